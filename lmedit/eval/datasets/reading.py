"""Reading benchmark files (JSON array or JSON lines, local path or URL) and collecting per-record problems.

A file is a JSON array of records, or JSON lines (one record per line; a file holding a single JSON
object is one record). Every loader reports a bad record through `Issues.add(index, case_id, field,
message)`; the message names the file, the record (index and case id) and the field. A record is bad
when it is not an object, a line is not JSON, or a field is missing or of the wrong type; it is skipped,
and the load goes on (`load_dataset` warns and lists the issues). In strict mode the first issue fails
the load. Loaders parse one record at a time through `each_record`, whose parse function raises
`BadField` for a field it cannot use (the helpers `string`, `strings`, `mapping`, `items` check types);
any other slip on a record's content (KeyError, TypeError...) is reported as an issue too, never raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmedit.cache import atomic_write, cache_root
from lmedit.errors import LMEditError, MissingFileError
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.eval.records import EvalRecord

log = logging.getLogger(__name__)


class DatasetError(LMEditError, ValueError):
    """A benchmark file that cannot be read, that holds no valid record, or (in strict mode) has an invalid one."""


class DatasetWarning(UserWarning):
    """A dataset record that was skipped; the text is its `Issue` (file, record index, case id, field)."""


class BadField(Exception):
    """Raised while parsing one record: `field` cannot be used (`message` says what was expected)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
        return f"{self.file}: {where}: " + (f"field {self.field!r}: " if self.field else "") + self.message

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "index": self.index, "case_id": self.case_id, "field": self.field,
                "message": self.message}


class Issues:
    """Collects `Issue`s for one file; with `strict`, the first one raises instead.

    Raises (from `add`, strict only):
        DatasetError: the issue, as one line.
    """

    def __init__(self, file: str, *, strict: bool = False) -> None:
        self.file = file
        self.strict = strict
        self.items: list[Issue] = []

    def add(self, index: int | None, case_id: Any, field: str, message: str) -> None:
        issue = Issue(self.file, index, None if case_id is None else shown(case_id, 40, quote=False), field, message)
        if self.strict:
            raise DatasetError(f"invalid record (--strict): {issue}")
        self.items.append(issue)


def shown(value: Any, limit: int = 60, *, quote: bool = True) -> str:
    """`value` for a message: repr (or str), cut to `limit` characters (a record may hold megabytes)."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def fetch(url: str, timeout: float = 60.0) -> Path:
    """Download `url` once into `$LMEDIT_CACHE/data/<sha256 of the URL>/<file name>` and return the local path.

    Keyed by the whole URL, so two URLs that end in the same file name never share a cached copy.

    Raises:
        DatasetError: offline or the server refused, with the URL in the message.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    name = name if name.strip(".") else "download"
    target = cache_root() / "data" / hashlib.sha256(url.encode()).hexdigest()[:32] / name
    if target.is_file():
        return target

    def download(f) -> None:
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)

    try:
        atomic_write(target, download)
    except OSError as exc:
        raise DatasetError(f"could not download {url} ({exc}); pass a local file with --data PATH") from exc
    return target


def resolve(source: str | Path | None, *, name: str, filename: str | None, url: str | None) -> Path:
    """The local file for a dataset: an explicit path or URL, else `$LMEDIT_DATA/<filename>`, else the URL (its copy in the cache).

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
    if filename and os.environ.get("LMEDIT_DATA"):
        path = Path(os.environ["LMEDIT_DATA"]).expanduser() / filename
        if path.exists():
            return path
    if url:
        return fetch(url)  # its copy in the cache, found by the URL's hash
    raise DatasetError(f"dataset {name!r} has no default file; pass one with --data PATH")


def read_records(path: Path, issues: Issues | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (index, object) from a JSON array file or a JSON-lines file (a single object is one record).

    Args:
        path: the file.
        issues: where a JSON-lines line that is not JSON is reported (and skipped; it keeps its index);
            without it, such a line raises.

    Raises:
        DatasetError: unreadable file, a JSON array file that is not valid JSON (with the line), or (without
            `issues`) a line that is not JSON.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # too deeply nested, integers too long
            raise DatasetError(f"{path}: invalid JSON ({shown(str(exc), 100, quote=False)})") from None
        yield from enumerate(data)
        return
    if stripped.startswith("{"):
        try:  # one object, on one line (one-record JSON lines) or spread over several: one record
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = None  # JSON lines (or damaged): read line by line below
        if isinstance(data, dict):
            yield 0, data
            return
    index = 0
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            message = f"line {lineno} is not valid JSON ({getattr(exc, 'msg', None) or shown(str(exc), 80, quote=False)})"
            if issues is None:
                raise DatasetError(f"{path}: {message}; expected a JSON array or one record per line") from None
            issues.add(index, None, "", f"{message}; expected one JSON record per line")
        else:
            yield index, obj
        index += 1


def text_of(value: Any) -> Any:
    """ROME stores answers as {"str": ..., "id": ...}; plain strings pass through."""
    return value["str"] if isinstance(value, dict) and "str" in value else value


def require(obj: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """The names in `fields` that are missing from `obj` or empty."""
    return [f for f in fields if f not in obj or obj[f] in (None, "", [])]


def case_id_of(raw: dict[str, Any], index: int, *, required: bool = False) -> str | int:
    """A record's case id: its `case_id` (a string or an integer), else its index (unless `required`).

    Raises:
        BadField: missing while required, or neither a non-empty string nor an integer.
    """
    if "case_id" not in raw:
        if required:
            raise BadField("case_id", "missing")
        return index
    value = raw["case_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise BadField("case_id", f"must be a non-empty string or an integer, got {shown(value)}")
    return value


def string(value: Any, field: str, *, optional: bool = False) -> str | None:
    """`value` if it is a non-empty string (None for a missing optional value).

    Raises:
        BadField: anything else.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadField(field, f"must be a non-empty string, got {shown(value)}")
    return value


