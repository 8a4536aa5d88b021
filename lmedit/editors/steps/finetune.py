"""The fine-tuning loop of the FT and FT-L baselines (`editors/ft.py`), whose target-token batch and Adam loop
(`target_batch`, `train_on_targets`) LoRA (`editors/lora.py`) trains with too: gradient steps on target_new for chosen
weights, unconstrained or with the change kept in an L∞ ball (FT-L, Zhu et al. 2020, "Modifying Memories in
Transformer Models", arXiv:2012.00363). ROME (Meng et al. 2022, arXiv:2202.05262, §4) uses both as
baselines; its GPT-2 XL setting (layer 0's MLP down-projection, 25 Adam steps at lr 5e-4, ε = 5e-4 for FT-L)
gives the config defaults here and in `editors/ft.py`.

The objective: the mean over requests (and over optional ROME-style random prefixes) of target_new's
teacher-forced NLL per target token; the prompt's tokens are not scored. Every request is in the same
batch at every step. Logits are computed at the target positions only (the unembedding dominates).

How the weights stay untouched: each trained parameter is replaced, for the duration of training only, by
a trainable *copy* (a new `nn.Parameter` set on its module); the original tensor is never written, and
`finally` puts the original objects and every parameter's `requires_grad` flag back, so even an
interrupted edit leaves the model bit-identical. The result is the difference trained − original (dense,
float32, in the parameter's stored layout: L∞ is elementwise, so no orientation is needed).

Not handled: mini-batching many requests (all go in one batch per step); a KL/locality term (EasyEdit's
`kl_factor`); training biases or norms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

import torch
from torch import nn

from lmedit.config import check_ranges, to_dict
from lmedit.editors.steps.value import context_prefixes, prefix_token_bound
from lmedit.editors.base import EditorConfig, ParamDelta, WeightEdit
from lmedit.errors import ConfigError, EditFailedError
from lmedit.models.arch import WeightName
from lmedit.models.params import resident
from lmedit.scoring import logits_at, teacher_forced
from lmedit.tokens import Batch
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM
    from lmedit.stats import StatsCache

log = logging.getLogger(__name__)

MODULES: tuple[str, ...] = get_args(WeightName)  # the weights the ArchSpec can name: mlp_in, mlp_out, attn_out


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(EditorConfig):
    """Settings shared by the fine-tuning editors. Defaults: ROME's FT baseline on GPT-2 XL."""

    layers: tuple[int, ...] = (0,)     # blocks whose weight is trained (ROME's FT baseline: layer 0)
    module: str = "mlp_out"           # which weight of each block: mlp_out (down-projection) | mlp_in | attn_out
    steps: int = 25                   # most Adam steps (ROME: 25)
    lr: float = 5e-4                  # Adam learning rate (ROME: 5e-4)
    weight_decay: float = 0.0         # Adam's L2 weight decay on the trained weight (ROME, EasyEdit: 0)
    early_stop_loss: float = 1e-2     # stop once the mean target NLL per token is below this; 0 = never
    prefixes_short: int = 0           # ROME-style random 5-token prefixes added as extra training prompts
    prefixes_long: int = 0            # ... and 10-token ones (0 and 0: train on the bare prompts only)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_ranges(self, positive=("lr",), at_least_one=("steps",), layers=("layers",),
                     nonnegative=("weight_decay", "early_stop_loss", "prefixes_short", "prefixes_long"))
        if not self.layers:
            raise ConfigError(f"{name}.layers must name at least one layer")
        if self.module not in MODULES:
            raise ConfigError(f"{name}.module must be one of {', '.join(MODULES)}, got {self.module!r}")

    def prefix_tokens(self) -> int:
        return prefix_token_bound(((5, self.prefixes_short), (10, self.prefixes_long)))


@dataclass(frozen=True)
class FinetuneResult:
    deltas: dict[str, torch.Tensor]  # parameter name -> trained − original, float32, stored layout
    losses: list[float]              # losses[i]: mean target NLL per token after i updates
    steps: int                       # updates made
    stopped_early: bool              # the loss fell below early_stop_loss before `steps` updates
    n_prompts: int = 0               # training sequences per step (requests × prefixes)
    max_abs: dict[str, float] = field(default_factory=dict)  # ‖Δ‖∞ per parameter


@contextmanager
def trainable_copies(lm: LM, names: Sequence[str]) -> Iterator[dict[str, nn.Parameter]]:
    """Stand a trainable copy in for each named parameter, with every other parameter frozen, inside the block.

    The original `Parameter` objects are never written: on exit (normal, exception or KeyboardInterrupt)
    they are put back on their modules and every parameter's `requires_grad` flag is restored.

    Example:
        with trainable_copies(lm, ["model.layers.2.mlp.down_proj.weight"]) as params:
            loss(lm).backward()          # gradients land on params[name], the copy
        # lm is exactly as before; params[name] holds the trained values

    Parameters accelerate offloaded are held in memory for the block (`lmedit.models.params.resident`).
    """
    with resident(lm.model, names), _copies(lm, names) as copies:
        yield copies


