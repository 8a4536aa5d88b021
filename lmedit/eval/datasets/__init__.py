"""Benchmark datasets, each registered in `lmedit.registry.datasets` and loaded into `EvalRecord`s.

    ds = load_dataset("counterfact", "counterfact-val.json")
    ds.records[0].requests[0]   # EditRequest("The mother tongue of {} is", "Danielle Darrieux", ...)
    ds.issues                   # records skipped, each naming file, record and field

Registered: counterfact (ROME JSON and EasyEdit/MEND layouts), multi_counterfact, zsre, mquake, starter.
Each loader is a function `(path, issues) -> list[EvalRecord]` registered with metadata `filename` and
`url` (the default file). Loading checks duplicate case ids centrally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmedit.eval.datasets._io import DatasetError, Issue, Issues, resolve
from lmedit.eval.records import EvalRecord
from lmedit.registry import datasets

# Built-in loaders register themselves on import: one list, one place.
from lmedit.eval.datasets import counterfact, mquake, starter, zsre  # noqa: E402,F401  isort: skip

log = logging.getLogger(__name__)

__all__ = ["Dataset", "DatasetError", "Issue", "load_dataset"]


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
        strict: raise on the first load if any record is invalid, instead of skipping it.
        limit: keep only the first `limit` valid records.

    Returns:
        The `Dataset`; `issues` lists skipped records (missing fields, duplicate case ids, ...).

    Raises:
        DatasetError: unreadable file, or invalid records in strict mode (all of them listed).
        KeyError: unknown dataset name, with suggestions.
    """
    loader = datasets.get(name)
    meta = datasets.meta(name)
    if path is None and meta.get("default_path") is not None:
        path = meta["default_path"]()  # shipped with the package
    file = resolve(path, name=name, filename=meta.get("filename"), url=meta.get("url"))
    issues = Issues(str(file))
    records = loader(file, issues)
    seen: dict[str, int] = {}
    unique = []
    for i, record in enumerate(records):
        if record.case_id in seen:
            issues.add(None, record.case_id, "case_id",
                       f"duplicate case id (first seen in record {seen[record.case_id]}, again in {record.source})")
            continue
        seen[record.case_id] = i
        unique.append(record)
    if strict and issues.items:
        listed = "\n  ".join(str(i) for i in issues.items[:20])
        more = f"\n  ... and {len(issues.items) - 20} more" if len(issues.items) > 20 else ""
        raise DatasetError(f"{len(issues.items)} invalid record(s) in {file}:\n  {listed}{more}")
    for issue in issues.items[:5]:
        log.warning("skipping %s", issue)
    if len(issues.items) > 5:
        log.warning("skipping %d more invalid records of %s", len(issues.items) - 5, file)
    if limit is not None:
        unique = unique[:limit]
    return Dataset(name=name, source=str(file), records=unique, issues=issues.items)
