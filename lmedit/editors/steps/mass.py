"""The mass editors' base (MEMIT, AlphaEdit): keys of many requests, z targets, the layer-by-layer spread, and
`MassEditor`, the edit flow both run, which a subclass specialises only by its per-layer closed form (`solver`).

MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer", arXiv:2210.07229, §4.3) edits the MLP
down-projections of a range of layers R = [l_1 .. L] at once:
  1. z_i = h_L + δ_i: the residual stream after block L at request i's last subject token, optimised so the
     model says target_new (ROME's v* loss, `steps.value.optimize_values` at site `resid_out`); for models that
     normalise the MLP output (Gemma 2/3) the layers' own values are optimised instead (`target_mode`),
     each target being the value that layer had in the optimised forward;
  2. for each l in R, ascending, with the updates of earlier layers already applied:
     K_l (d_mlp × n) keys of the requests (mean over prefixed prompts), R_l = (z − h_L) / (L − l + 1) the
     part of the missing residual this layer writes, mapped to the down-projection's output space
     (`ArchSpec.value_change_for_residual`, identity unless the model normalises its MLP output);
     Δ_l = `solve(l, K_l, D_l)`, the method's closed form (MEMIT: D Kᵀ(λC + K Kᵀ)⁻¹; AlphaEdit projects).
Keys and z are computed in chunks of `chunk` requests, so thousands of requests never hold all their
activations at once.

Legend: n requests, d = d_model, d_mlp = the down-projection's input width; K is stored (n, d_mlp) here
(rows are keys) and Δ in the canonical (d, d_mlp) orientation.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from lmedit.config import check_ranges, to_dict
from lmedit.editors.steps.quiet import QuietSettings
from lmedit.editors.steps.value import (ValueOptions, ValueResult, context_prefixes, optimize_values, prefix_token_bound,
                                        prefixed_templates)
from lmedit.editors.base import Editor, EditorConfig, ParamDelta, WeightEdit, check_requests
from lmedit.errors import ConfigError, EditFailedError
from lmedit.stats import CorpusSpec, StatsCache, key_second_moment
from lmedit.hooks import capture
from lmedit.tokens import pad_batch, prompt_ids, subject_span
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
# (layer, K (n, d_mlp) float64, D (n, d) float64) -> Δ (d, d_mlp) as factors (left (d, r), right (d_mlp, r))
SolveFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class MassEditConfig(QuietSettings, EditorConfig):
    """Settings MEMIT and AlphaEdit share: the layer range, the z optimisation, statistics and batching."""

    layers: tuple[int, ...] | None = None  # edited range, ascending; None = 4 layers ending at the tracing suggestion
    v_steps: int = 25                      # Adam steps for z (MEMIT: 25)
    v_lr: float = 0.5                      # (MEMIT: 0.5)
    v_early_stop: float = 0.05             # stop once target_new's mean NLL is below this (MEMIT's code: 0.05)
    kl_factor: float = 0.0625              # essence KL weight (MEMIT: 0.0625)
    v_weight_decay: float = 0.5            # ‖δ‖/‖h‖² penalty (MEMIT GPT-J: 0.5)
    clamp_norm_factor: float = 0.75        # ‖z − h‖ ≤ 0.75‖h‖ (MEMIT GPT-J: 0.75)
    prefixes: int = 5                      # 10-token random prefixes besides the bare prompt (MEMIT: 5)
    corpus: str = "sampled"                # statistics corpus: sampled | docstrings | file:PATH
    corpus_tokens: int = 5_000             # tokens averaged into C (see RomeConfig.corpus_tokens)
    chunk: int = 16                        # requests per z optimisation batch (bounds memory for big batches)
    targets: str = "auto"                  # residual (MEMIT's z at the last layer) | values | auto (see steps/mass.py)
    batch_size: int = 64                   # sequences per forward when reading keys and values

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_ranges(self, positive=("v_lr", "clamp_norm_factor"),
                     nonnegative=("kl_factor", "v_weight_decay", "prefixes", "v_early_stop"),
                     at_least_one=("v_steps", "chunk", "batch_size", "corpus_tokens"), layers=("layers",))
        if self.layers is not None and not self.layers:
            raise ConfigError(f"{owner}.layers must name at least one layer (or be null for the default range)")
        if self.targets not in ("auto", "residual", "values"):
            raise ConfigError(f"{owner}.targets must be auto, residual or values, got {self.targets!r}")
        CorpusSpec(source=self.corpus, n_tokens=self.corpus_tokens)
        self.check_quiet()

    def prefix_tokens(self) -> int:
        return prefix_token_bound(self.prefix_lengths())

    def value_options(self) -> ValueOptions:
        return ValueOptions(steps=self.v_steps, lr=self.v_lr, kl_factor=self.kl_factor,
                            early_stop_loss=self.v_early_stop,
                            weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                            quiet_factor=self.quiet_factor, quiet_prompts=self.quiet_prompts)

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(source=self.corpus, n_tokens=self.corpus_tokens, seed=self.seed)

    def prefix_lengths(self) -> tuple[tuple[int, int], ...]:
        return ((10, self.prefixes),) if self.prefixes else ()


def default_layers(lm: LM, last: int, span: int = 4) -> tuple[int, ...]:
    """`span` consecutive layers ending at `last`, the causal-tracing suggestion (MEMIT's critical MLP range)."""
    return tuple(range(max(0, last - span + 1), last + 1))


def check_layers(lm: LM, layers: Sequence[int], owner: str) -> tuple[int, ...]:
    layers = tuple(layers)
    if not layers:
        raise ConfigError(f"{owner}.layers must name at least one layer")
    if list(layers) != sorted(set(layers)):
        raise ConfigError(f"{owner}.layers must be distinct and ascending, got {list(layers)}")
    if layers[-1] >= lm.n_layers:
        raise ConfigError(f"{owner}.layers includes {layers[-1]} but the model has {lm.n_layers} layers")
    return layers


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def at_subject(lm: LM, site: Site, jobs: Sequence[tuple[str, str]], batch_size: int) -> torch.Tensor:
    """Activation at `site` at the subject's last token of each (template, subject) -> (len(jobs), width)."""
    out = []
    for chunk in _chunks(jobs, batch_size):
        batch = pad_batch(lm, [prompt_ids(lm, t.format(s)) for t, s in chunk])
        cols = torch.tensor([subject_span(lm, t, s).last for t, s in chunk], device=lm.device)
        with capture(lm, [site], stop_after=site) as acts:
            lm.model(**batch.model_inputs(), use_cache=False)
        out.append(acts[site][torch.arange(len(chunk), device=lm.device), cols].to(torch.float64))
    return torch.cat(out)


def request_keys(lm: LM, layer: int, requests: Sequence[EditRequest], prefixes: Sequence[str],
                 batch_size: int = 64) -> torch.Tensor:
    """k_i: the mean key at the subject's last token over the prefixed prompts, per request -> (n, d_mlp) float64."""
    jobs = [(t, r.subject) for r in requests for t in prefixed_templates(r, prefixes)]
    keys = at_subject(lm, Site("mlp.key", layer), jobs, batch_size)
    return keys.view(len(requests), len(prefixes), -1).mean(1)


def bare_values(lm: LM, site: Site, requests: Sequence[EditRequest], batch_size: int = 64) -> torch.Tensor:
    """The activation at `site` at the subject's last token of each bare prompt -> (n, width) float64."""
    return at_subject(lm, site, [(r.prompt, r.subject) for r in requests], batch_size)


@dataclass(frozen=True)
class Targets:
    """What each request should produce, with the optimisation's diagnostics.

    mode "residual": z (n, d), the residual stream after the range's last block (MEMIT).
    mode "values":   z (n, S, d), the down-projection output of each of the S layers of the range.
    """

    mode: str
    z: torch.Tensor                 # float64
    results: list[ValueResult]


def target_mode(lm: LM, setting: str) -> str:
    """`auto` -> "values" when the model normalises its MLP output (Gemma 2/3), else MEMIT's "residual".

    Why: after a post-MLP RMSNorm each layer's write to the residual stream has a fixed norm, so the residual
    change MEMIT spreads over the layers is not reachable by them (gemma3-270m, Eiffel Tower → Rome: z patched
    in gives log P(Rome) − log P(Paris) = +10.4, the spread update −3.0 even at λ = 100). Optimising the
    layers' values jointly (the same loss, one δ per layer) gives targets the layers can meet.
    """
    if setting != "auto":
        return setting
    return "values" if lm.arch.mlp_post_norm is not None else "residual"


def z_targets(lm: LM, layers: Sequence[int], requests: Sequence[EditRequest], prefixes: Sequence[str],
              options: ValueOptions, *, chunk: int, mode: str = "residual",
              progress: ProgressFn | None = None) -> Targets:
    """The targets of `requests` for the range `layers`, optimised `chunk` requests at a time."""
    results: list[ValueResult] = []
    for part in _chunks(requests, chunk):
        if mode == "residual":
            results += optimize_values(lm, layers[-1], part, prefixes, options, site_kind="resid_out")
        else:
            results += optimize_values(lm, list(layers), part, prefixes, options, site_kind="mlp.out")
        if progress:
            progress("target values", len(results), len(requests))
    return Targets(mode, torch.stack([r.v_star for r in results]).to(torch.float64), results)


def spread(lm: LM, requests: Sequence[EditRequest], layers: Sequence[int], targets: Targets,
           prefixes: Sequence[str], solve: SolveFn, *, batch_size: int = 64,
           progress: ProgressFn | None = None) -> tuple[dict[str, ParamDelta], dict[str, torch.Tensor], list[dict]]:
    """Apply the per-layer updates one layer after another (each sees the earlier ones), then remove them all.

    Returns:
        deltas: parameter name -> its ParamDelta (stored layout);
        keys: parameter name -> the keys the update was fitted to, (d_mlp, n) float32 (for later AlphaEdit edits);
        layer_info: per layer, norms of the residual written and of the update.
    """
    last = layers[-1]
    deltas: dict[str, ParamDelta] = {}
    keys_used: dict[str, torch.Tensor] = {}
    info: list[dict] = []
    steps: list[WeightEdit] = []
    try:
        for i, layer in enumerate(layers):
            K = request_keys(lm, layer, requests, prefixes, batch_size)                       # (n, d_mlp)
            v = bare_values(lm, Site("mlp.out", layer), requests, batch_size)                 # (n, d)
            if targets.mode == "residual":
                h_last = bare_values(lm, Site("resid_out", last), requests, batch_size)       # (n, d)
                residual = (targets.z - h_last) / (len(layers) - i)                           # (n, d)
                D = lm.arch.value_change_for_residual(lm.model, layer, v, residual).to(torch.float64)
            else:  # the layer's own target, re-measured against its value after the earlier layers' updates
                residual = targets.z[:, i] - v
                D = residual
            left, right = solve(layer, K, D)
            if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                raise EditFailedError(f"the update of layer {layer} is not finite; the model is unchanged")
            name = lm.arch.param_name(lm.model, layer, "mlp_out")
            p_left, p_right = lm.arch.factors_to_param_layout(left.to(torch.float32), right.to(torch.float32))
            rows, cols, rank = p_left.shape[0], p_right.shape[0], p_left.shape[1]
            # Low-rank factors while they are smaller than the dense matrix (MEMIT's rank is ≤ n).
            delta = (ParamDelta(left=p_left, right=p_right) if rank * (rows + cols) < rows * cols
                     else ParamDelta(dense=(p_left.to(torch.float64) @ p_right.to(torch.float64).T).to(torch.float32)))
            deltas[name] = delta
            keys_used[name] = K.T.to(torch.float32).contiguous()
            info.append({"layer": layer, "target_norm": float(residual.norm(dim=-1).mean()),
                         "update_norm": float(delta.full(torch.float64).norm())})
            steps.append(WeightEdit({name: delta}).apply(lm, check_fingerprint=False, trial=True))
            if progress:
                progress("layers", i + 1, len(layers))
    finally:
        for step in reversed(steps):
            step.undo()
    return deltas, keys_used, info


def request_info(requests: Sequence[EditRequest], targets: Targets) -> list[dict]:
    """Per-request diagnostics of the target optimisation, for `WeightEdit.info`."""
    return [{"subject": r.subject, "target_new": r.target_new, "z_nll": res.nll, "z_steps": res.steps,
             "z_delta_norm": float((res.v_star - res.v_init).norm()), "z_init_norm": float(res.v_init.norm())}
            for r, res in zip(requests, targets.results, strict=True)]


@dataclass(frozen=True)
class LayerSolver:
    """A mass editor's closed form for one edit: `solve` per layer, and `notes` added to that layer's `info`."""

    solve: SolveFn
    notes: Callable[[int], dict] = lambda layer: {}


@dataclass(frozen=True)
class MassSetup:
    """What an edit prepares before its targets: the layer range, its key statistics, the solver, the prefixes."""

    layers: tuple[int, ...]
    covariances: dict[int, torch.Tensor]   # layer -> C, (d_mlp, d_mlp)
    solver: LayerSolver
    prefixes: list[str]


MC = TypeVar("MC", bound=MassEditConfig)


class MassEditor(Editor[MC]):
    """The edit flow MEMIT and AlphaEdit share; a subclass says only how a layer's update is solved.

    `edit` = layers (configured, else 4 ending at the tracing suggestion) -> key statistics C per layer ->
    `solver(lm, layers, Cs)` (the subclass's closed form, made once per edit) -> context prefixes -> targets
    (`z_targets`) -> `spread` over the layers -> an unapplied `WeightEdit` recording `method`. A subclass sets
    `config_class` (a `MassEditConfig`), `method` (its registry name) and implements `solver`.
    `optimize_targets` + `edit_from_targets` split `edit` at the expensive step (the targets do not depend on
    the solve's settings, so a sweep of those optimises them once).
    """

    config_class = MassEditConfig
    method: ClassVar[str]                  # the registry name, recorded on the edit

    def __init__(self, config: MC | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()

    @abstractmethod
    def solver(self, lm: LM, layers: tuple[int, ...], covariances: dict[int, torch.Tensor]) -> LayerSolver:
        """The method's per-layer closed form for one edit (called once per edit, before the targets)."""

    def layers_for(self, lm: LM) -> tuple[int, ...]:
        """The edited layer range: the configured one, else 4 layers ending at the causal-tracing suggestion."""
        layers = self.config.layers if self.config.layers is not None else default_layers(lm, self.suggested_layer(lm))
        return check_layers(lm, layers, type(self.config).__name__)

    def covariances(self, lm: LM, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        return key_second_moment(lm, list(layers), self.config.corpus_spec(), cache=self.cache, progress=self.progress)

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """One update for all `requests` (unapplied; the model is unchanged on return)."""
        requests = check_requests(requests)
        setup = self._setup(lm)
        return self._solve(lm, requests, setup, self._targets(lm, requests, setup))

    def optimize_targets(self, lm: LM, requests: Sequence[EditRequest]) -> Targets:
        """The targets of `requests` (the expensive step; it does not depend on the solve's settings)."""
        requests = check_requests(requests)
        return self._targets(lm, requests, self._setup(lm))

    def edit_from_targets(self, lm: LM, requests: Sequence[EditRequest], targets: Targets) -> WeightEdit:
        """The edit `edit(lm, requests)` makes, given the targets `optimize_targets` returned for them."""
        requests = check_requests(requests)
        return self._solve(lm, requests, self._setup(lm), targets)

    def _setup(self, lm: LM) -> MassSetup:
        cfg = self.config
        layers = self.layers_for(lm)
        torch.manual_seed(cfg.seed)
        Cs = self.covariances(lm, layers)
        solver = self.solver(lm, layers, Cs)
        prefixes = context_prefixes(lm, cfg.prefix_lengths(), seed=cfg.seed, cache=self.cache)
        return MassSetup(layers, Cs, solver, prefixes)

    def _targets(self, lm: LM, requests: Sequence[EditRequest], setup: MassSetup) -> Targets:
        cfg = self.config
        return z_targets(lm, setup.layers, requests, setup.prefixes, cfg.value_options(), chunk=cfg.chunk,
                         mode=target_mode(lm, cfg.targets), progress=self.progress)

    def _solve(self, lm: LM, requests: Sequence[EditRequest], setup: MassSetup, targets: Targets) -> WeightEdit:
        cfg, layers = self.config, setup.layers
        deltas, keys, layer_info = spread(lm, requests, layers, targets, setup.prefixes, setup.solver.solve,
                                          batch_size=cfg.batch_size, progress=self.progress)
        for item in layer_info:
            item.update(setup.solver.notes(item["layer"]))
        per_request = request_info(requests, targets) if targets.results else []
        log.info("%s: %d requests over layers %s", self.method, len(requests), list(layers))
        return WeightEdit(deltas=deltas, requests=requests, method=self.method, config=to_dict(cfg),
                          base_fingerprint=lm.fingerprint, keys=keys,
                          info={"layers": list(layers), "targets": targets.mode, "per_layer": layer_info, "requests": per_request,
                                "update_norm": float(sum(d["update_norm"] ** 2 for d in layer_info) ** 0.5)})