@contextmanager
def _copies(lm: LM, names: Sequence[str]) -> Iterator[dict[str, nn.Parameter]]:
    flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    owners = {}
    for name in names:
        module_path, _, attr = name.rpartition(".")
        owners[name] = (lm.model.get_submodule(module_path), attr)
    originals = {name: getattr(module, attr) for name, (module, attr) in owners.items()}
    try:
        for p in lm.model.parameters():
            p.requires_grad_(False)
        copies = {}
        for name, (module, attr) in owners.items():
            copies[name] = nn.Parameter(originals[name].detach().clone(), requires_grad=True)
            setattr(module, attr, copies[name])
        yield copies
    finally:
        for name, (module, attr) in owners.items():
            setattr(module, attr, originals[name])
        for name, p in lm.model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))


@dataclass(frozen=True)
class TargetBatch:
    """The teacher-forced training batch of target_new: rows "prefix + prompt + target[:-1]" request by request
    (`scoring.teacher_forced`), and per scored target token its row, position, gold id and weight. A token's
    weight is 1 / (its target's length): each sequence counts once, whatever its target length."""

    batch: Batch
    rows: torch.Tensor       # (n_target_tokens,)
    positions: torch.Tensor  # (n_target_tokens,)
    gold: torch.Tensor       # (n_target_tokens,)
    weights: torch.Tensor    # (n_target_tokens,)
    n_seqs: int              # training sequences (requests × prefixes)

    def loss(self, lm: LM) -> torch.Tensor:
        """The mean over sequences of target_new's NLL per target token, under `lm`'s current weights (a scalar
        with gradient; logits only at the target positions)."""
        logits = logits_at(lm, self.batch.model_inputs(), self.rows, self.positions).float()  # (n_target_tokens, d_vocab)
        token_nll = -torch.log_softmax(logits, dim=-1).gather(1, self.gold[:, None])[:, 0]
        return (token_nll * self.weights).sum() / self.n_seqs


def target_batch(lm: LM, requests: Sequence[EditRequest], prefixes: Sequence[str] = ("",)) -> TargetBatch:
    """The `TargetBatch` of `requests`, each behind every prefix of `prefixes` ("" = the bare prompt)."""
    scored = teacher_forced(lm, [prefix + request.text for request in requests for prefix in prefixes],
                            [request.target_new for request in requests for _ in prefixes], feed_last=False)
    weights = torch.tensor([1.0 / n for _, n in scored.spans for _ in range(n)], dtype=torch.float32, device=lm.device)
    return TargetBatch(scored.padded(lm), *scored.index(lm.device), weights, len(scored.ids))


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]   # losses[i]: mean target NLL per token after i updates
    steps: int            # updates made
    stopped_early: bool   # the loss fell below early_stop_loss before `steps` updates
    # The trained values, one per param: the param itself (float32 model), else its float32 master copy.
    values: list[torch.Tensor] = field(default_factory=list)


_HALF = (torch.float16, torch.bfloat16)


