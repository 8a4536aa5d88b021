"""Benchmark: a full causal trace (3 kinds) of an 11-token prompt on the default model. Prints JSON.

Measures, in the same process:
  * the trace: wall time, forwards, and its work as the engine counts it (token-positions × blocks run,
    summed over forwards; rows unembedded);
  * the floor: the same work as plain batched forwards, i.e. full-length rows at full depth whose
    token-positions × n_layers equal the trace's block work, stopped at the final norm, plus the
    unembedding (logits and log-softmax) of as many rows as the trace unembeds. `ratio_to_floor` is
    the engine's overhead over that;
  * the naive loop, on a smaller grid (cells spread over kinds, traced tokens and layers) and
    extrapolated to the traced grid (tokens from the first subject token on, the cells the trace
    computes): ROME's `trace_with_patch`, one restored state per forward with batch = clean + samples.
    `speedup_vs_naive` uses ROME's full logits at every position; `speedup_vs_naive_last_logits` the
    same loop with logits at the last position only (a stricter baseline).

    python benchmarks/bench_trace.py [--model gemma3-270m] [--naive-cells 12]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import lmedit
from lmedit.hooks import capture, patch
from lmedit.tokens import find_subject, prompt_ids
from lmedit.tracing import KINDS, default_window, embedding_noise, trace_kinds, window_layers
from lmedit.tracing.engine import SITE_KIND
from lmedit.types import Site

PROMPT = "The Space Needle is located in the downtown area of"
SUBJECT = "The Space Needle"


def naive_cell(lm, ids, span, clean_states, sites, token, noise_eps, answer_id, *, all_logits):
    """ROME-style: one forward of [clean, corrupted × samples] restoring `sites` at `token`."""
    samples = noise_eps.shape[0]
    x = torch.tensor([ids] * (samples + 1))

    def corrupt(act, site):
        act = act.clone()
        act[1:, span.first:span.last + 1] += noise_eps
        return act

    def restore(act, site):
        act = act.clone()
        act[1:, token] = clean_states[site][token]
        return act

    with patch(lm, {Site("embed"): corrupt, **{s: restore for s in sites}}):
        # ROME computes logits at all positions; logits_to_keep=1 keeps only the last one.
        logits = lm.model(input_ids=x, logits_to_keep=0 if all_logits else 1).logits  # (1 + samples, pos, d_vocab)
    return torch.softmax(logits[1:, -1].float(), -1)[:, answer_id].mean().item()


def floor_time(lm, ids, block_positions, unembedded_rows, batch_rows=512, unembed_batch=256):
    """Plain batched forwards with the trace's block work, then its unembedding, in seconds."""
    n_pos, n_layers = len(ids), lm.n_layers
    floor_rows = math.ceil(block_positions / (n_pos * n_layers))
    x = torch.tensor([ids] * min(floor_rows, batch_rows))
    final = Site("final_norm")
    t0 = time.perf_counter()
    done, hidden = 0, []
    while done < floor_rows:
        with capture(lm, [final], stop_after=final) as acts:
            lm.model(input_ids=x[: min(batch_rows, floor_rows - done)], use_cache=False)
        hidden.append(acts[final][:, -1])
        done += len(hidden[-1])
    hidden = torch.cat(hidden)
    hidden = hidden.repeat(math.ceil(unembedded_rows / len(hidden)), 1)[:unembedded_rows]
    for start in range(0, unembedded_rows, unembed_batch):
        torch.log_softmax(lm.arch.logits_from_final(lm.model, hidden[start:start + unembed_batch]).float(), -1)
    return time.perf_counter() - t0, floor_rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--naive-cells", type=int, default=12, help="grid cells run by each naive loop")
    args = parser.parse_args()
    lm = lmedit.load(args.model)
    ids = prompt_ids(lm, PROMPT)
    span = find_subject(lm, PROMPT, SUBJECT)
    n_pos, n_layers, window = len(ids), lm.n_layers, default_window(lm.n_layers)
    noise = embedding_noise(lm)
    trace_kinds(lm, "Paris is in", "Paris", samples=1, tokens=[1])  # warm-up

    t0 = time.perf_counter()
    results = trace_kinds(lm, PROMPT, SUBJECT, samples=args.samples, noise=noise)
    trace_s = time.perf_counter() - t0
    work = results["resid"].extra
    # What the same batches would run without starting at the restored layer (full depth).
    traced = range(span.first, n_pos)
    rows_per_token = len(KINDS) * n_layers * args.samples
    full_depth = n_layers * ((1 + args.samples) * n_pos
                             + sum(args.samples * t + rows_per_token * (n_pos - t) for t in traced if t > 0))

    floor_s, floor_rows = floor_time(lm, ids, work["block_positions"], work["unembedded_rows"])

    answer_id = results["resid"].answer_token_id
    eps = torch.randn(args.samples, span.last - span.first + 1, lm.arch.d_model(lm.model),
                      generator=torch.Generator().manual_seed(0)) * noise
    all_sites = [Site(SITE_KIND[k], layer) for k in KINDS for layer in range(n_layers)]
    clean_states = {}
    with patch(lm, {s: (lambda act, site: clean_states.__setitem__(site, act[0].clone())) for s in all_sites}):
        lm.model(input_ids=torch.tensor([ids]))
    cells = [(k, t, layer) for k in KINDS for t in traced for layer in range(n_layers)]
    step = max(1, len(cells) // args.naive_cells)
    sample_cells = cells[::step][: args.naive_cells]
    naive = {}
    for all_logits in (True, False):
        t0 = time.perf_counter()
        for kind, t, layer in sample_cells:
            layers = [layer] if kind == "resid" else window_layers(layer, window, n_layers)
            naive_cell(lm, ids, span, clean_states, [Site(SITE_KIND[kind], j) for j in layers], t, eps,
                       answer_id, all_logits=all_logits)
        naive[all_logits] = (time.perf_counter() - t0) / len(sample_cells)

    print(json.dumps({
        "model": args.model, "prompt": PROMPT, "n_tokens": n_pos, "n_layers": n_layers, "samples": args.samples,
        "window": window, "threads": torch.get_num_threads(),
        "trace_wall_s": round(trace_s, 2), "n_forwards": results["resid"].n_forwards,
        "block_positions": work["block_positions"], "block_positions_full_depth": full_depth,
        "rows_unembedded": work["unembedded_rows"],
        "floor_rows": floor_rows, "floor_wall_s": round(floor_s, 2), "ratio_to_floor": round(trace_s / floor_s, 3),
        "grid_cells_traced": len(cells), "naive_cells_run": len(sample_cells),
        "naive_s_per_cell": round(naive[True], 3), "naive_last_logits_s_per_cell": round(naive[False], 3),
        "naive_full_grid_s_estimated": round(naive[True] * len(cells), 1),
        "speedup_vs_naive": round(naive[True] * len(cells) / trace_s, 2),
        "speedup_vs_naive_last_logits": round(naive[False] * len(cells) / trace_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
