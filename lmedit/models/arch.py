"""One `ArchSpec` per Hugging Face `config.model_type`: the only place that knows module paths and weight orientation.

Adding an architecture means adding one entry to `ARCHS`; `tests/unit/models/test_arch.py` checks every
entry against a tiny random model. Gated MLPs (Llama, Gemma): the key k is the input of `down_proj`
and the value is its output. GPT-2 stores its Conv1D weights as (d_in, d_out): `weight_layout="in_out"`.

Not handled: encoder-decoder models, mixture-of-experts MLPs (no single down-projection per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from lmedit.errors import UnsupportedArchitectureError
from lmedit.types import Site

WeightName = Literal["mlp_in", "mlp_out", "attn_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one family of HF causal LMs. Paths are attribute paths (dots, list indices as digits).

    Attributes:
        layers: path from the model root to the ModuleList of blocks.
        mlp_in: path inside a block to the MLP up-projection (the gate's sibling for gated MLPs).
        mlp_out: path inside a block to the MLP down-projection (ROME's W_out): input = key, output = value.
        attn_out: path inside a block to the attention output projection.
        embed: path from the root to the token embedding.
        final_norm: path from the root to the norm before the unembedding.
        unembed: path from the root to the unembedding (lm_head).
        weight_layout: "out_in" for nn.Linear (weight is (d_out, d_in)); "in_out" for GPT-2's Conv1D.
        mlp_post_norm: path inside a block to an RMSNorm applied to the MLP's output before it joins the
            residual stream (Gemma 2/3's post_feedforward_layernorm), or None when the output is added as is.
    """

    layers: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    embed: str
    final_norm: str
    unembed: str
    weight_layout: Literal["out_in", "in_out"] = "out_in"
    mlp_post_norm: str | None = None

    # --- module lookup -------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def block_module(self, model: nn.Module, layer: int, name: WeightName) -> nn.Module:
        """The submodule `name` ("mlp_in", "mlp_out", "attn_out") of block `layer`."""
        n = self.n_layers(model)
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
        return _get(self.blocks(model)[layer], getattr(self, name))

    def module_for(self, model: nn.Module, site: Site) -> tuple[nn.Module, bool]:
        """The module whose output (or input, when the bool is True) is `site`'s activation."""
        if site.kind == "embed":
            return _get(model, self.embed), False
        if site.kind == "final_norm":
            return _get(model, self.final_norm), False
        if site.kind == "logits":
            return _get(model, self.unembed), False
        assert site.layer is not None
        if site.kind == "resid_out":
            n = self.n_layers(model)
            if not 0 <= site.layer < n:
                raise IndexError(f"layer {site.layer} is out of range: the model has {n} layers (0..{n - 1})")
            return self.blocks(model)[site.layer], False
        if site.kind == "attn.out":
            return self.block_module(model, site.layer, "attn_out"), False
        if site.kind == "mlp.key":
            return self.block_module(model, site.layer, "mlp_out"), True
        if site.kind == "mlp.out":
            return self.block_module(model, site.layer, "mlp_out"), False
        raise ValueError(f"no module for site {site}")

    # --- weights ----------------------------------------------------------------------------------
    def param_name(self, model: nn.Module, layer: int, name: WeightName) -> str:
        """The `named_parameters()` name of block `layer`'s `name` weight, e.g. 'model.layers.5.mlp.down_proj.weight'."""
        module = self.block_module(model, layer, name)
        for param_name, param in model.named_parameters():
            if param is module.weight:
                return param_name
        raise LookupError(f"weight of {name} at layer {layer} is not a named parameter")

    def weight(self, model: nn.Module, layer: int, name: WeightName) -> torch.Tensor:
        """Block `layer`'s `name` weight in the canonical (d_out, d_in) orientation (a view, never a copy)."""
        w = self.block_module(model, layer, name).weight
        return w.T if self.weight_layout == "in_out" else w

    def weight_value(self, model: nn.Module, layer: int, name: WeightName) -> torch.Tensor:
        """`weight`'s value, also when accelerate offloaded it (then a tensor read from its store, not a view)."""
        from lmedit.models.params import read

        w = read(model, self.param_name(model, layer, name))
        return w.T if self.weight_layout == "in_out" else w

    def factors_to_param_layout(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of Δ = left @ right.T in canonical layout -> factors of the stored parameter's Δ."""
        return (right, left) if self.weight_layout == "in_out" else (left, right)

    def value_change_for_residual(self, model: nn.Module, layer: int, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The change of the down-projection output `v` (..., d_model) that changes the block's residual write by `r`.

        Without a post-MLP norm the MLP output is added as is, so the answer is `r`. With Gemma's RMSNorm
        n(x) = g ⊙ x / rms(x), a target write n(v) + r is met (up to n's fixed output scale) by
        x = rms(v) · (n(v) + r) / g = v + rms(v) · r / g. The gain g is read off the module as n(1);
        dimensions whose gain is zero get no change.
        MEMIT (arXiv:2210.07229) spreads residual changes over layers; this maps them to each layer's value.
        """
        if self.mlp_post_norm is None:
            return r
        norm = _get(self.blocks(model)[layer], self.mlp_post_norm)
        with torch.no_grad():
            gain = norm(torch.ones(v.shape[-1], dtype=v.dtype, device=v.device))
        rms = v.pow(2).mean(-1, keepdim=True).sqrt()
        # A dimension with zero gain (Gemma: weight = −1) cannot be written at all: ask nothing of it.
        writable = gain.abs() > 1e-6 * gain.abs().max()
        return torch.where(writable, rms * r / torch.where(writable, gain, torch.ones_like(gain)), torch.zeros_like(r))

    # --- sizes ------------------------------------------------------------------------------------
    def d_model(self, model: nn.Module) -> int:
        return self.weight(model, 0, "mlp_out").shape[0]

    def d_mlp(self, model: nn.Module) -> int:
        return self.weight(model, 0, "mlp_out").shape[1]

    def unembedding(self, model: nn.Module) -> nn.Module:
        """The module that maps final-norm outputs to logits (lm_head; soft-capping, if any, comes after it)."""
        return _get(model, self.unembed)

    def logits_from_final(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-norm outputs, applying the config's final soft-capping (Gemma 2) as the model does."""
        logits = self.unembedding(model)(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


_GPT2 = ArchSpec(layers="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn_out="attn.c_proj",
                 embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head", weight_layout="in_out")
_GPTJ = ArchSpec(layers="transformer.h", mlp_in="mlp.fc_in", mlp_out="mlp.fc_out", attn_out="attn.out_proj",
                 embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head")
_NEOX = ArchSpec(layers="gpt_neox.layers", mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h",
                 attn_out="attention.dense", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                 unembed="lm_head")
_LLAMA_LIKE = ArchSpec(layers="model.layers", mlp_in="mlp.up_proj", mlp_out="mlp.down_proj",
                       attn_out="self_attn.o_proj", embed="model.embed_tokens", final_norm="model.norm",
                       unembed="lm_head")

_GEMMA2_LIKE = replace(_LLAMA_LIKE, mlp_post_norm="post_feedforward_layernorm")

ARCHS: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
}


def get_arch(model: nn.Module) -> ArchSpec:
    """The `ArchSpec` for `model.config.model_type`.

    Raises:
        UnsupportedArchitectureError: the model type has no entry; the message lists the supported ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}. "
            "Add an ArchSpec entry in lmedit/models/arch.py to support it."
        ) from None
