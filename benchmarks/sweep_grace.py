"""GRACE editing on starter facts: efficacy, paraphrase and neighbourhood counts as layer, lr and eps vary.

Each fact is edited alone (the 5 starter facts of the other sweeps), the edit applied, the record's probes
scored with the evaluation harness's `measure`, and the edit undone. A probe counts when its target is more
likely than its foil: efficacy and paraphrase (target_new over target_true), neighbour kept (the neighbour's
true answer over target_new). The value a request trains does not depend on the radius, so each (layer, lr)
edit is trained once and measured at every eps (its radii set to eps · ‖k‖, as `GraceEditor` sets them).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_grace.py --model gemma3-270m [--layers 9,13,15]
       [--lrs 1.0] [--eps 0.05,0.15] [--steps 100] [--early-stop 0.01] [--cases capital-0,...]
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
from lmedit.editors.grace import GraceConfig, GraceEditor  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402

CASES = STARTER_CASES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--layers", default="9,13,15")
    ap.add_argument("--lrs", default="1.0")
    ap.add_argument("--eps", default="0.05,0.15")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--early-stop", type=float, default=1e-2)
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()

    lm = lmedit.load(args.model)
    wanted = args.cases.split(",")
    by_id = {r.case_id: r for r in load_dataset("starter").records}
    records = [by_id[c] for c in wanted]
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = {"model": args.model, "cases": wanted, "steps": args.steps, "early_stop_loss": args.early_stop,
              "threads": torch.get_num_threads(), "unedited": {}, "settings": []}
    for record in records:
        add_counts(result["unedited"], starter_counts(lm, [record]))
    eps_values = [float(e) for e in args.eps.split(",")]
    for layer in map(int, args.layers.split(",")):
        for lr in map(float, args.lrs.split(",")):
            config = GraceConfig(layer=layer, lr=lr, steps=args.steps, early_stop_loss=args.early_stop)
            totals: dict[float, dict[str, list[int]]] = {eps: {} for eps in eps_values}
            steps, losses, seconds = [], [], 0.0
            for record in records:
                start = time.perf_counter()
                edit = GraceEditor(config).edit(lm, list(record.requests))
                seconds += time.perf_counter() - start
                steps.append(edit.info["steps"])
                losses.append(round(edit.info["final_loss"], 3))
                norms = torch.tensor(edit.info["key_norms"], device=edit.radii.device)
                for eps in eps_values:
                    edit.radii = eps * norms
                    with edit.applied(lm):
                        add_counts(totals[eps], starter_counts(lm, [record]))
            for eps in eps_values:
                row = {"layer": layer, "lr": lr, "eps": eps,
                       **{k: f"{a}/{b}" for k, (a, b) in totals[eps].items()},
                       "steps": steps, "final_loss": losses, "edit_seconds_mean": round(seconds / len(records), 2)}
                print(row, file=sys.stderr, flush=True)
                result["settings"].append(row)
    assert all(torch.equal(snapshot[k], v) for k, v in lm.model.state_dict().items()), "weights changed"
    assert not lm.edits, "an edit was left applied"
    result["unedited"] = {k: f"{a}/{b}" for k, (a, b) in result["unedited"].items()}
    result["peak_rss_mb"] = round(peak_rss_mb())
    emit(result)


if __name__ == "__main__":
    main()
