"""Edit time of a weight editor with and without the quiet option (`lmedit/editors/steps/quiet.py`).

Each CounterFact record's edit request is edited twice in the same process, once plain and once with
`quiet_factor` set, in alternating order (so drift in the machine's speed falls on both alike); statistics and
prefixes are cached and warmed first. Reports the median edit time of each, the median of the per-record
ratios, the v* steps, the time per step, and the loss on the neutral probe text (`eval/health.py`) with
each edit applied. The issue's bound: quiet edit time ≤ 1.5× plain.

`--step-cost` (ROME only) measures instead what one v* step costs with 0 (plain), 1, 2, 4 and 8 quiet texts:
`optimize_value` on the first `--records` requests with the shipped ROME settings and a fixed 10 steps (no
early stop), median seconds per step over the requests: what the quiet texts add to a step, by count.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_quiet.py --data cf-2001-2100.json [--records 20]
           [--method rome] [--model gemma3-270m] [--set quiet_factor=4] [--set quiet_prompts=4]
       OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_quiet.py --data cf-2001-2100.json --records 5 --step-cost
Run it alone: two torch processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.eval.health import probe_loss  # noqa: E402
from lmedit.settings import resolve_editor  # noqa: E402

COUNTERFACT = Path(__file__).resolve().parent.parent / "tests" / "data" / "counterfact" / "most_orthogonal.json"


def steps_of(edit) -> int:
    """v* steps of a one-request edit (ROME reports them per request; MEMIT/AlphaEdit per chunk or not at all)."""
    infos = edit.info.get("requests") or []
    return int(infos[0].get("v_steps", 0)) if infos else 0


def step_cost(lm, editor, requests, model: str) -> None:
    """Seconds per v* step (10 fixed steps) for 0, 1, 2, 4 and 8 quiet texts, median over `requests`."""
    from lmedit.editors.steps.value import context_prefixes, optimize_value

    cfg = editor.config
    prefixes = context_prefixes(lm, cfg.prefix_lengths(), seed=cfg.seed, cache=editor.cache)
    layer = editor.layer_for(lm)
    base = dataclasses.replace(cfg.value_options(), steps=10, early_stop_loss=0.0)
    variants = {"plain": dataclasses.replace(base, quiet_factor=0.0)}
    for n in (1, 2, 4, 8):
        variants[f"quiet_{n}"] = dataclasses.replace(base, quiet_factor=4.0, quiet_prompts=n)
    optimize_value(lm, layer, requests[0], prefixes, variants["quiet_1"], with_keys=True)  # warm
    per_step: dict[str, list[float]] = {k: [] for k in variants}
    for request in requests:
        for name, options in variants.items():
            seconds, _ = timed(lambda: optimize_value(lm, layer, request, prefixes, options, with_keys=True))
            per_step[name].append(seconds / options.steps)
    med = {k: round(median(v), 4) for k, v in per_step.items()}
    emit({"benchmark": "quiet_step_cost", "method": "rome", "model": model, "n_requests": len(requests),
          "threads": torch.get_num_threads(), "steps": 10, "s_per_step_median": med,
          "over_plain": {k: round(v / med["plain"], 3) for k, v in med.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rome")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default=str(COUNTERFACT), help="CounterFact file (ROME or EasyEdit layout)")
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="quiet settings (default quiet_factor=4)")
    parser.add_argument("--step-cost", action="store_true",
                        help="ROME only: seconds per v* step with 0, 1, 2, 4 and 8 quiet texts (fixed 10 steps)")
    args = parser.parse_args()
    lm = lmedit.load(args.model)
    quiet_set = args.set or ["quiet_factor=4"]
    if args.step_cost and args.method != "rome":
        parser.error("--step-cost measures ROME's v* step only")
    plain, _ = resolve_editor(args.method, lm, None)
    records = load_dataset("counterfact", Path(args.data)).records[: args.records]
    requests = [r.requests[0] for r in records]
    if args.step_cost:
        plain.edit(lm, requests[:1])  # warm: statistics, prefixes
        step_cost(lm, plain, requests, args.model)
        return
    quiet, _ = resolve_editor(args.method, lm, None, quiet_set)
    plain.edit(lm, requests[:1])  # warm: statistics, prefixes, allocator
    quiet.edit(lm, requests[:1])
    times = {"plain": [], "quiet": []}
    steps = {"plain": [], "quiet": []}
    probe = {"plain": [], "quiet": []}
    base_probe = probe_loss(lm)
    for i, request in enumerate(requests):
        order = [("plain", plain), ("quiet", quiet)] if i % 2 == 0 else [("quiet", quiet), ("plain", plain)]
        for name, editor in order:
            seconds, edit = timed(lambda: editor.edit(lm, [request]))
            times[name].append(seconds)
            steps[name].append(steps_of(edit))
            with edit.applied(lm):
                probe[name].append(probe_loss(lm))
    ratios = [q / p for q, p in zip(times["quiet"], times["plain"])]
    emit({
        "benchmark": "quiet_edit_time", "method": args.method, "model": args.model, "data": Path(args.data).name,
        "n_requests": len(requests), "quiet_settings": quiet_set, "threads": torch.get_num_threads(),
        "plain_s_median": round(median(times["plain"]), 2), "quiet_s_median": round(median(times["quiet"]), 2),
        "quiet_over_plain_of_medians": round(median(times["quiet"]) / median(times["plain"]), 3),
        "quiet_over_plain_median": round(median(ratios), 3),
        "quiet_over_plain_total": round(sum(times["quiet"]) / sum(times["plain"]), 3),
        "v_steps_mean": {k: round(sum(v) / len(v), 2) for k, v in steps.items()},
        "s_per_step_median": {k: round(median([t / max(n, 1) for t, n in zip(times[k], steps[k])]), 3)
                              for k in times},
        "probe_loss_unedited": round(base_probe, 4),
        "probe_loss_mean": {k: round(sum(v) / len(v), 4) for k, v in probe.items()},
        "probe_loss_max": {k: round(max(v), 4) for k, v in probe.items()},
        "peak_rss_mb": round(peak_rss_mb()),
        "target": "quiet edit time <= 1.5 x plain (issue 16)",
    })


if __name__ == "__main__":
    main()
