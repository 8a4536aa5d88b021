"""WISE (Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language
Models", arXiv:2405.14768): edits trained into *side memories*, copies of one MLP's value matrix, and a router that
sends an input to a side memory only when its activations say it is about an edit. This module trains the edits;
`lmedit.editors.wise_memory` holds the edit kind, the side memories and the router.

A side memory sits at block `layer`'s MLP down-projection W_v (d_model × d_mlp; the paper's "value matrix" of a
late-ish FFN, e.g. `mlp.down_proj` of LLaMA's layer 27 in its code). The main memory, W_v itself, is never written;
a side memory is W_v + ΔW, and each edit holds the increment its training added to its memory's ΔW.

- Memories (the paper's WISE-Retrieve; its code's `save_freq`): an edit joins the memory of the newest applied
  WISE edit at the layer while that memory holds fewer than `memory_size` applied edits, and is trained on top of
  it; otherwise it starts a new memory, with a new random mask. The forward's cost grows with the memories, not the
  edits (`wise_memory`).
- Routing (the paper's memory routing): for an input whose layer input (`mlp.key`, A(x), d_mlp) is a, a memory's
  activation indicator is Δ_act = ‖a · ΔWᵀ‖, what it would add to the main memory's output. Where Δ_act > ε the
  memory answers: main output + a · ΔWᵀ, so everything left to the main memory is bit for bit the unedited output.
  The paper routes per input (its code: the max of Δ_act over the input's tokens); here the decision is made along
  each row, causally: a row reads a memory from its first position where it fires on (several that fire: their
  sum). So the edit prompt (prompt
  + target, teacher-forced) reads it from its last subject token on, an input that never fires is untouched, and
  right-padding cannot change a row.
- Training (the paper's editing of the side memory): the increment starts at zero and only a random subset of its
  entries, a fraction ρ = `mask_ratio` (the paper's 0.2), may move: ΔW = ΔW_memory + M ⊙ P with M the memory's fixed
  random 0/1 mask, so P's gradient outside the subset is zero (the paper's masked gradient). The loss is target_new's
  teacher-forced NLL per target token (FT-M's objective, `editors/steps/finetune.py`'s `target_batch` /
  `train_on_targets`, Adam and early stop) with the memory read from the subject's last token on, plus the paper's
  routing margin loss, with α, β, γ in units of s, the main memory's mean output norm at the edit's subject tokens
  (the paper's 5, 20, 10 are absolute, for LLaMA's activations):
      mean⁺ max(0, Δ_act(x_i) − α·s) + mean⁺ max(0, β·s − Δ_act(x_e))
      + mean⁺ max(0, γ·s − (Δ_act(x_e) − Δ_act(x_i)))
  over edit activations x_e (the last subject token of each request) and irrelevant ones x_i (every position of a
  fixed set of generic prompts and of each request's template with stand-in subjects such as "it", left-padded into
  one batch as generation pads, the padding included; and the edit prompt before its last subject token), divided
  by s; mean⁺ averages over the violating terms only, as the paper's code does. An edit keeps its x_e and its own x_i (template and prompt tokens: `subject_keys`, `quiet_keys`), and the
  next edits of its memory train on them too: the memory keeps firing on its earlier edits and stays quiet where
  they were taught to. That replays their inputs at no forward's cost (the paper's replay, Appendix B.3, runs them).
  Each step runs only the blocks from `layer` on (`hooks.start_at`), with the layer's output as the applied memories
  served it taken from one forward before the steps (`lm.edits.muted`: their cost is paid once per edit, not per
  step); the margin terms need no forward at all (the layer's inputs do not depend on ΔW).
- Threshold ε of a memory = min over its applied edits of `act_ratio` × their least subject Δ_act (the paper's code:
  the least editing activation × 0.88), recomputed from the memory as it is; `info["separated"]` says whether
  every irrelevant activation the edit trained on stays below it.
- Knowledge sharding: `shards` > 1 splits an edit's requests round-robin into shards, each trained into its own
  random subset; the shards' increments are merged into the edit's one increment by Ties-merging (Yadav et al.
  2023, arXiv:2306.01708: per entry, elect the sign of the sum, average the deltas that agree with it; no trimming,
  each delta being already sparse). With masks that do not overlap, the merge is exactly their sum.

Legend: a = `mlp.key` (…, d_mlp); ΔW (d_model, d_mlp), canonical (d_out, d_in) orientation; ε = threshold; s =
scale; M = `edit_mask(...)`.

Not handled: WISE-Merge (merging memories into the main memory) and the paper's replay of earlier edits' inputs
(Appendix B.3); the paper's SGD (lr 1.0) and elementwise norm constraint are replaced by Adam with FT's early stop
(`norm_constraint`, off by default, clamps each edit's |increment| elementwise); random-prefix augmentation of the
edit prompt; EditDescriptors (triplets only); generation with a key/value cache decides per new token (a cached
step sees only its own position: tokens generated after the first read a memory only where they fire themselves,
unlike a full forward of the same text); in a left-padded batch (generation) the router does not know padding from
text: it is trained to stay quiet on it, but a row whose padding fired would read the memory throughout; writing
the side memories into the weights (`lmedit export-model` refuses adaptor edits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lmedit.config import check_ranges, to_dict
from lmedit.editors.adaptor import LayerAtDepth, served
from lmedit.editors.base import Editor, EditorConfig, check_requests
from lmedit.editors.steps.finetune import TargetBatch, target_batch, train_on_targets, trainable_copies
from lmedit.editors.wise_memory import WiseEdit, build_memories, delta_act, edit_mask, mask_seed, memory_id, newest_memory, \
    ties_merge
from lmedit.errors import ConfigError, EditFailedError
from lmedit.hooks import capture, patch, start_at
from lmedit.registry import editors
from lmedit.tokens import pad_batch, prompt_ids, subject_span
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

__all__ = ["GENERIC_PROMPTS", "WiseConfig", "WiseEdit", "WiseEditor", "edit_mask", "ties_merge"]

# Irrelevant inputs the router learns to leave to the main memory (the paper: random irrelevant text). Fixed,
# generic, and no evaluation data.
GENERIC_PROMPTS = (
    "The weather today is",
    "Once upon a time there was a",
    "In 1998 the company announced that",
    "My favourite food is",
    "The results of the experiment show that",
    "She opened the door and",
    "Water boils at a temperature of",
    "The best way to learn a language is",
)
# Stand-in subjects: each request's template filled with these is irrelevant too, so the template's own tokens
# (shared with every neighbour prompt) do not fire the router.
STAND_INS = ("it", "this", "someone", "John Smith", "the company", "a small town")


@dataclass(frozen=True, kw_only=True)
class WiseConfig(EditorConfig):
    """WISE settings. Defaults: the paper's mask ratio and act ratio (its code: 0.2, 0.88); the rest from the sweep
    on gemma3-270m (configs/wise/gemma3-270m.yaml)."""

    layer: int | None = None         # block whose MLP down-projection gets the side memory; None: DEPTH of the depth
    mask_ratio: float = 0.2          # ρ: fraction of the side memory's entries one shard trains (paper: 0.2)
    shards: int = 1                  # k: an edit's requests are split into this many shards, Ties-merged
    lr: float = 1e-3                 # Adam learning rate of ΔW
    steps: int = 70                  # most Adam steps (the paper's code: 70 SGD iterations on LLaMA)
    early_stop_loss: float = 5e-2    # stop once NLL + margin loss is below this; 0 = never
    alpha: float = 0.1               # irrelevant inputs: Δ_act pushed below alpha·s (s: main output norm)
    beta: float = 0.5                # edit inputs: Δ_act pushed above beta·s
    gamma: float = 0.3               # and above every irrelevant Δ_act by gamma·s
    act_ratio: float = 0.88          # threshold ε = act_ratio × the edit's least subject Δ_act, < 1 (paper's code: 0.88)
    norm_constraint: float = 0.0     # > 0: clamp |ΔW| elementwise to this after every step (paper's code: 1.0); 0 = off
    memory_size: int = 10            # edits one side memory takes before the next starts (paper's save_freq: 500)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("lr", "beta"), at_least_one=("steps", "shards", "memory_size"), layers=("layer",),
                     nonnegative=("early_stop_loss", "alpha", "gamma", "norm_constraint"),
                     intervals={"mask_ratio": "(0, 1]", "act_ratio": "(0, 1)"})
        if self.alpha >= self.beta:
            raise ConfigError(f"WiseConfig.alpha ({self.alpha}) must be below beta ({self.beta}): irrelevant inputs "
                              "must stay below what edit inputs exceed")


@dataclass(frozen=True)
class _Objective(TargetBatch):
    """FT's target-token NLL (`TargetBatch.loss`) plus the routing margin loss, for `train_on_targets`."""

    margin: Callable[[], torch.Tensor]

    def loss(self, lm: LM) -> torch.Tensor:
        return super().loss(lm) + self.margin()


