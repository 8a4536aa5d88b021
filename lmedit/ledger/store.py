"""The ledger's storage: one SQLite database (WAL mode) plus one patch file per edit, beside it.

Layout of a ledger directory:
    ledger.sqlite          tables `meta` (base model hash, model name), `edits` (one row per recorded edit),
                           `audits` (every audit report, with the reason it was run), `base_params`
                           (sha256 of the base value of every parameter an edit touches)
    patches/<uuid>.edit    each edit as written by `Edit.save()` (safetensors for weight edits)

Integrity rules:
  * Every write happens inside `BEGIN IMMEDIATE` (one writer at a time; others wait up to the busy
    timeout), so concurrent processes are serialised instead of failing with "database is locked".
  * A patch file is written (temp file + rename, by `Edit.save`) while the write lock is held, and its
    row is committed last. A process killed before the commit leaves no row; the file it may have left
    is unreferenced and is deleted by the next writer (under the same lock, so it can never delete a
    file another writer is about to commit).
  * Each row keeps the sha256 of its patch file; a file that changed on disk is refused when loaded.

Not handled: ledgers on network file systems (SQLite's WAL needs shared memory on one machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmedit.errors import LMEditError

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
DB_NAME = "ledger.sqlite"
PATCH_DIR = "patches"
BUSY_TIMEOUT_MS = 60_000
STATES = ("applied", "reverted")

# Test-only hook: when LMEDIT_LEDGER_TEST_PAUSE names a stage, the writer touches the file named by
# LMEDIT_LEDGER_TEST_MARKER and sleeps there, so a test can kill it at exactly that point.
_PAUSE_ENV, _MARKER_ENV = "LMEDIT_LEDGER_TEST_PAUSE", "LMEDIT_LEDGER_TEST_MARKER"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('applied', 'reverted')),
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    config TEXT NOT NULL,
    requests TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    patch TEXT NOT NULL UNIQUE,
    patch_sha256 TEXT NOT NULL,
    patch_bytes INTEGER NOT NULL,
    verdict TEXT,
    probes TEXT,
    info TEXT NOT NULL DEFAULT '{}',
    source TEXT NOT NULL DEFAULT 'edit'
);
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    edit_id INTEGER NOT NULL REFERENCES edits(id),
    created TEXT NOT NULL,
    reason TEXT NOT NULL,
    verdict TEXT NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS base_params (
    name TEXT PRIMARY KEY,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""


class LedgerError(LMEditError):
    """A ledger operation that cannot be done: wrong base model, unknown edit, corrupted patch, ..."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: Path) -> str:
    """sha256 of a patch: of the file's bytes, or for a directory (an edit kind saved as several files) of
    each file's relative name and bytes, in sorted order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def path_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def test_pause(stage: str) -> None:
    """Test-only: pause at `stage` when the test hook asks for it (see the module docstring)."""
    if os.environ.get(_PAUSE_ENV) != stage:
        return
    marker = os.environ.get(_MARKER_ENV)
    if marker:
        Path(marker).write_text(stage)
    time.sleep(600)


@dataclass(frozen=True)
class EditRow:
    """One recorded edit, as stored (JSON columns decoded)."""

    id: int
    created: str
    updated: str
    state: str
    kind: str
    method: str
    config: dict[str, Any]
    requests: list[dict[str, Any]]
    base_fingerprint: str
    patch: str
    patch_sha256: str
    patch_bytes: int
    verdict: str | None
    probes: list[dict[str, Any]] | None
    info: dict[str, Any]
    source: str

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> EditRow:
        data = dict(row)
        for key in ("config", "requests", "info"):
            data[key] = json.loads(data[key])
        data["probes"] = json.loads(data["probes"]) if data["probes"] else None
        return cls(**data)


class Store:
    """The SQLite database and patch directory of one ledger. Reads are plain queries; writes use `write()`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise LedgerError(f"{self.root} is a file; a ledger is a directory (it holds {DB_NAME} and {PATCH_DIR}/)")
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / DB_NAME, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")  # a committed edit survives a power cut, not only a crash
        self.db.execute("PRAGMA foreign_keys = ON")
        if self._format() != FORMAT_VERSION:  # a new ledger (or another format): create the schema under the lock
            with self.write(cleanup=False) as db:
                for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT the open transaction
                    if statement.strip():
                        db.execute(statement)
                version = self._format()
                if version is None:
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT_VERSION,))
                elif version != FORMAT_VERSION:
                    raise LedgerError(f"{self.root} is a ledger of format {version}; this lmedit reads {FORMAT_VERSION}")
        if self._orphans():
            self.cleanup(blocking=False)

    def _format(self) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return None
        return row[0] if row else None

    @property
    def patch_dir(self) -> Path:
        return self.root / PATCH_DIR

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self, *, cleanup: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (`BEGIN IMMEDIATE`): serialised with every other writer; rolled back on error.

        Example:
            with store.write() as db:
                db.execute("UPDATE edits SET state = 'reverted' WHERE id = ?", (3,))
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if cleanup:
                self._remove_orphans()
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def cleanup(self, *, blocking: bool = True) -> list[Path]:
        """Delete patch files no committed row references (left by a killed writer). Returns what was removed."""
        if not blocking:
            self.db.execute("PRAGMA busy_timeout = 0")
        try:
            with self.write(cleanup=False):
                return self._remove_orphans()
        except sqlite3.OperationalError as exc:  # another writer holds the lock: it will clean up itself
            if blocking or "locked" not in str(exc):
                raise
            return []
        finally:
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _orphans(self) -> list[Path]:
        known = {r[0] for r in self.db.execute("SELECT patch FROM edits")}
        return [p for p in self.patch_dir.iterdir() if p.name not in known]

    def _remove_orphans(self) -> list[Path]:
        removed = self._orphans()
        for path in removed:
            log.warning("removing %s: no committed ledger row refers to it (an interrupted write)", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return removed

    # ---- reads -----------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def rows(self, state: str | None = None) -> list[EditRow]:
        if state is None:
            cursor = self.db.execute("SELECT * FROM edits ORDER BY id")
        else:
            cursor = self.db.execute("SELECT * FROM edits WHERE state = ? ORDER BY id", (state,))
        return [EditRow.from_sql(r) for r in cursor]

    def row(self, edit_id: int) -> EditRow:
        found = self.db.execute("SELECT * FROM edits WHERE id = ?", (edit_id,)).fetchone()
        if found is None:
            ids = [r.id for r in self.rows()]
            raise LedgerError(f"no edit {edit_id} in the ledger {self.root} (edits: {ids or 'none'})")
        return EditRow.from_sql(found)

    def audits(self, edit_id: int) -> list[dict[str, Any]]:
        cursor = self.db.execute("SELECT * FROM audits WHERE edit_id = ? ORDER BY id", (edit_id,))
        return [{**dict(r), "report": json.loads(r["report"])} for r in cursor]

    def base_params(self) -> dict[str, dict[str, str]]:
        return {r["name"]: {"shape": r["shape"], "dtype": r["dtype"], "sha256": r["sha256"]}
                for r in self.db.execute("SELECT * FROM base_params")}

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]
