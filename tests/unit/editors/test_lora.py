"""LoRA (editors/lora.py) on tiny random models: the edit, the untouched base model, peft missing, adapter export."""

import subprocess
import sys

import pytest
import torch

import lmedit
from lmedit.editors.base import ParamDelta, WeightEdit
from lmedit.editors.ft import FtConfig, FtEditor
from lmedit.editors.lora import PEFT_CONFIG, PEFT_WEIGHTS, LoraEditConfig, LoraEditor, export_peft_adapter
from lmedit.errors import ConfigError, LMEditError, MissingDependencyError
from lmedit.scoring import next_token_logprobs
from lmedit.testing import interrupt_at, tiny_lm
from lmedit.tokens import target_ids

# The subject ends the prompt (see tests/contract/test_editors.py for why, on a random 4-layer model).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
SETTINGS = dict(layers=(1,), lr=1e-2, steps=10, rank=4, alpha=8.0)
PROBE = "Where is The Eiffel Tower? It is in"


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap) -> bool:
    return lm.model.state_dict().keys() == snap.keys() and all(
        torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


def _structure(lm):
    """Every module and parameter object, each flag, and the model's own attributes: what peft could leave behind."""
    return ({n: m for n, m in lm.model.named_modules()}, {n: p for n, p in lm.model.named_parameters()},
            {n: p.requires_grad for n, p in lm.model.named_parameters()}, set(vars(lm.model)))


def _logits(model, lm, text=PROBE):
    ids = lm.tokenizer([text], return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored (d_in, d_out)
def test_edit_flips_the_fact_and_leaves_the_base_model_bit_identical(family):
    lm = tiny_lm(family)
    lm.model.get_submodule(lm.arch.param_name(lm.model, 0, "mlp_in").rpartition(".")[0]).weight.requires_grad_(False)
    snap, structure = _snapshot(lm), _structure(lm)
    result = LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    assert _same(lm, snap), "edit() changed the weights"
    modules, params, flags, attrs = _structure(lm)
    assert all(m is structure[0][n] for n, m in modules.items()) and modules.keys() == structure[0].keys()
    assert all(p is structure[1][n] for n, p in params.items()) and params.keys() == structure[1].keys()
    assert flags == structure[2] and attrs == structure[3]  # flags kept, no peft_config left on the model
    assert all(p.grad is None for p in lm.model.parameters())

    name = lm.arch.param_name(lm.model, 1, "mlp_out")
    (got, delta), = result.deltas.items()
    assert got == name and delta.rank == 4 and delta.shape == tuple(params[name].shape)
    assert result.info["scaling"] == 2.0 and result.info["losses"][-1] < result.info["losses"][0]
    new_first = target_ids(lm, REQUEST.target_new)[0]
    assert next_token_logprobs(lm, [REQUEST.text])[0].argmax().item() != new_first
    with result.applied(lm):
        changed = {n for n, v in lm.model.state_dict().items() if not torch.equal(v, snap[n])}
        assert next_token_logprobs(lm, [REQUEST.text])[0].argmax().item() == new_first
    assert changed == {name}
    assert _same(lm, snap), "undo did not restore the weights bit-exactly"


def test_the_edit_is_the_trained_adapter_merged(monkeypatch):
    # The WeightEdit's Δ is what the trained peft adapter added: the same logits as the model with the adapter in.
    import lmedit.editors.lora as lora

    lm = tiny_lm("gpt2")
    seen = {}
    real = lora.train_on_targets

    def train_and_look(lm_, params, batch, **kwargs):
        out = real(lm_, params, batch, **kwargs)
        seen["adapted"] = _logits(lm_.model, lm_)  # the adapter is still in: B A x beside W x
        return out

    monkeypatch.setattr(lora, "train_on_targets", train_and_look)
    result = LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    with result.applied(lm):
        merged = _logits(lm.model, lm)
    assert not torch.allclose(merged, _logits(lm.model, lm), atol=1e-3)  # the edit changes the output...
    torch.testing.assert_close(merged, seen["adapted"], atol=1e-5, rtol=1e-5)  # ... as the adapter did


def test_interrupted_edit_leaves_the_model_bit_identical():
    lm = tiny_lm("llama")
    snap, structure = _snapshot(lm), _structure(lm)
    editor = LoraEditor(LoraEditConfig(**SETTINGS, early_stop_loss=0.0))

    editor.progress = interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(lm, [REQUEST])
    assert _same(lm, snap)
    modules, params, flags, attrs = _structure(lm)
    assert all(m is structure[0][n] for n, m in modules.items()) and modules.keys() == structure[0].keys()
    assert flags == structure[2] and attrs == structure[3]


def test_seed_sets_the_adapter_initialisation():
    lm = tiny_lm("llama")
    first = LoraEditor(LoraEditConfig(**SETTINGS, seed=0)).edit(lm, [REQUEST])
    other = LoraEditor(LoraEditConfig(**SETTINGS, seed=1)).edit(lm, [REQUEST])
    (name, delta), = first.deltas.items()
    assert not torch.equal(delta.full(), other.deltas[name].full())


def test_no_layer_means_the_tracing_suggestion(monkeypatch):
    lm = tiny_lm("llama")
    monkeypatch.setattr(LoraEditor, "suggested_layer", lambda self, lm: 2)
    result = LoraEditor(LoraEditConfig(lr=1e-2, steps=2, rank=2, alpha=4.0)).edit(lm, [REQUEST])
    assert list(result.deltas) == [lm.arch.param_name(lm.model, 2, "mlp_out")] and result.info["layers"] == [2]


def test_save_load_round_trip_keeps_the_factors(tmp_path):
    lm = tiny_lm("llama")
    result = LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    loaded = WeightEdit.load(result.save(tmp_path / "lora.safetensors"))
    assert loaded.method == "lora" and loaded.config["rank"] == 4
    (name, delta), = loaded.deltas.items()
    assert torch.equal(delta.left, result.deltas[name].left) and torch.equal(delta.right, result.deltas[name].right)


def test_missing_peft_is_a_clear_error_and_changes_nothing(monkeypatch, tmp_path):
    lm = tiny_lm("llama")
    edit = LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    snap = _snapshot(lm)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'lmedit\[lora\]'"):
        LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    with pytest.raises(MissingDependencyError, match=r"pip install 'lmedit\[lora\]'"):
        export_peft_adapter(edit, lm, tmp_path / "adapter")
    assert _same(lm, snap) and not (tmp_path / "adapter").exists()


def test_importing_lmedit_does_not_import_peft():
    code = "import sys, lmedit, lmedit.editors; lmedit.editors.get_editor('lora'); print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exported_adapter_loads_in_peft_and_computes_the_edit(family, tmp_path):
    from peft import PeftModel

    lm = tiny_lm(family)
    result = LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    directory = export_peft_adapter(result, lm, tmp_path / "adapter")
    assert (directory / PEFT_CONFIG).is_file() and (directory / PEFT_WEIGHTS).is_file()
    with result.applied(lm):
        edited = _logits(lm.model, lm)
    base = tiny_lm(family)  # a fresh copy of the same base weights
    assert base.fingerprint == lm.fingerprint
    peft_model = PeftModel.from_pretrained(base.model, str(directory))
    torch.testing.assert_close(_logits(peft_model, base), edited, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(lm.model, lm), edited, atol=1e-3)  # the edit is not a no-op


def test_any_low_rank_edit_exports_with_its_own_ranks(tmp_path):
    # Two weights of different ranks (rank_pattern/alpha_pattern), from a hand-made edit: not only LoRA's.
    from peft import PeftModel

    lm = tiny_lm("llama")
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for layer, module, rank in ((0, "attn_out", 1), (2, "mlp_out", 3)):
        rows, cols = dict(lm.model.named_parameters())[lm.arch.param_name(lm.model, layer, module)].shape
        deltas[lm.arch.param_name(lm.model, layer, module)] = ParamDelta(
            left=0.3 * torch.randn(rows, rank, generator=gen), right=0.3 * torch.randn(cols, rank, generator=gen))
    edit = WeightEdit(deltas=deltas, requests=(REQUEST,), method="handmade", base_fingerprint=lm.fingerprint)
    with edit.applied(lm):
        edited = _logits(lm.model, lm)
    base = tiny_lm("llama")
    peft_model = PeftModel.from_pretrained(base.model, str(export_peft_adapter(edit, lm, tmp_path / "a")))
    torch.testing.assert_close(_logits(peft_model, base), edited, atol=1e-5, rtol=1e-5)


def test_dense_or_foreign_edits_are_refused_for_export(tmp_path):
    lm = tiny_lm("llama")
    dense = FtEditor(FtConfig(layers=(1,), lr=1e-2, steps=2)).edit(lm, [REQUEST])
    with pytest.raises(LMEditError, match="dense"):
        export_peft_adapter(dense, lm, tmp_path / "a")
    lora_edit = LoraEditor(LoraEditConfig(**SETTINGS)).edit(lm, [REQUEST])
    with pytest.raises(LMEditError, match="fingerprint"):
        export_peft_adapter(lora_edit, tiny_lm("gpt2"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(alpha=0.0), "alpha"), (dict(lr=0.0), "lr"), (dict(steps=0), "steps"),
    (dict(layers=()), "layers"), (dict(layers=(-1,)), "layers"), (dict(layers=(2, 2)), "layers"),
    (dict(module="mlp_gate"), "module"), (dict(early_stop_loss=-1.0), "early_stop_loss"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_config_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"LoraEditConfig\.{field}"):
        LoraEditConfig(**kwargs)


def test_layer_out_of_range_is_refused_before_training():
    lm = tiny_lm("llama")
    snap = _snapshot(lm)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[4\] out of range.*4 layers"):
        LoraEditor(LoraEditConfig(layers=(1, 4))).edit(lm, [REQUEST])
    assert _same(lm, snap)
