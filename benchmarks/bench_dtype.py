"""ROME in float32 vs bfloat16 (or float16): CounterFact scores, edit seconds and peak memory per dtype.

For each dtype, in a fresh process of its own (so that one dtype's peak memory does not hide the other's):
load the model in that dtype (`lmedit.load(..., dtype=...)`), evaluate ROME on the first `--records`
CounterFact records of tests/data/counterfact/easyedit-train-40.json with the evaluation harness as `lmedit
eval` runs it (single mode: each edit measured, then undone), probability metrics only. Reported per dtype:
ES / PS / NS (efficacy, paraphrase and neighbourhood scores of the edited model, and the unedited model's),
the harness's mean edit seconds per record, the run's wall seconds, the load seconds, and the process's peak
RSS (plus the peak CUDA memory on a GPU). The key statistics and context prefixes are computed per dtype
into a fresh cache before the timed run (the statistics of a bfloat16 model are its own), so edit seconds
do not include them; their cost is reported as `warm_s`.

Usage: .venv/bin/python benchmarks/bench_dtype.py [--model gemma3-270m] [--records 20]
           [--dtypes float32,bfloat16] [--device cpu] [--config rome/gemma3-270m.yaml] [--set key=value ...]
A tiny smoke run (no real model): --model DIR with a small Hugging Face model directory and --set overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, peak_rss_mb, timed  # noqa: E402

# 40 CounterFact records in EasyEdit's layout (one paraphrase and one neighbourhood prompt each); the first --records.
COUNTERFACT = Path(__file__).resolve().parent.parent / "tests" / "data" / "counterfact" / "easyedit-train-40.json"
SCORES = {"ES": "efficacy_score", "PS": "paraphrase_score", "NS": "neighborhood_score"}


def _mean(summary: dict, state: str, metric: str) -> float | None:
    entry = summary.get(state, {}).get("metrics", {}).get(metric)
    return None if not entry or entry.get("mean") is None else round(float(entry["mean"]), 4)


def run_one(args: argparse.Namespace) -> dict:
    """One dtype, in this process: load, warm the caches, evaluate; the measurements as a dict."""
    import os

    import torch

    import lmedit
    from lmedit.eval import EvalConfig, load_dataset
    from lmedit.settings import resolve_editor
    from lmedit.stats import StatsCache

    from lmedit.cache import cache_root

    models = cache_root() / "models"
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["LMEDIT_CACHE"] = cache_dir  # a fresh cache: statistics and prefixes are this dtype's own
        if models.is_dir():  # ... but the converted built-in models are shared: no conversion in the timings
            os.symlink(models, Path(cache_dir) / "models")
        load_s, lm = timed(lambda: lmedit.load(args.model, device=args.device, dtype=args.child))
        rss_loaded = peak_rss_mb()
        editor, _ = resolve_editor("rome", lm, args.config, args.set or None)
        if hasattr(editor, "cache"):
            editor.cache = StatsCache(Path(cache_dir) / "stats")
        data = load_dataset("counterfact", COUNTERFACT)
        first = data.records[0].requests[0]
        warm_s, _ = timed(lambda: editor.edit(lm, [first]))  # statistics + prefixes, then one edit
        if torch.cuda.is_available() and lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as out:
            wall, result = timed(lambda: lmedit.evaluate(
                lm, data, editor, limit=args.records, out_dir=out,
                config=EvalConfig(generation_tokens=0, n_bootstrap=200)))
        summary = result.summary
        row = {"dtype": args.child, "records": summary["n_records"], "load_s": round(load_s, 2),
               "warm_s": round(warm_s, 2), "wall_s": round(wall, 2),
               "edit_s_mean": None if summary.get("edit_seconds_mean") is None else round(summary["edit_seconds_mean"], 3),
               "edited": {k: _mean(summary, "edited", m) for k, m in SCORES.items()},
               "unedited": {k: _mean(summary, "unedited", m) for k, m in SCORES.items()},
               "edited_score": (summary.get("edited", {}).get("score") or {}).get("mean"),
               "peak_rss_mb_after_load": round(rss_loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
               "param_bytes": sum(p.numel() * p.element_size() for p in lm.model.parameters())}
        if torch.cuda.is_available() and lm.device.type == "cuda":
            row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="built-in name, HF directory or HF id")
    parser.add_argument("--records", type=int, default=20, help="CounterFact records (tests/data) to edit")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", help="ROME's YAML config (default: the shipped settings for the model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ROME config override")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one dtype in this process
    args = parser.parse_args()
    if args.child:
        json.dump(run_one(args), sys.stdout)
        return
    rows = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        cmd = [sys.executable, __file__, "--model", args.model, "--records", str(args.records), "--device", args.device,
               "--child", dtype, *(["--config", args.config] if args.config else []),
               *[f"--set={s}" for s in args.set]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"dtype": dtype, "error": done.stderr.strip().splitlines()[-1:] or ["exit %d" % done.returncode]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    emit({"benchmark": "rome float32 vs half precision on CounterFact", "model": args.model, "device": args.device,
          "records": args.records, "dataset": str(COUNTERFACT.relative_to(COUNTERFACT.parents[3])), "runs": rows})


if __name__ == "__main__":
    main()
