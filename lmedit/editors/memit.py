"""MEMIT, Mass-Editing Memory in a Transformer (Meng et al. 2023, arXiv:2210.07229).

Edits many facts at once by spreading each fact's change over the MLP down-projections of a range of
layers (`editors/steps/mass.py` holds the shared steps and the edit flow, `MassEditor`; this module adds
only MEMIT's per-layer solve). Per layer, the update minimises
    Σ_i ‖(W + Δ) k_i − (W k_i + d_i)‖²  +  λ · E_{k∼C}[‖Δ k‖²]
so the new keys map to their targets while keys typical of the corpus (second moment C, `stats.py`)
move little; its closed form is Δ = D Kᵀ (λ C + K Kᵀ)⁻¹ (eq. 14), solved here in float64. λ is MEMIT's
"mom2_update_weight" (1.5e4 for GPT-J) and counts how many corpus keys one edit key weighs against.

Not handled: edits of attention weights; per-request layer ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.config import check_ranges
from lmedit.editors.steps.mass import LayerSolver, MassEditConfig, MassEditor
from lmedit.registry import editors

if TYPE_CHECKING:
    from lmedit.models.load import LM


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
class MemitEditor(MassEditor[MemitConfig]):
    """MEMIT (arXiv:2210.07229): many requests in one edit, spread over a range of MLP layers."""

    config_class = MemitConfig
    method = "memit"

    def solver(self, lm: LM, layers: tuple[int, ...], covariances: dict[int, torch.Tensor]) -> LayerSolver:
        """Eq. 14 per layer with λ = `mom2_weight` (`memit_solve`)."""
        lam = self.config.mom2_weight
        return LayerSolver(lambda layer, K, D: memit_solve(covariances[layer], K, D, lam))
