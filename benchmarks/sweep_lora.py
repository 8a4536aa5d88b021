"""LoRA editing on starter facts: efficacy, paraphrase and neighbourhood counts as rank and lr vary.

Each fact is edited alone (the shipped configs' sweeps of configs/ft/ use the same 5 facts), the edit applied,
the record's probes scored with the evaluation harness's `measure`, and the edit undone. A probe counts when
its target is more likely than its foil: efficacy and paraphrase (target_new over target_true), neighbour
kept (the neighbour's true answer over target_new). The layer is the one of the model's shipped FT config.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_lora.py --model gemma3-270m [--ranks 4,8]
       [--lrs 1e-3,5e-3,2e-2] [--steps 30] [--early-stop 0.5] [--cases capital-0,...]
Run it alone: two torch processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import STARTER_CASES, add_counts, emit, peak_rss_mb, starter_counts  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

import lmedit  # noqa: E402
from lmedit.editors.lora import LoraEditConfig, LoraEditor  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.settings import CONFIG_ROOT  # noqa: E402

CASES = STARTER_CASES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--ranks", default="4,8")
    ap.add_argument("--lrs", default="1e-3,5e-3,2e-2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--early-stop", type=float, default=0.5)
    ap.add_argument("--alpha-per-rank", type=float, default=2.0, help="alpha = this x rank")
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()

    lm = lmedit.load(args.model)
    layer = yaml.safe_load((CONFIG_ROOT / "ft" / f"{args.model}.yaml").read_text())["layers"][0]
    wanted = args.cases.split(",")
    by_id = {r.case_id: r for r in load_dataset("starter").records}
    records = [by_id[c] for c in wanted]
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = {"model": args.model, "layer": layer, "cases": wanted, "steps": args.steps,
              "early_stop_loss": args.early_stop, "threads": torch.get_num_threads(), "unedited": {}, "settings": []}
    for record in records:
        add_counts(result["unedited"], starter_counts(lm, [record]))
    for rank in map(int, args.ranks.split(",")):
        for lr in map(float, args.lrs.split(",")):
            config = LoraEditConfig(layers=(layer,), rank=rank, alpha=args.alpha_per_rank * rank, lr=lr,
                                    steps=args.steps, early_stop_loss=args.early_stop)
            total: dict[str, list[int]] = {}
            steps, seconds = [], 0.0
            for record in records:
                start = time.perf_counter()
                edit = LoraEditor(config).edit(lm, list(record.requests))
                seconds += time.perf_counter() - start
                steps.append(edit.info["steps"])
                with edit.applied(lm):
                    add_counts(total, starter_counts(lm, [record]))
            row = {"rank": rank, "alpha": config.alpha, "lr": lr, **{k: f"{a}/{b}" for k, (a, b) in total.items()},
                   "steps": steps, "edit_seconds_mean": round(seconds / len(records), 2)}
            print(row, file=sys.stderr, flush=True)
            result["settings"].append(row)
    assert all(torch.equal(snapshot[k], v) for k, v in lm.model.state_dict().items()), "weights changed"
    result["unedited"] = {k: f"{a}/{b}" for k, (a, b) in result["unedited"].items()}
    result["peak_rss_mb"] = round(peak_rss_mb())
    emit(result)


if __name__ == "__main__":
    main()
