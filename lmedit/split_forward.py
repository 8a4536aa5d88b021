"""Forwards that recompute only what an intervention can change: a key/value cache for the rest.

A value optimisation (ROME's v*, MEMIT's targets) adds δ at one token of each prompt (the subject's
last) at one layer l, then runs the model forward and backward once per step. Everything before that
token, at every layer, and every position at layers below l, is the same at every step. `SplitForward`
computes those once: the prompts' positions before each row's split point go through the model one time
(no gradient) and their attention keys/values are kept in the model's own key/value cache; the residual
stream entering block l at the positions from the split on is kept too. Each step then runs blocks
l…L on the positions from the split on only, reading the cached keys/values (`hooks.start_at` skips the
blocks below l).

Rows are packed into *lanes* (batch rows of the forward): rows whose recomputed parts are short share a lane
with others of the same group (first-fit, longest first, up to the longest recomputed part), so a batch
mixing short prompts with long texts (the quiet option's) is neither padded to the long ones nor split into
two forwards; each forward reads the weights once, which on a CPU costs as much as the arithmetic. A lane
is laid out as [left-padded fixed parts of its rows | right-padded recomputed parts of its rows], with
explicit position ids, and an attention mask (built here, passed to the model as a custom 4D mask) lets
each token see only earlier tokens of its own row, within the sliding window on sliding-window layers
(`config.layer_types` / `config.sliding_window`). With one row per lane (the default) this is the layout
of batched generation with left padding.

The model's own machinery does the rest, so this needs no per-architecture code: its key/value cache,
rotary or learned positions, and attention (eager or SDPA: the mask is additive, 0 or the dtype's minimum).
A padded query attends to itself only, so no softmax row is empty.

Not handled: caches that update in place (static caches); attention kinds other than full and sliding
window (chunked attention raises `ValueError`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Hashable, Mapping, Sequence
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


def attention_windows(config) -> dict[str | None, int | None]:
    """The attention kinds of a model config -> their window (None: full attention).

    Keyed by layer type when the model mixes kinds (Gemma 2/3, Qwen 2: it then takes a mask per kind),
    else one entry under None."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not types:
        return {None: window}   # Mistral-like configs: one kind, sliding when a window is set
    kinds = {}
    for kind in set(types):
        if kind not in ("full_attention", "sliding_attention"):
            raise ValueError(f"attention kind {kind!r} is not supported by SplitForward")
        kinds[kind] = window if kind == "sliding_attention" else None
    return kinds if len(kinds) > 1 else {None: next(iter(kinds.values()))}


