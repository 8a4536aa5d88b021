"""FT and FT-L (editors/ft.py, editors/steps/finetune.py) on tiny random models."""

import pytest
import torch

import lmedit
from lmedit.config import load_config
from lmedit.editors import get_editor
from lmedit.editors.base import WeightEdit
from lmedit.editors.ft import FtConfig, FtEditor, FtLConfig, FtLEditor
from lmedit.scoring import next_token_logprobs, score_targets
from lmedit.stats import StatsCache
from lmedit.testing import interrupt_at, tiny_lm
from lmedit.tokens import target_ids

# The subject ends the prompt (see tests/contract/test_editors.py for why, on a random 4-layer model).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
TWO_TOKENS = lmedit.EditRequest("Who founded {}", "Apple", "Steve Jobs")   # target: 2 tokens in the tiny vocabulary
SETTINGS = dict(layers=(1,), lr=1e-2, steps=10)


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap) -> bool:
    return all(torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored (d_in, d_out)
def test_ft_l_stays_in_its_linf_ball_and_ft_does_not(family):
    lm = tiny_lm(family)
    eps = 0.02
    constrained = FtLEditor(FtLConfig(**SETTINGS, norm_constraint=eps)).edit(lm, [REQUEST])
    free = FtEditor(FtConfig(**SETTINGS)).edit(lm, [REQUEST])
    name = lm.arch.param_name(lm.model, 1, "mlp_out")
    assert set(constrained.deltas) == set(free.deltas) == {name}
    weight = dict(lm.model.named_parameters())[name]
    rounding = torch.finfo(torch.float32).eps * weight.abs().max().item()  # W₀ + clamp(Δ) is rounded to float32
    d_constrained = constrained.deltas[name].full()
    assert d_constrained.abs().max().item() <= eps + rounding
    assert d_constrained.abs().max().item() >= eps - rounding  # the bound binds at this lr
    assert free.deltas[name].full().abs().max().item() > 2 * eps
    # the change as applied to the weights (float32 rounding included) respects the bound too
    before = weight.detach().clone()
    with constrained.applied(lm):
        assert (weight.detach() - before).abs().max().item() <= eps + rounding


@pytest.mark.parametrize("module", ["mlp_out", "mlp_in", "attn_out"])
def test_training_touches_only_the_named_parameters(module):
    lm = tiny_lm("llama")
    lm.model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # a mixed set of flags, to be kept as is
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    objects = {n: p for n, p in lm.model.named_parameters()}
    result = FtEditor(FtConfig(layers=(1, 3), module=module, lr=1e-2, steps=5)).edit(lm, [REQUEST])
    expected = {lm.arch.param_name(lm.model, layer, module) for layer in (1, 3)}
    assert set(result.deltas) == expected
    assert all(result.deltas[n].full().abs().max() > 0 for n in expected)
    assert result.deltas[next(iter(expected))].dense.dtype == torch.float32
    # the model keeps its own Parameter objects and flags, and no gradient was left on any of them
    assert {n: p for n, p in lm.model.named_parameters()}.keys() == objects.keys()
    assert all(p is objects[n] for n, p in lm.model.named_parameters())
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert all(p.grad is None for p in lm.model.parameters())
    snap = _snapshot(lm)
    with result.applied(lm):
        changed = {n for n, v in lm.model.state_dict().items() if not torch.equal(v, snap[n])}
    assert changed == expected


def test_loss_falls_and_the_edit_flips_the_prediction():
    lm = tiny_lm("llama")
    result = FtEditor(FtConfig(**SETTINGS, early_stop_loss=0.0)).edit(lm, [REQUEST])
    losses = result.info["losses"]
    assert result.info["steps"] == 10 and len(losses) == 11  # losses[i]: after i updates
    assert losses[-1] < 0.2 * losses[0]
    assert not result.info["stopped_early"]
    with result.applied(lm):
        after = next_token_logprobs(lm, [REQUEST.text])[0]
    assert after.argmax().item() == target_ids(lm, "Rome")[0]


def test_early_stop():
    lm = tiny_lm("llama")
    result = FtEditor(FtConfig(**SETTINGS, early_stop_loss=3.0)).edit(lm, [REQUEST])
    assert result.info["stopped_early"] and result.info["steps"] < 10
    assert result.info["losses"][-1] < 3.0 <= min(result.info["losses"][:-1])


def test_loss_is_the_whole_targets_nll_per_token_and_requests_train_together():
    lm = tiny_lm("llama")
    assert len(target_ids(lm, TWO_TOKENS.target_new)) == 2
    scores = score_targets(lm, [REQUEST.text, TWO_TOKENS.text], ["Rome", "Steve Jobs"])
    expected = sum(-s.logprob / s.n_tokens for s in scores) / 2  # mean over requests of NLL per target token
    result = FtEditor(FtConfig(**SETTINGS)).edit(lm, [REQUEST, TWO_TOKENS])
    assert result.info["n_prompts"] == 2
    assert result.info["losses"][0] == pytest.approx(expected, rel=1e-5)
    with result.applied(lm):
        after = score_targets(lm, [REQUEST.text, TWO_TOKENS.text], ["Rome", "Steve Jobs"])
    assert all(a.logprob > b.logprob + 2.0 for a, b in zip(after, scores))  # both facts moved, in one batch


def test_random_prefixes_add_training_prompts(tmp_path):
    lm = tiny_lm("llama")
    config = FtConfig(**SETTINGS, prefixes_short=2, prefixes_long=1)
    result = FtEditor(config, cache=StatsCache(tmp_path)).edit(lm, [REQUEST])
    assert result.info["n_prompts"] == 4  # the bare prompt + 3 prefixed ones
    assert result.info["losses"][-1] < result.info["losses"][0]


@pytest.mark.parametrize("method", ["ft", "ft_l"])
def test_edit_leaves_the_model_bit_identical_even_when_interrupted(method):
    lm = tiny_lm("llama")
    snap = _snapshot(lm)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    objects = dict(lm.model.named_parameters())
    editor = get_editor(method, {"layers": [1, 2], "lr": 1e-2, "steps": 10})
    editor.edit(lm, [REQUEST])
    assert _same(lm, snap)

    editor.progress = interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(lm, [REQUEST])
    assert _same(lm, snap)
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert all(p is objects[n] for n, p in lm.model.named_parameters())  # the trainable copies are gone


def test_save_load_round_trip_of_dense_deltas(tmp_path):
    lm = tiny_lm("gpt2")
    result = FtLEditor(FtLConfig(**SETTINGS, norm_constraint=0.05)).edit(lm, [REQUEST])
    loaded = WeightEdit.load(result.save(tmp_path / "ft_l.safetensors"))
    assert loaded.method == "ft_l" and loaded.info["losses"] == result.info["losses"]
    (name, delta), = loaded.deltas.items()
    assert delta.dense is not None and torch.equal(delta.dense, result.deltas[name].dense)


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=-1), "steps"), (dict(steps=0), "steps"), (dict(module="mlp_gate"), "module"),
    (dict(layers=()), "layers"), (dict(layers=(-1,)), "layers"), (dict(layers=(2, 2)), "layers"),
    (dict(lr=0.0), "lr"), (dict(weight_decay=-0.1), "weight_decay"), (dict(early_stop_loss=-1.0), "early_stop_loss"),
    (dict(prefixes_short=-1), "prefixes_short"),
])
def test_bad_config_is_refused_naming_the_field(kwargs, field):
    for cls in (FtConfig, FtLConfig):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
            cls(**kwargs)


