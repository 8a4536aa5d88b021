"""Benchmark datasets, each registered in `lmedit.registry.datasets` and loaded into `EvalRecord`s.

    ds = load_dataset("counterfact", "counterfact-val.json")
    ds.records[0].requests[0]   # EditRequest("The mother tongue of {} is", "Danielle Darrieux", ...)
    ds.issues                   # records skipped, each naming file, record and field (also warned)

Registered: counterfact (ROME JSON and EasyEdit/MEND layouts), multi_counterfact, zsre, mquake, starter.
Each loader is a function `(path, issues) -> list[EvalRecord]` registered with metadata `filename` and
`url` (the default file). Loading checks duplicate case ids centrally. A bad record is skipped and
reported (a `DatasetWarning` per issue, and `Dataset.issues`); `strict=True` raises on the first one
instead; a file with no valid record is an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from lmedit.errors import LMEditError
from lmedit.eval.datasets.reading import DatasetError, DatasetWarning, Issue, Issues, resolve
from lmedit.eval.records import EvalRecord
from lmedit.registry import datasets

# Built-in loaders register themselves on import: one list, one place.
from lmedit.eval.datasets import counterfact, mquake, starter, zsre  # noqa: E402,F401  isort: skip


__all__ = ["Dataset", "DatasetError", "DatasetWarning", "Issue", "load_dataset"]


@dataclass
class Dataset:
    """Loaded records plus the problems found while loading."""

    name: str
    source: str
    records: list[EvalRecord]
    issues: list[Issue] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def load_dataset(name: str, path: str | Path | None = None, *, strict: bool = False,
                 limit: int | None = None) -> Dataset:
    """Load a registered dataset from `path` (file or URL) or its default location.

    Args:
        name: registry key (`lmedit ls datasets`), e.g. "counterfact".
        path: a local file or URL; default: the dataset's packaged or cached file.
        strict: raise on the first invalid record, instead of skipping it.
        limit: keep only the first `limit` valid records.

    Returns:
        The `Dataset`; `issues` lists skipped records (a line that is not JSON, a record that is not an
        object, a missing field or one of the wrong type, duplicate case ids, ...), each also warned as a
        `DatasetWarning`.

    Raises:
        DatasetError: unreadable file, no valid record in it, or (strict) the first invalid record.
        KeyError: unknown dataset name, with suggestions.
    """
    loader = datasets.get(name)
    meta = datasets.meta(name)
    if path is None and meta.get("default_path") is not None:
        path = meta["default_path"]()  # shipped with the package
    file = resolve(path, name=name, filename=meta.get("filename"), url=meta.get("url"))
    issues = Issues(str(file), strict=strict)
    try:
        records = loader(file, issues)
    except LMEditError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError) as exc:  # a plugin loader's slip
        raise DatasetError(f"{file}: the {name!r} loader cannot read this file ({type(exc).__name__}: {exc})") from None
    seen: dict[str, int] = {}
    unique = []
    for i, record in enumerate(records):
        if record.case_id in seen:
            issues.add(None, record.case_id, "case_id",
                       f"duplicate case id (first seen in record {seen[record.case_id]}, again in {record.source})")
            continue
        seen[record.case_id] = i
        unique.append(record)
    if not unique:
        first = f"; first: {str(issues.items[0]).removeprefix(f'{file}: ')}" if issues.items else ""
        raise DatasetError(f"{file} holds no valid {name} record ({len(issues.items)} invalid{first})")
    for issue in issues.items:
        warnings.warn(f"skipping {issue}", DatasetWarning, stacklevel=2)
    if limit is not None:
        unique = unique[:limit]
    return Dataset(name=name, source=str(file), records=unique, issues=issues.items)