def _lanes(lengths: Sequence[int], groups: Sequence[Hashable], width: int) -> list[list[int]]:
    """First-fit decreasing: rows (by recomputed length) into lanes of `width`, a lane holding one group only."""
    lanes: list[list[int]] = []
    used: list[int] = []
    by_group: dict[Hashable, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        open_lanes = by_group.setdefault(groups[i], [])
        for lane in open_lanes:
            if used[lane] + lengths[i] <= width:
                lanes[lane].append(i)
                used[lane] += lengths[i]
                break
        else:
            open_lanes.append(len(lanes))
            lanes.append([i])
            used.append(lengths[i])
    return lanes


def _mask(q_pos: torch.Tensor, q_seg: torch.Tensor, k_pos: torch.Tensor, k_seg: torch.Tensor, self_col: torch.Tensor,
          window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (lanes, 1, Q, K): a query sees keys of its own row at its position or before (and within
    `window`); a padded query (segment -1) sees only the key at `self_col` (its own)."""
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] >= 0)
    seen = same & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        seen &= q_pos[:, :, None] - k_pos[:, None, :] < window
    pad_q = q_seg < 0
    own = torch.zeros_like(seen)
    own[:, torch.arange(q_pos.shape[1]), self_col] = True
    seen = torch.where(pad_q[:, :, None], own, seen)
    out = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    return out.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


class SplitForward:
    """A batch of token sequences whose positions before `splits[i]` (and blocks below `start_layer`) are fixed.

    Args:
        lm: the model bundle; its weights must not change while this object is used.
        seqs: token id lists, one per row.
        splits: per row, the first position that is recomputed (0 ≤ split < len(row)).
        start_layer: the first block that is recomputed; interventions may only touch blocks ≥ it.
        groups: per row, a key; rows share a lane only with rows of the same key (default: one row per lane).
            A forward runs whole lanes (`lanes_of(rows)`).

    Activations inside a forward, and `final`'s result, are (lanes, width, d_model); `address(rows, cols)`
    gives the index of column `cols` of each row's recomputed part (column 0 is the row's split point).

    Example:
        fwd = SplitForward(lm, seqs, lookups, layer)   # lookups: each row's subject-last-token position
        at = fwd.address(torch.arange(len(seqs)), torch.zeros(len(seqs), dtype=torch.long))
        hidden = fwd.final(None, {Site("mlp.out", layer): lambda act, site: act.index_put(at, act[at] + delta)})
        hidden[at]   # (rows, d_model): each row's final-norm output at its split point
    """

    def __init__(self, lm: LM, seqs: Sequence[Sequence[int]], splits: Sequence[int], start_layer: int,
                 groups: Sequence[Hashable] | None = None) -> None:
        if len(seqs) != len(splits) or not seqs:
            raise ValueError("SplitForward needs one split point per sequence and at least one sequence")
        if groups is not None and len(groups) != len(seqs):
            raise ValueError("SplitForward needs one group per sequence")
        for s, at in zip(seqs, splits):
            if not 0 <= at < len(s):
                raise ValueError(f"split {at} is outside a sequence of {len(s)} tokens")
        self.lm = lm
        self.start_layer = start_layer
        dev = lm.device
        n = len(seqs)
        self.splits = torch.tensor(list(splits), device=dev)
        lengths = [len(s) - at for s, at in zip(seqs, splits)]
        self.S = max(lengths)                                   # lane width of the recomputed part
        lanes = _lanes(lengths, list(groups) if groups is not None else list(range(n)), self.S)
        self.P = max(sum(splits[i] for i in lane) for lane in lanes)   # lane width of the fixed part
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        n_lanes = len(lanes)
        fill = (("ids", pad), ("pos", 0), ("seg", -1))    # token ids, position ids, row of each column (-1: pad)
        pre = {k: torch.full((n_lanes, self.P), v, dtype=torch.long) for k, v in fill}
        suf = {k: torch.full((n_lanes, self.S), v, dtype=torch.long) for k, v in fill}
        self.lane = torch.empty(n, dtype=torch.long)
        self.offset = torch.empty(n, dtype=torch.long)          # each row's first column in its lane's recomputed part
        for j, lane in enumerate(lanes):
            at_pre = self.P - sum(splits[i] for i in lane)
            at_suf = 0
            for i in lane:
                s, cut = list(seqs[i]), splits[i]
                pre["ids"][j, at_pre:at_pre + cut] = torch.tensor(s[:cut], dtype=torch.long)
                pre["pos"][j, at_pre:at_pre + cut] = torch.arange(cut)
                pre["seg"][j, at_pre:at_pre + cut] = i
                at_pre += cut
                suf["ids"][j, at_suf:at_suf + lengths[i]] = torch.tensor(s[cut:], dtype=torch.long)
                suf["pos"][j, at_suf:at_suf + lengths[i]] = torch.arange(cut, len(s))
                suf["seg"][j, at_suf:at_suf + lengths[i]] = i
                self.lane[i], self.offset[i] = j, at_suf
                at_suf += lengths[i]
        self.lane, self.offset = self.lane.to(dev), self.offset.to(dev)
        self.n_lanes = n_lanes
        dtype = next(lm.model.parameters()).dtype
        windows = attention_windows(lm.model.config)
        both_pos, both_seg = torch.cat([pre["pos"], suf["pos"]], 1), torch.cat([pre["seg"], suf["seg"]], 1)
        self._suf_masks = {kind: _mask(suf["pos"], suf["seg"], both_pos, both_seg, self.P + torch.arange(self.S),
                                       w, dtype).to(dev) for kind, w in windows.items()}
        self._suf = {"input_ids": suf["ids"].to(dev), "position_ids": suf["pos"].to(dev)}
        self._cache = None
        self._cache_arg = _cache_argument(lm.model)
        with torch.no_grad():
            if self.P:
                # A cache of plain (unwindowed) layers, filled up to the final norm: the masks apply the windows,
                # and the unembedding of the fixed positions is never needed.
                pre_masks = {kind: _mask(pre["pos"], pre["seg"], pre["pos"], pre["seg"], torch.arange(self.P),
                                         w, dtype).to(dev) for kind, w in windows.items()}
                self._cache = DynamicCache()
                site = Site("final_norm")
                with capture(lm, [site], stop_after=site):
                    lm.model(input_ids=pre["ids"].to(dev), position_ids=pre["pos"].to(dev),
                             attention_mask=self._mask_argument(pre_masks), use_cache=True,
                             **{self._cache_arg: self._cache})
            self._resid = None
            if start_layer > 0:
                site = Site("resid_out", start_layer - 1)
                with capture(lm, [site], stop_after=site) as acts:
                    lm.model(**self._inputs(None))
                self._resid = acts[site]

    @staticmethod
    def _mask_argument(masks: Mapping[str | None, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        return masks[None] if None in masks else dict(masks)

    def columns(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Recomputed-part columns of original (row, position) pairs; positions must be ≥ their row's split."""
        return positions - self.splits[rows]

    def lanes_of(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The lanes holding `rows` (None: all lanes). A forward of them also computes any other rows sharing
        those lanes (rows of the same group), which the masks keep apart."""
        if rows is None:
            return None
        lanes = torch.unique(self.lane[rows])
        return None if len(lanes) == self.n_lanes else lanes

    def address(self, rows: torch.Tensor, cols: torch.Tensor, lanes: torch.Tensor | None = None) -> tuple:
        """Index (lane, column) into a forward's activations of `lanes` (None: all) for `cols` of `rows`."""
        lane = self.lane[rows]
        if lanes is not None:
            local = torch.full((self.n_lanes,), -1, dtype=torch.long, device=lane.device)
            local[lanes] = torch.arange(len(lanes), device=lane.device)
            lane = local[lane]
        return lane, self.offset[rows] + cols

    def _inputs(self, lanes: torch.Tensor | None) -> dict:
        pick = (lambda t: t) if lanes is None else (lambda t: t[lanes])
        inputs = {k: pick(v) for k, v in self._suf.items()}
        inputs["attention_mask"] = self._mask_argument({k: pick(v) for k, v in self._suf_masks.items()})
        if self._cache is not None:
            # A fresh cache object per forward: the forward appends to it, the stored tensors stay as they are.
            cache = copy.copy(self._cache)
            cache.layers = [copy.copy(layer) for layer in self._cache.layers]
            if lanes is not None:
                for layer in cache.layers:
                    layer.batch_select_indices(lanes)
            inputs[self._cache_arg] = cache
            inputs["use_cache"] = True
        else:
            inputs["use_cache"] = False
        return inputs

    def final(self, lanes: torch.Tensor | None = None, fns: Mapping[Site, PatchFn] | None = None) -> torch.Tensor:
        """Final-norm output of `lanes` (all by default; `lanes_of(rows)` names them) -> (len(lanes), S, d_model).

        `fns` patch sites at blocks ≥ start_layer (their activations are laid out the same way; index them
        with `address(rows, cols, lanes)`). Gradients flow when called outside `torch.no_grad()`.
        """
        site = Site("final_norm")
        resid = None if self._resid is None else (self._resid if lanes is None else self._resid[lanes])
        with capture(self.lm, [site], stop_after=site, detach=False) as acts, patch(self.lm, dict(fns or {})):
            if resid is None:
                self.lm.model(**self._inputs(lanes))
            else:
                with start_at(self.lm, self.start_layer, resid):
                    self.lm.model(**self._inputs(lanes))
        return acts[site]