@dataclass(frozen=True)
class _Shard:
    increment: torch.Tensor      # (d_out, d_in) what the shard trained into the memory, zero outside its mask
    subject_keys: torch.Tensor   # (n, d_mlp) layer input at each request's last subject token
    before_keys: torch.Tensor    # (m, d_mlp) layer input at the edit prompts' positions before it
    info: dict[str, Any]


@dataclass(frozen=True)
class _Base:
    """The side memory an edit is trained into: a new one (nothing applied to join) or the newest applied one."""

    memory: str
    mask_seed: int
    delta: torch.Tensor | None          # (d_out, d_in) its ΔW now; None for a new memory
    member_keys: torch.Tensor | None    # (k, d_mlp) its applied edits' subject keys
    member_quiet: torch.Tensor | None   # (q, d_mlp) and the keys they were taught to leave alone
    members: int


@editors.register("wise")
class WiseEditor(LayerAtDepth, Editor[WiseConfig]):
    """WISE (arXiv:2405.14768): side memories at one MLP down-projection, trained under random masks, with a router."""

    config_class = WiseConfig
    method: ClassVar[str] = "wise"  # the registry name, recorded on the edit

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WiseEdit:
        """Train the requests into a side memory (the newest applied one while it has room, else a new one; one
        random subset per shard, Ties-merged). Returns the edit unapplied; the weights are never written.

        Raises:
            RequestError: no requests, an EditDescriptor, or a subject that covers no token of its prompt.
            ConfigError: the configured layer is outside the model.
            EditFailedError: the loss became NaN/inf, or the trained memory does not fire on the edit (nothing is
                applied).
        """
        checked = check_requests(requests)
        config = self.config
        layer = self.layer_for(lm)
        spans = [subject_span(lm, r.prompt, r.subject) for r in checked]  # refuses a subject without tokens first
        base = self._base(lm, layer, checked)
        groups = [[i for i in range(len(checked)) if i % config.shards == s] for s in range(config.shards)]
        groups = [g for g in groups if g]
        negatives, own_quiet = _irrelevant_keys(lm, layer, checked)  # (N, d_mlp), (m, d_mlp)
        if base.member_quiet is not None:  # the memory stays quiet where its earlier edits were taught to
            negatives = torch.cat([negatives, base.member_quiet])
        shards = [self._train(lm, layer, [checked[i] for i in g], [spans[i].last for i in g], negatives, base,
                              shard=s) for s, g in enumerate(groups)]
        increment = ties_merge([s.increment for s in shards])
        subject_keys = torch.cat([s.subject_keys for s in shards])
        quiet_keys = torch.cat([own_quiet, *[s.before_keys for s in shards]])
        irrelevant = torch.cat([negatives, quiet_keys])
        memory = increment if base.delta is None else base.delta + increment
        every_key = subject_keys if base.member_keys is None else torch.cat([base.member_keys, subject_keys])
        with torch.no_grad():
            subject_acts = delta_act(subject_keys, memory)  # (n,)
            irrelevant_acts = delta_act(irrelevant, memory)  # (N,)
            threshold = config.act_ratio * float(delta_act(every_key, memory).min())
        if not threshold > 0 or not bool(torch.isfinite(increment).all()) or not bool((increment != 0).any()):
            raise EditFailedError(f"WISE trained a side memory that does not fire on its own edit (threshold "
                                  f"{threshold}); raise lr or steps; the model is unchanged")
        separated = bool(irrelevant_acts.max() < threshold)
        log.info("WISE at layer %d, memory %s (%d earlier edit(s)): %d request(s) in %d shard(s), threshold %.3g, "
                 "subject Δ_act %s, irrelevant max %.3g%s", layer, base.memory, base.members, len(checked),
                 len(shards), threshold, [f"{a:.3g}" for a in subject_acts.tolist()], float(irrelevant_acts.max()),
                 "" if separated else " (not separated)")
        info = {"layer": layer, "memory": base.memory, "memory_edits_before": base.members,
                "shards": [s.info for s in shards], "threshold": threshold, "subject_acts": subject_acts.tolist(),
                "irrelevant_act_max": float(irrelevant_acts.max()), "separated": separated,
                "delta_norm": float(increment.norm()), "trained_entries": int((increment != 0).sum()),
                "losses": shards[0].info["losses"], "steps": sum(s.info["steps"] for s in shards),
                "final_loss": max(s.info["final_loss"] for s in shards)}
        return WiseEdit(checked, increment, subject_keys, quiet_keys, site=Site("mlp.out", layer), memory=base.memory,
                        act_ratio=config.act_ratio, mask_seed=base.mask_seed, founder=base.members == 0,
                        method=self.method, config=to_dict(config), base_fingerprint=lm.fingerprint, info=info)

    def _base(self, lm: LM, layer: int, requests: Sequence[EditRequest]) -> _Base:
        """The memory to train into: the newest applied WISE edit's at this layer while it holds fewer than
        `memory_size` applied edits, else a new one."""
        members = newest_memory(served(lm.edits, WiseEdit.adaptor, Site("mlp.out", layer)))
        if members and len(members) < self.config.memory_size:
            (memory,) = build_memories(members).memories
            return _Base(members[0].memory, members[0].mask_seed, memory.delta,
                         torch.cat([m.subject_keys for m in members]).to(lm.device),
                         torch.cat([m.quiet_keys for m in members]).to(lm.device), len(members))
        seed = mask_seed(self.config.seed, requests)
        return _Base(memory_id(seed), seed, None, None, None, 0)

    def _train(self, lm: LM, layer: int, requests: list[EditRequest], subject_last: list[int],
               negatives: torch.Tensor, base: _Base, *, shard: int) -> _Shard:
        """One shard: its increment to the memory, trained under its mask on the requests' NLL and the margin loss."""
        config = self.config
        key_site, out_site = Site("mlp.key", layer), Site("mlp.out", layer)
        batch = target_batch(lm, requests)
        n = batch.n_seqs
        rows = torch.arange(n, device=lm.device)
        last = torch.tensor(subject_last, device=lm.device)  # (n,) each row's last subject token
        # One forward through the layer: its inputs (fixed while the memory trains), its output as the applied
        # memories serve it (fixed too: rows that do not read the memory being trained keep it), and the residual
        # stream entering it, from which every training step starts (`start_at`). The main memory's output is the
        # module's own forward without hooks. The steps then mute the applied memories' hook (`muted`), whose
        # cost grows with the memories, and reuse `served`: the same output at no cost per step.
        resid_site = Site("resid_out", layer - 1) if layer > 0 else None
        sites = [key_site, out_site] + ([resid_site] if resid_site else [])
        with torch.no_grad(), capture(lm, sites, stop_after=out_site) as acts:
            lm.model(**batch.batch.model_inputs(), use_cache=False)
        served_out = acts[out_site]
        with torch.no_grad():
            main = lm.arch.block_module(lm.model, layer, "mlp_out").forward(acts[key_site]).float()  # (n, pos, d_out)
        keys = acts[key_site].float()  # (n, pos, d_mlp)
        positions = torch.arange(keys.shape[1], device=lm.device)
        lengths = torch.tensor(batch.batch.lengths, device=lm.device)
        reads = (positions[None] >= last[:, None]) & (positions[None] < lengths[:, None])  # (n, pos): side memory read
        before = positions[None] < last[:, None]  # (n, pos): the prompt before the last subject token
        subject_keys = keys[rows, last]  # (n, d_mlp)
        before_keys = keys[before]  # (m, d_mlp)
        irrelevant = torch.cat([negatives, before_keys])  # (N, d_mlp)
        wanted = subject_keys if base.member_keys is None else torch.cat([base.member_keys, subject_keys])
        scale = float(main[rows, last].norm(dim=-1).mean())
        mask = edit_mask(main.shape[-1:] + keys.shape[-1:], config.mask_ratio, base.mask_seed, shard).to(lm.device)
        start = torch.zeros(mask.shape, device=lm.device) if base.delta is None else base.delta.to(lm.device)
        weight = nn.Parameter(torch.zeros(mask.shape, device=lm.device))  # P; the memory's ΔW = start + M ⊙ P

        def margin() -> torch.Tensor:
            delta = start + weight * mask
            edit_acts = delta_act(wanted, delta)  # (k + n,) this edit's and the memory's earlier edits'
            other_acts = delta_act(irrelevant, delta)  # (N,)
            a, b, g = config.alpha * scale, config.beta * scale, config.gamma * scale
            loss = (_violation(other_acts - a) + _violation(b - edit_acts)
                    + _violation(g - (edit_acts[:, None] - other_acts[None, :])))
            return loss / scale

        def read_side(activation: torch.Tensor, site: Site) -> torch.Tensor:
            side = keys @ (start + weight * mask).T  # (n, pos, d_out)
            return torch.where(reads[..., None], (main + side).to(activation.dtype), served_out.to(activation.dtype))

        def clamp(values: list[torch.Tensor]) -> None:
            values[0].clamp_(-config.norm_constraint, config.norm_constraint)

        objective = _Objective(**{f.name: getattr(batch, f.name) for f in fields(TargetBatch)}, margin=margin)
        skip = start_at(lm, layer, acts[resid_site]) if resid_site else nullcontext()
        with trainable_copies(lm, []), skip, lm.edits.muted(out_site), patch(lm, {out_site: read_side}):
            trained = train_on_targets(lm, [weight], objective, steps=config.steps, lr=config.lr,
                                       early_stop_loss=config.early_stop_loss, label="WISE side memory",
                                       after_step=clamp if config.norm_constraint > 0 else None, progress=self.progress)
        increment = (weight.detach() * mask).float()
        with torch.no_grad():
            final_margin = float(margin())
        info = {"losses": trained.losses, "steps": trained.steps, "stopped_early": trained.stopped_early,
                "final_loss": trained.losses[-1], "final_margin_loss": final_margin, "scale": scale,
                "mask_entries": int(mask.sum())}
        return _Shard(increment, subject_keys, before_keys, info)


