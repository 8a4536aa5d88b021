"""`lmedit eval --workers N` and `lmedit trace --average … --workers N` on Ray: the same rows, files and summary
as the serial run, resume, a worker that dies, and the refusals (sequential mode, Ray not installed).

One local Ray instance (2 CPUs, no dashboard) serves every test of this file: starting Ray costs seconds. Each
parallel run still starts its own 2 actors, which load the tiny model from a directory, as workers load the
serial run's `--model`. The tests that need Ray skip when it is not installed (`pip install 'lmedit[ray]'`).
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest

from lmedit.cli.main import main
from lmedit.parallel import EXIT_ON_ENV
from lmedit.testing import tiny_lm

TIMING = {"edit_seconds", "elapsed_s", "edit_seconds_mean"}  # wall-clock fields: differ between any two runs
EVAL = ["eval", "--method", "ft", "--dataset", "starter", "--generation", "3"]


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The tiny Llama as a local HF directory: what `--model` names, for the serial run and every worker."""
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    lm = tiny_lm("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def untimed(value):
    """A JSON value without its wall-clock fields, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]


def summary(run_dir) -> dict:
    return untimed(json.loads((run_dir / "summary.json").read_text()))


@pytest.fixture(scope="module")
def lm(model):
    import lmedit

    return lmedit.load(model)


@pytest.fixture(scope="module")
def pool(ray_session, lm):
    """Two actors holding the tiny model, shared by the tests that call the API (each actor loads it once)."""
    from lmedit.parallel import WorkerPool

    with WorkerPool(lm, workers=2) as workers:
        yield workers


@pytest.fixture(scope="module")
def serial(lm, tmp_path_factory):
    """The serial runs of 4 records, single and batch mode (batches of 2): the reference."""
    import lmedit

    out = tmp_path_factory.mktemp("serial")
    lmedit.evaluate(lm, "starter", "ft", limit=4, generation_tokens=3, out_dir=out / "ft-single")
    lmedit.evaluate(lm, "starter", "ft", limit=4, generation_tokens=3, mode="batch", batch_size=2,
                    out_dir=out / "ft-batch")
    return out


def same_run(run_dir, reference) -> None:
    assert [untimed(r) for r in lines(run_dir)] == [untimed(r) for r in lines(reference)]
    assert summary(run_dir) == summary(reference)
    assert (run_dir / "skipped.jsonl").read_text() == (reference / "skipped.jsonl").read_text()


def test_cli_workers_give_the_serial_rows_files_and_summary(model, pool, serial, tmp_path, capsys, monkeypatch):
    import lmedit.eval.report
    import lmedit.parallel

    # The report and its plots (seconds; tested in tests/unit/eval) are left out: this test is about the run.
    monkeypatch.setattr(lmedit.eval.report, "write_report", lambda runs, out: {"markdown": out, "html": out})
    # The CLI's pool is the shared one (starting two more actors costs seconds); the arguments it asked for are kept.
    asked = []

    @contextmanager
    def shared_pool(lm, **kwargs):
        asked.append((lm.name, kwargs))
        yield pool

    monkeypatch.setattr(lmedit.parallel, "WorkerPool", shared_pool)
    out = tmp_path / "par"
    assert main([*EVAL, "--model", model, "--limit", "4", "--out", str(out), "--workers", "2"]) == 0
    assert asked == [(model, {"workers": 2, "threads": 1, "address": None})]
    same_run(out / "ft-single", serial / "ft-single")
    assert "error" not in capsys.readouterr().err


def test_batch_mode_runs_its_batches_on_the_workers(lm, pool, serial, tmp_path):
    import lmedit

    events = []
    lmedit.evaluate(lm, "starter", "ft", limit=4, generation_tokens=3, mode="batch", batch_size=2,
                    out_dir=tmp_path / "b", workers=pool, progress=events.append)
    same_run(tmp_path / "b", serial / "ft-batch")
    assert [e.done for e in events] == [2, 4] and {e.total for e in events} == {4}


def test_resume_skips_finished_records_as_the_serial_run_does(lm, pool, serial, tmp_path):
    import lmedit

    out = tmp_path / "run"
    shutil.copytree(serial / "ft-single", out)
    first, second, *_ = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text(first + "\n" + second[:25])  # interrupted in the middle of the second line
    events = []
    result = lmedit.evaluate(lm, "starter", "ft", limit=4, generation_tokens=3, out_dir=out, resume=True,
                             workers=pool, progress=events.append)
    # Records 2-4 ran (progress counts them as the workers finish); record 1's line is kept byte for byte.
    assert [e.done for e in events] == [1, 2, 3] and {e.total for e in events} == {3}
    assert (out / "records.jsonl").read_text().splitlines()[0] == first
    assert [untimed(r) for r in result.rows] == [untimed(r) for r in lines(serial / "ft-single")]
    same_run(out, serial / "ft-single")


def test_a_worker_that_dies_is_retried_then_its_record_reported(lm, pool, serial, tmp_path, monkeypatch):
    import lmedit

    reference = lines(serial / "ft-single")
    doomed = reference[1]["case_id"]
    monkeypatch.setenv(EXIT_ON_ENV, doomed)  # each actor handed this record exits, as a killed worker would
    out = tmp_path / "crash"
    result = lmedit.evaluate(lm, "starter", "ft", limit=4, generation_tokens=3, out_dir=out, workers=pool)
    assert [untimed(r) for r in lines(out)] == [untimed(r) for r in reference if r["case_id"] != doomed]
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["reason"], s["case_id"]) for s in skipped] == [("worker_died", doomed)]
    assert "2 attempts" in skipped[0]["message"]
    assert result.summary["skipped"]["by_reason"] == {"worker_died": 1} and result.summary["n_records"] == 3
    monkeypatch.delenv(EXIT_ON_ENV)
    resumed = lmedit.evaluate(lm, "starter", "ft", limit=4, generation_tokens=3, out_dir=out, workers=pool,
                              resume=True)  # the two replacement actors run the record that failed
    assert len(resumed.rows) == 4 and {r["case_id"] for r in resumed.rows} == {r["case_id"] for r in reference}


def test_average_trace_with_workers_equals_serial(lm, pool):
    from lmedit.tracing import average_trace, builtin_facts

    facts = builtin_facts()[:3]
    events = []
    serial = average_trace(lm, facts, samples=2)
    parallel = average_trace(lm, facts, samples=2, workers=pool, progress=lambda done, total: events.append(done))
    assert json.dumps(asdict(parallel)) == json.dumps(asdict(serial))
    assert events == [1, 2, 3]


def test_a_model_with_edits_applied_is_refused(lm, pool):
    import lmedit
    from lmedit.errors import LMEditError

    request = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    edit = lmedit.edit(lm, [request], method="ft", apply=False)
    with edit.applied(lm):  # the workers' copies would not have it: their rows would not be this model's
        with pytest.raises(LMEditError, match=r"1 edit\(s\) applied"):
            lmedit.evaluate(lm, "starter", "noop", limit=1, workers=pool)


def test_cli_trace_checks_workers_before_loading(capsys):
    assert main(["trace", "--average", "facts.jsonl", "--ray-address", "auto"]) == 2
    assert "--ray-address goes with --workers" in one_error(capsys)
    assert main(["trace", "The Space Needle is in", "--subject", "The Space Needle", "--workers", "2"]) == 2
    assert "--average" in one_error(capsys)


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_sequential_mode_refuses_workers(capsys):
    code = main([*EVAL, "--model", "no-such-model", "--mode", "sequential", "--workers", "2"])
    assert code == 2
    assert "sequential edits depend on each other" in one_error(capsys)  # before any model loads


def test_workers_without_ray_name_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main([*EVAL, "--model", "no-such-model", "--workers", "2"]) == 2
    assert "pip install 'lmedit[ray]'" in one_error(capsys)
    assert main(["trace", "--average", "facts.jsonl", "--workers", "2"]) == 2
    assert "pip install 'lmedit[ray]'" in one_error(capsys)
    import lmedit
    from lmedit.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"lmedit\[ray\]"):
        lmedit.evaluate(tiny_lm("llama"), "starter", "noop", limit=1, workers=2)


def test_importing_lmedit_does_not_import_ray():
    """Ray is imported inside the functions that start workers only: no module of lmedit imports it when loaded."""
    import lmedit

    offenders = []
    for path in Path(lmedit.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        # Statements run at import: the module's own, and those in its top-level if/try blocks.
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If | ast.Try):
                stack += node.body + node.orelse + getattr(node, "finalbody", []) + \
                    [s for h in getattr(node, "handlers", []) for s in h.body]
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
