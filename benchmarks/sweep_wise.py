"""WISE editing on starter facts: efficacy, paraphrase and neighbourhood counts as layer, lr and act ratio vary.

Each fact is edited alone (the 5 starter facts of the other sweeps), the edit applied, the record's probes
scored with the evaluation harness's `measure`, and the edit undone. A probe counts when its target is more
likely than its foil: efficacy and paraphrase (target_new over target_true), neighbour kept (the neighbour's
true answer over target_new). The side memory a request trains does not depend on the router's threshold, so
each (layer, lr) edit is trained once and measured at every act ratio (its threshold is ratio × its least
subject activation). Then the 5 edits are applied together (each its own side memory, as they were made apart) and
every record measured again ("all_applied", at the config's act ratio); and the 5 facts are edited one after
another, each edit applied before the next is made, so that they share one side memory ("in_sequence").

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_wise.py --model gemma3-270m [--layers 9,13,15]
       [--lrs 5e-4,1e-3] [--ratios 0.88,0.95] [--steps 70] [--set alpha=0.1 ...] [--cases capital-0,...]
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

import lmedit  # noqa: E402
from lmedit.config import from_dict  # noqa: E402
from lmedit.editors.wise import WiseConfig, WiseEditor  # noqa: E402
from lmedit.editors.wise_memory import build_memories  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402

CASES = STARTER_CASES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--layers", default="9,13,15")
    ap.add_argument("--lrs", default="5e-4,1e-3")
    ap.add_argument("--ratios", default="0.88,0.95")
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another WiseConfig field")
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()

    lm = lmedit.load(args.model)
    wanted = args.cases.split(",")
    by_id = {r.case_id: r for r in load_dataset("starter").records}
    records = [by_id[c] for c in wanted]
    extra = dict(item.split("=", 1) for item in args.set)
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = {"model": args.model, "cases": wanted, "steps": args.steps, "set": extra,
              "threads": torch.get_num_threads(), "unedited": {}, "settings": []}
    for record in records:
        add_counts(result["unedited"], starter_counts(lm, [record]))
    ratios = [float(r) for r in args.ratios.split(",")]
    for layer in map(int, args.layers.split(",")):
        for lr in map(float, args.lrs.split(",")):
            config = from_dict(WiseConfig, {**extra, "layer": layer, "lr": lr, "steps": args.steps})
            totals: dict[float, dict[str, list[int]]] = {r: {} for r in ratios}
            steps, losses, separated, seconds, edits = [], [], [], 0.0, []
            for record in records:
                start = time.perf_counter()
                edit = WiseEditor(config).edit(lm, list(record.requests))
                seconds += time.perf_counter() - start
                steps.append(edit.info["steps"])
                losses.append(round(edit.info["final_loss"], 3))
                separated.append(edit.info["separated"])
                for ratio in ratios:
                    edit.act_ratio = ratio
                    with edit.applied(lm):
                        add_counts(totals[ratio], starter_counts(lm, [record]))
                edit.act_ratio = config.act_ratio
                edits.append(edit)
            # Every fact's edit applied at once: each its own memory (they were made apart).
            for edit in edits:
                edit.apply(lm)
            together = {k: f"{a}/{b}" for k, (a, b) in starter_counts(lm, records).items()}
            for edit in reversed(edits):
                edit.undo()
            # The facts edited one after another, each applied before the next is made: one memory of 5 edits.
            chain = []
            for record in records:
                chain.append(WiseEditor(config).edit(lm, list(record.requests)).apply(lm))
            in_sequence = {k: f"{a}/{b}" for k, (a, b) in starter_counts(lm, records).items()}
            memories = len(build_memories(chain).memories)
            for edit in reversed(chain):
                edit.undo()
            print({"layer": layer, "lr": lr, "act_ratio": config.act_ratio, "all_applied": together,
                   "in_sequence": in_sequence, "memories_in_sequence": memories}, file=sys.stderr, flush=True)
            for ratio in ratios:
                row = {"layer": layer, "lr": lr, "act_ratio": ratio,
                       **{k: f"{a}/{b}" for k, (a, b) in totals[ratio].items()},
                       "steps": steps, "final_loss": losses, "separated": separated,
                       **({"all_applied": together, "in_sequence": in_sequence} if ratio == config.act_ratio else {}),
                       "edit_seconds_mean": round(seconds / len(records), 2)}
                print(row, file=sys.stderr, flush=True)
                result["settings"].append(row)
    assert all(torch.equal(snapshot[k], v) for k, v in lm.model.state_dict().items()), "weights changed"
    assert not lm.edits, "an edit was left applied"
    result["unedited"] = {k: f"{a}/{b}" for k, (a, b) in result["unedited"].items()}
    result["peak_rss_mb"] = round(peak_rss_mb())
    emit(result)


if __name__ == "__main__":
    main()
