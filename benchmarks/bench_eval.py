"""Evaluation throughput: records per minute of a single-mode CounterFact evaluation, without and with generations.

For each setting (probability/KL/token-accuracy metrics only; then also generation metrics) it reports
records evaluated, wall seconds, records per minute, the editor's own seconds per record (`edit_s`) and
the harness's measuring seconds per record (the unedited and the edited model, batched); plus peak RSS
of the process (model, edits and measurements together).

Usage: .venv/bin/python benchmarks/bench_eval.py [--method rome] [--config rome/gemma3-270m.yaml]
           [--data ../shared/data/counterfact/rome_format_samples/most_orthogonal.json] [--limit 3] [--set k=v]
The default data is the ROME-layout CounterFact sample (10 neighbourhood and 10 generation prompts per
record, like the full file); the EasyEdit layout has one neighbour and no generation prompts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.settings import resolve_editor  # noqa: E402
from lmedit.eval import EvalConfig, load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "counterfact" / "rome_format_samples" / "most_orthogonal.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rome")
    parser.add_argument("--config", help="the method's YAML config (default: the shipped settings for the model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--data", default=str(SAMPLE) if SAMPLE.exists() else None)
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--generation", type=int, default=40, help="tokens per generation prompt (second setting)")
    args = parser.parse_args()

    lm = lmedit.load(args.model)
    data = load_dataset(args.dataset, args.data)
    editor, _ = resolve_editor(args.method, lm, args.config, args.set or None)
    results = []
    for label, tokens in (("probability+kl+token_accuracy", 0), ("with generation", args.generation)):
        with tempfile.TemporaryDirectory() as tmp:
            wall, result = timed(lambda: lmedit.evaluate(
                lm, data, editor, limit=args.limit, out_dir=tmp,
                config=EvalConfig(generation_tokens=tokens, n_bootstrap=200)))
        n = result.summary["n_records"]
        edit_s = sum(r["edit_seconds"] for r in result.rows)
        results.append({"setting": label, "generation_tokens": tokens, "records": n, "wall_s": round(wall, 2),
                        "records_per_minute": round(60 * n / wall, 2), "edit_s_per_record": round(edit_s / n, 2),
                        "measure_s_per_record": round((wall - edit_s) / n, 2),
                        "edited_score": result.summary["edited"]["score"]["mean"],
                        "unedited_score": result.summary["unedited"]["score"]["mean"]})
    emit({"benchmark": "eval", "method": args.method, "settings": editor.settings_source, "overrides": args.set, "model": args.model,
          "dataset": args.dataset, "data": data.source, "results": results, "peak_rss_mb": round(peak_rss_mb(), 1),
          "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
