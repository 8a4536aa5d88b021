"""Reading benchmark files (JSON array or JSON lines, local path or URL) and collecting per-record problems.

Every loader reports a bad record through `Issues.add(index, case_id, field, message)`; the message
names the file, the record (index and case id) and the field. In strict mode the whole load fails with
all problems listed; otherwise the bad records are skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmedit.errors import LMEditError, MissingFileError, RequestError
from lmedit.models.load import cache_dir
from lmedit.types import EditRequest

log = logging.getLogger(__name__)


class DatasetError(LMEditError, ValueError):
    """A benchmark file that cannot be read, or (in strict mode) one with invalid records."""


@dataclass(frozen=True)
class Issue:
    """One record that was skipped: where it is and what is wrong with it."""

    file: str
    index: int | None
    case_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"record {self.index}" if self.index is not None else "record"
        if self.case_id is not None:
            where += f" (case_id {self.case_id})"
        return f"{self.file}: {where}: field {self.field!r}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "index": self.index, "case_id": self.case_id, "field": self.field,
                "message": self.message}


class Issues:
    """Collects `Issue`s for one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Issue] = []

    def add(self, index: int | None, case_id: Any, field: str, message: str) -> None:
        self.items.append(Issue(self.file, index, None if case_id is None else str(case_id), field, message))


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def fetch(url: str, timeout: float = 60.0) -> Path:
    """Download `url` once into `$LMEDIT_CACHE/data/` and return the local path.

    Raises:
        DatasetError: offline or the server refused, with the URL in the message.
    """
    target = cache_dir() / "data" / url.rstrip("/").rsplit("/", 1)[-1]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"could not download {url} ({exc}); pass a local file with --data PATH") from exc
    tmp.replace(target)
    return target


def resolve(source: str | Path | None, *, name: str, filename: str | None, url: str | None) -> Path:
    """The local file for a dataset: an explicit path or URL, else `$LMEDIT_DATA/<filename>`, the cache, the URL.

    Raises:
        MissingFileError: (a `FileNotFoundError`) an explicit path that does not exist.
        DatasetError: an explicit path that is a directory; nothing given and no default is reachable.
    """
    if source is not None:
        if is_url(source):
            return fetch(str(source))
        path = Path(source).expanduser()
        if not path.exists():
            raise MissingFileError(f"dataset file {path} does not exist")
        if path.is_dir():
            raise DatasetError(f"dataset file {path} is a directory; pass the JSON or JSONL file with --data")
        return path
    candidates = []
    if filename:
        if os.environ.get("LMEDIT_DATA"):
            candidates.append(Path(os.environ["LMEDIT_DATA"]).expanduser() / filename)
        candidates.append(cache_dir() / "data" / filename)
    for path in candidates:
        if path.exists():
            return path
    if url:
        return fetch(url)
    raise DatasetError(f"dataset {name!r} has no default file; pass one with --data PATH")


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (index, object) from a JSON array file or a JSON-lines file.

    Raises:
        DatasetError: invalid JSON (with file and line) or a top-level value that is not a list.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        yield from enumerate(data)
        return
    if stripped.startswith("{") and "\n" not in stripped.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        raise DatasetError(f"{path}: expected a JSON array or JSON lines of records, got one object with keys "
                           f"{sorted(data)[:8]}")
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); expected a JSON array "
                               f"or one record per line") from exc
        yield index, obj
        index += 1


def text_of(value: Any) -> Any:
    """ROME stores answers as {"str": ..., "id": ...}; plain strings pass through."""
    return value["str"] if isinstance(value, dict) and "str" in value else value


def require(obj: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """The names in `fields` that are missing from `obj` or empty."""
    return [f for f in fields if f not in obj or obj[f] in (None, "", [])]


def checked_records(path: Path, issues: Issues, fields: tuple[str, ...]) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """Yield (index, case_id, record) for the JSON objects of `path` that have every field in `fields`.

    Non-objects and records missing a field are recorded in `issues` and skipped.
    """
    for index, raw in read_records(path):
        if not isinstance(raw, dict):
            issues.add(index, None, "", f"must be a JSON object, got {type(raw).__name__}")
            continue
        case_id = raw.get("case_id", index)
        missing = require(raw, fields)
        if missing:
            issues.add(index, case_id, missing[0], "missing" if len(missing) == 1 else f"missing (also {missing[1:]})")
            continue
        yield index, case_id, raw


def make_request(issues: Issues, index: int, case_id: Any, field: str, prompt: Any, subject: Any,
                 target_new: Any, target_true: Any) -> EditRequest | None:
    """An `EditRequest`, or None after recording why the fields cannot make one.

    Accepts filled prompts (EasyEdit layout) by putting `{}` where the subject occurs.
    """
    values = {"prompt": prompt, "subject": subject, "target_new": target_new}
    for key, value in values.items():
        if not isinstance(value, str) or not value.strip():
            issues.add(index, case_id, f"{field}.{key}" if field else key, f"must be a non-empty string, got {value!r}")
            return None
    if target_true is not None and not isinstance(target_true, str):
        issues.add(index, case_id, f"{field}.target_true" if field else "target_true",
                   f"must be a string, got {target_true!r}")
        return None
    if "{}" not in prompt:
        if subject not in prompt:
            issues.add(index, case_id, f"{field}.subject" if field else "subject",
                       f"subject {subject!r} does not occur in the prompt {prompt!r}")
            return None
        prompt = prompt.replace(subject, "{}", 1)
    try:
        return EditRequest(prompt=prompt, subject=subject, target_new=target_new.strip(),
                           target_true=target_true.strip() if target_true else None)
    except RequestError as exc:
        issues.add(index, case_id, field or "prompt", str(exc))
        return None
