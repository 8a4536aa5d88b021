"""A ledger never loses a patch: damaged databases are refused, stale temp files swept, stored text rendered safely."""

import hashlib
import json
import os
import sqlite3
import zipfile

import pytest
from ledger_helpers import LENIENT, REQUESTS, random_edit

from lmedit.cli.main import main
from lmedit.errors import LMEditError
from lmedit.ledger import Ledger
from lmedit.ledger.store import DB_NAME, LedgerError
from lmedit.testing import tiny_lm


def _make(tmp_path, lm, n=2):
    path = tmp_path / "ledger"
    with Ledger(path, audit_config=LENIENT) as ledger:
        for i in range(n):
            assert ledger.record(lm, random_edit(lm, REQUESTS[i], seed=i)).recorded
        patch = ledger.export_patch(tmp_path / "edits.lmpatch")
    return path, patch


def _hashes(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((path / "patches").rglob("*")) if p.is_file()}


def _delete(db):
    db.unlink()


def _empty(db):
    db.write_bytes(b"")


def _random_bytes(db):
    db.write_bytes(os.urandom(8192))


def _truncated(db):
    db.write_bytes(db.read_bytes()[:100])


def _no_tables(db):
    db.unlink()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE x (a)")
    con.execute("DROP TABLE x")
    con.commit()
    con.close()


def _foreign_tables(db):
    db.unlink()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (a)")
    con.commit()
    con.close()


DAMAGE = {"deleted": _delete, "emptied": _empty, "random bytes": _random_bytes, "truncated": _truncated,
          "sqlite without tables": _no_tables, "sqlite with other tables": _foreign_tables}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_database_with_patches_is_refused_and_nothing_is_lost(tmp_path, lm, capsys, damage):
    path, patch = _make(tmp_path, lm)
    db = path / DB_NAME
    for side in ("-wal", "-shm"):
        (path / (DB_NAME + side)).unlink(missing_ok=True)
    DAMAGE[damage](db)
    before = _hashes(path)
    assert len(before) == 2
    db_before = db.read_bytes() if db.exists() else None
    listing = sorted(p.name for p in path.iterdir())

    with pytest.raises(LedgerError) as info:
        Ledger(path)
    assert isinstance(info.value, LMEditError)
    message = str(info.value)
    assert "2 patch file(s)" in message and "backup" in message and "never deletes" in message
    with pytest.raises(LedgerError):
        Ledger(path, audit_config=LENIENT)  # every operation (list, revert, export, import, ...) opens it first
    with pytest.raises(LedgerError):
        Ledger(tmp_path / "other").replay(lm, into=path)

    d = str(path)
    commands = [["ledger", "list", "--ledger", d], ["ledger", "show", "1", "--ledger", d],
                ["ledger", "revert", "1", "--no-audit", "--ledger", d], ["ledger", "apply", "--ledger", d],
                ["ledger", "export", "--ledger", d, "--patch", str(tmp_path / "out.lmpatch")],
                ["ledger", "import", str(patch), "--ledger", d],
                ["ledger", "replay", "--ledger", d, "--onto", "nowhere"],
                ["edit", "--ledger", d, "--prompt", "Where is {}", "--subject", "The Louvre", "--target-new", "Rome"],
                ["audit", "1", "--ledger", d], ["export-model", str(tmp_path / "model-out"), "--ledger", d]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "backup" in lines[0] and "patch file" in lines[0], (argv, err)

    assert _hashes(path) == before  # every patch survives byte-identical
    assert sorted(p.name for p in path.iterdir()) == listing  # nothing created (no new ledger.sqlite, no -wal)
    assert (db.read_bytes() if db.exists() else None) == db_before
    assert not (tmp_path / "out.lmpatch").exists() and not (tmp_path / "model-out").exists()


def test_only_an_empty_directory_becomes_a_ledger(tmp_path):
    (tmp_path / "fresh").mkdir()
    Ledger(tmp_path / "fresh").close()
    Ledger(tmp_path / "new").close()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LedgerError, match="not a ledger"):
        Ledger(busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_stale_temp_files_are_swept_on_open_and_patches_kept(tmp_path, lm):
    path, _ = _make(tmp_path, lm)
    before = _hashes(path)
    stale = path / "patches" / ("ab" * 16 + ".edit.tmp")
    stale.write_bytes(b"half a patch")
    scratch = path / ".lmedit-import-x1y2z3"
    (scratch / "0").mkdir(parents=True)
    (scratch / "0" / "data").write_bytes(b"x")
    unknown = path / "patches" / ("cd" * 16 + ".edit")  # no row and no pending marker: kept, never deleted
    unknown.write_bytes(b"someone's patch")
    with Ledger(path, audit_config=LENIENT) as ledger:
        assert not stale.exists() and not scratch.exists()
        assert unknown.exists() and ledger.store.unknown_patches() == [unknown]
        assert [r.id for r in ledger.entries()] == [1, 2]
        ledger.record(lm, random_edit(lm, REQUESTS[2], seed=2))  # a write keeps it too
    assert unknown.read_bytes() == b"someone's patch"
    after = _hashes(path)
    assert {k: v for k, v in after.items() if k in before} == before


def _rewrite_manifest(patch, out, change):
    with zipfile.ZipFile(patch) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                change(manifest)
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)


@pytest.mark.parametrize("prompt", ["{1}", "{}{}", "Where is {0} {}"])
def test_stored_prompt_with_braces_never_breaks_listing(tmp_path, lm, capsys, prompt):
    _, patch = _make(tmp_path, lm, n=1)
    bad = tmp_path / "bad.lmpatch"
    _rewrite_manifest(patch, bad, lambda m: m["edits"][0]["requests"][0].update(prompt=prompt))
    with pytest.raises(LedgerError, match="invalid request"):
        Ledger(tmp_path / "copy").import_patch(bad)
    assert main(["ledger", "import", str(bad), "--ledger", str(tmp_path / "copy2")]) == 2
    assert "invalid request" in capsys.readouterr().err

    # a row stored by an older lmedit (or written by hand) still lists and shows
    path = tmp_path / "ledger"
    con = sqlite3.connect(path / DB_NAME)
    con.execute("UPDATE edits SET requests = ? WHERE id = 1",
                (json.dumps([{"prompt": prompt, "subject": "[bold]X", "target_new": "[red]Y"}]),))
    con.commit()
    con.close()
    capsys.readouterr()
    assert main(["ledger", "list", "--ledger", str(path)]) == 0
    assert prompt.replace("{}", "[bold]X", 1)[:4] in capsys.readouterr().out
    assert main(["ledger", "show", "1", "--ledger", str(path)]) == 0
    assert "[red]Y" in capsys.readouterr().out


def test_patch_name_outside_the_ledger_is_refused(tmp_path, lm, capsys):
    path, _ = _make(tmp_path, lm, n=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not touch")
    con = sqlite3.connect(path / DB_NAME)
    con.execute("UPDATE edits SET patch = ? WHERE id = 1", ("../../secret.txt",))
    con.commit()
    con.close()
    with Ledger(path, audit_config=LENIENT) as ledger:
        with pytest.raises(LedgerError, match="not a patch name"):
            ledger.load_edit(1)
        with pytest.raises(LedgerError, match="not a patch name"):
            ledger.apply(tiny_lm("llama"))  # a fresh model: the patches are loaded again
        with pytest.raises(LedgerError, match="not a patch name"):
            ledger.export_patch(tmp_path / "x.lmpatch")
    assert main(["ledger", "show", "1", "--ledger", str(path)]) == 2
    assert "not a patch name" in capsys.readouterr().err
    assert secret.read_text() == "do not touch"
