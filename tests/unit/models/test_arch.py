import pytest
import torch
from torch import nn

from lmedit.errors import UnsupportedArchitectureError
from lmedit.models.arch import ARCHS, get_arch
from lmedit.testing import TINY_FAMILIES, tiny_lm
from lmedit.types import Site


def test_every_family_has_a_tiny_test():
    assert set(ARCHS) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_arch_entry_matches_model(family):
    lm = tiny_lm(family)
    arch, model = lm.arch, lm.model
    cfg = model.config
    d_model = cfg.hidden_size
    assert arch.n_layers(model) == cfg.num_hidden_layers
    assert isinstance(arch.blocks(model), nn.ModuleList)
    d_mlp = arch.d_mlp(model)
    assert arch.d_model(model) == d_model
    for layer in range(arch.n_layers(model)):
        w_out = arch.weight(model, layer, "mlp_out")
        assert w_out.shape == (d_model, d_mlp)
        assert arch.weight(model, layer, "mlp_in").shape == (d_mlp, d_model)
        assert arch.weight(model, layer, "attn_out").shape[0] == d_model
        # the canonical weight maps a key to the module's output: W k == module(k) (minus bias)
        module = arch.block_module(model, layer, "mlp_out")
        k = torch.randn(3, d_mlp)
        bias = module.bias if getattr(module, "bias", None) is not None else 0
        torch.testing.assert_close(module(k) - bias, k @ w_out.T)
        name = arch.param_name(model, layer, "mlp_out")
        assert dict(model.named_parameters())[name] is module.weight
    emb, _ = arch.module_for(model, Site("embed"))
    assert emb.weight.shape == (cfg.vocab_size, d_model)
    unembed, _ = arch.module_for(model, Site("logits"))
    assert unembed.weight.shape == (cfg.vocab_size, d_model)
    norm, _ = arch.module_for(model, Site("final_norm"))
    assert norm is not None
    # logits from the final norm's output reproduce the model's logits
    enc = lm.encode(["The Eiffel Tower is in"])
    out = model(**enc, output_hidden_states=True)
    torch.testing.assert_close(arch.logits_from_final(model, out.hidden_states[-1]), out.logits)


def test_layer_out_of_range_is_an_index_error(tiny_llama):
    with pytest.raises(IndexError, match="4 layers"):
        tiny_llama.arch.weight(tiny_llama.model, 4, "mlp_out")


def test_unsupported_architecture_names_the_supported_ones():
    class Fake(nn.Module):
        class config:  # noqa: N801
            model_type = "t5"

    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        get_arch(Fake())
