"""lmedit's on-disk cache: where it lives, how files are written (atomically) and read back (checked).

lmedit keeps what is expensive to compute under `cache_root()` (`$LMEDIT_CACHE`, else
`$XDG_CACHE_HOME/lmedit`, else `~/.cache/lmedit`): key statistics, sampled corpora, context prefixes,
null-space projections, knowledge-neuron sets, suggested layers, converted built-in models, downloaded
datasets. A cache is data that someone else may have written (a shared or restored directory) or that a
killed process cut short, so it is never trusted:
  * directories are created private (0700, whatever the umask); files are written 0600;
  * every write goes through `atomic_write`: a temporary file in the same directory, named
    `.<name>.<pid>-<random>.lmedit-tmp`, fsync, then `os.replace`. Readers never see a partial file, and
    temporaries a killed writer left (older than `STALE_AFTER_S`) are swept when the directory is next
    read or written;
  * every cached artefact carries its provenance (what it was computed from: model fingerprint, corpus,
    layer, settings, and `CACHE_FORMAT`) and a sha256 checksum, in the safetensors metadata
    (`write_tensors`) or in a JSON envelope {"format", "provenance", "sha256", "payload"} (`write_json`);
  * `read_tensors` / `read_json` return None for a file that fails any check (unreadable, truncated,
    another format, checksum, provenance, tensor names/shape/dtype, non-finite values, a payload the
    caller's check rejects) after one `CacheWarning` naming the file and the reason; the caller then
    recomputes and overwrites it. Nothing read from the cache can run code (safetensors and JSON only).

Usage:
    provenance = {"kind": "key_second_moment", "model": lm.fingerprint, "layer": 3}
    tensors = read_tensors(path, provenance, {"C": ((d_mlp, d_mlp), torch.float32)})
    if tensors is None:
        write_tensors(path, {"C": compute()}, provenance)

Not handled: locking (two processes computing the same artefact both compute it and the last rename wins;
the results are equal), size limits or eviction, checksums of converted model directories (those are
published by one directory rename, `publish_dir`, and not checked on load).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

CACHE_FORMAT = 1          # bump when what a cache file holds changes: older files then fail the provenance check
FORMAT = "lmedit-cache"   # the "format" of a JSON envelope and of a safetensors file's metadata
TMP_SUFFIX = ".lmedit-tmp"  # every temporary file or directory in the cache ends with this
STALE_AFTER_S = 3600.0    # a temporary untouched this long belongs to a killed writer

Check = Callable[[Any], "str | None"]  # payload -> None if usable, else the reason it is not


class CacheWarning(UserWarning):
    """A cache file failed its check and is not used: it is recomputed and overwritten."""


class _Rejected(Exception):
    """Internal: why a cache file is not used."""


def cache_root() -> Path:
    """Root of lmedit's on-disk cache: `$LMEDIT_CACHE`, else `$XDG_CACHE_HOME/lmedit`, else `~/.cache/lmedit`.

    Only the path: directories are created (0700) when something is written.
    """
    env = os.environ.get("LMEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lmedit"


def ensure_dir(path: str | Path) -> Path:
    """Create directory `path` and its missing parents with mode 0700; existing directories are left as they are.

    Raises:
        OSError: a component is a file, or is not writable.
    """
    path = Path(path)
    missing = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # created meanwhile by another process
            continue
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    return path


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def sweep(directory: str | Path) -> int:
    """Remove temporaries (`*.lmedit-tmp`) older than `STALE_AFTER_S` from `directory`; returns how many.

    Only entries of that name, in that directory, are touched; a symlink is removed, never followed.
    """
    now = time.time()
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue  # possibly a writer at work
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    return removed


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function that writes to a binary file) to `path`, all or nothing.

    The bytes go to a temporary file (0600) in the same directory, which is fsynced and then renamed over
    `path`; on any error the temporary is removed and `path` is untouched. The directory is created (0700)
    if needed, and stale temporaries in it are swept first.

    Raises:
        OSError: the directory or file cannot be written (and whatever `data`'s function raises).
    """
    path = Path(path)
    ensure_dir(path.parent)
    sweep(path.parent)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


