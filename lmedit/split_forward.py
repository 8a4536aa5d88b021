"""Forwards that recompute only what an intervention can change: a key/value cache for the rest.

A value optimisation (ROME's v*, MEMIT's targets) adds δ at one token of each prompt (the subject's
last) at one layer l, then runs the model forward and backward once per step. Everything before that
token, at every layer, and every position at layers below l, is the same at every step. `SplitForward`
computes those once: the prompts' positions before each row's split point go through the model one time
(no gradient) and their attention keys/values are kept in the model's own key/value cache; the residual
stream entering block l at the positions from the split on is kept too. Each step then runs blocks
l…L on the positions from the split on only, reading the cached keys/values (`hooks.start_at` skips the
blocks below l).

The model's own machinery does the work, so this needs no per-architecture code: transformers' cache
classes (including Gemma's sliding-window layers), its attention masks and rotary or learned positions.
Rows are laid out as [left-padded part before the split | right-padded part from the split on], with
explicit position ids, exactly as batched generation with left padding lays them out.

Each row's fixed and recomputed parts are contiguous in that layout, so distances between real tokens,
and with them sliding-window masks, are those of the plain forward.

Not handled: caches that update in place (static caches); the model's own `DynamicCache` is used.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from lmedit.hooks import PatchFn, capture, patch, start_at
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM


def _cache_argument(model: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SplitForward:
    """A batch of token sequences whose positions before `splits[i]` (and blocks below `start_layer`) are fixed.

    Args:
        lm: the model bundle; its weights must not change while this object is used.
        seqs: token id lists, one per row.
        splits: per row, the first position that is recomputed (0 ≤ split < len(row)).
        start_layer: the first block that is recomputed; interventions may only touch blocks ≥ it.

    Example:
        fwd = SplitForward(lm, seqs, lookups, layer)   # lookups: each row's subject-last-token position
        hidden = fwd.final(None, {Site("mlp.out", layer): add_delta_at_column_0})
        # hidden: (B, S, d_model); column j of row i is position splits[i] + j
    """

    def __init__(self, lm: LM, seqs: Sequence[Sequence[int]], splits: Sequence[int], start_layer: int) -> None:
        if len(seqs) != len(splits) or not seqs:
            raise ValueError("SplitForward needs one split point per sequence and at least one sequence")
        for s, at in zip(seqs, splits):
            if not 0 <= at < len(s):
                raise ValueError(f"split {at} is outside a sequence of {len(s)} tokens")
        self.lm = lm
        self.start_layer = start_layer
        self.splits = torch.tensor(list(splits), device=lm.device)
        dev = lm.device
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        n = len(seqs)
        self.P = max(splits)                                   # prefix width (left-padded)
        self.S = max(len(s) - at for s, at in zip(seqs, splits))  # suffix width (right-padded)
        pre_ids = torch.full((n, self.P), pad, dtype=torch.long)
        pre_mask = torch.zeros((n, self.P), dtype=torch.long)
        suf_ids = torch.full((n, self.S), pad, dtype=torch.long)
        suf_mask = torch.zeros((n, self.S), dtype=torch.long)
        for i, (s, at) in enumerate(zip(seqs, splits)):
            if at:
                pre_ids[i, self.P - at:] = torch.tensor(list(s[:at]))
                pre_mask[i, self.P - at:] = 1
            rest = list(s[at:])
            suf_ids[i, : len(rest)] = torch.tensor(rest)
            suf_mask[i, : len(rest)] = 1
        start = torch.tensor(list(splits))
        self._pre = {"input_ids": pre_ids.to(dev), "attention_mask": pre_mask.to(dev),
                     "position_ids": (torch.arange(self.P)[None] - (self.P - start)[:, None]).clamp_min(0).to(dev)}
        self._suf = {"input_ids": suf_ids.to(dev), "attention_mask": torch.cat([pre_mask, suf_mask], 1).to(dev),
                     "position_ids": (start[:, None] + torch.arange(self.S)[None]).to(dev)}
        self._cache = None
        self._cache_arg = _cache_argument(lm.model)
        with torch.no_grad():
            if self.P:
                # The model's own cache class (sliding-window layers included), filled up to the final norm:
                # the unembedding of the fixed positions is never needed.
                self._cache = DynamicCache(config=lm.model.config)
                site = Site("final_norm")
                with capture(lm, [site], stop_after=site):
                    lm.model(**self._pre, **{self._cache_arg: self._cache}, use_cache=True)
            self._resid = None
            if start_layer > 0:
                site = Site("resid_out", start_layer - 1)
                with capture(lm, [site], stop_after=site) as acts:
                    lm.model(**self._inputs(None))
                self._resid = acts[site]

    def columns(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Suffix columns of original (row, position) pairs; positions must be ≥ their row's split."""
        return positions - self.splits[rows]

    def _inputs(self, rows: torch.Tensor | None) -> dict:
        inputs = dict(self._suf) if rows is None else {k: v[rows] for k, v in self._suf.items()}
        if self._cache is not None:
            # A fresh cache object per forward: the forward appends to it, the stored tensors stay as they are.
            cache = copy.copy(self._cache)
            cache.layers = [copy.copy(layer) for layer in self._cache.layers]
            if rows is not None:
                for layer in cache.layers:
                    layer.batch_select_indices(rows)
            inputs[self._cache_arg] = cache
            inputs["use_cache"] = True
        else:
            inputs["use_cache"] = False
        return inputs

    def final(self, rows: torch.Tensor | None = None, fns: Mapping[Site, PatchFn] | None = None) -> torch.Tensor:
        """Final-norm output at the recomputed positions of `rows` (all by default) -> (len(rows), S, d_model).

        `fns` patch sites at blocks ≥ start_layer (their activations cover the recomputed positions only;
        column 0 is each row's split point). Gradients flow when called outside `torch.no_grad()`.
        """
        site = Site("final_norm")
        resid = None if self._resid is None else (self._resid if rows is None else self._resid[rows])
        with capture(self.lm, [site], stop_after=site, detach=False) as acts, patch(self.lm, dict(fns or {})):
            if resid is None:
                self.lm.model(**self._inputs(rows))
            else:
                with start_at(self.lm, self.start_layer, resid):
                    self.lm.model(**self._inputs(rows))
        return acts[site]
