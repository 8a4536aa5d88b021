"""The 1,000-sequential-edit curves of GRACE and WISE side by side (docs/editors.md, "1,000 sequential edits").

Reads the committed results in docs/figures (GRACE: its run's summary.json; WISE: its checkpoint means, partial
while its run is) and writes docs/figures/sequential1000_lifelong_gemma3-270m.png.

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


def main() -> None:
    grace = json.loads((FIGURES / "sequential1000_grace_gemma3-270m.summary.json").read_text())["curves"]
    wise = json.loads((FIGURES / "sequential1000_wise_partial_gemma3-270m.json").read_text())["checkpoints"]
    steps = sorted(int(n) for n in wise)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(14, 3.4), sharey=True)
    for ax, (key, label) in zip(axes, METRICS):
        ax.plot([p["n_edits"] for p in grace[key]], [p["mean"] for p in grace[key]], "o-", label="GRACE")
        ax.plot(steps, [wise[str(n)][key] for n in steps], "s-", label=f"WISE (to {steps[-1]})")
        if key in UNEDITED:
            ax.axhline(UNEDITED[key], color="grey", ls=":", label="unedited")
        ax.set_title(label)
        ax.set_xlabel("sequential edits")
        ax.set_xlim(0, 1050)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left")
    axes[2].legend(loc="lower left")
    fig.suptitle(f"1,000 sequential CounterFact edits on gemma3-270m (checkpoints every 100; WISE's run so far: "
                 f"{steps[-1]})")
    fig.tight_layout()
    out = FIGURES / "sequential1000_lifelong_gemma3-270m.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
