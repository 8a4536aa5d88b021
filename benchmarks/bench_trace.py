"""Benchmark: a full causal trace (3 kinds) of a 10-token prompt on the default model. Prints JSON.

Measures, in the same process: the trace's wall time and forward passes; the floor (the same number of
token-positions run as plain batched forwards, logits at the last position only); and the naive loop
(ROME's `trace_with_patch`: one restored state per forward, batch = clean + samples, full logits) on a
smaller grid, extrapolated to the full grid for the speedup.

    OMP_NUM_THREADS=1 python benchmarks/bench_trace.py [--model gemma3-270m] [--naive-cells 12]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lmedit
from lmedit.hooks import patch
from lmedit.scoring import logits_at
from lmedit.tokens import find_subject, prompt_ids
from lmedit.tracing import KINDS, _SITE_KIND, default_window, embedding_noise, trace_kinds, window_layers
from lmedit.types import Site

PROMPT = "The Space Needle is located in the downtown area of"
SUBJECT = "The Space Needle"


def naive_cell(lm, ids, span, clean_states, sites, token, noise_eps, answer_id):
    """ROME-style: one forward of [clean, corrupted × samples] restoring `sites` at `token`, full logits."""
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
        logits = lm.model(input_ids=x).logits  # (1 + samples, pos, d_vocab): all positions, as ROME does
    return torch.softmax(logits[1:, -1].float(), -1)[:, answer_id].mean().item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--naive-cells", type=int, default=12, help="grid cells run by the naive loop")
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
    n_forwards = results["resid"].n_forwards
    # Token-positions the trace ran: baseline (1 + samples) × n_pos; per restored token t, a prefix of
    # samples × t and rows × (n_pos - t), rows = 3 kinds × n_layers × samples.
    rows_per_token = len(KINDS) * n_layers * args.samples
    traced = range(span.first, n_pos)
    positions = (1 + args.samples) * n_pos + sum(args.samples * t + rows_per_token * (n_pos - t) for t in traced)
    last_rows = len(traced) * rows_per_token + 1 + args.samples

    # Floor: the same token-positions as plain forwards of full-length rows, logits at the last position only.
    floor_rows = positions // n_pos
    x = torch.tensor([ids] * min(floor_rows, 512))
    t0 = time.perf_counter()
    done = 0
    while done < floor_rows:
        batch = x[: min(512, floor_rows - done)]
        logits_at(lm, {"input_ids": batch}, torch.arange(len(batch)), torch.full((len(batch),), n_pos - 1))
        done += len(batch)
    floor_s = time.perf_counter() - t0

    # Naive loop on a smaller grid: cells spread over kinds, tokens and layers.
    answer_id = results["resid"].answer_token_id
    eps = torch.randn(args.samples, span.last - span.first + 1, lm.arch.d_model(lm.model),
                      generator=torch.Generator().manual_seed(0)) * noise
    all_sites = [Site(_SITE_KIND[k], layer) for k in KINDS for layer in range(n_layers)]
    clean_states = {}
    with patch(lm, {s: (lambda act, site: clean_states.__setitem__(site, act[0].clone())) for s in all_sites}):
        lm.model(input_ids=torch.tensor([ids]))
    cells = [(k, t, layer) for k in KINDS for t in range(n_pos) for layer in range(n_layers)]
    step = max(1, len(cells) // args.naive_cells)
    sample_cells = cells[::step][: args.naive_cells]
    t0 = time.perf_counter()
    for kind, t, layer in sample_cells:
        layers = [layer] if kind == "resid" else window_layers(layer, window, n_layers)
        naive_cell(lm, ids, span, clean_states, [Site(_SITE_KIND[kind], j) for j in layers], t, eps, answer_id)
    naive_per_cell = (time.perf_counter() - t0) / len(sample_cells)
    naive_full = naive_per_cell * len(cells)

    print(json.dumps({
        "model": args.model, "prompt": PROMPT, "n_tokens": n_pos, "n_layers": n_layers, "samples": args.samples,
        "window": window, "threads": torch.get_num_threads(),
        "trace_wall_s": round(trace_s, 2), "n_forwards": n_forwards,
        "token_positions": positions, "rows_unembedded": last_rows,
        "floor_wall_s": round(floor_s, 2), "ratio_to_floor": round(trace_s / floor_s, 3),
        "grid_cells": len(cells), "naive_cells_run": len(sample_cells),
        "naive_s_per_cell": round(naive_per_cell, 3), "naive_full_grid_s_estimated": round(naive_full, 1),
        "speedup_vs_naive": round(naive_full / trace_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
