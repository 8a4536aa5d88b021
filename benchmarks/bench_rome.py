"""ROME edit time on a model against two floors, and what the first edit on a new model costs.

Edit time: median over the 10 hand-written facts below plus CounterFact records (tests/data, ROME
layout) of `RomeEditor.edit`, statistics and prefixes cached (the first, warming edit is not counted).
Floors, measured in the same run on the same facts with as many forwards and backwards as each edit ran,
a leaf δ added at the edited layer and logits at the target positions only:
  * floor_full: full passes over every position at every block (what the v* optimisation computed
    before δ-only passes);
  * floor_delta: the δ-dependent passes alone (`SplitForward`: positions from the subject's last
    token on, blocks from the edited one on), not counting their one-time set-up.
First edit on a new model: the key statistics and the context prefixes, computed into an empty cache.

Usage: .venv/bin/python benchmarks/bench_rome.py [--model gemma3-270m] [--config rome/gemma3-270m.yaml]
           [--records 10] [--no-first-edit]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.editors.steps.value import value_problem, context_prefixes  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.settings import resolve_editor  # noqa: E402
from lmedit.split_forward import SplitForward  # noqa: E402
from lmedit.stats import StatsCache  # noqa: E402
from lmedit.types import EditRequest, Site  # noqa: E402

COUNTERFACT = Path(__file__).resolve().parent.parent / "tests" / "data" / "counterfact" / "most_orthogonal.json"

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


def floor_time(lm, layer: int, request: EditRequest, prefixes: list[str], n_forward: int, *, delta_only: bool) -> float:
    """Time of n_forward forwards and n_forward-1 backwards of the v* batch (the passes the optimisation needs).

    Adapted from lmedit/editors/steps/value.py::optimize_values: differs in keeping only the passes (no loss terms,
    optimiser or clamp), so the ratio measures everything else the editor does. The `SplitForward` set-up
    (the fixed positions' one forward) is outside the timing.
    """
    problem = value_problem(lm, request, prefixes, "{} is a")
    seqs, lookups = problem.seqs, problem.lookups
    fwd = SplitForward(lm, seqs, lookups if delta_only else [0] * len(seqs), layer if delta_only else 0,
                       groups=[0] * len(seqs))   # one request: its rows may share lanes, as in the editor
    all_rows = torch.arange(len(seqs))
    cols = fwd.columns(all_rows, torch.tensor(lookups))
    rows = torch.tensor(problem.rows + [len(seqs) - 1])
    positions = torch.tensor(problem.positions + [lookups[-1]])
    score_cols = fwd.columns(rows, positions)
    delta = torch.zeros(lm.arch.d_model(lm.model), requires_grad=True)

    at, scored = fwd.address(all_rows, cols), fwd.address(rows, score_cols)

    def add(act, site):
        out = act.clone()
        out[at] = out[at] + delta
        return out

    def run():
        for i in range(n_forward):
            hidden = fwd.final(None, {Site("mlp.out", layer): add})
            loss = lm.arch.logits_from_final(lm.model, hidden[scored]).float().logsumexp(-1).mean()
            if i < n_forward - 1:
                loss.backward()

    return timed(run)[0]


def first_edit_cost(lm, editor) -> dict:
    """Seconds to compute the key statistics and the context prefixes into an empty cache."""
    cfg = editor.config
    layer = editor.layer_for(lm)
    with tempfile.TemporaryDirectory() as tmp:
        cache = StatsCache(Path(tmp))
        fresh = type(editor)(cfg, cache=cache)
        stats_s, _ = timed(lambda: fresh.covariance(lm, layer))
        prefix_s, _ = timed(lambda: context_prefixes(lm, ((5, cfg.prefixes_short), (10, cfg.prefixes_long)),
                                                     seed=cfg.seed, cache=cache))
    return {"statistics_s": round(stats_s, 1), "prefixes_s": round(prefix_s, 1), "corpus": cfg.corpus,
            "corpus_tokens": cfg.corpus_tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--config", default=None)
    parser.add_argument("--records", type=int, default=10, help="CounterFact records (tests/data) after the facts")
    parser.add_argument("--no-first-edit", action="store_true", help="skip timing statistics + prefixes from scratch")
    args = parser.parse_args()
    lm = lmedit.load(args.model)
    editor, _ = resolve_editor("rome", lm, args.config)
    first = None if args.no_first_edit else first_edit_cost(lm, editor)
    editor.edit(lm, [FACTS[0]])  # warm: statistics, prefixes, allocator
    cfg = editor.config
    prefixes = context_prefixes(lm, ((5, cfg.prefixes_short), (10, cfg.prefixes_long)), seed=cfg.seed,
                                cache=editor.cache)
    layer = editor.layer_for(lm)
    records = load_dataset("counterfact", COUNTERFACT).records[: args.records] if args.records else []
    requests = FACTS + [r.requests[0] for r in records]
    edit_times, full_times, delta_times, steps = [], [], [], []
    for request in requests:
        seconds, result = timed(lambda: editor.edit(lm, [request]))
        n = result.info["requests"][0]["v_steps"]
        edit_times.append(seconds)
        full_times.append(floor_time(lm, layer, request, prefixes, n, delta_only=False))
        delta_times.append(floor_time(lm, layer, request, prefixes, n, delta_only=True))
        steps.append(n)
    per_step = [e / n for e, n in zip(edit_times, steps)]
    emit({
        "benchmark": "rome_edit", "model": args.model, "layer": layer, "n_requests": len(requests),
        "n_facts": len(FACTS), "n_counterfact": len(records), "threads": torch.get_num_threads(),
        "edit_s_median": round(median(edit_times), 2),
        "floor_full_s_median": round(median(full_times), 2),
        "floor_delta_s_median": round(median(delta_times), 2),
        "edit_over_floor_delta_median": round(median([e / f for e, f in zip(edit_times, delta_times)]), 3),
        "edit_over_floor_full_median": round(median([e / f for e, f in zip(edit_times, full_times)]), 3),
        "floor_delta_over_full_median": round(median([d / f for d, f in zip(delta_times, full_times)]), 3),
        "edit_s_per_step_median": round(median(per_step), 3),
        "v_steps": steps, "n_prompts_per_step": len(prefixes) + 1, "first_edit": first,
        "peak_rss_mb": round(peak_rss_mb()),
        "target": "edit <= 1.3 x floor_delta; edit <= 0.4 x the edit time before delta-only passes",
    })


if __name__ == "__main__":
    main()
