"""MEND's editor network: (u, δ) → (ũ, δ̃), and its safetensors checkpoint (Mitchell et al. 2021, arXiv:2110.11309).

For a linear layer y = W u, the fine-tuning gradient of a loss summed over tokens is a sum of rank-one
terms, ∇_W L = Σ_t δ_t u_tᵀ (δ_t = ∂L/∂y_t). MEND never forms that d_out×d_in matrix: a small network
maps each token's pair (u_t, δ_t) to (ũ_t, δ̃_t), and the edit is ΔW = −α_l Σ_t δ̃_t ũ_tᵀ, a low-rank
update whose rank is the number of tokens.

Legend: `u` (n_tokens, d_in): inputs of the edited layer (for an MLP down-projection, ROME's keys, d_mlp);
`δ` (n_tokens, d_out): gradients of the loss w.r.t. its outputs (d_model); `α_l`: learned per-layer
edit step size.

The network (MEND §3.1): u and δ are normalised per dimension with running statistics collected during
training, concatenated, and passed through n_hidden + 1 residual layers x ↦ x + act(B A x' + b) with
low-rank A, B and B initialised to zero, so the untrained network is the identity; x' = x ⊙ (1 + s_l) + t_l
with a per-layer scale and shift (MEND's "layer embeddings"), which lets one network serve every
edited layer of the same shape. Difference from MEND's code: the running statistics are kept per edited
layer (MEND keeps one set per shared network); inputs of different layers differ in scale.

Not handled: MEND's one-sided and x-only/δ-only variants.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from lmedit.cache import atomic_write
from lmedit.errors import LMEditError, MissingFileError

FORMAT = "lmedit.mend"
FORMAT_VERSION = 1
WEIGHTS_FILE = "mend.safetensors"  # the network an editor loads from a checkpoint directory


class LowRankResidual(nn.Module):
    """x ↦ x' + act(x' A B + b), x' = x ⊙ (1 + scale[mode]) + shift[mode]; identity at initialisation (B = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))  # A: (dim, rank)
        self.up = nn.Parameter(torch.zeros(rank, dim))                     # B: zero, so the layer starts as the identity
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.zeros(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        x = x * (1 + self.scale[mode]) + self.shift[mode]
        h = (x @ self.down) @ self.up + self.bias
        return x + (torch.relu(h) if self.relu else h)


class EditorMLP(nn.Module):
    """n_hidden ReLU low-rank residual layers and a linear one (MEND's IDMLP), shared by layers of one shape."""

    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes, relu=i < n_hidden)
                                    for i in range(n_hidden + 1))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mode)
        return x


class RunningStats(nn.Module):
    """Per-dimension mean and variance of u and δ over every training token seen (Chan et al.'s parallel update)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("u_mean", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("u_m2", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("delta_mean", torch.zeros(d_out, dtype=torch.float64))
        self.register_buffer("delta_m2", torch.zeros(d_out, dtype=torch.float64))

    @torch.no_grad()
    def update(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        n_b = u.shape[0]
        if n_b == 0:
            return
        n_a = self.count.clone()
        n = n_a + n_b
        for mean, m2, x in ((self.u_mean, self.u_m2, u), (self.delta_mean, self.delta_m2, delta)):
            x = x.detach().to(torch.float64)
            mean_b = x.mean(0)
            m2_b = ((x - mean_b) ** 2).sum(0)
            diff = mean_b - mean
            mean += diff * (n_b / n)
            m2 += m2_b + diff ** 2 * (n_a * n_b / n)
        self.count.fill_(float(n))

    def normalise(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x − mean) / std per dimension; the identity until two tokens have been seen."""
        if self.count < 2:
            return u, delta
        out = []
        for x, mean, m2 in ((u, self.u_mean, self.u_m2), (delta, self.delta_mean, self.delta_m2)):
            std = (m2 / (self.count - 1)).sqrt().clamp_min(1e-6)
            out.append((x - mean.to(x.dtype)) / std.to(x.dtype))
        return out[0], out[1]


