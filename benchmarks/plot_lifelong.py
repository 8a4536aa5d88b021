"""The 1,000-sequential-edit curves of GRACE and WISE side by side (docs/editors.md, "1,000 sequential edits").

Reads the committed results in docs/figures (each run's summary.json; for a run not yet finished, its checkpoint
means so far, `sequential1000_<method>_partial_gemma3-270m.json`) and writes
docs/figures/sequential1000_lifelong_gemma3-270m.png.

Usage: .venv/bin/python benchmarks/plot_lifelong.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
METRICS = [("efficacy_score", "ES on all earlier edits"), ("paraphrase_score", "PS"), ("neighborhood_score", "NS"),
           ("specificity_plus_score", "Specificity+")]
UNEDITED = {"neighborhood_score": 0.767, "specificity_plus_score": 0.379}  # the same 1,000 records, unedited


def checkpoint_means(method: str) -> dict[int, dict[str, float]]:
    """{n_edits: {metric: mean}} from the run's summary.json, or from its partial means while it runs."""
    summary = FIGURES / f"sequential1000_{method}_gemma3-270m.summary.json"
    if summary.exists():
        means: dict[int, dict[str, float]] = {}
        for key, points in json.loads(summary.read_text())["curves"].items():
            for p in points:
                means.setdefault(int(p["n_edits"]), {})[key] = p["mean"]
        return means
    partial = json.loads((FIGURES / f"sequential1000_{method}_partial_gemma3-270m.json").read_text())
    return {int(n): values for n, values in partial["checkpoints"].items()}


def main() -> None:
    grace, wise = checkpoint_means("grace"), checkpoint_means("wise")
    steps = sorted(wise)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(14, 3.4), sharey=True)
    for ax, (key, label) in zip(axes, METRICS):
        ax.plot(sorted(grace), [grace[n][key] for n in sorted(grace)], "o-", label="GRACE")
        ax.plot(steps, [wise[n][key] for n in steps], "s-", label=f"WISE (to {steps[-1]})")
        if key in UNEDITED:
            ax.axhline(UNEDITED[key], color="grey", ls=":", label="unedited")
        ax.set_title(label)
        ax.set_xlabel("sequential edits")
        ax.set_xlim(0, 1050)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left")
    axes[2].legend(loc="lower left")
    fig.suptitle("1,000 sequential CounterFact edits on gemma3-270m (checkpoints every 100, each re-measuring all "
                 "earlier edits)")
    fig.tight_layout()
    out = FIGURES / "sequential1000_lifelong_gemma3-270m.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
