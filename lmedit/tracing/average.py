"""Averages over many facts: the indirect effect by token bucket and layer (the paper's Fig. 2).

Facts are traced one after another, or on Ray workers (`workers=N`, `lmedit.parallel`) with the same result:
fact `i` draws its noise from seed `seed + i` wherever it runs, and the averages are taken in the facts' order.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmedit.errors import LMEditError, RequestError
from lmedit.tokens import find_subject
from lmedit.tracing.engine import (
    BUCKETS,
    KINDS,
    ProgressFn,
    default_window,
    embedding_noise,
)
from lmedit.tracing.facts import Fact, builtin_facts, known_facts
from lmedit.tracing.plots import plot_average
from lmedit.tracing.single import encode_prompt, trace_kinds

if TYPE_CHECKING:
    from lmedit.models.load import LM
    from lmedit.parallel import WorkerPool

log = logging.getLogger(__name__)


def token_buckets(n_pos: int, first: int, last: int) -> dict[str, list[int]]:
    """Token positions of each of the paper's averaging buckets (a token may fall in two, e.g. a
    one-token subject is both its first and last token; an empty bucket is an empty list)."""
    return {
        "first subject": [first],
        "middle subject": list(range(first + 1, last)),
        "last subject": [last],
        "first subsequent": [last + 1] if last + 1 < n_pos else [],
        "further tokens": list(range(last + 2, n_pos - 1)),
        "last token": [n_pos - 1],
    }


@dataclass
class AverageTraceResult:
    """Average indirect effect over facts, by token bucket and layer, for each kind (the paper's Fig. 2).

    `mean[kind]` and `band[kind]` are (bucket, n_layers) lists: the mean indirect effect and the half-width
    of its 95% band (1.96 × standard error over facts); `counts[bucket]` is how many facts have that bucket.
    """

    kinds: list[str]
    buckets: list[str]
    mean: dict[str, list[list[float]]]
    band: dict[str, list[list[float]]]
    counts: dict[str, int]
    n_given: int
    n_known: int
    clean_prob: float
    corrupted_prob: float
    samples: int
    noise: float
    window: int
    model: str = ""
    known_only: bool = True

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, allow_nan=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AverageTraceResult:
        return cls(**json.loads(Path(path).read_text()))

    def plot(self, path: str | Path) -> list[Path]:
        return plot_average(self, path)


def average_trace(lm: LM, facts: Sequence[Fact] | None = None, *, kinds: Sequence[str] = KINDS,
                  samples: int = 10, noise: float | None = None, window: int | None = None, seed: int = 0,
                  buckets: Sequence[str] = BUCKETS, known_only: bool = True,
                  progress: ProgressFn | None = None, workers: int | WorkerPool = 0, ray_address: str | None = None,
                  worker_threads: int = 1) -> AverageTraceResult:
    """Average indirect effect over facts by token bucket (first/middle/last subject token, first
    subsequent, further, last token), with 95% bands, for each kind.

    Args:
        lm: the model bundle.
        facts: the facts; default `builtin_facts()`.
        kinds, samples, noise, window, seed: as in `trace`.
        buckets: the buckets to trace (tokens of other buckets are not run).
        known_only: keep only the facts the model gets right (as the paper does). When it gets none right
            (random test models), the model's own top prediction is traced instead, with a warning.
        progress: called as progress(facts done, facts total).
        workers: > 0: trace the facts on this many Ray actors (`lmedit.parallel`; `pip install 'lmedit[ray]'`),
            each loading the model again by `lm.name`, or a running `lmedit.parallel.WorkerPool` for `lm`; the
            result is the same as without (each fact keeps its own seed, and the averages are taken in the
            facts' order).
        ray_address: the Ray cluster to join (default: start a local instance, shut down afterwards).
        worker_threads: torch threads (and Ray CPUs) per worker.

    Returns:
        An `AverageTraceResult` (`n_known` says how many facts were kept).

    Raises:
        RequestError: no facts, or an unknown bucket.
        MissingDependencyError: `workers` without Ray installed.
    """
    facts = builtin_facts() if facts is None else list(facts)
    if not facts:
        raise RequestError("average_trace needs at least one fact")
    unknown = [b for b in buckets if b not in BUCKETS]
    if unknown:
        raise RequestError(f"unknown bucket(s) {unknown}; choose from {BUCKETS}")
    if workers:
        from lmedit.parallel import check_workers, require_ray

        check_workers(workers if isinstance(workers, int) else None, worker_threads)
        require_ray()
    n_layers = lm.n_layers
    window = default_window(n_layers) if window is None else window
    noise = embedding_noise(lm) if noise is None else noise
    kept = known_facts(lm, facts) if known_only else facts
    use_answers = True
    if known_only and not kept:
        log.warning("the model completes none of the %d facts correctly: tracing its own top predictions", len(facts))
        kept, use_answers = facts, False
    log.info("average trace over %d of %d facts (%s)", len(kept), len(facts),
             "known" if known_only and use_answers else "all")
    per_kind: dict[str, dict[str, list[torch.Tensor]]] = {k: {b: [] for b in buckets} for k in kinds}
    clean, corrupted = [], []
    task = _FactTask(kinds=tuple(kinds), buckets=tuple(buckets), samples=samples, noise=noise, window=window,
                     seed=seed, use_answers=use_answers)
    units = list(enumerate(kept))
    for done, (fact_clean, fact_corrupted, effects) in enumerate(
            _traced(lm, task, units, progress, workers, ray_address, worker_threads), start=1):
        clean.append(fact_clean)
        corrupted.append(fact_corrupted)
        for kind, by_bucket in effects.items():
            for bucket, effect in by_bucket.items():
                per_kind[kind][bucket].append(effect)
        if progress is not None and not workers:
            progress(done, len(kept))
    mean: dict[str, list[list[float]]] = {}
    band: dict[str, list[list[float]]] = {}
    for kind in kinds:
        rows_mean, rows_band = [], []
        for bucket in buckets:
            values = per_kind[kind][bucket]
            if not values:
                rows_mean.append([math.nan] * n_layers)
                rows_band.append([math.nan] * n_layers)
                continue
            stacked = torch.stack(values)  # (facts, n_layers)
            rows_mean.append(stacked.mean(0).tolist())
            sem = stacked.std(0) / math.sqrt(len(values)) if len(values) > 1 else torch.zeros(n_layers)
            rows_band.append((1.96 * sem).tolist())
        mean[kind], band[kind] = rows_mean, rows_band
    counts = {b: len(per_kind[kinds[0]][b]) for b in buckets} if kinds else {}
    return AverageTraceResult(kinds=list(kinds), buckets=list(buckets), mean=mean, band=band, counts=counts,
                              n_given=len(facts), n_known=len(kept) if use_answers else 0,
                              clean_prob=sum(clean) / len(clean), corrupted_prob=sum(corrupted) / len(corrupted),
                              samples=samples, noise=float(noise), window=window, model=lm.name,
                              known_only=known_only)


FactOutcome = tuple[float, float, dict[str, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class _FactTask:
    """One fact's trace, reduced to what the average needs: clean and corrupted P(answer), and per kind and
    bucket the indirect effect averaged over the bucket's tokens, (n_layers,). Fact `i` uses noise seed
    `seed + i` wherever it runs (here or on a Ray worker, `lmedit.parallel`)."""

    kinds: tuple[str, ...]
    buckets: tuple[str, ...]
    samples: int
    noise: float
    window: int
    seed: int
    use_answers: bool

    def setup(self, lm: LM) -> None:
        pass

    def run(self, lm: LM, unit: tuple[int, Fact]) -> FactOutcome:
        i, fact = unit
        ids = encode_prompt(lm, fact.text)
        span = find_subject(lm, fact.text, fact.subject)
        groups = {b: pos for b, pos in token_buckets(len(ids), span.first, span.last).items() if b in self.buckets}
        needed = sorted({t for pos in groups.values() for t in pos})
        results = trace_kinds(lm, fact.text, fact.subject, fact.answer if self.use_answers else None,
                              kinds=self.kinds, samples=self.samples, noise=self.noise, window=self.window,
                              seed=self.seed + i, tokens=needed)
        first = next(iter(results.values()))
        effects = {kind: {bucket: result.effect[pos].mean(0) for bucket, pos in groups.items() if pos}
                   for kind, result in results.items()}  # result.effect: (pos, n_layers)
        return first.clean_prob, first.corrupted_prob, effects

    def labels(self, unit: tuple[int, Fact]) -> list[str]:
        return [unit[1].text]


def _traced(lm: LM, task: _FactTask, units: list[tuple[int, Fact]], progress: ProgressFn | None,
            workers: int | WorkerPool, address: str | None, threads: int) -> Iterator[FactOutcome]:
    """Each fact's outcome, in the facts' order: traced here, or on `workers` Ray actors (progress counts facts
    as any actor finishes one). Facts whose worker died twice are an error naming them, after the others ran."""
    if not workers:
        for unit in units:
            yield task.run(lm, unit)
        return
    from lmedit.parallel import WorkerDied, WorkerPool

    finished = 0

    def on_done(_unit: tuple[int, Fact]) -> None:
        nonlocal finished
        finished += 1
        if progress is not None:
            progress(finished, len(units))

    failed: list[WorkerDied] = []
    with WorkerPool(lm, workers=workers, threads=threads, address=address) \
            if isinstance(workers, int) else nullcontext(workers) as pool:
        pool.check_model(lm)
        for _, outcome in pool.map(task, units, on_done=on_done):
            if isinstance(outcome, WorkerDied):
                failed.append(outcome)
            else:
                yield outcome
    if failed:
        names = "; ".join(repr(f.labels[0]) for f in failed)
        raise LMEditError(f"average trace: {len(failed)} fact(s) could not be traced, {failed[0].message}: {names}")
