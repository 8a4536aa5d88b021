"""ROME edit time on the default model vs. its floor, and peak memory.

Edit time: median over 10 different facts of `RomeEditor.edit` (statistics and prefixes cached; the
first, warming edit is not counted). Floor: the forward/backward passes the algorithm cannot avoid — the
v* optimisation's passes over the prefixed prompts, as many forwards and backwards as the edit ran,
with the same batch, a leaf δ added at the edited layer and logits at the target positions only —
measured in the same run on the same facts.

Usage: .venv/bin/python benchmarks/bench_rome.py [--model gemma3-270m] [--config rome/gemma3-270m.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.settings import resolve_editor  # noqa: E402
from lmedit.editors._value import context_prefixes  # noqa: E402
from lmedit.hooks import patch  # noqa: E402
from lmedit.scoring import logits_at  # noqa: E402
from lmedit.tokens import pad_batch, prompt_ids, subject_span, target_ids  # noqa: E402
from lmedit.types import EditRequest, Site  # noqa: E402

FACTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("{} plays the sport of", "Michael Jordan", "soccer", "basketball"),
    EditRequest("The mother tongue of {} is", "Emmanuel Macron", "Japanese", "French"),
    EditRequest("{} is a product of", "iPhone", "Toyota", "Apple"),
    EditRequest("The capital of {} is", "Japan", "Berlin", "Tokyo"),
    EditRequest("{} was written by", "Hamlet", "Charles Dickens", "William Shakespeare"),
    EditRequest("{} is in downtown", "The Space Needle", "Chicago", "Seattle"),
    EditRequest("{} was founded by", "Microsoft", "Steve Jobs", "Bill Gates"),
    EditRequest("The official language of {} is", "Brazil", "Spanish", "Portuguese"),
    EditRequest("{} is the capital of", "Madrid", "Italy", "Spain"),
]


def floor_time(lm, layer: int, request: EditRequest, prefixes: list[str], n_forward: int) -> float:
    """Time of n_forward forwards and n_forward-1 backwards of the v* batch (the unavoidable passes).

    Adapted from lmedit/editors/_value.py::optimize_value: differs in keeping only the passes (no loss terms,
    optimiser or clamp), so the ratio measures everything else the editor does.
    """
    t_ids = target_ids(lm, request.target_new)
    seqs, rows, positions, lookups = [], [], [], []
    for r, prefix in enumerate(prefixes):
        template = prefix + request.prompt
        p = prompt_ids(lm, template.format(request.subject))
        seqs.append(p + t_ids[:-1])
        lookups.append(subject_span(lm, template, request.subject).last)
        rows += [r] * len(t_ids)
        positions += [len(p) - 1 + j for j in range(len(t_ids))]
    seqs.append(prompt_ids(lm, "{} is a".format(request.subject)))
    lookups.append(subject_span(lm, "{} is a", request.subject).last)
    rows.append(len(prefixes))
    positions.append(lookups[-1])
    batch = pad_batch(lm, seqs)
    rows_t, pos_t = torch.tensor(rows), torch.tensor(positions)
    lr, lc = torch.arange(len(seqs)), torch.tensor(lookups)
    delta = torch.zeros(lm.arch.d_model(lm.model), requires_grad=True)

    def add(act, site):
        out = act.clone()
        out[lr, lc] = out[lr, lc] + delta
        return out

    def run():
        for i in range(n_forward):
            with patch(lm, {Site("mlp.out", layer): add}):
                loss = logits_at(lm, batch.model_inputs(), rows_t, pos_t).float().logsumexp(-1).mean()
            if i < n_forward - 1:
                loss.backward()

    return timed(run)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    lm = lmedit.load(args.model)
    editor, _ = resolve_editor("rome", lm, args.config)
    editor.edit(lm, [FACTS[0]])  # warm: statistics, prefixes, allocator
    cfg = editor.config
    prefixes = context_prefixes(lm, ((5, cfg.prefixes_short), (10, cfg.prefixes_long)), seed=cfg.seed,
                                cache=editor.cache)
    layer = editor.layer_for(lm)
    edit_times, floor_times, steps = [], [], []
    for request in FACTS:
        seconds, result = timed(lambda: editor.edit(lm, [request]))
        n = result.info["requests"][0]["v_steps"]
        edit_times.append(seconds)
        floor_times.append(floor_time(lm, layer, request, prefixes, n))
        steps.append(n)
    ratios = [e / f for e, f in zip(edit_times, floor_times)]
    emit({
        "benchmark": "rome_edit", "model": args.model, "layer": layer, "n_facts": len(FACTS),
        "edit_s_median": round(median(edit_times), 2), "floor_s_median": round(median(floor_times), 2),
        "ratio_median": round(median(ratios), 3), "ratio_max": round(max(ratios), 3),
        "v_steps": steps, "n_prompts_per_step": len(prefixes) + 1, "peak_rss_mb": round(peak_rss_mb()),
        "target": "edit <= 1.5 x floor",
    })


if __name__ == "__main__":
    main()
