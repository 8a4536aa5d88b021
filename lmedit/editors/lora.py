"""LoRA as an editor (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685),
trained with the `peft` library, and the export of a low-rank edit as a PEFT adapter directory.

The frozen weight W (d_out, d_in) of one block's module (default: the MLP down-projection, `mlp_out`) gets
a trainable low-rank path:  W x + (α/r) · B A x,  A (r, d_in) randomly initialised, B (d_out, r) zero, so
training starts from the unedited model. Only A and B are trained, with FT-M's objective (target_new's
teacher-forced NLL on the target tokens only, `editors/steps/finetune.py`: `target_batch`,
`train_on_targets`, the same Adam loop and early stop as FT). The result is the weight change
Δ = (α/r) · B A, a rank-r `WeightEdit` (`ParamDelta(left=(α/r)·B, right=Aᵀ)` in the canonical layout,
moved to the parameter's stored layout by `lm.arch`), so undo, save/load, the ledger and export work as for
any weight edit.

Legend: r = `rank`, α = `alpha`; A = lora_A, B = lora_B in peft's names.

How the weights stay untouched: peft's adapter is injected into `lm.model` for the duration of training
only; `finally` puts the original module objects back, deletes the `peft_config` attribute peft sets on
the model and restores every parameter's `requires_grad` flag, so even a failed or interrupted edit leaves
the model bit-identical (peft never writes the base weight: `merge` is not called).

`export_peft_adapter` writes any low-rank weight edit (LoRA's, ROME's, MEMIT's...) as adapter_config.json +
adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base_model, directory)` loads.

Not handled: biases, DoRA/rsLoRA variants, LoRA dropout (0: an edit is a few dozen steps on one batch),
mini-batches, a locality term; dense edits (FT) cannot be exported as an adapter. `peft` is an optional
dependency (`pip install 'lmedit[lora]'`), imported only when a LoRA edit or an export runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lmedit.config import check_ranges, to_dict
from lmedit.editors.base import Editor, EditorConfig, ParamDelta, WeightEdit, check_requests
from lmedit.editors.steps.finetune import MODULES, target_batch, train_on_targets
from lmedit.errors import ConfigError, LMEditError, MissingDependencyError
from lmedit.models.params import resident
from lmedit.registry import editors
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

ADAPTER = "lmedit"  # the adapter's name while it is injected (never seen outside `lora_adapter`)
PEFT_WEIGHTS = "adapter_model.safetensors"  # the file names `PeftModel.from_pretrained` reads
PEFT_CONFIG = "adapter_config.json"


def require_peft() -> ModuleType:
    """The `peft` module, imported on first use (importing lmedit never imports it).

    Raises:
        MissingDependencyError: peft is not installed; the message says what to install.
    """
    try:
        import peft
    except ImportError:
        raise MissingDependencyError("LoRA edits and PEFT adapter export need the peft library: "
                                     "pip install 'lmedit[lora]'") from None
    return peft


@dataclass(frozen=True, kw_only=True)
class LoraEditConfig(EditorConfig):
    """LoRA editing settings. Defaults: the paper's rank/α ratio (α = 2r is common practice), FT's early stop."""

    layers: tuple[int, ...] | None = None  # blocks whose module gets an adapter; None = the causal-tracing suggestion
    module: str = "mlp_out"     # which weight of each block: mlp_out (down-projection) | mlp_in | attn_out
    rank: int = 8               # r: rank of B A (the edit's rank)
    alpha: float = 16.0         # α: the update is scaled by α / r (peft's lora_alpha)
    lr: float = 5e-3            # Adam learning rate of A and B (EasyEdit's LoRA editing: 5e-3)
    steps: int = 30             # most Adam steps
    weight_decay: float = 0.0   # Adam's L2 weight decay on A and B
    early_stop_loss: float = 1e-2  # stop once the mean target NLL per token is below this; 0 = never

    def __post_init__(self) -> None:
        check_ranges(self, positive=("lr", "alpha"), at_least_one=("steps", "rank"), layers=("layers",),
                     nonnegative=("weight_decay", "early_stop_loss"))
        name = type(self).__name__
        if self.layers is not None and not self.layers:
            raise ConfigError(f"{name}.layers must name at least one layer (or be null: the tracing suggestion)")
        if self.module not in MODULES:
            raise ConfigError(f"{name}.module must be one of {', '.join(MODULES)}, got {self.module!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@contextmanager
def lora_adapter(lm: LM, modules: Sequence[str], config: LoraEditConfig) -> Iterator[dict[str, nn.Module]]:
    """Inject a fresh peft LoRA adapter into the named modules of `lm.model` for the duration of the block.

    Only the adapter's A and B require gradients inside the block. On exit (normal, exception or
    KeyboardInterrupt) the original module objects are put back, peft's `peft_config` attribute is removed
    and every parameter's `requires_grad` flag is restored: the model is exactly as before.

    Modules whose weights accelerate offloaded hold them in memory for the block (`models.params.resident`).

    Yields:
        module name -> peft's LoRA layer standing in for it (`lora_A[ADAPTER]`, `lora_B[ADAPTER]`, `scaling`).
    """
    with resident(lm.model, [f"{name}.weight" for name in modules]), _injected(lm, modules, config) as layers:
        yield layers


@contextmanager
def _injected(lm: LM, modules: Sequence[str], config: LoraEditConfig) -> Iterator[dict[str, nn.Module]]:
    peft = require_peft()
    model = lm.model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    originals = {name: model.get_submodule(name) for name in modules}
    had_config = "peft_config" in vars(model)
    peft_config = peft.LoraConfig(target_modules=list(modules), r=config.rank, lora_alpha=config.alpha,
                                  lora_dropout=0.0, bias="none", fan_in_fan_out=lm.arch.weight_layout == "in_out")
    try:
        with torch.random.fork_rng(devices=[]):  # A's random init from the config's seed; the caller's RNG is kept
            torch.manual_seed(config.seed)
            peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
        yield {name: model.get_submodule(name) for name in modules}
    finally:
        for name, module in originals.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module)
        if not had_config and "peft_config" in vars(model):
            delattr(model, "peft_config")
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))


@editors.register("lora")
class LoraEditor(Editor[LoraEditConfig]):
    """LoRA (arXiv:2106.09685): trains a rank-r adapter B A on target_new (peft), returned as a rank-r weight edit."""

    config_class = LoraEditConfig
    method: ClassVar[str] = "lora"  # the registry name, recorded on the edit

    def layers_for(self, lm: LM) -> tuple[int, ...]:
        if self.config.layers is None:
            return (self.suggested_layer(lm),)
        bad = [layer for layer in self.config.layers if layer >= lm.n_layers]
        if bad:
            raise ConfigError(f"LoraEditConfig.layers={list(self.config.layers)}: layer(s) {bad} out of range, "
                              f"{lm.name!r} has {lm.n_layers} layers (0..{lm.n_layers - 1})")
        return self.config.layers

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Train a LoRA adapter on all `requests` together; return its weight change, unapplied.

        Raises:
            MissingDependencyError: peft is not installed.
            ConfigError: a configured layer is outside the model.
            EditFailedError: the loss became NaN/inf (the model is unchanged).
        """
        checked = check_requests(requests)
        require_peft()  # before any work: a missing dependency is the user's to fix
        config = self.config
        layers = self.layers_for(lm)
        names = [lm.arch.param_name(lm.model, layer, config.module) for layer in layers]  # type: ignore[arg-type]
        modules = [name.rpartition(".")[0] for name in names]
        batch = target_batch(lm, checked)
        deltas: dict[str, ParamDelta] = {}
        with lora_adapter(lm, modules, config) as adapters:
            params = [p for layer in adapters.values()
                      for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
            trained = train_on_targets(lm, params, batch, steps=config.steps, lr=config.lr,
                                       weight_decay=config.weight_decay, early_stop_loss=config.early_stop_loss,
                                       label="LoRA training", progress=self.progress)
            # The trained A and B (float32 masters on a half-precision model: `train_on_targets`).
            value = {id(p): v for p, v in zip(params, trained.values)}
            for name, module in zip(names, modules):
                layer = adapters[module]
                a = value[id(layer.lora_A[ADAPTER].weight)].detach().to(torch.float32).clone()  # (rank, d_in)
                b = value[id(layer.lora_B[ADAPTER].weight)].detach().to(torch.float32).clone()  # (d_out, rank)
                left, right = b * layer.scaling[ADAPTER], a.T.contiguous()  # canonical Δ = left @ right.T
                p_left, p_right = lm.arch.factors_to_param_layout(left, right)
                deltas[name] = ParamDelta(left=p_left.to(lm.device), right=p_right.to(lm.device))
        norms = {name: float(d.full(torch.float64).norm()) for name, d in deltas.items()}
        log.info("LoRA r=%d on %s: loss %.3f -> %.3f in %d steps, ‖Δ‖ %s", config.rank, names, trained.losses[0],
                 trained.losses[-1], trained.steps, {k: f"{v:.3g}" for k, v in norms.items()})
        info = {"layers": list(layers), "module": config.module, "params": names, "rank": config.rank,
                "scaling": config.scaling, "losses": trained.losses, "steps": trained.steps,
                "stopped_early": trained.stopped_early, "final_loss": trained.losses[-1],
                "n_prompts": batch.n_seqs, "delta_norm": norms}
        return WeightEdit(deltas=deltas, requests=checked, method=self.method, config=to_dict(config),
                          base_fingerprint=lm.fingerprint, info=info)


def _adapter_factors(lm: LM, name: str, delta: ParamDelta) -> tuple[str, torch.Tensor, torch.Tensor, bool]:
    """(module name, A (rank, d_in), B (d_out, rank), fan_in_fan_out) with Δ = B A in the canonical layout."""
    module_name, _, attr = name.rpartition(".")
    if delta.left is None or delta.right is None:
        raise LMEditError(f"the edit's change of {name!r} is dense (e.g. FT's), not low-rank: only low-rank weight "
                          "edits (lora, rome, memit, alphaedit...) can be written as a LoRA adapter")
    try:
        module = lm.model.get_submodule(module_name)
    except AttributeError:
        raise LMEditError(f"the edit changes {name!r}, which {lm.name!r} does not have") from None
    if attr != "weight":
        raise LMEditError(f"the edit changes {name!r}, not a module's weight: a LoRA adapter cannot hold it")
    if isinstance(module, nn.Linear):
        transposed = False  # weight (d_out, d_in)
    elif type(module).__name__ == "Conv1D":  # GPT-2's (transformers.pytorch_utils.Conv1D): weight (d_in, d_out)
        transposed = True
    else:
        raise LMEditError(f"the edit changes {name!r} of a {type(module).__name__}; a LoRA adapter is written for "
                          "Linear and GPT-2 Conv1D modules only")
    left, right = (delta.right, delta.left) if transposed else (delta.left, delta.right)  # canonical factors
    return module_name, right.T.to(torch.float32).contiguous().cpu(), left.to(torch.float32).contiguous().cpu(), transposed


def export_peft_adapter(edit: WeightEdit, lm: LM, directory: str | Path) -> Path:
    """Write a low-rank weight edit as a PEFT LoRA adapter directory (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base_model, directory)` loads.

    Each changed weight becomes one adapter module with its own rank and α = rank (scaling 1), so the
    adapter adds exactly Δ = B A: the model PEFT loads computes what the applied edit computes (up to
    float rounding: PEFT adds B A x beside W x instead of merging it into W).

    Args:
        edit: a `WeightEdit` with low-rank deltas (LoRA's, ROME's, MEMIT's...), made on `lm`.
        lm: the unedited base model it was made on (for the module types; its weights are not read).
        directory: where to write; created when missing, files in it of the same names replaced.

    Returns:
        The directory.

    Raises:
        MissingDependencyError: peft is not installed.
        LMEditError: not a weight edit, made on other weights, or a change that is dense or not of a
            Linear/Conv1D module's weight, or Linear and Conv1D weights mixed (one adapter has one layout).
    """
    peft = require_peft()
    from safetensors.torch import save_file

    if not isinstance(edit, WeightEdit):
        raise LMEditError(f"only weight edits can be written as a LoRA adapter, got a {edit.kind} edit")
    if edit.base_fingerprint and not lm.is_checkpoint(edit.base_fingerprint):
        raise LMEditError(f"this edit was made on a model with fingerprint {edit.base_fingerprint}, but {lm.name!r} "
                          f"has {lm.fingerprint}; export it with the model it was made on")
    if not edit.deltas:
        raise LMEditError("the edit changes no weight: there is nothing to write as an adapter")
    parts = [_adapter_factors(lm, name, delta) for name, delta in edit.deltas.items()]
    layouts = {transposed for *_, transposed in parts}
    if len(layouts) > 1:
        raise LMEditError("the edit changes both Linear and Conv1D weights; a PEFT adapter has one layout "
                          "(fan_in_fan_out) for all its modules")
    ranks = {module: a.shape[0] for module, a, _, _ in parts}
    first = ranks[parts[0][0]]
    config = peft.LoraConfig(target_modules=sorted(ranks), r=first, lora_alpha=first, lora_dropout=0.0, bias="none",
                             rank_pattern={m: r for m, r in ranks.items() if r != first},
                             alpha_pattern={m: r for m, r in ranks.items() if r != first},
                             fan_in_fan_out=layouts.pop(), inference_mode=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, a, b, _ in parts:  # the key names PEFT's save_pretrained writes (adapter name left out)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt", "lmedit_method": edit.method,
                                                               "base_fingerprint": edit.base_fingerprint})
    log.info("wrote a LoRA adapter of %d module(s) (ranks %s) to %s", len(ranks), sorted(set(ranks.values())), directory)
    return directory