def train_on_targets(lm: LM, params: Sequence[nn.Parameter], batch: TargetBatch, *, steps: int, lr: float,
                     weight_decay: float = 0.0, early_stop_loss: float = 0.0,
                     after_step: Callable[[list[torch.Tensor]], None] | None = None, label: str = "fine-tuning",
                     progress: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Adam on `params` (already standing in the model, with gradients on) to lower `batch.loss(lm)`.

    Half-precision params (bfloat16, float16) are trained through float32 master copies (mixed precision):
    Adam's moments and steps are float32 (in float16 its ε underflows and the first step is NaN; in
    bfloat16 steps below a weight's rounding step would be lost), and after each step the param the
    forward reads is the master rounded once to its dtype. Float32 params are stepped directly.

    Args:
        lm: the model whose forward reads `params`.
        params: the trained tensors; nothing else is touched.
        batch: what is trained on (`target_batch`).
        steps: most updates; the loss is measured once more after the last one.
        lr, weight_decay: Adam's.
        early_stop_loss: stop once the loss is below this (0: never).
        after_step: called (without gradient) after every update with the trained values (`TrainResult.values`),
            which it may change in place, e.g. FT-L's projection.
        label: the phase name given to `progress`.
        progress: called as (label, step, steps) after each update.

    Raises:
        EditFailedError: the loss became NaN/inf.
    """
    losses: list[float] = []
    stopped_early = False
    updates = 0
    params = list(params)
    values = [p.detach().float() if p.dtype in _HALF else p for p in params]
    halves = [(p, v) for p, v in zip(params, values) if v is not p]
    optimizer = torch.optim.Adam(values, lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for updates in range(steps + 1):
            optimizer.zero_grad()
            loss = batch.loss(lm)
            losses.append(loss.item())
            if not torch.isfinite(loss):
                raise EditFailedError(f"{label} loss became {loss.item()} after {updates} steps; "
                                      "lower lr; the model is unchanged")
            if losses[-1] < early_stop_loss:
                stopped_early = True
                break
            if updates == steps:
                break  # this forward only measured the loss after the last update
            loss.backward()
            for p, v in halves:
                v.grad = None if p.grad is None else p.grad.float()
            optimizer.step()
            with torch.no_grad():
                if after_step is not None:
                    after_step(values)
                for p, v in halves:
                    p.copy_(v)
            if progress is not None:
                progress(label, updates + 1, steps)
    return TrainResult(losses=losses, steps=updates, stopped_early=stopped_early, values=values)


def finetune(lm: LM, requests: Sequence[EditRequest], config: FinetuneConfig, *,
             norm_constraint: float | None = None, cache: StatsCache | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> FinetuneResult:
    """Train the configured weights on target_new's NLL; return the change without applying it.

    Args:
        lm: the model; its weights and `requires_grad` flags are the same afterwards, bit for bit.
        requests: trained together, one batch per step.
        config: layers, module, steps, lr, weight decay, early stopping, prefixes.
        norm_constraint: ε for FT-L: after each step W ← W₀ + clamp(W − W₀, −ε, ε) elementwise. None: FT.
        cache: where sampled prefixes are cached (only used when prefixes are on).
        progress: called as ("fine-tuning", step, steps) after each update.

    Returns:
        The per-parameter deltas (float32) and the loss curve.

    Raises:
        ValueError: a configured layer is outside the model.
        EditFailedError: the loss became NaN/inf.
    """
    n_layers = lm.n_layers
    bad = [layer for layer in config.layers if layer >= n_layers]
    if bad:
        raise ConfigError(f"{type(config).__name__}.layers={list(config.layers)}: layer(s) {bad} out of range, "
                         f"{lm.name!r} has {n_layers} layers (0..{n_layers - 1})")
    names = [lm.arch.param_name(lm.model, layer, config.module) for layer in config.layers]  # type: ignore[arg-type]
    lengths = [(n, c) for n, c in ((5, config.prefixes_short), (10, config.prefixes_long)) if c > 0]
    prefixes = context_prefixes(lm, lengths, seed=config.seed, cache=cache) if lengths else [""]
    batch = target_batch(lm, requests, prefixes)

    with trainable_copies(lm, names) as params:
        originals = {name: p.detach().clone() for name, p in params.items()}

        def project(values: list[torch.Tensor]) -> None:  # FT-L: W ← W₀ + clamp(W − W₀, −ε, ε)
            assert norm_constraint is not None
            for name, w in zip(params, values):
                w0 = originals[name].to(w.dtype)  # a half-precision W₀ is exact in float32
                w.copy_(w0 + (w - w0).clamp(-norm_constraint, norm_constraint))

        trained = train_on_targets(lm, list(params.values()), batch, steps=config.steps, lr=config.lr,
                                   weight_decay=config.weight_decay, early_stop_loss=config.early_stop_loss,
                                   after_step=project if norm_constraint is not None else None, progress=progress)
        deltas = {name: (w.detach().to(torch.float64) - originals[name].to(torch.float64)).to(torch.float32)
                  for name, w in zip(params, trained.values)}
    losses, updates, stopped_early = trained.losses, trained.steps, trained.stopped_early
    max_abs = {name: float(d.abs().max()) for name, d in deltas.items()}
    log.info("fine-tuned %s: loss %.3f -> %.3f in %d steps, max |Δ| %s", names, losses[0], losses[-1], updates,
             {k: f"{v:.3g}" for k, v in max_abs.items()})
    return FinetuneResult(deltas=deltas, losses=losses, steps=updates, stopped_early=stopped_early,
                          n_prompts=batch.n_seqs, max_abs=max_abs)


def finetune_edit(lm: LM, requests: tuple[EditRequest, ...], config: FinetuneConfig, method: str, *,
                  norm_constraint: float | None = None, cache: StatsCache | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> WeightEdit:
    """`finetune`, packaged as an unapplied `WeightEdit` with dense deltas and the loss curve in `info`."""
    result = finetune(lm, requests, config, norm_constraint=norm_constraint, cache=cache, progress=progress)
    info = {"layers": list(config.layers), "module": config.module, "params": list(result.deltas),
            "losses": result.losses, "steps": result.steps, "stopped_early": result.stopped_early,
            "final_loss": result.losses[-1], "n_prompts": result.n_prompts, "max_abs_delta": result.max_abs}
    return WeightEdit(deltas={name: ParamDelta(dense=d) for name, d in result.deltas.items()}, requests=requests,
                      method=method, config=to_dict(config), base_fingerprint=lm.fingerprint, info=info)
