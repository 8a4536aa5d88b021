"""WISE (Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language
Models", arXiv:2405.14768): edits trained into a *side memory*, a copy of one MLP's value matrix, and a router that
sends an input to the side memory only when its activations say it is about an edit.

The side memory sits at block `layer`'s MLP down-projection W_v (d_model × d_mlp; the paper's "value matrix" of a
late-ish FFN, e.g. `mlp.down_proj` of LLaMA's layer 27 in its code). The main memory, W_v itself, is never written.
Each edit holds the part of the side memory it trained: ΔW = W_v' − W_v (d_model × d_mlp, dense float32, zero
outside its mask), so the side memory seen by the model is W_v + ΔW.

- Routing (the paper's memory routing): for an input whose layer input (`mlp.key`, the activation A(x), d_mlp) is a,
  the activation indicator is Δ_act = ‖a · ΔWᵀ‖, the norm of what the side memory would add to the main memory's
  output. Where Δ_act > ε the side memory answers: the output becomes a · (W_v + ΔW)ᵀ (+ bias), computed as the main
  output + a · ΔWᵀ, so everything the router sends to the main memory is bit for bit the unedited output. The paper
  routes per input (its code: the mean or max of Δ_act over the input's tokens); here the decision is made along
  each row, causally: a row reads the side memory from its first position where Δ_act > ε on. So the edit prompt
  (prompt + target, teacher-forced) reads it from its last subject token on, an input that never fires is untouched,
  and right-padding cannot change a row.
- Training (the paper's editing of the side memory): ΔW starts at zero and only a random subset of its entries, a
  fraction ρ = `mask_ratio` (the paper's 0.2), may move: ΔW = M ⊙ P with M a fixed random 0/1 mask, so P's
  gradient outside the subset is zero (the paper's masked gradient). The loss is target_new's teacher-forced NLL
  per target token (FT-M's objective, `editors/steps/finetune.py`'s `target_batch`/`train_on_targets`, Adam and
  early stop) with the side memory read from the subject's last token on, plus the paper's routing margin loss,
  with α, β, γ in units of s, the main memory's mean output norm at the edit's subject tokens (the paper's 5, 20,
  10 are absolute, for LLaMA's activations):
      mean max(0, Δ_act(x_i) − α·s) + mean max(0, β·s − Δ_act(x_e))
      + mean max(0, γ·s − (Δ_act(x_e) − Δ_act(x_i)))
  over edit activations x_e (the last subject token of each request) and irrelevant ones x_i (every position of a
  fixed set of generic prompts and of each request's template with stand-in subjects such as "it", left-padded into
  one batch as generation pads, the padding included; and the edit prompt before its last subject token), divided by
  s. Each step runs only the blocks from `layer` on (`hooks.start_at`); the margin terms need no forward at all (the
  layer's inputs do not depend on ΔW).
- Threshold ε = `act_ratio` × the smallest Δ_act among the edit's subject tokens (the paper's code: the least
  editing activation × 0.88), kept on the edit; `info["separated"]` says whether every irrelevant activation it
  trained on stays below it.
- Knowledge sharding and merging: `shards` > 1 splits an edit's requests round-robin into shards, each trained into
  its own random subset; the shards' ΔW are merged into the edit's one ΔW by Ties-merging (Yadav et al. 2023,
  arXiv:2306.01708: per entry, elect the sign of the sum, average the deltas that agree with it). The applied WISE
  edits at a layer are merged the same way into the one side memory the hook reads. Ties' trimming step is not done:
  each delta is already sparse (its random mask), and with one edit, or edits whose masks do not overlap, the merge
  is exactly their sum. The gate is per edit: a row fires when some applied edit's own Δ_act (its own ΔW) exceeds
  its own threshold, and then reads the merged memory. The paper gates the merged memory with one threshold (the
  least editing activation); with the 5 starter facts applied together on gemma3-270m that gate kept 9/24
  neighbours, the per-edit gates 22/24 (configs/wise/gemma3-270m.yaml). No edit modifies another: undoing one
  rebuilds the merged memory and the gates from the others.

Legend: a = `mlp.key` (…, d_mlp); ΔW = `delta` (d_model, d_mlp), canonical (d_out, d_in) orientation; ε =
`threshold`; s = scale; M = `edit_mask(...)`.

The edit is a `WiseEdit` (kind "adaptor", `lmedit.editors.adaptor`): applying it attaches, once per model and
layer, the forward hook that serves every applied WISE edit there; undo takes its delta away (the hook with the
last one). Saved with its delta, threshold and requests (`load_edit` reads it back).

Not handled: WISE-Retrieve (several side memories, the most activated one answers) and its replay of earlier
edits (Appendix B.3); the paper's SGD (lr 1.0) and elementwise norm constraint are replaced by Adam with FT's
early stop (`norm_constraint`, off by default, clamps |ΔW| elementwise as the paper's code does); random-prefix
augmentation of the edit prompt; EditDescriptors (triplets only); generation with a key/value cache decides per
new token (a cached step sees only its own position: tokens generated after the first read the side memory only
where they fire themselves, unlike a full forward of the same text); in a left-padded batch (generation) the
router does not know padding from text: it is trained to stay quiet on it, but a row whose padding fired would read
the side memory throughout; writing the side memory into the weights (`lmedit export-model` refuses adaptor edits).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lmedit.config import check_ranges, to_dict
from lmedit.editors._edit_files import saved_requests
from lmedit.editors.adaptor import AdaptorEdit, LayerAtDepth
from lmedit.editors.base import Editor, EditorConfig, check_requests
from lmedit.editors.steps.finetune import TargetBatch, target_batch, train_on_targets, trainable_copies
from lmedit.errors import ConfigError, EditFailedError, EditFileError, LMEditError
from lmedit.hooks import capture, patch, start_at
from lmedit.registry import editors
from lmedit.tokens import pad_batch, prompt_ids, subject_span
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

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
STAND_INS = ("it", "this", "someone")


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

    def __post_init__(self) -> None:
        check_ranges(self, positive=("lr", "beta"), at_least_one=("steps", "shards"), layers=("layer",),
                     nonnegative=("early_stop_loss", "alpha", "gamma", "norm_constraint"),
                     intervals={"mask_ratio": "(0, 1]", "act_ratio": "(0, 1)"})
        if self.alpha >= self.beta:
            raise ConfigError(f"WiseConfig.alpha ({self.alpha}) must be below beta ({self.beta}): irrelevant inputs "
                              "must stay below what edit inputs exceed")


def edit_mask(shape: Sequence[int], ratio: float, seed: int, requests: Sequence[EditRequest], shard: int = 0) -> torch.Tensor:
    """The random subset of side-memory entries a shard trains: (d_out, d_in) bool, each entry True with
    probability `ratio`. Drawn from the seed and the requests, so edits of other facts get other subsets and the
    same edit always gets the same one."""
    text = json.dumps([seed, shard, [r.to_dict() for r in requests]], sort_keys=True)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(digest)) < ratio


def ties_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ties-merge (sign election and disjoint mean, no trimming) of deltas of one shape: per entry, the mean of the
    deltas whose sign agrees with the sign of their sum (0 where none does). One delta is returned as it is."""
    if len(deltas) == 1:
        return deltas[0]
    total = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d in deltas:
        total += d
    elected = total.sign()
    agreeing = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for d in deltas:
        agree = (d.sign() == elected) & (d != 0)
        agreeing += torch.where(agree, d, 0.0)
        count += agree
    return agreeing / count.clamp(min=1)