@contextmanager
def temp_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A private scratch directory `.<name>.<pid>-<random>.lmedit-tmp` in `parent`, removed on exit.

    For artefacts written as a whole directory by another library (a converted model): build it inside,
    then `publish_dir` it. A killed process's scratch directory is swept like a temporary file.

        with temp_dir(cache_root() / "models", "gemma3-270m") as scratch:
            model.save_pretrained(scratch / "out")
            publish_dir(scratch / "out", target)
    """
    parent = ensure_dir(parent)
    sweep(parent)
    path = _temp_name(parent / name)
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish_dir(source: Path, target: Path) -> bool:
    """Rename the finished directory `source` to `target` (0700). Returns False if `target` already exists
    (another process published first: theirs is kept)."""
    os.chmod(source, 0o700)
    try:
        source.rename(target)
    except OSError:
        if target.is_dir():
            return False
        raise
    return True


# --- provenance and checksums ---------------------------------------------------------------------
def _canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces); ValueError for NaN/inf, TypeError for non-JSON types."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance as stored (and compared): JSON-normalised, with the cache format version."""
    return json.loads(_canonical({**provenance, "cache_format": CACHE_FORMAT}))


def _check_provenance(stored: Any, expected: dict[str, Any]) -> None:
    if not isinstance(stored, dict):
        raise _Rejected("it has no provenance")
    if stored != expected:
        key = next(k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k))
        raise _Rejected(f"it was computed for {key}={stored.get(key)!r}, not {expected.get(key)!r}")


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _json_digest(payload: Any) -> str:
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def _warn(path: Path, reason: str) -> None:
    warnings.warn(f"cache file {path} is not used ({reason}); recomputing it", CacheWarning, stacklevel=3)


def _write_or_warn(path: Path, data: bytes) -> None:
    """A cache that cannot be written costs time, not correctness: warn and go on."""
    try:
        atomic_write(path, data)
    except OSError as exc:
        warnings.warn(f"cache file {path} could not be written ({exc.strerror or exc}); continuing without it",
                      CacheWarning, stacklevel=3)


