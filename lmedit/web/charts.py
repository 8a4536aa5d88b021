"""The Compare tab's chart: per method, the audit's scores (efficacy, paraphrase, neighbourhood,
Specificity+), the fluency of its generations and the time its edit took (matplotlib's Agg canvas
directly: no pyplot global state, safe in the server's worker thread).

Not handled: interactive charts (the page shows a PNG, like every plot lmedit draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmedit.web.tables import COMPARE_METRICS, CompareResult

SCORES = COMPARE_METRICS[:4]  # fractions of probes (0-1); fluency (entropy, bits) and time get their own panels


def compare_chart(results: Sequence[CompareResult], reference: dict[str, float | None] | None,
                  path: str | Path, title: str = "") -> Path:
    """Grouped bars of the scores per method (the unedited model's as a dotted line), fluency and edit time.

    Returns:
        `path` (PNG).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in results if r.metrics is not None]
    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    scores, fluency, timing = fig.subplots(1, 3, gridspec_kw={"width_ratios": (3, 1, 1)})
    width = 0.8 / max(1, len(done))
    for i, r in enumerate(done):
        xs = [k + (i - (len(done) - 1) / 2) * width for k in range(len(SCORES))]
        values = [(r.metrics or {}).get(key) for key, _ in SCORES]
        scores.bar(xs, [0.0 if v is None else v for v in values], width, label=r.method)
    if reference is not None:
        for k, (key, _) in enumerate(SCORES):
            if reference.get(key) is not None:
                scores.plot([k - 0.45, k + 0.45], [reference[key]] * 2, color="black", ls=":", lw=1.2,
                            label="before the edit" if k == 0 else None)
    scores.set_xticks(range(len(SCORES)), [label for _, label in SCORES])
    scores.set_ylim(0, 1.05)
    scores.set_ylabel("fraction of probes right")
    scores.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(done) + 1, frameon=False)
    names = [r.method for r in done]
    fluency.bar(names, [(r.metrics or {}).get("fluency") or 0.0 for r in done], color="tab:gray")
    if reference is not None and reference.get("fluency") is not None:
        fluency.axhline(reference["fluency"], color="black", ls=":", lw=1.2)
    fluency.set_title("fluency (entropy)", fontsize=9)
    timing.bar(names, [r.seconds or 0.0 for r in done], color="tab:olive")
    timing.set_title("edit time (s)", fontsize=9)
    for ax in (fluency, timing):
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