@dataclass(frozen=True)
class SideMemory:
    """What the hook serves: the applied WISE edits' merged ΔW, and each edit's own ΔW and threshold (the gates)."""

    delta: torch.Tensor                  # (d_out, d_in) float32, the merged side memory
    gates: tuple[torch.Tensor, ...]      # each applied edit's own ΔW
    thresholds: tuple[float, ...]        # and its threshold ε


def side_output(memory: SideMemory, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """The layer's output under the router: where a row has fired (some applied edit's Δ_act = ‖a·ΔWᵀ‖, its own ΔW,
    above its own threshold, at this or an earlier position of the forward), main output + a·ΔW_mergedᵀ; elsewhere
    `output` itself. None when nothing fires.

    Args:
        memory: the merged side memory and the edits' gates.
        inputs: (batch, pos, d_in) the layer's input a.
        output: (batch, pos, d_out) the main memory's output.
    """
    with torch.no_grad():
        keys = inputs.detach().float()
        fired = torch.zeros(inputs.shape[:-1], dtype=torch.bool, device=inputs.device)  # (batch, pos)
        for delta, threshold in zip(memory.gates, memory.thresholds):
            fired |= (keys @ delta.to(keys.device).T).norm(dim=-1) > threshold
        if not bool(fired.any()):
            return None
        routed = fired.to(torch.int8).cummax(dim=-1).values.bool()  # from a row's first firing position on
    side = inputs.float() @ memory.delta.to(inputs.device).T  # (batch, pos, d_out); gradients flow through `inputs`
    return torch.where(routed[..., None], output + side.to(output.dtype), output)


class WiseEdit(AdaptorEdit, adaptor="wise"):
    """A WISE edit at `site` = Site("mlp.out", layer): its part of the side memory and its routing threshold.

    Attributes:
        delta: (d_out, d_in) ΔW = side memory − main memory, zero outside the entries the edit trained.
        threshold: (1,) ε: inputs whose Δ_act exceeds it read the side memory.
    """

    def __init__(self, requests: Sequence[EditRequest], delta: torch.Tensor, threshold: torch.Tensor, *, site: Site,
                 **common: Any) -> None:
        super().__init__(site=site, requests=requests, **common)
        if site.kind != "mlp.out":
            raise LMEditError(f"a WISE edit sits at an mlp.out site, got {site}")
        if not requests or delta.ndim != 2 or threshold.shape != (1,):
            raise LMEditError(f"a WISE edit needs requests, a 2-D delta and one threshold: {len(requests)} requests, "
                              f"delta {tuple(delta.shape)}, threshold {tuple(threshold.shape)}")
        self.delta, self.threshold = delta, threshold

    def check(self, lm: LM) -> None:
        """Refuse a model the side memory does not fit (layer, shape, NaN/inf, threshold); move it to its device."""
        layer = self.site_layer(lm)
        shape = tuple(lm.arch.weight(lm.model, layer, "mlp_out").shape)
        if tuple(self.delta.shape) != shape:
            raise LMEditError(f"this WISE edit's side memory is {tuple(self.delta.shape)}; layer {layer} of "
                              f"{lm.name!r} has a {shape} down-projection")
        if not (bool(torch.isfinite(self.delta).all()) and bool(torch.isfinite(self.threshold).all())):
            raise LMEditError("this WISE edit holds NaN or infinite values; the model is unchanged")
        if float(self.threshold) <= 0:
            raise LMEditError(f"this WISE edit's threshold is {float(self.threshold)}; it must be positive")
        self.delta, self.threshold = self.delta.to(lm.device), self.threshold.to(lm.device)

    @classmethod
    def prepare(cls, edits: Sequence[AdaptorEdit]) -> SideMemory:
        mine = [e for e in edits if isinstance(e, WiseEdit)]
        return SideMemory(ties_merge([e.delta.float() for e in mine]), tuple(e.delta.float() for e in mine),
                          tuple(float(e.threshold) for e in mine))

    @classmethod
    def respond(cls, state: SideMemory, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        return side_output(state, inputs, output)

    def activations(self, keys: torch.Tensor) -> torch.Tensor:
        """Δ_act = ‖a·ΔWᵀ‖ of this edit's ΔW alone for layer inputs `keys` (…, d_mlp) -> (…)."""
        return (keys.float().to(self.delta.device) @ self.delta.T).norm(dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta, "threshold": self.threshold}

    def metadata(self) -> dict[str, Any]:
        return {"requests": [r.to_dict() for r in self.requests]}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> WiseEdit:
        """Rebuild a saved edit after checking its tensors and metadata (`EditFileError` names what is wrong)."""
        if set(tensors) != {"delta", "threshold"}:
            raise EditFileError(f"tensors {sorted(tensors)}; a WISE edit has exactly 'delta' and 'threshold'")
        requests = saved_requests(metadata.get("requests"), nonempty=True)
        threshold = tensors["threshold"]
        if threshold.shape != (1,) or not float(threshold) > 0:
            raise EditFileError(f"tensor 'threshold' must hold one positive number, got {threshold.tolist()}")
        return cls(requests, tensors["delta"], threshold, **common)


@dataclass(frozen=True)
class _Objective(TargetBatch):
    """FT's target-token NLL (`TargetBatch.loss`) plus the routing margin loss, for `train_on_targets`."""

    margin: Callable[[], torch.Tensor]

    def loss(self, lm: LM) -> torch.Tensor:
        return super().loss(lm) + self.margin()


@dataclass(frozen=True)
class _Shard:
    delta: torch.Tensor          # (d_out, d_in) trained ΔW, zero outside the mask
    subject_keys: torch.Tensor   # (n, d_mlp) layer input at each request's last subject token
    before_keys: torch.Tensor    # (m, d_mlp) layer input at the edit prompts' positions before it
    scale: float                 # s: mean main-memory output norm at the subject tokens
    info: dict[str, Any]


@editors.register("wise")
class WiseEditor(LayerAtDepth, Editor[WiseConfig]):
    """WISE (arXiv:2405.14768): a side memory at one MLP down-projection, trained under a random mask, with a router."""

    config_class = WiseConfig
    method: ClassVar[str] = "wise"  # the registry name, recorded on the edit

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WiseEdit:
        """Train the requests into the side memory (one random subset per shard, Ties-merged) and set the router's
        threshold. Returns the edit unapplied; the weights are never written.

        Raises:
            RequestError: no requests, an EditDescriptor, or a subject that covers no token of its prompt.
            ConfigError: the configured layer is outside the model.
            EditFailedError: the loss became NaN/inf, or the trained side memory is zero (nothing is applied).
        """
        checked = check_requests(requests)
        config = self.config
        layer = self.layer_for(lm)
        spans = [subject_span(lm, r.prompt, r.subject) for r in checked]  # refuses a subject without tokens first
        groups = [[i for i in range(len(checked)) if i % config.shards == s] for s in range(config.shards)]
        groups = [g for g in groups if g]
        negatives = _irrelevant_keys(lm, layer, checked)  # (N, d_mlp)
        shards = [self._train(lm, layer, [checked[i] for i in g], [spans[i].last for i in g], negatives, shard=s)
                  for s, g in enumerate(groups)]
        delta = ties_merge([s.delta for s in shards])
        subject_keys = torch.cat([s.subject_keys for s in shards])
        irrelevant = torch.cat([negatives, *[s.before_keys for s in shards]])
        with torch.no_grad():
            subject_acts = (subject_keys @ delta.T).norm(dim=-1)  # (n,)
            irrelevant_acts = (irrelevant @ delta.T).norm(dim=-1)  # (N,)
        threshold = config.act_ratio * subject_acts.min()
        if not bool(torch.isfinite(threshold)) or float(threshold) <= 0:
            raise EditFailedError(f"WISE trained a side memory that does not fire on its own edit (threshold "
                                  f"{float(threshold)}); raise lr or steps; the model is unchanged")
        separated = bool(irrelevant_acts.max() < threshold)
        log.info("WISE at layer %d: %d request(s) in %d shard(s), threshold %.3g, subject Δ_act %s, irrelevant max "
                 "%.3g%s", layer, len(checked), len(shards), float(threshold),
                 [f"{a:.3g}" for a in subject_acts.tolist()], float(irrelevant_acts.max()),
                 "" if separated else " (not separated)")
        info = {"layer": layer, "shards": [s.info for s in shards], "threshold": float(threshold),
                "subject_acts": subject_acts.tolist(), "irrelevant_act_max": float(irrelevant_acts.max()),
                "separated": separated, "delta_norm": float(delta.norm()), "trained_entries": int((delta != 0).sum()),
                "losses": shards[0].info["losses"], "steps": sum(s.info["steps"] for s in shards),
                "final_loss": max(s.info["final_loss"] for s in shards)}
        return WiseEdit(checked, delta, threshold.reshape(1).float(), site=Site("mlp.out", layer), method=self.method,
                        config=to_dict(config), base_fingerprint=lm.fingerprint, info=info)

    def _train(self, lm: LM, layer: int, requests: list[EditRequest], subject_last: list[int],
               negatives: torch.Tensor, *, shard: int) -> _Shard:
        """One shard: ΔW trained under its mask on the requests' NLL and the margin loss."""
        config = self.config
        key_site, out_site = Site("mlp.key", layer), Site("mlp.out", layer)
        batch = target_batch(lm, requests)
        n = batch.n_seqs
        rows = torch.arange(n, device=lm.device)
        last = torch.tensor(subject_last, device=lm.device)  # (n,) each row's last subject token
        # One forward up to the layer: its inputs (fixed while ΔW trains), the main output, and the residual stream
        # entering the layer, from which every training step starts (`start_at`).
        resid_site = Site("resid_out", layer - 1) if layer > 0 else None
        sites = [key_site, out_site] + ([resid_site] if resid_site else [])
        with torch.no_grad(), capture(lm, sites, stop_after=out_site) as acts:
            lm.model(**batch.batch.model_inputs(), use_cache=False)
        keys = acts[key_site].float()  # (n, pos, d_mlp)
        positions = torch.arange(keys.shape[1], device=lm.device)
        lengths = torch.tensor(batch.batch.lengths, device=lm.device)
        reads = (positions[None] >= last[:, None]) & (positions[None] < lengths[:, None])  # (n, pos): side memory read
        before = positions[None] < last[:, None]  # (n, pos): the prompt before the last subject token
        subject_keys = keys[rows, last]  # (n, d_mlp)
        before_keys = keys[before]  # (m, d_mlp)
        irrelevant = torch.cat([negatives, before_keys])  # (N, d_mlp)
        scale = float(acts[out_site][rows, last].float().norm(dim=-1).mean())
        d_out = acts[out_site].shape[-1]
        mask = edit_mask((d_out, keys.shape[-1]), config.mask_ratio, config.seed, requests, shard).to(lm.device)
        weight = nn.Parameter(torch.zeros(mask.shape, device=lm.device))  # P; ΔW = M ⊙ P

        def margin() -> torch.Tensor:
            delta = weight * mask
            edit_acts = (subject_keys @ delta.T).norm(dim=-1)  # (n,)
            other_acts = (irrelevant @ delta.T).norm(dim=-1)  # (N,)
            a, b, g = config.alpha * scale, config.beta * scale, config.gamma * scale
            loss = (torch.relu(other_acts - a).mean() + torch.relu(b - edit_acts).mean()
                    + torch.relu(g - (edit_acts[:, None] - other_acts[None, :])).mean())
            return loss / scale

        def read_side(activation: torch.Tensor, site: Site) -> torch.Tensor:
            side = keys @ (weight * mask).T  # (n, pos, d_out)
            return activation + torch.where(reads[..., None], side, 0.0).to(activation.dtype)

        def clamp(values: list[torch.Tensor]) -> None:
            values[0].clamp_(-config.norm_constraint, config.norm_constraint)

        objective = _Objective(**{f.name: getattr(batch, f.name) for f in fields(TargetBatch)}, margin=margin)
        skip = start_at(lm, layer, acts[resid_site]) if resid_site else nullcontext()
        with trainable_copies(lm, []), skip, patch(lm, {out_site: read_side}):
            trained = train_on_targets(lm, [weight], objective, steps=config.steps, lr=config.lr,
                                       early_stop_loss=config.early_stop_loss, label="WISE side memory",
                                       after_step=clamp if config.norm_constraint > 0 else None, progress=self.progress)
        delta = (weight.detach() * mask).float()
        with torch.no_grad():
            final_margin = float(margin())
        info = {"losses": trained.losses, "steps": trained.steps, "stopped_early": trained.stopped_early,
                "final_loss": trained.losses[-1], "final_margin_loss": final_margin, "scale": scale,
                "mask_entries": int(mask.sum())}
        return _Shard(delta, subject_keys, before_keys, scale, info)


def _irrelevant_keys(lm: LM, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
    """The layer's input at every position of the generic prompts and of each request's template filled with the
    stand-in subjects, left-padded into one batch as generation pads: (N, d_mlp), what the router must leave to the
    main memory. The padding in front of the shorter rows counts too: a row that fired on its padding would read the
    side memory throughout."""
    templates = list(dict.fromkeys(r.prompt for r in requests))
    texts = [*GENERIC_PROMPTS, *[t.format(s) for t in templates for s in STAND_INS]]
    right = pad_batch(lm, [prompt_ids(lm, text) for text in texts])
    width = right.input_ids.shape[1]
    ids = torch.stack([row.roll(width - n) for row, n in zip(right.input_ids, right.lengths)])  # (rows, pos)
    mask = torch.stack([row.roll(width - n) for row, n in zip(right.attention_mask, right.lengths)])
    site = Site("mlp.key", layer)
    with torch.no_grad(), capture(lm, [site], stop_after=site) as acts:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return acts[site].reshape(-1, acts[site].shape[-1]).float()
