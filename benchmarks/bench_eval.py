"""Benchmark: records per minute of a single-mode CounterFact evaluation, without and with generations; peak RSS.

Usage:
    LMEDIT_CACHE=/tmp/lm/cache OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --method METHOD \
        --data ../shared/data/counterfact/easyedit_format/counterfact-edit.json --limit 20 [--set key=value ...]

Writes benchmarks/bench_eval-<method>.json: for each setting (probability/KL metrics only; plus generation
metrics), records evaluated, wall seconds, records per minute, mean seconds per edit (the editor's own
cost) and the rest (the harness's measuring: the unedited and edited model, batched). Peak RSS is the
process maximum (resource.getrusage), so it covers model, edits and measurements together.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

import lmedit
from lmedit.eval import EvalConfig, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--data", help="dataset file (default: the dataset's default)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--generation", type=int, default=40, help="tokens per generation prompt in the second setting")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="editor config override")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()

    lm = lmedit.load(args.model)
    data = load_dataset(args.dataset, args.data)
    editor = lmedit.editors.get_editor(args.method, None, args.set or None)
    results = []
    for label, tokens in (("probability+kl", 0), ("with generation", args.generation)):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = lmedit.evaluate(lm, data, editor, limit=args.limit, out_dir=tmp,
                                     config=EvalConfig(generation_tokens=tokens, n_bootstrap=200))
            wall = time.perf_counter() - start
        n = result.summary["n_records"]
        edit_s = sum(r["edit_seconds"] for r in result.rows)
        results.append({"setting": label, "generation_tokens": tokens, "records": n, "wall_s": round(wall, 2),
                        "records_per_minute": round(60 * n / wall, 2), "edit_s_per_record": round(edit_s / n, 2),
                        "measure_s_per_record": round((wall - edit_s) / n, 2),
                        "edited_score": result.summary["edited"]["score"]["mean"],
                        "unedited_score": result.summary["unedited"]["score"]["mean"]})
    report = {"benchmark": "bench_eval", "method": args.method, "model": args.model, "dataset": args.dataset,
              "data": data.source, "editor_overrides": args.set, "results": results,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_eval-{args.method}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
