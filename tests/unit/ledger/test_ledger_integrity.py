"""Integrity: a process killed mid-commit leaves a consistent ledger; concurrent writers are serialised."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ledger_helpers import LENIENT, REQUESTS, random_edit, same_weights, snapshot

import lmedit
from lmedit.ledger import Ledger
from lmedit.testing import tiny_lm

HERE = Path(__file__).parent

# Runs in a child process: record one edit into the ledger, with the test hook pausing the commit.
CHILD = """
import sys
sys.path.insert(0, {here!r})
import lmedit
from ledger_helpers import LENIENT, REQUESTS, random_edit
from lmedit.ledger import Ledger
lm = lmedit.load({model!r})
ledger = Ledger({ledger!r}, audit_config=LENIENT)
ledger.record(lm, random_edit(lm, REQUESTS[1], seed=1))
print("committed")
"""


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_killed_during_commit_leaves_a_consistent_ledger(tmp_path, model_dir):
    """Kill a writer after its patch file is written, and another after its row is inserted (uncommitted)."""
    lm = lmedit.load(str(model_dir))
    stages = ("patch_saved", "row_inserted")
    ledgers = {}
    for stage in stages:
        ledgers[stage] = Ledger(tmp_path / stage, audit_config=LENIENT)
        ledgers[stage].record(lm, random_edit(lm, REQUESTS[0], seed=0))
    model_files = _digest(model_dir)
    children = {}
    for stage in stages:  # both children at once: each spends seconds importing torch before it pauses
        env = {**os.environ, "LMEDIT_LEDGER_TEST_PAUSE": stage, "OMP_NUM_THREADS": "1",
               "LMEDIT_LEDGER_TEST_MARKER": str(tmp_path / f"{stage}.paused")}
        code = CHILD.format(here=str(HERE), model=str(model_dir), ledger=str(ledgers[stage].path))
        children[stage] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE)
    try:
        for stage, child in children.items():
            marker = tmp_path / f"{stage}.paused"
            for _ in range(1800):
                if marker.exists() or child.poll() is not None:
                    break
                threading.Event().wait(0.1)
            assert marker.exists(), child.communicate()[1].decode()[-2000:]
            # the child's patch file is on disk, its row not committed
            assert len(list((ledgers[stage].path / "patches").iterdir())) == 2
            child.send_signal(signal.SIGKILL)
            child.wait()
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()

    for stage in stages:
        reopened = Ledger(ledgers[stage].path, audit_config=LENIENT)
        assert reopened.store.integrity() == "ok"
        assert [r.id for r in reopened.entries()] == [1], stage  # the killed commit left no row
        assert [p.name for p in (reopened.path / "patches").iterdir()] == [reopened.entry(1).patch]  # nor a file
        fresh = lmedit.load(str(model_dir))
        reopened.apply(fresh)
        expected = lmedit.load(str(model_dir))
        random_edit(expected, REQUESTS[0], seed=0).apply(expected)
        assert same_weights(snapshot(fresh), snapshot(expected))
        assert reopened.record(fresh, random_edit(fresh, REQUESTS[2], seed=2)).edit_id == 2  # and it goes on
    assert _digest(model_dir) == model_files  # the model's files were never written


def test_concurrent_writers_are_serialised(tmp_path):
    path = tmp_path / "ledger"
    Ledger(path)  # create the database once; both writers open it afterwards
    errors: list[BaseException] = []

    models = [tiny_lm("llama") for _ in range(2)]  # built here: tiny_lm seeds torch's global generator

    def writer(offset: int) -> None:
        try:
            lm = models[offset // 10]
            ledger = Ledger(path, audit_config=LENIENT)
            for i in range(3):
                ledger.record(lm, random_edit(lm, REQUESTS[i], seed=offset + i, layer=i % 2))
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(10 * k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ledger = Ledger(path, audit_config=LENIENT)
    rows = ledger.entries()
    assert [r.id for r in rows] == [1, 2, 3, 4, 5, 6] and ledger.store.integrity() == "ok"
    assert sorted(p.name for p in (path / "patches").iterdir()) == sorted(r.patch for r in rows)
    fresh = tiny_lm("llama")
    assert ledger.apply(fresh) == [1, 2, 3, 4, 5, 6]


def test_a_writer_waits_for_the_one_holding_the_lock(tmp_path):
    lm = tiny_lm("llama")
    first = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    first.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    second = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    done = threading.Event()

    def revert() -> None:
        second.revert(1)
        done.set()

    with first.store.write():
        thread = threading.Thread(target=revert)
        thread.start()
        assert not done.wait(0.5)  # blocked behind the open write transaction
        assert first.entry(1).state == "applied"
    thread.join()
    assert done.is_set() and first.entry(1).state == "reverted"
