"""Aggregating per-record metrics: means with 95% bootstrap intervals, and ROME's harmonic-mean score.

Intervals are percentile bootstrap intervals over records (Efron & Tibshirani 1993): resample the
records with replacement `n_boot` times (seeded) and take the 2.5% and 97.5% quantiles of the mean.
The score is ROME's "Score" column (arXiv:2202.05262 Table 4): the harmonic mean of efficacy,
paraphrase and neighborhood scores; its interval resamples records jointly.

Not handled: paired tests between methods (compare intervals, or the per-record JSONL, yourself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (as a score with a failed component should be)."""
    values = [float(v) for v in values]
    if not values or min(values) <= 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def bootstrap_mean(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """{"mean", "lo", "hi", "n"} of `values` with a percentile bootstrap interval (None entries dropped)."""
    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return {"mean": float(x.mean()), "lo": float(np.quantile(means, alpha)), "hi": float(np.quantile(means, 1 - alpha)),
            "n": int(x.size)}


def score_of(rows: Sequence[dict[str, Any]], state: str, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ROME's Score: harmonic mean of the means of ES, PS and NS over `rows[*][state]`, with a bootstrap interval."""
    table = np.array([[np.nan if r[state].get(k) is None else r[state][k] for k in SCORE_PARTS] for r in rows],
                     dtype=np.float64).reshape(len(rows), len(SCORE_PARTS))
    usable = ~np.isnan(table).all(axis=0)
    if not len(rows) or not usable.any():
        return {"mean": None, "lo": None, "hi": None, "n": 0, "parts": []}
    table = table[:, usable]
    parts = [p for p, u in zip(SCORE_PARTS, usable) if u]

    def hm(t: np.ndarray) -> float:
        return harmonic_mean(list(np.nanmean(t, axis=0)))

    rng = np.random.default_rng(seed)
    boots = [hm(table[rng.integers(0, len(table), size=len(table))]) for _ in range(n_boot)]
    boots = [b for b in boots if not np.isnan(b)]
    return {"mean": hm(table), "lo": float(np.quantile(boots, 0.025)), "hi": float(np.quantile(boots, 0.975)),
            "n": len(table), "parts": parts}


def summarize_rows(rows: Sequence[dict[str, Any]], names: Sequence[str], *, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Per state ("unedited", "edited"): every metric's mean and interval, plus the harmonic-mean score."""
    out: dict[str, Any] = {}
    for state in ("unedited", "edited"):
        metrics = {name: bootstrap_mean([r[state].get(name) for r in rows], n_boot=n_boot, seed=seed) for name in names}
        out[state] = {"metrics": metrics, "score": score_of(rows, state, n_boot=n_boot, seed=seed)}
    return out


def curves(rows: Sequence[dict[str, Any]], names: Sequence[str], *, kind: str, n_boot: int = 1000,
           seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Sequential curves: for each metric, one point per checkpoint (n_edits, mean, lo, hi, n) over rows of `kind`."""
    by_checkpoint: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == kind:
            by_checkpoint.setdefault(int(r["n_edits"]), []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        points = []
        for n_edits in sorted(by_checkpoint):
            stats = bootstrap_mean([r["edited"].get(name) for r in by_checkpoint[n_edits]], n_boot=n_boot, seed=seed)
            if stats["n"]:
                points.append({"n_edits": n_edits, **stats})
        if points:
            out[name] = points
    return out
