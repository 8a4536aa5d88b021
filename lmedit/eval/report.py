"""Reports comparing methods side by side: markdown and HTML tables (unedited row included) plus plots.

    write_report(["runs/a", "runs/b"], "runs/report")   # report.md, report.html, plots/*.png|svg

Each run directory is what `evaluate(..., out_dir=...)` wrote. Cells are "mean [95% interval]"; the
probability and token-accuracy families sit under separate headers so they cannot be mixed up. One
unedited row is shown per (model, dataset) of the runs.

Not handled: significance tests between methods.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmedit.errors import MissingFileError

FAMILY_TITLES = {"probability": "probability comparison (ROME/MEMIT)", "kl": "distribution drift (KL, nats)",
                 "token_accuracy": "teacher-forced token accuracy (EasyEdit/zsRE)", "generation": "generation"}


@dataclass
class Run:
    """One evaluation's outputs, read back from its directory."""

    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        run = self.summary["run"]
        return f"{run['method']} ({run['mode']})" if run["mode"] != "single" else run["method"]

    def final_rows(self) -> list[dict[str, Any]]:
        """Per-record rows of the final state (the last checkpoint in sequential mode)."""
        if self.summary["run"]["mode"] != "sequential":
            return self.rows
        edited = [r for r in self.rows if r.get("kind") == "edited"]
        last = max((int(r["n_edits"]) for r in edited), default=0)
        return [r for r in edited if int(r["n_edits"]) == last]


def load_run(path: str | Path) -> Run:
    """Read summary.json and records.jsonl from a run directory.

    Raises:
        FileNotFoundError: the directory has no summary.json (the run did not finish; use --resume).
    """
    path = Path(path)
    summary_file = path / "summary.json"
    if not summary_file.exists():
        raise MissingFileError(f"{path} has no summary.json: not a finished evaluation run")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    rows_file = path / "records.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if rows_file.exists() else []
    return Run(path=path, summary=summary, rows=rows)


def _columns(runs: list[Run]) -> list[tuple[str, dict[str, Any]]]:
    """Metrics with at least one value in some run, in the runs' column order, with their metadata."""
    names: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, meta in run.summary["metrics"].items():
            if any(run.summary[s]["metrics"].get(name, {}).get("n") for s in ("unedited", "edited")):
                names.setdefault(name, meta)
    return list(names.items())


def _rows(runs: list[Run]) -> list[tuple[str, dict[str, Any]]]:
    """(row label, state summary): one unedited row per (model, dataset source), then one per run."""
    out, seen = [], set()
    for run in runs:
        key = (run.summary["run"]["model"], run.summary["run"]["source"])
        if key not in seen:
            seen.add(key)
            label = "unedited" if len({(r.summary["run"]["model"], r.summary["run"]["source"]) for r in runs}) == 1 \
                else f"unedited ({key[0]}, {Path(key[1]).name})"
            out.append((label, run.summary["unedited"]))
    out += [(run.label, run.summary["edited"]) for run in runs]
    return out


def _cell(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.{digits}f} [{stats['lo']:.{digits}f}, {stats['hi']:.{digits}f}]"


def markdown_table(runs: list[Run]) -> str:
    """Methods side by side (unedited first): Score, then every metric with values, grouped by family."""
    columns = _columns(runs)
    header = ["", "n", "Score"] + [f"{m['label']} {'↑' if m['higher_is_better'] else '↓'}" for _, m in columns]
    families = ["", "", "probability"] + [m["family"] for _, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(f"*{f}*" if f else "" for f in families) + " |"]
    for label, state in _rows(runs):
        n = max((s.get("n", 0) for s in state["metrics"].values()), default=0)
        cells = [label, str(n), _cell(state["score"])] + [_cell(state["metrics"].get(name)) for name, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(runs: list[Run]) -> str:
    lines = ["| label | metric | family | definition |", "|---|---|---|---|",
             "| Score | harmonic mean of ES, PS, NS | probability | ROME's summary score (arXiv:2202.05262) |"]
    for name, meta in _columns(runs):
        lines.append(f"| {meta['label']} | `{name}` | {meta['family']} | {meta['doc']} |")
    return "\n".join(lines)


def html_table(runs: list[Run]) -> str:
    """The same table as `markdown_table`, as an HTML fragment with family header cells."""
    columns = _columns(runs)
    groups: list[tuple[str, int]] = []
    for _, meta in columns:
        if groups and groups[-1][0] == meta["family"]:
            groups[-1] = (meta["family"], groups[-1][1] + 1)
        else:
            groups.append((meta["family"], 1))
    head1 = "<tr><th></th><th></th><th></th>" + "".join(
        f'<th colspan="{n}">{html.escape(FAMILY_TITLES.get(f, f))}</th>' for f, n in groups) + "</tr>"
    head2 = "<tr><th>method</th><th>n</th><th>Score</th>" + "".join(
        f'<th title="{html.escape(m["doc"])}">{html.escape(m["label"])} {"↑" if m["higher_is_better"] else "↓"}</th>'
        for _, m in columns) + "</tr>"
    body = []
    for label, state in _rows(runs):
        n = max((s.get("n", 0) for s in state["metrics"].values()), default=0)
        cells = [html.escape(label), str(n), _cell(state["score"])] + [_cell(state["metrics"].get(k)) for k, _ in columns]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>\n<thead>{head1}\n{head2}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _runs_section(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        r, s = run.summary["run"], run.summary
        skipped = s["skipped"]
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped["by_reason"].items()) or "none"
        lines.append(f"- **{run.label}**: model {r['model']} ({r['model_fingerprint']}), dataset {r['dataset']} "
                     f"({r['source']}), {s['n_records']} records, skipped {skipped['count']} ({reasons}), "
                     f"{s.get('elapsed_s', 0):.0f} s; `{run.path}`")
    return lines


def write_report(run_dirs: list[str | Path], out_dir: str | Path, *, title: str = "lmedit evaluation") -> dict[str, Path]:
    """Write report.md, report.html and plots (PNG + SVG) comparing the runs in `run_dirs`.

    Returns:
        Paths by name: "markdown", "html" and one entry per plot file.
    """
    from lmedit.eval import plots

    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.write_plots(runs, out / "plots")
    md = [f"# {title}", "", "Cells: mean [95% bootstrap interval] over records. ↑ higher is better, ↓ lower is better.",
          "", markdown_table(runs), "", "## Metrics", "", legend(runs), "", "## Runs", "", *_runs_section(runs), ""]
    if figures:
        md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figures if p.suffix == ".png"] + [""]
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap} "
             "td:first-child{text-align:left;font-weight:bold} img{max-width:48%;margin:4px}")
    images = "".join(f'<img src="plots/{p.name}" alt="{p.stem}">' for p in figures if p.suffix == ".svg")
    runs_html = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _runs_section(runs))
    paths["html"].write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p>Cells: mean [95% bootstrap interval] over records.</p>"
        f"{html_table(runs)}<h2>Runs</h2><ul>{runs_html}</ul><h2>Plots</h2>{images}</body></html>", encoding="utf-8")
    for p in figures:
        paths[p.name] = p
    return paths
