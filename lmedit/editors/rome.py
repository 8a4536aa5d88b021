"""ROME, Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", arXiv:2202.05262).

Edits one MLP down-projection W at layer l so that the key of the subject, k*, maps to a value v* that
makes the model say target_new:  W' = W + Λ (C⁻¹k*)ᵀ,  Λ = (v* − W k* − b) / ((C⁻¹k*)ᵀ k*),
so W' k* = v* exactly, while keys uncorrelated with k* under C = E[k kᵀ] are barely moved.

Legend: `k*` (d_mlp): mean key at the subject's last token over the prompt and ~20 model-generated
prefixes; `v*` (d_model): optimised output (`editors/steps/value.py`); `C` (d_mlp, d_mlp): key second moment
(`stats.py`).

By default the same prefix-averaged k* is used in Λ and in C⁻¹k* (R-ROME, Gupta et al. 2024,
"Rebuilding ROME", arXiv:2403.07175), so W' k̄ + b = v*. The paper's code (`compute_v` in its
repository) solves at the bare-prompt key instead: Λ = (v* − W k_bare − b) / ((C⁻¹k̄)ᵀ k_bare), left
vector C⁻¹k̄, so that W' k_bare + b = v* exactly; a small (C⁻¹k̄)ᵀ k_bare makes the update huge
("disabling edits"). `original_key_mix=True` reproduces that for comparison.

Not handled: several requests in one rank-one update (they are applied one after another, each on top
of the previous; use MEMIT for batches).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.config import check_ranges, to_dict
from lmedit.editors.steps.quiet import QuietSettings
from lmedit.editors.steps.value import ValueOptions, context_prefixes, optimize_value, prefix_token_bound
from lmedit.editors.base import Editor, EditorConfig, ParamDelta, WeightEdit, check_requests
from lmedit.errors import ConfigError, EditFailedError
from lmedit.models.params import read
from lmedit.registry import editors
from lmedit.stats import CorpusSpec, StatsCache, key_second_moment
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RomeConfig(QuietSettings, EditorConfig):
    layer: int | None = None           # edited block; None = the causal-tracing suggestion for this model
    v_steps: int = 20                  # Adam steps for v* (ROME: 20)
    v_lr: float = 0.5                  # Adam lr for v* (ROME: 0.5)
    v_early_stop: float = 0.05         # stop once target_new's mean NLL is below this (ROME's code: 0.05)
    kl_factor: float = 0.0625          # essence-drift KL weight (ROME: 0.0625)
    v_weight_decay: float = 0.5        # ‖δ‖/‖v‖² penalty (ROME GPT-2 XL: 0.5)
    clamp_norm_factor: float = 4.0     # ‖v* − v‖ ≤ 4‖v‖ (ROME)
    prefixes_short: int = 10           # number of 5-token random prefixes (ROME: 10)
    prefixes_long: int = 10            # number of 10-token random prefixes (ROME: 10)
    corpus: str = "sampled"            # statistics corpus: sampled | docstrings | file:PATH
    corpus_tokens: int = 5_000         # tokens averaged into C: 5k sampled ≈ 20k in edit quality, 1/4 the cost (bench_stats)
    cov_shrinkage: float = 0.0         # C ← (1−s)·C + s·tr(C)/d·I; helps when corpus_tokens is small
    original_key_mix: bool = False     # True: the paper's code (Λ solved at the bare-prompt key), disabling edits and all

    def __post_init__(self) -> None:
        check_ranges(self, positive=("v_lr", "clamp_norm_factor"),
                     nonnegative=("kl_factor", "v_weight_decay", "prefixes_short", "prefixes_long",
                                  "v_early_stop"),
                     at_least_one=("v_steps", "corpus_tokens"), intervals={"cov_shrinkage": "[0, 1)"},
                     layers=("layer",))
        CorpusSpec(source=self.corpus, n_tokens=self.corpus_tokens)
        self.check_quiet()

    def prefix_lengths(self) -> tuple[tuple[int, int], ...]:
        """(tokens, count) of the random context prefixes (`steps.value.context_prefixes`)."""
        return ((5, self.prefixes_short), (10, self.prefixes_long))

    def prefix_tokens(self) -> int:
        return prefix_token_bound(self.prefix_lengths())

    def value_options(self) -> ValueOptions:
        return ValueOptions(steps=self.v_steps, lr=self.v_lr, kl_factor=self.kl_factor,
                            early_stop_loss=self.v_early_stop,
                            weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                            quiet_factor=self.quiet_factor, quiet_prompts=self.quiet_prompts)


def rank_one_update(W: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor, k_star: torch.Tensor,
                    v_star: torch.Tensor, k_solve: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's closed form in float64: factors (left, right) with Δ = left @ right.T and W' k + b = v* at the
    key k it is solved at: k_solve when given (the paper's code: the bare-prompt key), else k*.

    Args:
        W: (d_model, d_mlp) canonical weight; bias: (d_model,) or None.
        C: (d_mlp, d_mlp) key second moment.
        k_star: (d_mlp,) the prefix-averaged key, whose C⁻¹k* is the update's direction in key space.
        v_star: (d_model,) target value.
        k_solve: the key at which W' k + b = v* must hold; None: k_star (R-ROME).

    Returns:
        left (d_model, 1) = Λ = (v* − W k − b) / ((C⁻¹k*)ᵀ k) and right (d_mlp, 1) = C⁻¹k*.
    """
    W64, C64, k_bar = W.to(torch.float64), C.to(torch.float64), k_star.to(torch.float64)
    u = torch.linalg.solve(C64, k_bar)                  # (d_mlp,) C⁻¹k*
    k = k_bar if k_solve is None else k_solve.to(torch.float64)
    current = W64 @ k + (bias.to(torch.float64) if bias is not None else 0.0)
    lam = (v_star.to(torch.float64) - current) / (u @ k)  # (d_model,)
    return lam[:, None], u[:, None]


