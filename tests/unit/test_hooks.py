import re
from pathlib import Path

import pytest
import torch

from lmedit.hooks import attach, capture, patch, start_at
from lmedit.types import Site


def _hook_count(model):
    """Hooks registered by lmedit (transformers installs its own, lazily, for output_hidden_states)."""
    return sum(
        fn.__qualname__.startswith("_hooked")
        for m in model.modules()
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


def test_capture_resid_matches_hidden_states(tiny_family_lm):
    lm = tiny_family_lm
    enc = lm.encode(["The Eiffel Tower is located in", "Paris is"])
    n = lm.n_layers
    sites = [Site("resid_out", i) for i in range(n)] + [Site("embed"), Site("final_norm")]
    before = _hook_count(lm.model)
    with torch.no_grad(), capture(lm, sites) as acts:
        out = lm.model(**enc, output_hidden_states=True)
    hs = out.hidden_states
    for i in range(n - 1):  # HF's last entry comes after the final norm
        torch.testing.assert_close(acts[Site("resid_out", i)], hs[i + 1])
    torch.testing.assert_close(acts[Site("final_norm")], hs[-1])
    if lm.model.config.model_type != "gpt2":  # GPT-2 adds position embeddings after the token embedding
        torch.testing.assert_close(acts[Site("embed")], hs[0])
    assert _hook_count(lm.model) == before


def test_identity_patch_changes_nothing(tiny_family_lm):
    lm = tiny_family_lm
    enc = lm.encode(["The Space Needle is in downtown"])
    with torch.no_grad():
        clean = lm.model(**enc).logits
        sites = [Site(kind, 1) for kind in ("resid_out", "attn.out", "mlp.key", "mlp.out")] + [Site("embed")]
        with patch(lm, {s: (lambda act, site: act) for s in sites}):
            patched = lm.model(**enc).logits
    assert torch.equal(clean, patched)


def test_patch_mlp_out_equals_hand_written_forward(tiny_llama):
    lm = tiny_llama
    enc = lm.encode(["The Louvre is in"])
    delta = torch.randn(lm.arch.d_model(lm.model))
    layer = 2
    with torch.no_grad():
        with patch(lm, {Site("mlp.out", layer): lambda act, site: act + delta}):
            patched = lm.model(**enc).logits
        # by hand: add delta to the down-projection's bias-free output through a temporary bias
        module = lm.arch.block_module(lm.model, layer, "mlp_out")
        assert module.bias is None
        module.bias = torch.nn.Parameter(delta.clone(), requires_grad=False)
        try:
            manual = lm.model(**enc).logits
        finally:
            module.bias = None
    torch.testing.assert_close(patched, manual)


def test_mlp_key_is_input_of_down_projection(tiny_gpt2):
    lm = tiny_gpt2
    enc = lm.encode(["Toyota is a company from"])
    with torch.no_grad(), capture(lm, [Site("mlp.key", 1), Site("mlp.out", 1)]) as acts:
        lm.model(**enc)
    w = lm.arch.weight(lm.model, 1, "mlp_out")
    bias = lm.arch.block_module(lm.model, 1, "mlp_out").bias
    torch.testing.assert_close(acts[Site("mlp.key", 1)] @ w.T + bias, acts[Site("mlp.out", 1)])


def test_stop_after_skips_later_layers(tiny_llama):
    lm = tiny_llama
    enc = lm.encode(["Rome is the capital of"])
    seen = []
    before = _hook_count(lm.model)
    with torch.no_grad():
        with capture(lm, [Site("resid_out", 3)]) as later, \
                capture(lm, [Site("mlp.key", 1)], stop_after=Site("mlp.key", 1)) as acts:
            result = lm.model(**enc)
            seen.append(result)
    assert Site("mlp.key", 1) in acts
    assert Site("resid_out", 3) not in later
    assert seen == []  # the model call never returned
    assert _hook_count(lm.model) == before


def test_hooks_removed_on_exception(tiny_llama):
    lm = tiny_llama
    enc = lm.encode(["abc"])
    before = _hook_count(lm.model)

    def boom(act, site):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with patch(lm, {Site("mlp.out", 0): boom}):
            assert _hook_count(lm.model) == before + 1
            lm.model(**enc)
    assert _hook_count(lm.model) == before
    with pytest.raises(KeyError):
        with capture(lm, [Site("resid_out", 0)]):
            raise KeyError("x")
    assert _hook_count(lm.model) == before


def test_only_hooks_module_registers_hooks():
    root = Path(__file__).resolve().parents[2] / "lmedit"
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if p.name != "hooks.py" and re.search(r"register_forward(_pre)?_hook", p.read_text())
    ]
    assert offenders == []


