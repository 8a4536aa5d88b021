"""Helpers shared by the benchmark scripts: timing, peak memory, JSON output. Benchmarks print one JSON object."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


STARTER_CASES = "capital-0,landmark_city-0,spouse-0,antonym-0,official_language-0"  # the shipped configs' sweeps


def starter_counts(lm, records) -> dict[str, list[int]]:
    """[hits, probes] per group over `records`: a probe counts when its target is more likely than its foil
    (efficacy and paraphrase: target_new over target_true; neighbour kept: the true answer over target_new)."""
    from lmedit.eval.measure import measure

    out = {"efficacy": [0, 0], "paraphrase": [0, 0], "neighbour_kept": [0, 0]}
    for m in measure(lm, records, keep_dists=False):
        for group, key in (("rewrite", "efficacy"), ("paraphrase", "paraphrase"), ("neighborhood", "neighbour_kept")):
            s = m.scores[group]
            for t, f in zip(s.target_logprob, s.foil_logprob):
                out[key][0] += int(f is not None and t > f)
                out[key][1] += 1
    return out


def add_counts(total: dict[str, list[int]], part: dict[str, list[int]]) -> None:
    for k, (a, b) in part.items():
        total.setdefault(k, [0, 0])
        total[k][0] += a
        total[k][1] += b
