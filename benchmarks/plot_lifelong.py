"""The 1,000-sequential-edit runs of GRACE, WISE, default ROME and AlphaEdit side by side.

See docs/editors.md, "1,000 sequential edits".

Reads the runs' committed summaries in docs/figures and draws them with the evaluation's own plots
(`lmedit.eval.plots.sequential` and `health`): docs/figures/sequential1000_lifelong_gemma3-270m.png (metric
curves with 95% bands) and sequential1000_lifelong_health_gemma3-270m.png (probe-text loss along each run).

Usage: .venv/bin/python benchmarks/plot_lifelong.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lmedit.eval import plots
from lmedit.eval.report import Run

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
METHODS = ("grace", "wise", "rome", "alphaedit")


def main() -> None:
    runs = []
    for method in METHODS:
        path = FIGURES / f"sequential1000_{method}_gemma3-270m.summary.json"
        runs.append(Run(path=path, summary=json.loads(path.read_text()), rows=[]))
    with tempfile.TemporaryDirectory() as tmp:
        for drawn in plots.sequential(runs, Path(tmp)) + plots.health(runs, Path(tmp)):
            name = {"sequential_curves": "lifelong", "sequential_health": "lifelong_health"}.get(drawn.stem)
            if name and drawn.suffix == ".png":
                out = FIGURES / f"sequential1000_{name}_gemma3-270m.png"
                shutil.copyfile(drawn, out)
                print(out)


if __name__ == "__main__":
    main()
