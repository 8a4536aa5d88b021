"""AlphaEdit's per-layer solve, in the paper's d_mlp-dimensional form against the null space's own coordinates.

Eq. 15 of AlphaEdit (arXiv:2410.02355) with P moved inside, Δ = D Kᵀ P (P (K Kᵀ + K_p K_pᵀ) P + αI)⁻¹
(`alphaedit_solve`), costs several d_mlp³ float64 products per layer and edit. With P = U Uᵀ the same matrix is
D Kᵀ U (Uᵀ (K Kᵀ + K_p K_pᵀ) U + αI_r)⁻¹ Uᵀ (`alphaedit_solve_in_basis`, what the editor runs). In one run this
compares:

- "solve": one layer's solve on the model's real null-space basis (the shipped settings' corpus statistics and
  threshold), one edit key, and m = 0 / 100 / 1,000 earlier edits' keys (random keys at the corpus keys'
  scale; the cost depends on the shapes only), with the two results' relative difference;
- "edits": `--edits` sequential CounterFact edits with the shipped settings (all four layers), made and applied
  one after another, once with each form; median seconds of `editor.edit`, and the largest relative
  difference between the two runs' updates of the same edit.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_alphaedit_solve.py [--model gemma3-270m] [--edits 10]
Run it alone: two torch processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, peak_rss_mb  # noqa: E402

import torch  # noqa: E402

import lmedit  # noqa: E402
from lmedit.editors import alphaedit, get_editor  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.settings import shipped_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CF = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit_format" / "counterfact-edit.json"
BASIS_FORM = alphaedit.alphaedit_solve_in_basis


def paper_form(U, K, D, alpha, K_prev=None):
    return alphaedit.alphaedit_solve(U.to(torch.float64) @ U.to(torch.float64).T, K, D, alpha, K_prev)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bench_solve(editor, lm, layer: int, repeats: int) -> dict:
    C = editor.covariances(lm, (layer,))[layer]
    U = editor.projection(lm, layer, C)
    alpha = editor.config.l2 * float(torch.trace(C)) / C.shape[0]
    gen = torch.Generator().manual_seed(0)
    scale = float(torch.trace(C) / C.shape[0]) ** 0.5
    d_model = lm.arch.weight(lm.model, layer, "mlp_out").shape[0]
    K = torch.randn(1, C.shape[0], generator=gen, dtype=torch.float64) * scale
    D = torch.randn(1, d_model, generator=gen, dtype=torch.float64)
    out = {"layer": layer, "d_mlp": C.shape[0], "nullspace_dim": U.shape[1], "by_earlier_keys": {}}
    for m in (0, 100, 1000):
        K_prev = None if m == 0 else torch.randn(C.shape[0], m, generator=gen, dtype=torch.float64) * scale
        row: dict = {}
        results = {}
        for name, fn in (("paper_form", paper_form), ("basis", BASIS_FORM)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                results[name] = fn(U, K, D, alpha, K_prev)
                times.append(time.perf_counter() - start)
            row[f"{name}_median_seconds"] = median(times)
        row["speedup"] = row["paper_form_median_seconds"] / row["basis_median_seconds"]
        row["relative_difference"] = relative(results["basis"][1], results["paper_form"][1])
        out["by_earlier_keys"][str(m)] = row
    return out


def bench_edits(editor, lm, records) -> dict:
    runs: dict[str, dict] = {}
    for name, fn in (("paper_form", paper_form), ("basis", BASIS_FORM)):
        alphaedit.alphaedit_solve_in_basis = fn  # the editor's solver looks the function up when it solves
        applied, seconds = [], []
        try:
            for record in records:
                start = time.perf_counter()
                edit = editor.edit(lm, list(record.requests))
                seconds.append(time.perf_counter() - start)
                applied.append(edit.apply(lm))
        finally:
            for edit in reversed(applied):
                edit.undo()
            alphaedit.alphaedit_solve_in_basis = BASIS_FORM
        runs[name] = {"seconds": seconds, "deltas": [{k: d.full(torch.float64) for k, d in e.deltas.items()}
                                                    for e in applied]}
    diffs = [max(relative(b[k], p[k]) for k in p) for b, p in zip(runs["basis"]["deltas"],
                                                                  runs["paper_form"]["deltas"], strict=True)]
    med = {name: median(run["seconds"]) for name, run in runs.items()}
    return {"edits": len(records), "seconds": {name: run["seconds"] for name, run in runs.items()},
            "median_seconds": med, "speedup": med["paper_form"] / med["basis"],
            "max_relative_update_difference": max(diffs), "relative_update_difference_per_edit": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = lmedit.load(args.model)
    editor = get_editor("alphaedit", shipped_path("alphaedit", args.model))
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    records = load_dataset("counterfact", CF).records[:args.edits]
    solve = bench_solve(editor, lm, editor.config.layers[0], args.repeats)
    edits = bench_edits(editor, lm, records)
    restored = all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    emit({"benchmark": "alphaedit_solve", "model": args.model, "layers": list(editor.config.layers),
          "nullspace_threshold": editor.config.nullspace_threshold, "torch_threads": torch.get_num_threads(),
          "solve": solve, "sequential_edits": edits, "weights_restored_after": restored,
          "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()
