"""Plots of evaluation runs (matplotlib, Agg backend; each figure as PNG and SVG).

  metric_bars      one panel per headline metric: a bar per method (unedited first) with its 95% interval
  sequential       metric vs number of edits for sequential runs (edited records, and drift of unrelated ones)
  health           per edit of a sequential run: update norm, ROME denominator, probe-text loss; flagged edits red
  loud_facts       per record, neighborhood magnitude vs Specificity+ magnitude (arXiv:2305.17553): points
                   far below the diagonal are edits that leak into neighbours once the new fact is mentioned

Not handled: interactive plots (a front end draws its own from the records).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

if TYPE_CHECKING:
    from lmedit.eval.report import Run

BAR_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "specificity_plus_score",
               "neighborhood_kl", "essence_drift", "implication_accuracy", "efficacy_acc", "neighborhood_acc")
CURVE_METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "specificity_plus_score",
                 "neighborhood_kl", "efficacy_acc")
DRIFT_METRICS = ("efficacy_score", "rewrite_kl", "essence_drift", "neighborhood_score")


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def _label(run: Run, name: str) -> str:
    return run.summary["metrics"].get(name, {}).get("label", name)


def _line_label(run: Run, runs: list[Run]) -> str:
    """The run's method, with its directory's parent added when another run has the same method (e.g. two configs)."""
    method = run.summary["run"]["method"]
    same = [r for r in runs if r.summary["run"]["method"] == method]
    return method if len(same) == 1 else f"{method} [{run.path.parent.name}]"


def metric_bars(runs: list[Run], out: Path) -> list[Path]:
    """Bars with 95% intervals per metric and method, the unedited model first."""
    names = [n for n in BAR_METRICS if any(r.summary["edited"]["metrics"].get(n, {}).get("n") for r in runs)]
    if not names:
        return []
    series = [("unedited", runs[0].summary["unedited"])] + [(r.label, r.summary["edited"]) for r in runs]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        for i, (label, state) in enumerate(series):
            s = state["metrics"].get(name, {})
            if s.get("mean") is None:
                continue
            err = [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]]
            ax.bar(i, s["mean"], yerr=err, capsize=4, color=colors[i % len(colors)], label=label)
        ax.set_title(f"{_label(runs[0], name)} ({name})", fontsize=9)
        ax.set_xticks(range(len(series)), [lab for lab, _ in series], rotation=30, ha="right", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _save(fig, out, "metric_bars")


def sequential(runs: list[Run], out: Path) -> list[Path]:
    """Metric vs number of edits, one line per sequential run, with interval bands; drift in a second figure."""
    seq = [r for r in runs if r.summary.get("curves")]
    paths: list[Path] = []
    for key, names, title in (("curves", CURVE_METRICS, "sequential_curves"),
                              ("drift_curves", DRIFT_METRICS, "sequential_drift")):
        present = [n for n in names if any(n in r.summary.get(key, {}) for r in seq)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.2), squeeze=False)
        for ax, name in zip(axes.flat, present):
            for run in seq:
                points = run.summary.get(key, {}).get(name, [])
                if not points:
                    continue
                x = [p["n_edits"] for p in points]
                ax.plot(x, [p["mean"] for p in points], marker="o", label=_line_label(run, seq))
                ax.fill_between(x, [p["lo"] for p in points], [p["hi"] for p in points], alpha=0.2)
            ax.set_title(f"{_label(seq[0], name)}" + (" (unrelated facts)" if key == "drift_curves" else ""), fontsize=9)
            ax.set_xlabel("number of edits")
        axes.flat[0].legend(fontsize=8)
        paths += _save(fig, out, title)
    return paths


def health(runs: list[Run], out: Path) -> list[Path]:
    """Update norm, ROME denominator and probe-text loss along each sequential run; disabling edits in red."""
    fig = health_figure(runs)
    return [] if fig is None else _save(fig, out, "sequential_health")


def health_figure(runs: list[Run]) -> plt.Figure | None:
    """The figure of `health` (None without a sequential run). Each run keeps one colour across the panels, and
    the legend, on the probe-loss panel, names every run (a run without a panel's value, such as an adaptor's
    update norm, is absent from that panel only)."""
    seq = [r for r in runs if r.summary.get("health", {}).get("edits")]
    if not seq:
        return None
    panels = [("update_norm", "update norm ‖Δ‖_F", True), ("denominator", "ROME denominator (C⁻¹k*)ᵀk", True),
              ("probe_loss", "probe-text loss (nats/token)", False)]
    panels = [p for p in panels if any(h.get(p[0]) is not None for r in seq for h in r.summary["health"]["edits"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (key, title, log) in zip(axes.flat, panels):
        for i, run in enumerate(seq):
            pts = [(h["n_edits"], h[key], h["flagged"]) for h in run.summary["health"]["edits"] if h.get(key) is not None]
            if not pts:
                continue
            label = _line_label(run, seq)
            handles[label], = ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, color=f"C{i}", label=label)
            bad = [p for p in pts if p[2]]
            if bad:
                ax.scatter([p[0] for p in bad], [p[1] for p in bad], color="red", s=18, zorder=3)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("number of edits")
    labels = [label for label in (_line_label(r, seq) for r in seq) if label in handles]  # in the runs' order
    axes.flat[-1].legend([handles[label] for label in labels], labels, fontsize=8)
    return fig


def loud_facts(runs: list[Run], out: Path) -> list[Path]:
    """Per-record neighborhood magnitude (x) vs Specificity+ magnitude (y), edited model, one colour per method."""
    fig, ax = plt.subplots(figsize=(5, 5))
    plotted = False
    for run in runs:
        pts = [(r["edited"].get("neighborhood_magnitude"), r["edited"].get("specificity_plus_magnitude"))
               for r in run.final_rows()]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.6, label=run.label)
            plotted = True
    if not plotted:
        plt.close(fig)
        return []
    lo, hi = ax.get_xlim()
    lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("neighborhood magnitude  P(o) − P(o*)")
    ax.set_ylabel("Specificity+ magnitude (edit prefixed)")
    ax.set_title("loud facts: below the diagonal = leaks when o* is mentioned", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out, "loud_facts")


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """Every plot that the runs have data for; returns the written files."""
    return metric_bars(runs, out) + sequential(runs, out) + health(runs, out) + loud_facts(runs, out)
