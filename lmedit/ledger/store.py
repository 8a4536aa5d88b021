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
    row is committed last. Before writing it the writer leaves a marker `.lmedit-pending-<patch name>`
    in the ledger directory and removes it after the commit. A process killed before the commit leaves
    no row; the patch file (and temp file) it may have left is named by its marker and is deleted by the
    next writer or opener (under the same lock, so it can never delete a file another writer is about to
    commit). A patch file no row and no marker knows is never deleted (only warned about): lmedit deletes
    nothing it cannot prove to be its own unfinished write. Stale temp files (`<patch>.tmp` in patches/,
    `.lmedit-import-*` scratch directories) are swept the same way.
  * A ledger directory whose ledger.sqlite is missing, empty, not SQLite, damaged, or SQLite without
    lmedit's tables, while patch files (or other data) are there, is refused with a `LedgerError` that says
    how to recover; nothing is created or deleted in it. Only an empty (or new) directory becomes a ledger.
  * Patch names read from the database must be names lmedit writes (`<32 hex>.edit`), so a damaged or
    hand-edited row cannot point outside patches/.
  * Each row keeps the sha256 of its patch file; a file that changed on disk is refused when loaded.

Not handled: ledgers on network file systems (SQLite's WAL needs shared memory on one machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
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
PENDING_PREFIX = ".lmedit-pending-"  # marker of a patch being written (see the module docstring)
IMPORT_PREFIX = ".lmedit-import-"  # scratch directory of `import_patch`, inside the ledger directory
_PATCH_NAME = re.compile(r"[0-9a-f]{32}\.edit")
# `Edit.save` writes `.<patch>.<pid>-<hex>.lmedit-tmp` (`lmedit.cache.atomic_write`), then renames it; lmedit
# before 0.2 wrote `<patch>.tmp`.
_PATCH_TMP = re.compile(r"[0-9a-f]{32}\.edit\.tmp|\.[0-9a-f]{32}\.edit\.\d+-[0-9a-f]{8}\.lmedit-tmp")
_IMPORT_TMP = re.compile(re.escape(IMPORT_PREFIX) + r"[A-Za-z0-9_]+")
_SQLITE_HEADER = b"SQLite format 3\x00"
_TABLES = {"meta", "edits", "audits", "base_params"}

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


def new_patch_name() -> str:
    return f"{uuid.uuid4().hex}.edit"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _recovery(root: Path, what: str, patches: list[Path]) -> str:
    db = root / DB_NAME
    return (f"{db} {what} but {len(patches)} patch file(s) are in {root / PATCH_DIR}; restore {DB_NAME} from a "
            f"backup (copy it into {root}), or move the patch files away to start a new ledger here "
            f"— lmedit never deletes them")


def preflight(root: Path) -> None:
    """Refuse a ledger directory that holds data but no usable ledger.sqlite, before anything is written.

    Raises:
        LedgerError: ledger.sqlite missing, empty, not SQLite, damaged or without lmedit's tables, while patch
            files (or other files) are in the directory.
    """
    if not root.is_dir():
        return
    db = root / DB_NAME
    patch_dir = root / PATCH_DIR
    patches = sorted(p for p in patch_dir.iterdir() if not _PATCH_TMP.fullmatch(p.name)) if patch_dir.is_dir() else []
    if not db.exists() or (db.is_file() and db.stat().st_size == 0):
        what = "is missing" if not db.exists() else "is empty (0 bytes)"
        if patches:
            raise LedgerError(_recovery(root, what, patches))
        other = sorted(p.name for p in root.iterdir()  # a concurrent opener's database, markers and scratch are fine
                       if p.name != PATCH_DIR and not p.name.startswith((DB_NAME, PENDING_PREFIX, IMPORT_PREFIX)))
        if other and not (db.exists() and db.stat().st_size > 0):  # (another process may have created it meanwhile)
            raise LedgerError(f"{root} is not a ledger: {DB_NAME} {what} and the directory holds other files "
                              f"({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); lmedit starts a new "
                              f"ledger only in an empty or new directory (restore {DB_NAME} from a backup if this "
                              "was a ledger)")
        return
    if not db.is_file():
        raise LedgerError(f"{db} is not a file; restore {DB_NAME} from a backup")
    with db.open("rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        if patches:
            raise LedgerError(_recovery(root, "is not an SQLite database (damaged or overwritten)", patches))
        raise LedgerError(f"{db} is not an SQLite database (damaged or overwritten); restore it from a backup, "
                          f"or move it away to start a new ledger in {root}")


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
        preflight(self.root)
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / DB_NAME, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
        try:
            self._open()
        except BaseException:
            self.db.close()
            raise

    def _open(self) -> None:
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        blank = self._check_database()  # before any pragma that writes to the file
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")  # a committed edit survives a power cut, not only a crash
        self.db.execute("PRAGMA foreign_keys = ON")
        if blank:  # a new ledger (an empty directory): create the schema under the lock
            with self.write(cleanup=False) as db:
                if not self._tables():  # else another process created it meanwhile
                    for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT the open transaction
                        if statement.strip():
                            db.execute(statement)
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT_VERSION,))
        version = self._format()
        if version != FORMAT_VERSION:
            raise LedgerError(f"{self.root} is a ledger of format {version}; this lmedit reads {FORMAT_VERSION}")
        unknown = self.unknown_patches()
        if unknown:
            log.warning("%d file(s) in %s belong to no recorded edit (%s); lmedit keeps them: move them away, or "
                        "restore the %s they belong to", len(unknown), self.patch_dir,
                        ", ".join(p.name for p in unknown[:3]) + (", ..." if len(unknown) > 3 else ""), DB_NAME)
        if self._orphans():
            self.cleanup(blocking=False)

    def _tables(self) -> set[str]:
        with self._readable():
            return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @contextmanager
    def _readable(self) -> Iterator[None]:
        """Damage that `PRAGMA quick_check` cannot see (a flipped byte in a stored text that is no longer UTF-8 or
        JSON) found on a read: refused with the recovery message, never a raw sqlite/JSON error, never repaired."""
        try:
            yield
        except LMEditError:
            raise
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise
            raise self._damaged(str(exc)) from None
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
            raise self._damaged(f"a stored value cannot be read: {exc}") from None

    def _damaged(self, reason: str) -> LedgerError:
        db = self.root / DB_NAME
        patches = [p for p in self.patch_dir.iterdir() if not _PATCH_TMP.fullmatch(p.name)]
        what = f"is damaged ({reason})"
        return LedgerError(_recovery(self.root, what, patches) if patches else
                           f"{db} {what}; restore it from a backup, or move it away to start a new ledger")

    def _check_database(self) -> bool:
        """Refuse a damaged or foreign database; True when it is blank (no tables: a new ledger)."""
        db = self.root / DB_NAME
        patches = [p for p in self.patch_dir.iterdir() if not _PATCH_TMP.fullmatch(p.name)]
        try:
            tables = self._tables()
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise
            what = f"is damaged ({exc})"
            raise LedgerError(_recovery(self.root, what, patches) if patches else
                              f"{db} {what}; restore it from a backup, or move it away to start a new ledger") from None
        if check != "ok":
            what = f"is damaged (integrity check: {check})"
            raise LedgerError(_recovery(self.root, what, patches) if patches else
                              f"{db} {what}; restore it from a backup, or move it away to start a new ledger")
        if not tables:
            if patches:
                raise LedgerError(_recovery(self.root, "is an SQLite database without lmedit's tables", patches))
            return True
        missing = _TABLES - tables
        if missing:
            what = f"is not an lmedit ledger database (no table(s) {', '.join(sorted(missing))})"
            raise LedgerError(_recovery(self.root, what, patches) if patches else
                              f"{db} {what}; use another directory for the ledger, or restore {DB_NAME} from a backup")
        return False

    def _format(self) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet (or a format value that is not text: refused by the caller)
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
        """Delete what killed writers left (see `_orphans`: never a patch file lmedit has no marker for).
        Returns what was removed."""
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

    def patch_path(self, name: str, edit_id: int | None = None) -> Path:
        """The patch file of a row. Refuses names lmedit never writes (they could point outside patches/)."""
        if not isinstance(name, str) or not _PATCH_NAME.fullmatch(name):
            of = f"the patch of edit {edit_id}" if edit_id is not None else "a patch"
            raise LedgerError(f"the ledger database {self.root / DB_NAME} names {of} {name!r}, which is not a patch "
                              f"name lmedit writes (<32 hex digits>.edit) and could point outside {self.patch_dir}; "
                              f"refusing to use it (the database was edited or damaged: restore {DB_NAME} from a backup)")
        return self.patch_dir / name

    def _known(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT patch FROM edits")}

    def pending(self, name: str) -> Path:
        """The marker of a patch being written (see the module docstring)."""
        return self.root / f"{PENDING_PREFIX}{name}"

    def begin_patch(self, name: str) -> Path:
        """Mark `name` as being written (inside a write transaction, before the file is written); returns its path."""
        marker = self.pending(name)
        with marker.open("w") as f:
            f.write(now())
            f.flush()
            os.fsync(f.fileno())
        return self.patch_dir / name

    def end_patch(self, name: str) -> None:
        """The row of `name` is committed (or the write failed and the file is gone): drop its marker."""
        self.pending(name).unlink(missing_ok=True)

    def unknown_patches(self) -> list[Path]:
        """Files in patches/ that no row, no pending marker and no temp-name pattern accounts for (kept, never deleted)."""
        known = self._known()
        pending = {p.name[len(PENDING_PREFIX):] for p in self.root.glob(f"{PENDING_PREFIX}*")}
        return sorted(p for p in self.patch_dir.iterdir()
                      if p.name not in known and p.name not in pending and not _PATCH_TMP.fullmatch(p.name))

    def _orphans(self) -> list[Path]:
        """What a killed writer left: patch files (and their markers) named by a marker but with no committed row,
        stale markers, `Edit.save` temp files and import scratch directories. Never a patch without a marker."""
        known = self._known()
        found: list[Path] = []
        for marker in self.root.glob(f"{PENDING_PREFIX}*"):
            name = marker.name[len(PENDING_PREFIX):]
            if _PATCH_NAME.fullmatch(name) and name not in known:
                found += [p for p in (self.patch_dir / name,) if p.exists() or p.is_symlink()]
            found.append(marker)
        found += [p for p in self.patch_dir.iterdir() if _PATCH_TMP.fullmatch(p.name)]
        found += [p for p in self.root.iterdir() if _IMPORT_TMP.fullmatch(p.name) and p.is_dir()]
        return found

    def _remove_orphans(self) -> list[Path]:
        removed = self._orphans()
        for path in removed:
            if not path.name.startswith(PENDING_PREFIX):
                log.warning("removing %s: left by an interrupted write (no committed ledger row refers to it)", path)
            _remove(path)
        return removed

    # ---- reads -----------------------------------------------------------------------------------

    def set_base(self, fingerprint: str, model: str) -> None:
        """Set the ledger's base model (inside a `write()` transaction) when this is its first edit; else check it.

        Raises:
            LedgerError: the ledger is for another base model.
        """
        base = self.meta("base_fingerprint")
        if base is None:
            self.db.execute("INSERT INTO meta VALUES ('base_fingerprint', ?)", (fingerprint,))
            self.db.execute("INSERT INTO meta VALUES ('model', ?)", (model,))
        elif base != fingerprint:
            raise LedgerError(f"model hash mismatch: the ledger {self.root} is for base {base} "
                              f"({self.meta('model')}), not {fingerprint} ({model})")

    def insert_edit(self, patch: str, *, kind: str, method: str, config: dict[str, Any],
                    requests: list[dict[str, Any]], base_fingerprint: str, verdict: str | None,
                    probes: list[dict[str, Any]] | None, info: dict[str, Any], source: str,
                    new_params: dict[str, tuple[Any, str, str]]) -> int:
        """Insert one edit row (inside a `write()` transaction), its patch already in place. Returns its id.

        `new_params`: parameter name -> (shape, dtype, sha256) of base values first touched by this edit.
        """
        for param, (shape, dtype, sha) in new_params.items():
            self.db.execute("INSERT OR IGNORE INTO base_params VALUES (?, ?, ?, ?)",
                            (param, json.dumps(list(shape)), dtype, sha))
        path = self.patch_path(patch)
        stamp = now()
        cursor = self.db.execute(
            "INSERT INTO edits (created, updated, state, kind, method, config, requests, base_fingerprint, patch, "
            "patch_sha256, patch_bytes, verdict, probes, info, source) "
            "VALUES (?, ?, 'applied', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (stamp, stamp, kind, method, json.dumps(config, default=str), json.dumps(requests), base_fingerprint, patch,
             file_sha256(path), path_size(path), verdict, json.dumps(probes) if probes is not None else None,
             json.dumps(info, default=str), source))
        return int(cursor.lastrowid)  # type: ignore[arg-type]

    def add_audit(self, edit_id: int, reason: str, verdict: str, report: dict[str, Any]) -> None:
        """Store an audit report of edit `edit_id` (inside a `write()` transaction); it becomes the edit's verdict."""
        self.db.execute("INSERT INTO audits (edit_id, created, reason, verdict, report) VALUES (?, ?, ?, ?, ?)",
                        (edit_id, now(), reason, verdict, json.dumps(report, default=str)))
        self.db.execute("UPDATE edits SET verdict = ? WHERE id = ?", (verdict, edit_id))

    def meta(self, key: str) -> str | None:
        with self._readable():
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None

    def rows(self, state: str | None = None) -> list[EditRow]:
        with self._readable():
            if state is None:
                cursor = self.db.execute("SELECT * FROM edits ORDER BY id")
            else:
                cursor = self.db.execute("SELECT * FROM edits WHERE state = ? ORDER BY id", (state,))
            return [EditRow.from_sql(r) for r in cursor]

    def row(self, edit_id: int) -> EditRow:
        with self._readable():
            found = self.db.execute("SELECT * FROM edits WHERE id = ?", (edit_id,)).fetchone()
        if found is None:
            ids = [r.id for r in self.rows()]
            raise LedgerError(f"no edit {edit_id} in the ledger {self.root} (edits: {ids or 'none'})")
        with self._readable():
            return EditRow.from_sql(found)

    def audits(self, edit_id: int) -> list[dict[str, Any]]:
        with self._readable():
            cursor = self.db.execute("SELECT * FROM audits WHERE edit_id = ? ORDER BY id", (edit_id,))
            return [{**dict(r), "report": json.loads(r["report"])} for r in cursor]

    def base_params(self) -> dict[str, dict[str, str]]:
        with self._readable():
            return {r["name"]: {"shape": r["shape"], "dtype": r["dtype"], "sha256": r["sha256"]}
                    for r in self.db.execute("SELECT * FROM base_params")}

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]
