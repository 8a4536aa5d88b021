"""Suspending many applied WISE edits and re-applying them, as an evaluation does for every chunk of records.

`lm.edits.suspended(edits)` undoes the edits for a block (the unedited model) and re-applies them after. With
adaptor edits the hook's state (WISE: the dense side memories summed from every edit's sparse increment) used to
be rebuilt at the first forward after each block; now the hook function, with its state, is parked from the undo
to the re-apply. This compares, in one run on the same edits:

- "suspended": `with lm.edits.suspended(edits): pass`, then one forward (the state reused);
- "undo_apply": the same undo and re-apply done by hand outside `suspended` (nothing parked), then one forward
  (the state rebuilt from the edits, as before).

The edits are synthetic (random sparse increments at the default WISE mask ratio, keys drawn from a normal
distribution, `memory_size` edits per memory): the cost measured depends on their number and shapes, not on what
they say. The forward is one short prompt; "steady_forward" is the same forward with nothing re-applied.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_adaptor_suspend.py [--model gemma3-270m] [--edits 200]
       [--repeats 3]
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
from lmedit.editors.wise import WiseConfig, WiseEditor  # noqa: E402
from lmedit.editors.wise_memory import WiseEdit, edit_mask, memory_id  # noqa: E402
from lmedit.types import Site  # noqa: E402


def synthetic_edits(lm, n: int, config: WiseConfig) -> list[WiseEdit]:
    memory_size, ratio = config.memory_size, config.mask_ratio
    layer = WiseEditor(config).layer_for(lm)  # the layer the editor would train at
    shape = tuple(lm.arch.weight(lm.model, layer, "mlp_out").shape)
    gen = torch.Generator().manual_seed(0)
    request = lmedit.EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris")
    edits = []
    for i in range(n):
        seed = i // memory_size
        delta = torch.randn(shape, generator=gen) * 1e-3 * edit_mask(shape, ratio, seed, 0)
        keys = torch.randn(1, shape[1], generator=gen)
        quiet = torch.randn(8, shape[1], generator=gen)
        edits.append(WiseEdit([request], delta, keys, quiet, site=Site("mlp.out", layer), memory=memory_id(seed),
                              act_ratio=config.act_ratio, mask_seed=seed, founder=i % memory_size == 0,
                              method="wise", base_fingerprint=lm.fingerprint))
    return edits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = lmedit.load(args.model)
    config = WiseConfig()
    edits = synthetic_edits(lm, args.edits, config)
    for edit in edits:
        edit.apply(lm)
    ids = lm.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids.to(lm.device)

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start

    forward()  # the state built once
    reference = lm.model(input_ids=ids, use_cache=False).logits.detach()
    times: dict[str, dict[str, list[float]]] = {"suspended": {"block": [], "first_forward": []},
                                                "undo_apply": {"block": [], "first_forward": []}}
    steady = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with lm.edits.suspended(edits, lm=lm):
            pass
        times["suspended"]["block"].append(time.perf_counter() - start)
        times["suspended"]["first_forward"].append(forward())
        start = time.perf_counter()
        for edit in reversed(edits):
            edit.undo()
        for edit in edits:
            edit.apply(lm)
        times["undo_apply"]["block"].append(time.perf_counter() - start)
        times["undo_apply"]["first_forward"].append(forward())
        steady.append(forward())
    same = bool(torch.equal(lm.model(input_ids=ids, use_cache=False).logits, reference))
    result = {"model": args.model, "edits": args.edits, "memories": -(-args.edits // config.memory_size),
              "threads": torch.get_num_threads(), "repeats": args.repeats, "same_logits_after": same,
              "steady_forward_s": median(steady)}
    for name, parts in times.items():
        result[name] = {k + "_s": median(v) for k, v in parts.items()}
        result[name]["total_s"] = result[name]["block_s"] + result[name]["first_forward_s"]
    result["undo_apply_over_suspended"] = result["undo_apply"]["total_s"] / result["suspended"]["total_s"]
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)


if __name__ == "__main__":
    main()
