"""AlphaEdit: null-space constrained knowledge editing (Fang et al. 2024, arXiv:2410.02355).

MEMIT's steps and edit flow (`editors/steps/mass.py`, `MassEditor`), with the update confined to the null
space of the preserved keys: P = Û Ûᵀ, Û the eigenvectors of the corpus key second moment C whose eigenvalues
are below `nullspace_threshold` × the largest. Any Δ = Δ̃ P leaves preserved keys' outputs alone (Δ k₀ ≈ 0), so no
λC term is needed; the update minimises ‖Δ̃ P K − D‖² + ‖Δ̃ P K_p‖² + α‖Δ̃‖², where K_p are the keys of
the edits already applied (read off those edits, so sequential edits stop eroding earlier ones):
    Δ = D Kᵀ P (P (K Kᵀ + K_p K_pᵀ) P + α I)⁻¹        (eq. 15 of the paper, P moved inside symmetrically)
which lies in P's range, because P commutes with the bracket. α = `l2` × tr(C)/d_mlp, so it is in the
keys' units whatever the model.

The solve runs in the null space's own coordinates: with P = U Uᵀ (U orthonormal, d_mlp × r),
    Δ = D Kᵀ U (Uᵀ (K Kᵀ + K_p K_pᵀ) U + α I_r)⁻¹ Uᵀ
is the same matrix (P Kᵀ lies in U's range, on which the bracket acts as U (·) Uᵀ; tested against the form
above), but costs O(d_mlp · r · (n + m) + r³) instead of several d_mlp³ products: the eq. 15 form, in float64 at
d_mlp = 2,048, was about half of each edit's time on gemma3-270m (`benchmarks/bench_alphaedit_solve.py`).

U is cached on disk keyed by the model's exact weights hash (`LM.weights_hash`), the layer, the corpus and its
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


def null_space_basis(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """Û: the eigenvectors of C with eigenvalue < threshold × the largest -> (d_mlp, r) float64, orthonormal."""
    values, vectors = torch.linalg.eigh(C.to(torch.float64))
    return vectors[:, values < threshold * values.max()]


def null_space_projection(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ (`null_space_basis`) -> (d_mlp, d_mlp) float64."""
    basis = null_space_basis(C, threshold)
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


def alphaedit_solve_in_basis(U: torch.Tensor, K: torch.Tensor, D: torch.Tensor, alpha: float,
                             K_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`alphaedit_solve` with P = U Uᵀ, computed in U's coordinates: right = U (Uᵀ M U + αI_r)⁻¹ Uᵀ Kᵀ.

    Args:
        U: (d_mlp, r) orthonormal basis of the null space; K, D, K_prev as in `alphaedit_solve`.
    """
    U64 = U.to(torch.float64)
    KU = K.to(torch.float64) @ U64                                      # (n, r)
    A = KU.T @ KU
    if K_prev is not None:
        KpU = U64.T @ K_prev.to(torch.float64)                          # (r, m)
        A = A + KpU @ KpU.T
    A.diagonal().add_(alpha)
    right = U64 @ torch.linalg.solve(A, KU.T)                           # (d_mlp, n)
    return D.to(torch.float64).T, right


@editors.register("alphaedit")
class AlphaEditEditor(MassEditor[AlphaEditConfig]):
    """AlphaEdit (arXiv:2410.02355): MEMIT's update projected onto the null space of preserved keys."""

    config_class = AlphaEditConfig
    method = "alphaedit"

    def projection_path(self, lm: LM, layer: int) -> Path:
        spec = self.config.corpus_spec()
        stats = self.cache.path(lm, spec, layer)
        name = f"nullspace-layer{layer}-n{spec.n_tokens}-t{self.config.nullspace_threshold:g}-basis.safetensors"
        return stats.with_name(name)

    def projection(self, lm: LM, layer: int, C: torch.Tensor) -> torch.Tensor:
        """U for `layer` (P = U Uᵀ), read from the cache (checked: `lmedit.cache`) or computed from C and written
        (atomically) -> (d_mlp, r) float64."""
        path = self.projection_path(lm, layer)
        spec = self.config.corpus_spec()
        provenance = {"kind": "nullspace_basis", "model": lm.weights_hash, "layer": layer,
                      "corpus": spec.corpus_id(), "n_tokens": spec.n_tokens,
                      "threshold": self.config.nullspace_threshold}
        stored = read_tensors(path, provenance, {"U": ((C.shape[0], None), torch.float32)})
        if stored is not None:
            return stored["U"].to(device=C.device, dtype=torch.float64)
        U = null_space_basis(C, self.config.nullspace_threshold).to(torch.float32)
        write_tensors(path, {"U": U}, provenance, extra={"rank": str(U.shape[1])})
        return U.to(torch.float64)  # what a later read returns: identical edits either way

    def solver(self, lm: LM, layers: tuple[int, ...], covariances: dict[int, torch.Tensor]) -> LayerSolver:
        """Eq. 15 per layer, preserving the corpus keys (P) and the keys of the edits applied when it solves."""
        cfg = self.config
        Us = {layer: self.projection(lm, layer, covariances[layer]) for layer in layers}
        n_prev: dict[int, int] = {}

        def solve(layer: int, K: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            K_prev = lm.edits.keys(lm.arch.param_name(lm.model, layer, "mlp_out"))  # earlier edits' keys
            n_prev[layer] = 0 if K_prev is None else K_prev.shape[1]
            C = covariances[layer]
            alpha = cfg.l2 * float(torch.trace(C)) / C.shape[0]
            return alphaedit_solve_in_basis(Us[layer], K, D, alpha, K_prev)

        def notes(layer: int) -> dict:
            return {"nullspace_dim": Us[layer].shape[1], "preserved_edit_keys": n_prev.get(layer, 0)}

        return LayerSolver(solve, notes)
