"""Single-edit time of every weight editor on the default model, and MEMIT's throughput as the batch grows.

Per method (its shipped lmedit/configs/<method>/<model>.yaml): median over `--facts` facts of `editor.edit` (statistics,
prefixes and other caches warmed by a first, uncounted edit). For the methods that optimise target values
(ROME, MEMIT, AlphaEdit) the "floor" is that optimisation alone (`steps.value.optimize_values` with the
method's own options, sites and prefixes, on the same fact): the forward/backward passes the method
cannot avoid; the ratio is what everything else (keys, solves, the spread) costs on top.
MEMIT throughput: one `edit` call with n CounterFact requests, for each n in `--sizes`, in edits per minute.

Usage: .venv/bin/python benchmarks/bench_editors.py [--model gemma3-270m] [--facts 10] [--sizes 10,100]
       [--methods ft,ft_l,kn,rome,memit,alphaedit]
Run it alone: two torch processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.editors import get_editor  # noqa: E402
from lmedit.editors.steps.mass import target_mode  # noqa: E402
from lmedit.editors.steps.value import context_prefixes, optimize_values  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.settings import shipped_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit_format" / "counterfact-edit.json"


def value_floor(lm, editor, request) -> float:
    """Time of the method's target-value optimisation alone on `request` (ROME, MEMIT, AlphaEdit)."""
    cfg = editor.config
    if hasattr(cfg, "prefix_lengths"):  # MEMIT / AlphaEdit
        layers = list(editor.layers_for(lm)) if hasattr(editor, "layers_for") else list(cfg.layers)
        prefixes = context_prefixes(lm, cfg.prefix_lengths(), seed=cfg.seed, cache=editor.cache)
        mode = target_mode(lm, cfg.targets)
        layer, site = (layers[-1], "resid_out") if mode == "residual" else (layers, "mlp.out")
    else:  # ROME
        layer, site = editor.layer_for(lm), "mlp.out"
        prefixes = context_prefixes(lm, ((5, cfg.prefixes_short), (10, cfg.prefixes_long)), seed=cfg.seed,
                                    cache=editor.cache)
    seconds, _ = timed(lambda: optimize_values(lm, layer, [request], prefixes, cfg.value_options(), site_kind=site))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--sizes", default="10,100", help="MEMIT batch sizes, comma-separated ('' to skip)")
    parser.add_argument("--methods", default="ft,ft_l,kn,rome,memit,alphaedit")
    args = parser.parse_args()
    lm = lmedit.load(args.model)
    records = load_dataset("counterfact", CF).records
    sizes = [int(x) for x in args.sizes.split(",") if x]
    requests = [r.requests[0] for r in records[: max([args.facts + 1, *sizes])]]
    result: dict = {"model": args.model, "facts": args.facts, "methods": {}}
    for method in args.methods.split(","):
        editor = get_editor(method, shipped_path(method, args.model))
        editor.edit(lm, [requests[0]])  # warm caches (statistics, prefixes, refining facts)
        times, floors = [], []
        for request in requests[1: args.facts + 1]:
            seconds, _ = timed(lambda: editor.edit(lm, [request]))
            times.append(seconds)
            if method in ("rome", "memit", "alphaedit"):
                floors.append(value_floor(lm, editor, request))
        entry = {"edit_seconds_median": median(times), "edit_seconds_max": max(times)}
        if floors:
            entry |= {"floor_seconds_median": median(floors),
                      "ratio_median": median([t / f for t, f in zip(times, floors)])}
        result["methods"][method] = entry
        print(json.dumps({method: entry}), file=sys.stderr)
    memit = get_editor("memit", shipped_path("memit", args.model))
    result["memit_batch"] = []
    for n in sizes:
        seconds, _ = timed(lambda: memit.edit(lm, requests[:n]))
        result["memit_batch"].append({"requests": n, "seconds": seconds, "edits_per_minute": 60 * n / seconds})
        print(json.dumps(result["memit_batch"][-1]), file=sys.stderr)
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)


if __name__ == "__main__":
    main()