def test_site_spelling():
    assert str(Site("mlp.key", 17)) == "blocks.17.mlp.key"
    assert str(Site("embed")) == "embed"
    with pytest.raises(ValueError, match="layer"):
        Site("mlp.key")
    with pytest.raises(ValueError, match="kind"):
        Site("mlp_out", 1)  # type: ignore[arg-type]


def test_start_at_reproduces_the_full_forward(tiny_family_lm):
    lm = tiny_family_lm
    enc = lm.encode(["The Space Needle is in downtown"])
    n = lm.n_layers
    with torch.no_grad():
        with capture(lm, [Site("resid_out", i) for i in range(n)]) as acts:
            full = lm.model(**enc).logits
        for layer in (1, n - 1, n):
            resid = acts[Site("resid_out", layer - 1)]
            with start_at(lm, layer, resid):
                torch.testing.assert_close(lm.model(**enc).logits, full)
        # the resid_out hook of the last skipped block sees `resid` and may rewrite it
        delta = torch.randn_like(resid[:, :1])
        with patch(lm, {Site("resid_out", 1): lambda act, site: act + delta}):
            patched = lm.model(**enc).logits
        with start_at(lm, 2, acts[Site("resid_out", 1)]), \
                patch(lm, {Site("resid_out", 1): lambda act, site: act + delta}):
            torch.testing.assert_close(lm.model(**enc).logits, patched)
    assert all("forward" not in block.__dict__ for block in lm.arch.blocks(lm.model))
    assert torch.equal(lm.model(**enc).logits, full)


def test_start_at_refuses_hooks_it_would_skip(tiny_llama):
    lm = tiny_llama
    enc = lm.encode(["Rome is the capital of"])
    resid = torch.zeros(1, enc["input_ids"].shape[1], lm.arch.d_model(lm.model))
    for site in (Site("mlp.out", 1), Site("resid_out", 0), Site("attn.out", 0)):
        with pytest.raises(ValueError, match="skips block"):
            with torch.no_grad(), start_at(lm, 2, resid), capture(lm, [site]):
                lm.model(**enc)
    assert all("forward" not in block.__dict__ for block in lm.arch.blocks(lm.model))
    with pytest.raises(IndexError):
        with start_at(lm, lm.n_layers + 1, resid):
            pass


def test_attach_keeps_its_rewrite_until_removed_and_sees_the_module_input(tiny_llama):
    lm = tiny_llama
    ids = lm.tokenizer(["hello world"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    seen = {}

    def zero_last(inputs, output):
        seen["inputs"] = inputs
        out = output.clone()
        out[:, -1] = 0
        return out

    handle = attach(lm, Site("mlp.out", 1), zero_last)
    try:
        with torch.no_grad(), capture(lm, [Site("mlp.key", 1), Site("mlp.out", 1)]) as acts:
            edited = lm.model(input_ids=ids).logits
        assert torch.equal(seen["inputs"], acts[Site("mlp.key", 1)])  # the down-projection's input
        assert torch.equal(acts[Site("mlp.out", 1)][:, -1], torch.zeros_like(acts[Site("mlp.out", 1)][:, -1]))
        assert torch.equal(edited[:, :-1], before[:, :-1]) and not torch.equal(edited, before)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, before)
    assert not any(fn.__qualname__.startswith("attach") for m in lm.model.modules() for fn in m._forward_hooks.values())
    with pytest.raises(ValueError, match="input"):
        attach(lm, Site("mlp.key", 1), zero_last)