def test_bad_norm_constraint_and_yaml_module_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"FtLConfig\.norm_constraint"):
        FtLConfig(norm_constraint=0.0)
    path = tmp_path / "ft.yaml"
    path.write_text("layers: [1]\nmodule: mlp.down_proj\n")
    with pytest.raises(ValueError, match="must be one of mlp_in, mlp_out, attn_out"):
        load_config(FtConfig, path)


def test_layer_out_of_range_is_refused_before_training():
    lm = tiny_lm("llama")
    snap = _snapshot(lm)
    with pytest.raises(ValueError, match=r"layer\(s\) \[4\] out of range.*4 layers"):
        FtEditor(FtConfig(layers=(1, 4))).edit(lm, [REQUEST])
    assert _same(lm, snap)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ft_with_its_norm_bound_set_makes_ft_l_s_edit(family):
    # One editor, one option: `ft` with norm_constraint = ε computes FT-L's edit bit for bit; only the name differs.
    lm = tiny_lm(family)
    as_ft = get_editor("ft", {**SETTINGS, "norm_constraint": 0.02}).edit(lm, [REQUEST])
    as_ft_l = get_editor("ft_l", {**SETTINGS, "norm_constraint": 0.02}).edit(lm, [REQUEST])
    unbounded = get_editor("ft", SETTINGS).edit(lm, [REQUEST])
    assert (as_ft.method, as_ft_l.method) == ("ft", "ft_l")
    (name, delta), = as_ft.deltas.items()
    assert torch.equal(delta.dense, as_ft_l.deltas[name].dense)
    assert not torch.equal(delta.dense, unbounded.deltas[name].dense)  # the bound binds at this lr


def test_the_norm_bound_is_off_for_ft_and_on_for_ft_l_by_default(tmp_path):
    assert FtConfig().norm_constraint is None and FtLConfig().norm_constraint == 5e-4
    assert type(get_editor("ft_l").config) is FtLConfig and type(get_editor("ft").config) is FtConfig
    path = tmp_path / "ft.yaml"
    path.write_text("layers: [1]\nnorm_constraint: 1.0e-3\n")  # a user's FT file may set the bound
    assert load_config(FtConfig, path).norm_constraint == 1e-3
    with pytest.raises(ValueError, match=r"FtConfig\.norm_constraint must be > 0"):
        FtConfig(norm_constraint=-1.0)


def test_ft_l_without_its_bound_is_refused():
    from lmedit.editors.ft import FtLConfig
    from lmedit.errors import ConfigError

    with pytest.raises(ConfigError, match="norm_constraint"):
        FtLConfig(norm_constraint=None)