def strings(value: Any, field: str) -> tuple[str, ...]:
    """`value` if it is a list of strings (a missing value is an empty list).

    Raises:
        BadField: not a list, or an item that is not a string.
    """
    for i, item in enumerate(items(value, field)):
        if not isinstance(item, str):
            raise BadField(f"{field}[{i}]", f"must be a string, got {shown(item)}")
    return tuple(value or ())


def items(value: Any, field: str) -> list[Any]:
    """`value` if it is a list (a missing value is an empty list). Raises BadField otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadField(field, f"must be a list, got {type(value).__name__}")
    return value


def mapping(value: Any, field: str) -> dict[str, Any]:
    """`value` if it is a JSON object. Raises BadField otherwise."""
    if not isinstance(value, dict):
        raise BadField(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def each_record(path: Path, issues: Issues, parse: Callable[[int, str | int, dict[str, Any]], EvalRecord | None],
                *, fields: tuple[str, ...] = (), case_id_required: bool = False) -> list[EvalRecord]:
    """The records `parse(index, case_id, raw)` makes of the objects in `path`; each bad record is one issue.

    Skipped with an issue: a line that is not JSON, a record that is not an object, a bad case id, a missing
    field of `fields`, a `BadField` from `parse`, and any other error `parse` makes on the record's content.
    `parse` may also report its own issue and return None.
    """
    records = []
    for index, raw in read_records(path, issues):
        if not isinstance(raw, dict):
            issues.add(index, None, "", f"must be a JSON object, got {type(raw).__name__}")
            continue
        case_id: str | int | None = None
        try:
            case_id = case_id_of(raw, index, required=case_id_required)
            missing = require(raw, fields)
            if missing:
                raise BadField(missing[0], "missing" if len(missing) == 1 else f"missing (also {missing[1:]})")
            record = parse(index, case_id, raw)
        except BadField as exc:
            issues.add(index, case_id, exc.field, exc.message)
            continue
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:  # a check the parser lacks
            if isinstance(exc, LMEditError):
                raise
            issues.add(index, case_id, "", f"malformed record ({type(exc).__name__}: {shown(str(exc), 80, quote=False)})")
            continue
        if record is not None:
            records.append(record)
    return records


def make_request(issues: Issues, index: int, case_id: Any, field: str, prompt: Any, subject: Any,
                 target_new: Any, target_true: Any) -> EditRequest | None:
    """An `EditRequest`, or None after recording why the fields cannot make one.

    Accepts filled prompts (EasyEdit layout) by putting `{}` where the subject occurs.
    """
    values = {"prompt": prompt, "subject": subject, "target_new": target_new}
    for key, value in values.items():
        if not isinstance(value, str) or not value.strip():
            issues.add(index, case_id, f"{field}.{key}" if field else key,
                       f"must be a non-empty string, got {shown(value)}")
            return None
    if target_true is not None and not isinstance(target_true, str):
        issues.add(index, case_id, f"{field}.target_true" if field else "target_true",
                   f"must be a string, got {shown(target_true)}")
        return None
    if "{}" not in prompt:
        if subject not in prompt:
            issues.add(index, case_id, f"{field}.subject" if field else "subject",
                       f"subject {shown(subject)} does not occur in the prompt {shown(prompt)}")
            return None
        prompt = prompt.replace(subject, "{}", 1)
    try:
        return EditRequest(prompt=prompt, subject=subject, target_new=target_new.strip(),
                           target_true=target_true.strip() if target_true else None)
    except LMEditError as exc:  # RequestError, and whatever EditRequest's own validation raises
        issues.add(index, case_id, field or "prompt", str(exc))
        return None
