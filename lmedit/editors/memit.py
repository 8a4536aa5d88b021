"""MEMIT, Mass-Editing Memory in a Transformer (Meng et al. 2023, arXiv:2210.07229).

Edits many facts at once by spreading each fact's change over the MLP down-projections of a range of
layers (`editors/steps/mass.py` holds the shared steps). Per layer, the update minimises
    Σ_i ‖(W + Δ) k_i − (W k_i + d_i)‖²  +  λ · E_{k∼C}[‖Δ k‖²]
so the new keys map to their targets while keys typical of the corpus (second moment C, `stats.py`)
move little; its closed form is Δ = D Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14), solved here in float64. λ is MEMIT's
"mom2_update_weight" (1.5e4 for GPT-J) and counts how many corpus keys one edit key weighs against.

Not handled: edits of attention weights; per-request layer ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.config import check_ranges, to_dict
from lmedit.editors.steps.mass import (MassEditConfig, Targets, check_layers, default_layers, request_info, spread,
                                  target_mode, z_targets)
from lmedit.editors.steps.value import context_prefixes
from lmedit.editors.base import Editor, WeightEdit, check_requests
from lmedit.registry import editors
from lmedit.stats import StatsCache, key_second_moment
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MemitConfig(MassEditConfig):
    mom2_weight: float = 15_000.0          # λ: weight of the corpus keys' second moment (MEMIT GPT-J: 15000)

    def __post_init__(self) -> None:
        super().__post_init__()
        # λ = 0 leaves λC + KKᵀ singular for fewer edits than d_mlp: the solve needs λ > 0.
        check_ranges(self, positive=("mom2_weight",))


def memit_solve(C: torch.Tensor, K: torch.Tensor, D: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = D Kᵀ (λC + K Kᵀ)⁻¹ in float64, as factors (left = D (d, n)ᵀ, right = (λC + KKᵀ)⁻¹ K (d_mlp, n)).

    Args:
        C: (d_mlp, d_mlp) key second moment; K: (n, d_mlp) keys (rows); D: (n, d) wanted output changes.
    """
    C64, K64, D64 = C.to(torch.float64), K.to(torch.float64), D.to(torch.float64)
    A = lam * C64 + K64.T @ K64
    right = torch.linalg.solve(A, K64.T)  # A is symmetric: (K A⁻¹)ᵀ = A⁻¹ Kᵀ
    return D64.T, right


@editors.register("memit")
class MemitEditor(Editor[MemitConfig]):
    """MEMIT (arXiv:2210.07229): many requests in one edit, spread over a range of MLP layers."""

    config_class = MemitConfig

    def __init__(self, config: MemitConfig | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()

    def layers_for(self, lm: LM) -> tuple[int, ...]:
        layers = self.config.layers if self.config.layers is not None else default_layers(lm, self.suggested_layer(lm))
        return check_layers(lm, layers, "MemitConfig")

    def covariances(self, lm: LM, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        return key_second_moment(lm, list(layers), self.config.corpus_spec(), cache=self.cache, progress=self.progress)

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """One MEMIT update for all `requests` (unapplied; the model is unchanged on return)."""
        requests = check_requests(requests)
        layers, Cs, prefixes = self._setup(lm)
        return self._solve(lm, requests, layers, Cs, prefixes, self._targets(lm, requests, layers, prefixes))

    def optimize_targets(self, lm: LM, requests: Sequence[EditRequest]) -> Targets:
        """The targets of `requests` (the expensive step; it does not depend on λ, so a λ sweep does it once)."""
        requests = check_requests(requests)
        layers, _, prefixes = self._setup(lm)
        return self._targets(lm, requests, layers, prefixes)

    def edit_from_targets(self, lm: LM, requests: Sequence[EditRequest], targets: Targets) -> WeightEdit:
        """The edit `edit(lm, requests)` makes, given the targets `optimize_targets` returned for them."""
        requests = check_requests(requests)
        layers, Cs, prefixes = self._setup(lm)
        return self._solve(lm, requests, layers, Cs, prefixes, targets)

    def _setup(self, lm: LM) -> tuple[tuple[int, ...], dict[int, torch.Tensor], list[str]]:
        cfg = self.config
        layers = self.layers_for(lm)
        torch.manual_seed(cfg.seed)
        Cs = self.covariances(lm, layers)
        return layers, Cs, context_prefixes(lm, cfg.prefix_lengths(), seed=cfg.seed, cache=self.cache)

    def _targets(self, lm: LM, requests: Sequence[EditRequest], layers: Sequence[int], prefixes: Sequence[str]) -> Targets:
        cfg = self.config
        return z_targets(lm, layers, requests, prefixes, cfg.value_options(), chunk=cfg.chunk,
                         mode=target_mode(lm, cfg.targets), progress=self.progress)

    def _solve(self, lm: LM, requests: Sequence[EditRequest], layers: Sequence[int], Cs: dict[int, torch.Tensor],
               prefixes: Sequence[str], targets: Targets) -> WeightEdit:
        cfg = self.config

        def solve(layer: int, K: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return memit_solve(Cs[layer], K, D, cfg.mom2_weight)

        deltas, keys, layer_info = spread(lm, requests, layers, targets, prefixes, solve,
                                          batch_size=cfg.batch_size, progress=self.progress)
        per_request = request_info(requests, targets) if targets.results else []
        log.info("MEMIT: %d requests over layers %s", len(requests), list(layers))
        return WeightEdit(deltas=deltas, requests=requests, method="memit", config=to_dict(cfg),
                          base_fingerprint=lm.fingerprint, keys=keys,
                          info={"layers": list(layers), "targets": targets.mode, "per_layer": layer_info, "requests": per_request,
                                "update_norm": float(sum(d["update_norm"] ** 2 for d in layer_info) ** 0.5)})
