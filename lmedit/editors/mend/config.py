"""`MendConfig`: settings of MEND's editor network, its meta-training, and where a trained network lives.

One config serves both `lmedit train mend` (which reads the network and training fields) and editing
(which reads `checkpoint`): `configs/mend/<model>.yaml` holds the values used for a model, and
`--set checkpoint=DIR` points editing at the trained network. A checkpoint brings its own network
settings (layers, rank, ...); the fields here then only describe how it was trained.

Defaults follow MEND's published setting (Mitchell et al. 2021, "Fast Model Editing at Scale",
arXiv:2110.11309, and its code): the last three blocks, rank 1920, one hidden layer, cedit 0.1, cloc 1,
gradient clip 100. Learning rates differ: MEND's (1e-6 outer, 1e-4 edit lr) are for billion-parameter
models trained for days; ours are set per model in `configs/mend/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.config import check_ranges
from lmedit.editors.base import EditorConfig
from lmedit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class MendConfig(EditorConfig):
    # --- where the trained editor network is ------------------------------------------------------
    checkpoint: str | None = None      # directory written by `lmedit train mend` (or its mend.safetensors)
    allow_untrained: bool = False      # no checkpoint: use the identity network, i.e. one gradient step of size edit_lr

    # --- the editor network (MEND §3) ----------------------------------------------------------------
    layers: tuple[int, ...] = (-3, -2, -1)  # edited MLP down-projections; negative = from the end (MEND: last 3 blocks)
    rank: int = 1920                   # rank of each low-rank residual layer (MEND: 1920), capped at the input width
    n_hidden: int = 1                  # hidden low-rank layers (MEND: 1), so n_hidden + 1 layers in all
    edit_lr: float = 1e-4              # initial per-layer edit step size α_l, learned during training (MEND: 1e-4)

    # --- meta-training --------------------------------------------------------------------------------
    steps: int = 1000                  # optimiser steps
    batch_size: int = 4                # edits per step, each applied to its own copy of the model (batched)
    lr: float = 1e-4                   # Adam lr of the editor network (MEND: 1e-6 at 1B-10B parameters)
    lr_lr: float = 1e-4                # Adam lr of the per-layer edit step sizes (MEND: 1e-4)
    edit_weight: float = 0.1           # c_edit: weight of the post-edit NLL of target_new (MEND: 0.1)
    loc_weight: float = 1.0            # c_loc: weight of KL(base ‖ edited) on locality prompts (MEND: 1.0)
    grad_clip: float = 100.0           # max gradient norm of the editor network (MEND: 100)
    val_size: int = 50                 # held-out training records measured at every validation
    val_every: int = 100               # validate every N steps (and at step 0 and the last step)
    checkpoint_every: int = 100        # write the resumable training state every N steps

    def __post_init__(self) -> None:
        # edit_lr > 0: the edit is W − α·(transformed gradient); α ≤ 0 edits away from target_new or not at all.
        check_ranges(self, at_least_one=("rank", "steps", "batch_size", "val_size", "val_every", "checkpoint_every"),
                     positive=("edit_lr", "lr", "lr_lr", "grad_clip"),
                     nonnegative=("n_hidden", "edit_weight", "loc_weight"), distinct=("layers",))
        if not self.layers:
            raise ConfigError("MendConfig.layers must name at least one layer")
        if self.checkpoint is not None and not str(self.checkpoint).strip():
            raise ConfigError("MendConfig.checkpoint is empty (use null for no checkpoint)")

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """Absolute, sorted layer indices for a model with `n_layers` blocks.

        Raises:
            ValueError: a layer is out of range, or two entries name the same block.
        """
        out = []
        for layer in self.layers:
            absolute = layer + n_layers if layer < 0 else layer
            if not 0 <= absolute < n_layers:
                raise ConfigError(f"MendConfig.layers entry {layer} is out of range for a model with {n_layers} layers")
            out.append(absolute)
        if len(set(out)) != len(out):
            raise ConfigError(f"MendConfig.layers {self.layers} name the same block twice on a {n_layers}-layer model")
        return tuple(sorted(out))