class MendNetwork(nn.Module):
    """Editor network for a set of linear layers: one `EditorMLP` per distinct (d_out, d_in), modes per layer.

    Args:
        layers: absolute block indices of the edited layers.
        shapes: (d_out, d_in) of each edited weight, in the canonical orientation.
        rank, n_hidden: see `MendConfig`.
        edit_lr: initial value of every per-layer edit step size α_l.
    """

    def __init__(self, layers: Sequence[int], shapes: Sequence[tuple[int, int]], *, rank: int, n_hidden: int,
                 edit_lr: float) -> None:
        super().__init__()
        if len(layers) != len(shapes):
            raise ValueError(f"{len(layers)} layers but {len(shapes)} shapes")
        self.layers = tuple(int(l) for l in layers)
        self.shapes = tuple((int(a), int(b)) for a, b in shapes)
        self.rank, self.n_hidden = rank, n_hidden
        groups: dict[str, list[int]] = {}
        for i, (d_out, d_in) in enumerate(self.shapes):
            groups.setdefault(f"{d_out}x{d_in}", []).append(i)
        self.group_of = {i: key for key, members in groups.items() for i in members}
        self.mode_of = {i: members.index(i) for members in groups.values() for i in members}
        self.nets = nn.ModuleDict({key: EditorMLP(self.shapes[members[0]][0] + self.shapes[members[0]][1], rank,
                                                   n_hidden, len(members)) for key, members in groups.items()})
        self.stats = nn.ModuleList(RunningStats(d_in, d_out) for d_out, d_in in self.shapes)
        self.edit_lrs = nn.Parameter(torch.full((len(self.layers),), float(edit_lr)))

    def index(self, layer: int) -> int:
        """Position of block `layer` among the edited layers."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise LMEditError(f"the MEND network edits layers {list(self.layers)}, not {layer}") from None

    def transform(self, i: int, u: torch.Tensor, delta: torch.Tensor, *, update_stats: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, δ) of edited layer number `i` → (ũ, δ̃), each row a token (running statistics updated first if asked)."""
        if update_stats:
            self.stats[i].update(u, delta)
        u_n, delta_n = self.stats[i].normalise(u.float(), delta.float())
        out = self.nets[self.group_of[i]](torch.cat([u_n, delta_n], -1), self.mode_of[i])
        return out.split([u.shape[-1], delta.shape[-1]], -1)

    def factors(self, i: int, u: torch.Tensor, delta: torch.Tensor, *, update_stats: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = left @ right.T = −α_i Σ_t δ̃_t ũ_tᵀ in the canonical (d_out, d_in) layout.

        Returns:
            left (d_out, n_tokens) = −α_i δ̃ᵀ and right (d_in, n_tokens) = ũᵀ.
        """
        u_t, delta_t = self.transform(i, u, delta, update_stats=update_stats)
        return -self.edit_lrs[i] * delta_t.T, u_t.T

    def describe(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "shapes": [list(s) for s in self.shapes], "rank": self.rank,
                "n_hidden": self.n_hidden}


def save_network(network: MendNetwork, path: str | Path, *, config: dict[str, Any], base_fingerprint: str,
                 base_model: str, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the network's weights, running statistics and step sizes to one safetensors file, atomically.

    The metadata holds the network's shape, the full MEND config it was trained with, the base model's
    name and `LM.fingerprint`, and the training step.
    """
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in network.state_dict().items()}
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "network": json.dumps(network.describe()),
            "config": json.dumps(config), "base_fingerprint": base_fingerprint, "base_model": base_model,
            "step": str(step), "extra": json.dumps(extra or {}, default=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(tensors, metadata=meta))
    return path


def network_file(path: str | Path) -> Path:
    """The weights file of a checkpoint given as a directory (its `mend.safetensors`) or as the file itself.

    Raises:
        FileNotFoundError: nothing there.
    """
    path = Path(path).expanduser()
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.exists():
        hint = " (train one with `lmedit train mend ... --out DIR`)" if not path.exists() else ""
        raise MissingFileError(f"no MEND network at {file}{hint}")
    return file


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved network (decoded), after checking it is one.

    Raises:
        LMEditError: the file is not an lmedit MEND network, or of an unknown version.
    """
    file = network_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise LMEditError(f"{file} is not an lmedit MEND network (format={meta.get('format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise LMEditError(f"{file} is MEND format version {meta.get('version')}; this lmedit reads {FORMAT_VERSION}")
    return {"network": json.loads(meta["network"]), "config": json.loads(meta["config"]),
            "base_fingerprint": meta["base_fingerprint"], "base_model": meta["base_model"], "step": int(meta["step"]),
            "extra": json.loads(meta.get("extra", "{}")), "file": str(file)}


def load_network(path: str | Path, *, fingerprint: str | tuple[str, ...] | None = None, model_name: str = "this model",
                 device: torch.device | str = "cpu") -> tuple[MendNetwork, dict[str, Any]]:
    """Load a saved network; with `fingerprint`, refuse one trained on other weights.

    `fingerprint`: the model's `LM.fingerprint`, or a tuple of the fingerprints that name it (`LM.fingerprint`
    and `LM.weights_hash`, which networks saved before fingerprints were dtype-independent recorded).

    Returns:
        (network in eval mode on `device`, metadata as `read_metadata` gives it).

    Raises:
        LMEditError: not a MEND network, or trained on a model whose fingerprint differs from `fingerprint`.
    """
    meta = read_metadata(path)
    accepted = (fingerprint,) if isinstance(fingerprint, str) else fingerprint
    if accepted is not None and meta["base_fingerprint"] not in accepted:
        fingerprint = accepted[0]
        raise LMEditError(
            f"the MEND network {meta['file']} was trained on {meta['base_model']!r} (fingerprint "
            f"{meta['base_fingerprint']}), but {model_name!r} has fingerprint {fingerprint}: an editor network only "
            f"fits the weights it was trained on; train one for this model with `lmedit train mend --model ...`")
    shape = meta["network"]
    network = MendNetwork(shape["layers"], [tuple(s) for s in shape["shapes"]], rank=shape["rank"],
                          n_hidden=shape["n_hidden"], edit_lr=0.0)
    network.load_state_dict(load_file(meta["file"]), strict=True)
    return network.to(device).eval(), meta
