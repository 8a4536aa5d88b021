"""Suspending many applied weight edits and putting them back, as a sequential evaluation does for every chunk
of 8 records at every checkpoint (`_post_with_kl`: the unedited model's distributions for the KL).

`lm.edits.suspended(edits)`, when the edits are the newest applied ones in order (a sequential run's own), saves
each changed parameter's current value, writes its oldest original once, and writes the saved value back after
the block, the edits rejoining the stack without re-adding their deltas. This compares, in one run on the same
edits:

- "suspended": `with lm.edits.suspended(edits): pass`;
- "undo_apply": what `suspended` did before, with this commit's undo and apply: undo every edit, newest first,
  and re-apply each in order (each re-apply adds its delta in float64 over the whole matrix and checks it is
  finite). Run the script on the previous commit for the old `suspended` itself.

Both must leave the weights bit-identical to before (checked). It also reports what the edits keep for their
undo (a copy of the old value per `KEEP_EVERY` edits, against one per edit before), the median time of one
apply (which digests the value it writes) and of undoing the newest edit (its old value rebuilt from the nearest
copy below). The edits are synthetic rank-one deltas on the
MLP output matrix of one layer (ROME's shape: the shipped gemma3-270m setting edits layer 2), so the cost
depends on their number and the matrix's size, not on what they say.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_weight_suspend.py [--model gemma3-270m] [--edits 300]
       [--layer 2] [--repeats 3]
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
from lmedit.editors import ParamDelta, WeightEdit  # noqa: E402


def synthetic_edits(lm, n: int, layer: int) -> list[WeightEdit]:
    weight = lm.arch.weight(lm.model, layer, "mlp_out")
    name = next(k for k, p in lm.model.named_parameters() if p is weight)
    gen = torch.Generator().manual_seed(0)
    rows, cols = weight.shape
    return [WeightEdit({name: ParamDelta(left=torch.randn(rows, 1, generator=gen) * 1e-3,
                                         right=torch.randn(cols, 1, generator=gen))},
                       method="synthetic", base_fingerprint=lm.fingerprint) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--edits", type=int, default=300)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = lmedit.load(args.model)
    edits = synthetic_edits(lm, args.edits, args.layer)
    apply_seconds = []
    for edit in edits:
        start = time.perf_counter()
        edit.apply(lm)
        apply_seconds.append(time.perf_counter() - start)
    name = next(iter(edits[0].deltas))
    # What the edits keep for their undo: copies only every KEEP_EVERY edits (lmedit.editors.originals).
    copies = [e._originals[name] for e in edits if isinstance(e._originals[name], torch.Tensor)]
    kept_mb = sum(c.numel() * c.element_size() for c in copies) / 2**20
    one_copy_mb = edits[0]._originals[name].numel() * edits[0]._originals[name].element_size() / 2**20
    undo_top = []
    for _ in range(args.repeats):  # the newest edit: its old value rebuilt from the nearest copy below
        start = time.perf_counter()
        edits[-1].undo()
        undo_top.append(time.perf_counter() - start)
        edits[-1].apply(lm)
    edited = lm.model.get_parameter(name).detach().clone()

    def undo_apply() -> None:
        for edit in reversed(edits):
            edit.undo()
        for edit in edits:
            edit.apply(lm)

    def suspended() -> None:
        with lm.edits.suspended(edits, lm=lm):
            pass

    times: dict[str, list[float]] = {"suspended": [], "undo_apply": []}
    exact: dict[str, bool] = {}
    for _ in range(args.repeats):
        for variant, fn in (("suspended", suspended), ("undo_apply", undo_apply)):
            start = time.perf_counter()
            fn()
            times[variant].append(time.perf_counter() - start)
            exact[variant] = exact.get(variant, True) and torch.equal(lm.model.get_parameter(name), edited) \
                and list(lm.edits) == edits
    med = {k: median(v) for k, v in times.items()}
    emit({"benchmark": "weight_suspend", "model": args.model, "edits": args.edits, "param": name,
          "param_shape": list(edited.shape), "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
          "seconds": times, "median_seconds": med, "bit_identical_after": exact,
          "speedup_undo_apply_over_suspended": med["undo_apply"] / med["suspended"],
          "apply_median_seconds": median(apply_seconds), "undo_newest_median_seconds": median(undo_top),
          "kept_copies": len(copies), "kept_mb": kept_mb, "one_copy_per_edit_mb": one_copy_mb * len(edits),
          "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()