# --- safetensors files ----------------------------------------------------------------------------
def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], provenance: Mapping[str, Any],
                  extra: Mapping[str, str] | None = None) -> None:
    """Write `tensors` atomically as safetensors with provenance, checksum and `extra` in the metadata.

    Non-finite tensors are never written (a warning says so); callers raise their own error first.
    """
    path = Path(path)
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    bad = [name for name, t in cpu.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(f"cache file {path} is not written: tensors {bad} have non-finite values", CacheWarning,
                      stacklevel=2)
        return
    metadata = {**(extra or {}), "format": FORMAT, "provenance": _canonical(_provenance(provenance)),
                "sha256": tensor_digest(cpu)}
    _write_or_warn(path, save_safetensors(cpu, metadata=metadata))


def read_tensors(path: str | Path, provenance: Mapping[str, Any],
                 expected: Mapping[str, tuple[tuple[int | None, ...], torch.dtype]]) -> dict[str, torch.Tensor] | None:
    """The tensors of cache file `path` if it passes every check, else None (after a `CacheWarning`).

    Args:
        path: the cache file; a missing file gives None without a warning.
        provenance: what the caller is asking for; must equal what the file was computed from.
        expected: tensor name -> (shape, dtype); the file must hold exactly these (a None in a shape: any size
            along that axis, for sizes known only once computed). Float tensors must be finite.
    """
    return _checked(Path(path), lambda p: _read_tensors(p, _provenance(provenance), expected))


def _checked(path: Path, read: Any) -> Any:
    """`read(path)`, or None (with a warning naming the file and the reason) when the file fails a check;
    a missing file gives None without a warning. Stale temporaries beside it are swept first."""
    if not os.path.lexists(path):
        return None
    sweep(path.parent)
    try:
        return read(path)
    except _Rejected as rejected:
        _warn(path, str(rejected))
        return None


def _read_tensors(path: Path, provenance: dict[str, Any],
                  expected: Mapping[str, tuple[tuple[int | None, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Rejected(f"unreadable: {exc.strerror or exc}") from None
    if len(data) < 8:
        raise _Rejected(f"truncated: {len(data)} bytes")
    (n_header,) = struct.unpack("<Q", data[:8])
    if n_header > len(data) - 8:
        raise _Rejected("truncated: the header runs past the end of the file")
    try:
        header = json.loads(data[8:8 + n_header])
    except (ValueError, UnicodeDecodeError):
        raise _Rejected("not a safetensors file") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise _Rejected("no lmedit provenance metadata (not an lmedit cache file, or written by an older lmedit)")
    try:
        stored = json.loads(metadata.get("provenance", ""))
    except ValueError:
        stored = None
    _check_provenance(stored, provenance)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise _Rejected(f"truncated or damaged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if metadata.get("sha256") != tensor_digest(tensors):
        raise _Rejected("checksum mismatch")
    if set(tensors) != set(expected):
        raise _Rejected(f"it holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        if (tensor.dim() != len(shape) or tensor.dtype != dtype
                or any(want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True))):
            raise _Rejected(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {tuple(shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _Rejected(f"tensor {name!r} has non-finite values")
    return tensors


# --- JSON files -----------------------------------------------------------------------------------
def write_json(path: str | Path, payload: Any, provenance: Mapping[str, Any]) -> None:
    """Write `payload` atomically in an envelope {"format", "provenance", "sha256", "payload"}.

    A payload with NaN/inf is never written (a warning says so).
    """
    path = Path(path)
    try:
        digest = _json_digest(payload)
    except ValueError:
        warnings.warn(f"cache file {path} is not written: it would hold a non-finite number", CacheWarning,
                      stacklevel=2)
        return
    envelope = {"format": FORMAT, "provenance": _provenance(provenance), "sha256": digest, "payload": payload}
    _write_or_warn(path, json.dumps(envelope, ensure_ascii=False, allow_nan=False).encode())


def read_json(path: str | Path, provenance: Mapping[str, Any], check: Check | None = None) -> Any | None:
    """The payload of JSON cache file `path` if it passes every check, else None (after a `CacheWarning`).

    Args:
        path: the cache file; a missing file gives None without a warning.
        provenance: what the caller is asking for; must equal what the file was computed from.
        check: payload -> None if the payload is usable (type, length, ranges), else the reason it is not.
    """
    return _checked(Path(path), lambda p: _read_json(p, _provenance(provenance), check))


def _read_json(path: Path, provenance: dict[str, Any], check: Check | None) -> Any:
    try:
        envelope = json.loads(path.read_bytes())
    except OSError as exc:
        raise _Rejected(f"unreadable: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Rejected(f"not JSON (truncated?): {exc}") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT or "payload" not in envelope:
        raise _Rejected("not an lmedit cache envelope (not an lmedit cache file, or written by an older lmedit)")
    _check_provenance(envelope.get("provenance"), provenance)
    payload = envelope["payload"]
    try:
        digest = _json_digest(payload)
    except ValueError:
        raise _Rejected("it holds a non-finite number") from None
    if envelope.get("sha256") != digest:
        raise _Rejected("checksum mismatch")
    reason = check(payload) if check is not None else None
    if reason:
        raise _Rejected(reason)
    return payload


# --- payload checks shared by callers -------------------------------------------------------------
def is_int(value: Any, low: int = 0, high: int | None = None) -> bool:
    """An int (not a bool) with low <= value (< high when given)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value < high))


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe(value: Any) -> str:
    """A short name of a payload's type, for reasons: "a dict", "a list of 3 items"."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return {dict: "a JSON object", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value),
                                                                                           f"a {type(value).__name__}")
