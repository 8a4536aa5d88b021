"""The audit plot of one edit: per-probe margins before/after, and every check against its thresholds.

Left panel: for each probe (grouped: rewrite, paraphrase, neighbourhood, Specificity+, implication), the
margin log P(target) − log P(foil) in the reference state and the edited state; positive is right
(target_new on the edit's own prompts, the neighbour's answer on neighbourhoods). Right panels: the score
checks (0-1) and the drift checks, coloured by level, with the warn/refuse thresholds marked.

Not handled: comparing several edits in one figure (one figure per edit).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from lmedit.ledger.audit import CHECKS, AuditReport  # noqa: E402

COLORS = {"keep": "#4c9a2a", "warn": "#e8a317", "refuse": "#c0392b", None: "#bbbbbb"}
GROUP_LABELS = {"rewrite": "edit prompt", "paraphrase": "paraphrase", "neighborhood": "neighbour",
                "neighborhood_plus": "Specificity+", "implication": "implication", "multihop": "multi-hop"}


def plot_report(report: AuditReport, path: str | Path, title: str = "") -> Path:
    """Draw `report` to `path` (PNG). Returns the path."""
    path = Path(path)
    probes = report.probes
    fig = plt.figure(figsize=(13, max(4.0, 0.28 * len(probes) + 1.5)))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.6, 1.0))
    ax = fig.add_subplot(grid[:, 0])
    ys = list(range(len(probes)))[::-1]
    labels = [f"{GROUP_LABELS.get(p['group'], p['group'])}: {p['prompt'][-48:]}" for p in probes]
    ax.barh([y + 0.2 for y in ys], [p["before"] for p in probes], height=0.4, color="#9aa5b1", label=report.reference)
    ax.barh([y - 0.2 for y in ys], [p["after"] for p in probes], height=0.4, color="#2e6fbd", label="edited")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlabel("log P(target) − log P(foil)   (> 0: right answer wins)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("probes", fontsize=10)
    for row, higher in ((0, True), (1, False)):
        checks = [c for c in CHECKS if c.higher_is_better == higher]
        sub = fig.add_subplot(grid[row, 1])
        results = [report.checks[c.name] for c in checks]
        values = [r.value if r.value is not None else 0.0 for r in results]
        sub.barh(range(len(results))[::-1], values, color=[COLORS[r.level] for r in results])
        for y, r in zip(range(len(results))[::-1], results):
            for threshold, style in ((r.warn, ":"), (r.refuse, "-")):
                if threshold is not None:
                    sub.plot([threshold, threshold], [y - 0.4, y + 0.4], color="black", ls=style, lw=1)
            text = "n/a" if r.value is None else f"{r.value:.3g}"
            sub.text(0, y, f" {text}", va="center", fontsize=7)
        sub.set_yticks(range(len(results))[::-1], [c.name for c in checks], fontsize=8)
        sub.set_title("scores (warn ··· / refuse —)" if higher else "drifts (warn ··· / refuse —)", fontsize=9)
        if higher:
            sub.set_xlim(0, 1.05)
    fig.suptitle(title or f"audit: {report.verdict} ({report.model})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
