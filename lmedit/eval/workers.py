"""Single and batch modes on Ray workers: `evaluate(..., workers=N)` and `lmedit eval --workers N`.

The harness plans the units (a record in single mode, a chunk in batch mode; on resume, only those not
done) and keeps the rows; this module runs the units on a `lmedit.parallel.WorkerPool`, whose actors rebuild
the editor from its registry name and resolved settings and run the same unit functions as the serial loop
(`_single_unit`, `_batch_unit`), so a row is the same wherever it was made. Outcomes come back in the order
of the units, so records.jsonl gets the serial run's lines in the serial run's order.

Not handled: sequential mode (each edit is made on the model the earlier ones edited: refused), editors
that are not registered (a worker could not rebuild them: refused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lmedit.errors import LMEditError
from lmedit.eval.harness import _UNITS, EvalConfig
from lmedit.eval.records import EvalRecord
from lmedit.eval.text import Tfidf
from lmedit.registry import editors
from lmedit.settings import resolve_editor

if TYPE_CHECKING:
    from lmedit.editors import Editor
    from lmedit.models.load import LM
    from lmedit.parallel import WorkerPool

log = logging.getLogger(__name__)

Outcome = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (rows, skipped entries) of one unit


def check_parallel(config: EvalConfig, workers: int | WorkerPool, threads: int) -> None:
    """Refuse Ray workers where records are not independent, and without Ray installed (before any work)."""
    from lmedit.parallel import check_workers, require_ray

    check_workers(workers if isinstance(workers, int) else None, threads)
    if config.mode == "sequential":
        raise LMEditError("sequential mode cannot run on several workers: sequential edits depend on each other "
                          "(each is made on the model the earlier ones edited); use single or batch mode, or "
                          "no workers")
    require_ray()


@dataclass
class EvalTask:
    """What a Ray worker runs (`lmedit.parallel.Task`): single-mode records or batch-mode chunks, with the
    editor rebuilt from its registry name and resolved settings, so every worker edits as the caller would."""

    method: str
    editor_config: dict[str, Any]
    config: EvalConfig
    tfidf: Tfidf
    editor: Editor | None = None  # built by setup(), in the worker

    def setup(self, lm: LM) -> None:
        self.editor, _ = resolve_editor(self.method, lm, dict(self.editor_config))

    def run(self, lm: LM, unit: list[EvalRecord]) -> Outcome:
        return _UNITS[self.config.mode][1](lm, self.editor, unit, self.config, self.tfidf)

    def labels(self, unit: list[EvalRecord]) -> list[str]:
        return [r.case_id for r in unit]


def run_on_workers(lm: LM, editor: Editor, units: Sequence[list[EvalRecord]], config: EvalConfig, tfidf: Tfidf, *,
                   workers: int | WorkerPool, threads: int = 1, address: str | None = None,
                   on_done: Callable[[list[EvalRecord]], None] | None = None) -> Iterator[Outcome]:
    """Each unit's (rows, skipped entries), in the order of `units`, run on Ray workers.

    Args:
        workers: how many workers to start (a pool for this call), or a running `WorkerPool` for `lm`.
        threads, address: as `WorkerPool`'s, for a pool started here.
        on_done: called with each unit as any worker finishes it (progress).

    A unit whose worker died on both attempts gives a "worker_died" skipped entry per record.

    Raises:
        LMEditError: `editor` is not a registered editor, or the pool holds another model.
    """
    from lmedit.parallel import WorkerDied, WorkerPool

    name = editors.name_of(editor)
    if name is None:
        raise LMEditError(f"Ray workers rebuild the editor by its registry name; {type(editor).__name__} is not "
                          "registered (register it, or run without workers)")
    editor_config = asdict(editor.config) if hasattr(editor.config, "__dataclass_fields__") else {}
    rebuilt, _ = resolve_editor(name, None, dict(editor_config))  # as each worker will build it
    if rebuilt.config != editor.config:
        raise LMEditError(f"{name}'s settings do not survive the trip to the Ray workers ({editor.config!r} came "
                          f"back as {rebuilt.config!r}); run without workers")
    task = EvalTask(name, editor_config, config, tfidf)
    with WorkerPool(lm, workers=workers, threads=threads, address=address) \
            if isinstance(workers, int) else nullcontext(workers) as pool:
        pool.check_model(lm)
        for _, outcome in pool.map(task, units, on_done=on_done):
            if isinstance(outcome, WorkerDied):
                log.warning("case(s) %s failed: %s", ", ".join(outcome.labels), outcome.message)
                yield [], [{"reason": "worker_died", "case_id": c, "message": outcome.message} for c in outcome.labels]
            else:
                yield outcome
