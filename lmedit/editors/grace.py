"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors",
arXiv:2211.11031): a codebook at one layer's MLP output that replaces the output for inputs near an edited one.

The adaptor sits on block `layer`'s MLP down-projection, the layer the paper's code wraps (its `inner_params`,
e.g. EasyEdit's `mlp.down_proj` for Llama): its *keys* are that layer's input, `mlp.key` (d_mlp), and a
matched entry's *value* replaces the layer's output, `mlp.out` (d_model). Each request of an edit is one
codebook entry (k, v, ε):

- k: the key at the prompt's last token, the edit prompt as the model reads it (the token whose output
  predicts the first target token; the paper's `key_id = -1`).
- v: trained by Adam (the paper's optimiser, lr 1.0, ~100 steps in its code) so that, with v replacing that
  position's output, target_new's teacher-forced NLL per target token is low (FT-M's objective:
  `editors/steps/finetune.py`'s `target_batch` and `train_on_targets`, early stop included). v starts at the
  position's unedited output ("warm"; the paper's code also offers random "cold" starts). Each step runs
  only the blocks from `layer` on (`hooks.start_at`): the earlier ones do not depend on v. At lr 1.0 most
  starter facts reach the early stop (NLL 0.05) in 1-20 steps on the built-in models.
- ε: the deferral radius, `eps · ‖k‖` (eps is relative to the key's norm so one setting fits models whose
  activations differ in scale; the paper's init ε = 1.0 is absolute for T5's keys). The default, 0.3, is the
  largest radius of the sweep in `configs/grace/gemma3-270m.yaml`'s header with which every neighbourhood
  prompt of the 5 starter facts kept its answer on gemma3-270m (last-token key distances from the edit
  prompt's at its layer, in ‖k‖: paraphrases min 0.15, median 0.35; neighbours min 0.19, median 0.57).
  Larger radii reach more paraphrases and start to capture neighbours: the paper's ε trade-off.

Matching is per position: at every position of every forward, the key there is compared (Euclidean) with
the keys of every applied GRACE edit at that layer; where the nearest key k_j lies within entry j's radius,
that position's output becomes v_j, and everywhere else the output is left bit for bit as the model
computed it. Teacher-forced scoring (prompt and target in one forward) and generation with a key/value cache
need no special case. The value is trained at the last prompt token only; later positions read it through
attention, as they will when the entry matches there.

The paper's codebook updates, made dynamic. The paper changes stored radii when a new key falls inside an
entry's ball: same label → the old ball expands to the new key; other label → both radii shrink to half the
distance. Here no edit modifies another: each entry keeps its own ε, and the radius the adaptor uses for entry
i is min(ε_i, ½·min_j ‖k_i − k_j‖ over applied entries j whose target_new differs). Conflicting balls thus
never overlap while both are applied, and undoing one edit restores the other's radius exactly. Entries
with the same target both stay, so their balls together cover both keys (the paper's "expand"). One
exception to the split: a key that repeats, within float noise (`SAME_KEY` · ‖k‖), the key of an older
entry with another target supersedes that entry (the same prompt re-edited: the newer edit answers; a split
would leave both radii 0). Ties between equally near keys go to the newest entry.

Legend: k = `keys` (n, d_mlp), v = `values` (n, d_model), ε = `radii` (n,) in key units.

The edit is a `GraceEdit` (kind "adaptor", `lmedit.editors.adaptor`): applying it attaches, once per model and
layer, the forward hook that serves every applied GRACE edit there; undo takes the entries away (the hook with
the last of them). The weights are never written.

Several requests in one edit are trained in one batch: each value moves only its own row's output (Adam is
elementwise, so each follows the path it would alone), with one early stop on their mean loss.

Not handled: the paper's "replace all tokens / prompt" variants (one entry replaces only the positions it
matches); cold (random) value starts; EditDescriptors (triplets only); merging a codebook into weights
(`lmedit export-model` refuses adaptor edits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lmedit.config import check_ranges, to_dict
from lmedit.editors._edit_files import saved_requests
from lmedit.editors.adaptor import DEPTH, AdaptorEdit, LayerAtDepth  # noqa: F401  (DEPTH: `layer: null`)
from lmedit.editors.base import Editor, EditorConfig, check_requests
from lmedit.editors.steps.finetune import target_batch, train_on_targets
from lmedit.errors import EditFileError, LMEditError
from lmedit.hooks import capture, patch, start_at
from lmedit.registry import editors
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

SAME_KEY = 1e-4  # keys closer than this fraction of their norm are one key (float noise between batch layouts)
_DISTANCE = "donot_use_mm_for_euclid_dist"  # exact differences: the matmul shortcut loses small distances


@dataclass(frozen=True, kw_only=True)
class GraceConfig(EditorConfig):
    """GRACE settings. Defaults: the paper's optimiser (Adam, lr 1.0, 100 steps); layer depth, radius and early stop
    from the sweep on gemma3-270m (configs/grace/gemma3-270m.yaml)."""

    layer: int | None = None        # block whose MLP output gets the codebook; None: the block at DEPTH of the depth
    eps: float = 0.3                # initial deferral radius ε as a fraction of the entry's key norm ‖k‖
    lr: float = 1.0                 # Adam learning rate of the value (the paper's code: 1.0)
    steps: int = 100                # most Adam steps (the paper's code: 100 iterations)
    early_stop_loss: float = 5e-2   # stop once the mean target NLL per token is below this; 0 = never

    def __post_init__(self) -> None:
        check_ranges(self, positive=("eps", "lr"), at_least_one=("steps",), layers=("layer",),
                     nonnegative=("early_stop_loss",))


@dataclass(frozen=True)
class Codebook:
    """Every applied GRACE entry at one layer, newest first, with the radii the adaptor uses."""

    keys: torch.Tensor    # (n, d_mlp) float32
    values: torch.Tensor  # (n, d_model)
    radii: torch.Tensor   # (n,) effective radius; -1 for a superseded entry (matches nothing)


def effective_radii(keys: torch.Tensor, own: torch.Tensor, targets: Sequence[str]) -> torch.Tensor:
    """The radius each entry gets among the others: min(own ε, half the distance to the nearest entry with
    another target); -1 for an entry superseded by a newer one with another target at the same key.

    Args:
        keys: (n, d) the entries' keys, newest first (n >= 1).
        own: (n,) their own radii ε.
        targets: their target_new strings (entries with equal strings do not shrink each other).
    """
    keys = keys.float()
    dist = torch.cdist(keys[None], keys[None], compute_mode=_DISTANCE)[0]  # (n, n)
    codes = {t: c for c, t in enumerate(dict.fromkeys(targets))}
    label = torch.tensor([codes[t] for t in targets], device=keys.device)
    conflict = label[:, None] != label[None, :]
    norms = keys.norm(dim=-1)
    same_key = conflict & (dist <= SAME_KEY * torch.maximum(norms[:, None], norms[None, :]))
    superseded = torch.triu(same_key, diagonal=1).any(0)  # a newer entry (row i < j) repeats its key
    shrinks = conflict & ~same_key & ~superseded[None, :] & ~superseded[:, None]
    half = torch.where(shrinks, dist / 2, torch.full_like(dist, math.inf)).amin(1)
    radii = torch.minimum(own.float(), half)
    return torch.where(superseded, torch.full_like(radii, -1.0), radii)


class GraceEdit(AdaptorEdit, adaptor="grace"):
    """GRACE codebook entries, one per request, at `site` = Site("mlp.out", layer).

    Attributes:
        keys: (n, d_mlp) the layer's input at each prompt's last token.
        values: (n, d_model) what replaces the layer's output where an entry matches.
        radii: (n,) each entry's own deferral radius ε (what the adaptor uses may be smaller: `used_radii`).
    """

    def __init__(self, requests: Sequence[EditRequest], keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor,
                 *, site: Site, **common: Any) -> None:
        super().__init__(site=site, requests=requests, **common)
        if site.kind != "mlp.out":
            raise LMEditError(f"a GRACE edit sits at an mlp.out site, got {site}")
        n = len(requests)
        if n == 0 or keys.ndim != 2 or values.ndim != 2 or radii.shape != (n,) or len(keys) != n or len(values) != n:
            raise LMEditError(f"a GRACE edit needs one key, value and radius per request: {n} requests, keys "
                              f"{tuple(keys.shape)}, values {tuple(values.shape)}, radii {tuple(radii.shape)}")
        self.keys, self.values, self.radii = keys, values, radii

    def check(self, lm: LM) -> None:
        """Refuse a model the entries do not fit (layer, key or value width, NaN/inf); move them to its device."""
        layer = self.site_layer(lm)
        d_out, d_in = lm.arch.weight(lm.model, layer, "mlp_out").shape
        if self.keys.shape[1] != d_in or self.values.shape[1] != d_out:
            raise LMEditError(f"this GRACE edit's keys/values are {self.keys.shape[1]}/{self.values.shape[1]} wide; "
                              f"layer {layer} of {lm.name!r} reads {d_in} and writes {d_out}")
        if not all(bool(torch.isfinite(t).all()) for t in (self.keys, self.values, self.radii)):
            raise LMEditError("this GRACE edit holds NaN or infinite values; the model is unchanged")
        self.keys, self.values, self.radii = (t.to(lm.device) for t in (self.keys, self.values, self.radii))

    @classmethod
    def prepare(cls, edits: Sequence[AdaptorEdit], previous: tuple[Sequence[AdaptorEdit], Any] | None = None
                ) -> Codebook:
        newest = [e for e in reversed(edits) if isinstance(e, GraceEdit)]
        keys = torch.cat([e.keys.flip(0) for e in newest]).float()
        values = torch.cat([e.values.flip(0) for e in newest])
        own = torch.cat([e.radii.flip(0) for e in newest])
        targets = [r.target_new.strip() for e in newest for r in reversed(e.requests)]
        return Codebook(keys, values, effective_radii(keys, own, targets))

    @classmethod
    def respond(cls, state: Codebook, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()  # (batch·pos, d_mlp)
            keys = state.keys.to(flat.device)  # a no-op unless the model's layers sit on several devices
            nearest, index = torch.cdist(flat[None], keys[None], compute_mode=_DISTANCE)[0].min(dim=1)
            hit = nearest <= state.radii.to(flat.device)[index]  # (batch·pos,)
        if not bool(hit.any()):
            return None
        out = output.reshape(-1, output.shape[-1])
        values = state.values.to(device=out.device, dtype=out.dtype)[index.to(out.device)]
        return torch.where(hit.to(out.device)[:, None], values, out).reshape(output.shape)

    def used_radii(self) -> torch.Tensor:
        """(n,) the radii the adaptor uses for this edit's entries now: among the applied GRACE edits at its layer
        when applied (`effective_radii`), its own ε otherwise."""
        if self._lm is None:
            return self.radii.clone()
        peers = self.peers(self._lm)
        radii = self.prepare(peers).radii
        start = sum(len(e.requests) for e in peers[peers.index(self) + 1:])  # newer edits' entries come first
        return radii[start:start + len(self.requests)].flip(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii}

    def metadata(self) -> dict[str, Any]:
        return {"requests": [r.to_dict() for r in self.requests]}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> GraceEdit:
        """Rebuild a saved edit after checking its tensors and metadata (`EditFileError` names what is wrong)."""
        if set(tensors) != {"keys", "values", "radii"}:
            raise EditFileError(f"tensors {sorted(tensors)}; a GRACE edit has exactly 'keys', 'values' and 'radii'")
        requests = saved_requests(metadata.get("requests"), nonempty=True)
        if bool((tensors["radii"] < 0).any()):
            raise EditFileError("tensor 'radii' holds a negative radius")
        return cls(requests, tensors["keys"], tensors["values"], tensors["radii"], **common)


@contextmanager
def _frozen(lm: LM) -> Iterator[None]:
    """Every parameter without gradients inside the block (the value alone is trained); flags restored after."""
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@editors.register("grace")
class GraceEditor(LayerAtDepth, Editor[GraceConfig]):
    """GRACE (arXiv:2211.11031): a key-value codebook at one MLP output; each request is one entry (k, v, ε)."""

    config_class = GraceConfig
    method: ClassVar[str] = "grace"  # the registry name, recorded on the edit

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> GraceEdit:
        """One codebook entry per request: its key read, its value trained (all requests in one batch, each
        value moving only its own row's output). Returns the edit unapplied; the weights are never written.

        Raises:
            RequestError: no requests, or an EditDescriptor.
            ConfigError: the configured layer is outside the model.
            EditFailedError: the loss became NaN/inf (nothing is applied).
        """
        checked = check_requests(requests)
        config = self.config
        layer = self.layer_for(lm)
        key_site, out_site = Site("mlp.key", layer), Site("mlp.out", layer)
        batch = target_batch(lm, checked)
        n = batch.n_seqs
        rows = torch.arange(n, device=lm.device)
        # Each row's last prompt token: the position whose logits predict its first target token.
        last = torch.zeros(n, dtype=torch.long, device=lm.device).scatter_reduce(
            0, batch.rows, batch.positions, "amin", include_self=False)  # (n,)
        # One forward up to the layer: the keys, the warm start, and the residual stream entering the layer, from
        # which every training step starts (the blocks before it do not depend on the value: `start_at`).
        resid_site = Site("resid_out", layer - 1) if layer > 0 else None
        sites = [key_site, out_site] + ([resid_site] if resid_site else [])
        with torch.no_grad(), capture(lm, sites, stop_after=out_site) as acts:
            lm.model(**batch.batch.model_inputs(), use_cache=False)
        keys = acts[key_site][rows, last].float()  # (n, d_mlp)
        value = nn.Parameter(acts[out_site][rows, last].detach().float().clone())  # (n, d_model), warm start
        skip = start_at(lm, layer, acts[resid_site]) if resid_site else nullcontext()

        def put_values(activation: torch.Tensor, site: Site) -> torch.Tensor:
            out = activation.clone()
            out[rows, last] = value.to(out.dtype)
            return out

        with _frozen(lm), skip, patch(lm, {out_site: put_values}):
            trained = train_on_targets(lm, [value], batch, steps=config.steps, lr=config.lr,
                                       early_stop_loss=config.early_stop_loss, label="GRACE value",
                                       progress=self.progress)
        values = value.detach().clone()
        key_norms = keys.norm(dim=-1)
        radii = config.eps * key_norms  # (n,)
        log.info("GRACE at layer %d: %d entr%s, loss %.3f -> %.3f in %d steps, radius %s", layer, n,
                 "y" if n == 1 else "ies", trained.losses[0], trained.losses[-1], trained.steps,
                 [f"{r:.3g}" for r in radii.tolist()])
        info = {"layer": layer, "losses": trained.losses, "steps": trained.steps, "stopped_early": trained.stopped_early,
                "final_loss": trained.losses[-1], "key_norms": key_norms.tolist(), "radii": radii.tolist(),
                "value_shift": (values - acts[out_site][rows, last].float()).norm(dim=-1).tolist()}
        return GraceEdit(checked, keys, values, radii, site=out_site, method=self.method, config=to_dict(config),
                         base_fingerprint=lm.fingerprint, info=info)