def _violation(excess: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries of `excess` (0 when none is): a hinge averaged over the inputs that violate
    it, as the paper's code averages each margin term, so a few violators among many inputs still count fully."""
    positive = torch.relu(excess)
    return positive.sum() / (positive > 0).sum().clamp(min=1)


def _irrelevant_keys(lm: LM, layer: int, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's input at every position of the generic prompts and of each request's template filled with the
    stand-in subjects, left-padded into one batch as generation pads: (N, d_mlp), what the router must leave to the
    main memory. The padding in front of the shorter rows counts too: a row that fired on its padding would read the
    side memory throughout. Also returned: the template rows' keys at their own tokens (the edit keeps them, for
    the later edits of its memory to stay quiet on)."""
    templates = list(dict.fromkeys(r.prompt for r in requests))
    texts = [*GENERIC_PROMPTS, *[t.format(s) for t in templates for s in STAND_INS]]
    right = pad_batch(lm, [prompt_ids(lm, text) for text in texts])
    width = right.input_ids.shape[1]
    ids = torch.stack([row.roll(width - n) for row, n in zip(right.input_ids, right.lengths)])  # (rows, pos)
    mask = torch.stack([row.roll(width - n) for row, n in zip(right.attention_mask, right.lengths)])
    site = Site("mlp.key", layer)
    with torch.no_grad(), capture(lm, [site], stop_after=site) as acts:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    keys = acts[site].float()  # (rows, pos, d_mlp)
    own = keys[len(GENERIC_PROMPTS):][mask[len(GENERIC_PROMPTS):].bool()]  # (m, d_mlp) the templates' real tokens
    return keys.reshape(-1, keys.shape[-1]), own
