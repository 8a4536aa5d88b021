"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2024, arXiv:2410.02355).

MEMIT's steps and edit flow (`editors/steps/mass.py`, `MassEditor`), with the update confined to the null
space of the preserved keys: P = Û Ûᵀ, Û the eigenvectors of the corpus key second moment C whose eigenvalues
are below `nullspace_threshold` × the largest. Any Δ = Δ̃ P leaves preserved keys' outputs alone (Δ k₀ ≈ 0), so no
λC term is needed; the update minimises ‖Δ̃ P K − D‖² + ‖Δ̃ P K_p‖² + α‖Δ̃‖², where K_p are the keys of
the edits already applied (read off those edits, so sequential edits stop eroding earlier ones):
    Δ = D Kᵀ P (P (K Kᵀ + K_p K_pᵀ) P + α I)⁻¹        (eq. 15 of the paper, P moved inside symmetrically)
which lies in P's range, because P commutes with the bracket. α = `l2` × tr(C)/d_mlp, so it is in the
keys' units whatever the model.

P is cached on disk keyed by the model's exact weights hash (`LM.weights_hash`), the layer, the corpus and its
size, and the threshold.
(The paper's code saves one projection file without a key and reuses it for any model; we do not.)

Not handled: preserving keys other than the corpus's and the applied edits' (e.g. a user's own list).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.cache import read_tensors, write_tensors
from lmedit.config import check_ranges
from lmedit.editors.steps.mass import LayerSolver, MassEditConfig, MassEditor
from lmedit.registry import editors

if TYPE_CHECKING:
    from pathlib import Path

    from lmedit.models.load import LM


@dataclass(frozen=True, kw_only=True)
class AlphaEditConfig(MassEditConfig):
    nullspace_threshold: float = 1e-2      # eigenvalues of C below this × the largest span the editable space
    l2: float = 1.0                        # α = l2 · tr(C)/d_mlp, the ridge term

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("l2",), intervals={"nullspace_threshold": "(0, 1)"})


def null_space_projection(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C with eigenvalue < threshold × the largest -> (d_mlp, d_mlp) float64."""
    values, vectors = torch.linalg.eigh(C.to(torch.float64))
    basis = vectors[:, values < threshold * values.max()]
    return basis @ basis.T


def alphaedit_solve(P: torch.Tensor, K: torch.Tensor, D: torch.Tensor, alpha: float,
                    K_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = D Kᵀ P (P (KKᵀ + K_p K_pᵀ) P + αI)⁻¹ in float64, as factors (left (d, n), right (d_mlp, n)).

    Args:
        P: (d_mlp, d_mlp) null-space projection; K: (n, d_mlp) keys (rows); D: (n, d) wanted output changes;
        K_prev: (d_mlp, m) keys of earlier edits to keep (columns), or None.
    """
    P64, K64 = P.to(torch.float64), K.to(torch.float64)
    M = K64.T @ K64
    if K_prev is not None:
        M = M + K_prev.to(torch.float64) @ K_prev.to(torch.float64).T
    A = P64 @ M @ P64 + alpha * torch.eye(P64.shape[0], dtype=torch.float64, device=P64.device)
    right = torch.linalg.solve(A, P64 @ K64.T)  # = (K P A⁻¹)ᵀ: A and P are symmetric
    return D.to(torch.float64).T, right


@editors.register("alphaedit")
class AlphaEditEditor(MassEditor[AlphaEditConfig]):
    """AlphaEdit (arXiv:2410.02355): MEMIT's update projected onto the null space of preserved keys."""

    config_class = AlphaEditConfig
    method = "alphaedit"

    def projection_path(self, lm: LM, layer: int) -> Path:
        spec = self.config.corpus_spec()
        stats = self.cache.path(lm, spec, layer)
        return stats.with_name(f"nullspace-layer{layer}-n{spec.n_tokens}-t{self.config.nullspace_threshold:g}.safetensors")

    def projection(self, lm: LM, layer: int, C: torch.Tensor) -> torch.Tensor:
        """P for `layer`, read from the cache (checked: `lmedit.cache`) or computed from C and written (atomically)."""
        path = self.projection_path(lm, layer)
        spec = self.config.corpus_spec()
        provenance = {"kind": "nullspace_projection", "model": lm.weights_hash, "layer": layer,
                      "corpus": spec.corpus_id(), "n_tokens": spec.n_tokens,
                      "threshold": self.config.nullspace_threshold}
        stored = read_tensors(path, provenance, {"P": (tuple(C.shape), torch.float32)})
        if stored is not None:
            return stored["P"].to(device=C.device, dtype=torch.float64)
        P = null_space_projection(C, self.config.nullspace_threshold).to(torch.float32)
        write_tensors(path, {"P": P}, provenance, extra={"rank": str(round(float(P.trace())))})
        return P.to(torch.float64)  # what a later read returns: identical edits either way

    def solver(self, lm: LM, layers: tuple[int, ...], covariances: dict[int, torch.Tensor]) -> LayerSolver:
        """Eq. 15 per layer, preserving the corpus keys (P) and the keys of the edits applied when it solves."""
        cfg = self.config
        Ps = {layer: self.projection(lm, layer, covariances[layer]) for layer in layers}
        n_prev: dict[int, int] = {}

        def solve(layer: int, K: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            K_prev = lm.edits.keys(lm.arch.param_name(lm.model, layer, "mlp_out"))  # earlier edits' keys
            n_prev[layer] = 0 if K_prev is None else K_prev.shape[1]
            C = covariances[layer]
            alpha = cfg.l2 * float(torch.trace(C)) / C.shape[0]
            return alphaedit_solve(Ps[layer], K, D, alpha, K_prev)

        def notes(layer: int) -> dict:
            return {"nullspace_dim": round(float(Ps[layer].trace())), "preserved_edit_keys": n_prev.get(layer, 0)}

        return LayerSolver(solve, notes)