@editors.register("rome")
class RomeEditor(Editor[RomeConfig]):
    """Rank-One Model Editing (arXiv:2202.05262). Edits one MLP down-projection per request."""

    config_class = RomeConfig

    def __init__(self, config: RomeConfig | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()

    def layer_for(self, lm: LM) -> int:
        if self.config.layer is not None:
            if self.config.layer >= lm.n_layers:
                raise ConfigError(f"RomeConfig.layer={self.config.layer} but the model has {lm.n_layers} layers")
            return self.config.layer
        return self.suggested_layer(lm)

    def covariance(self, lm: LM, layer: int) -> torch.Tensor:
        spec = CorpusSpec(source=self.config.corpus, n_tokens=self.config.corpus_tokens, seed=self.config.seed)
        C = key_second_moment(lm, [layer], spec, cache=self.cache, progress=self.progress)[layer]
        s = self.config.cov_shrinkage
        if s:
            C = (1 - s) * C + s * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        return C

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Compute ROME updates for `requests`, one after another (each sees the previous ones applied).

        The model's weights are restored before returning: the result is an unapplied `WeightEdit`
        whose deltas sum the per-request rank-one factors (rank = number of requests).
        """
        requests = check_requests(requests)
        layer = self.layer_for(lm)
        torch.manual_seed(self.config.seed)
        C = self.covariance(lm, layer)
        prefixes = context_prefixes(lm, self.config.prefix_lengths(), seed=self.config.seed, cache=self.cache)
        param = lm.arch.param_name(lm.model, layer, "mlp_out")
        module = lm.arch.block_module(lm.model, layer, "mlp_out")
        lefts, rights, infos = [], [], []
        applied: list[WeightEdit] = []
        try:
            for request in requests:
                left, right, info = self._one(lm, layer, request, C, prefixes, module)
                p_left, p_right = lm.arch.factors_to_param_layout(left, right)
                lefts.append(p_left)
                rights.append(p_right)
                infos.append(info)
                if len(requests) > 1:  # later requests are computed on the model with earlier ones applied
                    step = WeightEdit({param: ParamDelta(left=p_left, right=p_right)})
                    applied.append(step.apply(lm, check_fingerprint=False, trial=True))
        finally:
            for step in reversed(applied):
                step.undo()
        delta = ParamDelta(left=torch.cat(lefts, 1).to(torch.float32), right=torch.cat(rights, 1).to(torch.float32))
        return WeightEdit(deltas={param: delta}, requests=requests, method="rome", config=to_dict(self.config),
                          base_fingerprint=lm.fingerprint, info={"layer": layer, "requests": infos})

    def _one(self, lm: LM, layer: int, request: EditRequest, C: torch.Tensor, prefixes: Sequence[str],
             module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict]:
        # The keys at the subject's last token of each prefixed prompt come out of the optimisation's
        # first (unedited) forward: (n_templates, d_mlp), row 0 the bare prompt.
        value = optimize_value(lm, layer, request, prefixes, self.config.value_options(), with_keys=True)
        keys = value.keys.float()  # read in the model's dtype: a half-precision model's keys are averaged in float32
        k_star = keys.mean(0)
        W = lm.arch.weight_value(lm.model, layer, "mlp_out")
        bias = getattr(module, "bias", None)
        if bias is not None and bias.device.type == "meta":  # offloaded by accelerate: read where it lives
            bias = read(lm.model, lm.arch.param_name(lm.model, layer, "mlp_out").rpartition(".")[0] + ".bias")
        k_solve = keys[0] if self.config.original_key_mix else None  # keys[0]: the bare prompt ("" prefix)
        left, right = rank_one_update(W, bias, C, k_star, value.v_star, k_solve)
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise EditFailedError(f"ROME produced a non-finite update for {request.subject!r}; the model is unchanged")
        denominator = float(right[:, 0] @ (k_solve if k_solve is not None else k_star).to(torch.float64))
        info = {
            "subject": request.subject, "target_new": request.target_new, "v_steps": value.steps,
            "v_nll": value.nll, "v_loss": value.losses, "delta_norm": float((value.v_star - value.v_init).norm()),
            "v_norm": float(value.v_init.norm()), "denominator": denominator,
            "update_norm": float(left.norm() * right.norm()), "v_star": value.v_star.tolist(),
        }
        log.info("ROME %s -> %s at layer %d: nll %.3f after %d steps, ‖Δ‖=%.3g", request.subject,
                 request.target_new, layer, value.nll, value.steps, info["update_norm"])
        return left, right, info
