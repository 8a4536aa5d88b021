import pytest
import torch

import lmedit
from lmedit.editors.steps.value import ValueOptions, optimize_value, optimize_values
from lmedit.editors.base import WeightEdit
from lmedit.editors.memit import MemitConfig, MemitEditor, memit_solve
from lmedit.hooks import capture, patch
from lmedit.scoring import next_token_logprobs, score_targets
from lmedit.stats import StatsCache
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.tokens import prompt_ids, subject_span, target_ids
from lmedit.types import Site

REQUESTS = [
    lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris"),
    lmedit.EditRequest("Who leads {}", "the orchestra", "cats", None),
    lmedit.EditRequest("What plays {}", "the quiet river", "music", None),
]


def _editor(tmp_path, **kw):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    cfg = MemitConfig(**{"layers": (1, 2), "corpus": f"file:{corpus}", "corpus_tokens": 3000, "prefixes": 2,
                         "mom2_weight": 100.0, "clamp_norm_factor": 4.0, **kw})
    return MemitEditor(cfg, cache=StatsCache(tmp_path / "stats"))


def test_memit_solve_satisfies_its_normal_equations():
    # argmin_Δ Σ‖Δ k_i − d_i‖² + λ tr(Δ C Δᵀ)  ⇔  Δ (KᵀK + λC) = Dᵀ K
    torch.manual_seed(0)
    A = torch.randn(24, 60)
    C = A @ A.T / 60
    K, D = torch.randn(5, 24), torch.randn(5, 8)
    left, right = memit_solve(C, K, D, lam=3.0)
    delta = left @ right.T
    lhs = delta @ (K.double().T @ K.double() + 3.0 * C.double())
    torch.testing.assert_close(lhs, D.double().T @ K.double(), rtol=1e-9, atol=1e-9)
    # λ → 0 with fewer keys than dimensions: the keys map exactly onto their targets
    left, right = memit_solve(C, K, D, lam=1e-9)
    torch.testing.assert_close((left @ right.T) @ K.double().T, D.double().T, rtol=1e-5, atol=1e-5)


def test_batched_value_optimisation_matches_one_at_a_time():
    lm = tiny_lm("llama")
    options = ValueOptions(steps=6, clamp_norm_factor=4.0)
    prefixes = ["", "A cat sat. "]
    batched = optimize_values(lm, 2, REQUESTS, prefixes, options, site_kind="resid_out")
    for request, together in zip(REQUESTS, batched):
        alone = optimize_value(lm, 2, request, prefixes, options, site_kind="resid_out")
        assert together.steps == alone.steps
        torch.testing.assert_close(together.v_star, alone.v_star, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_memit_edits_several_facts_at_once(family, tmp_path):
    lm = tiny_lm(family)
    snap = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = _editor(tmp_path, chunk=2).edit(lm, REQUESTS)
    assert all(torch.equal(snap[k], v) for k, v in lm.model.state_dict().items()), "edit() changed the weights"
    assert isinstance(result, WeightEdit) and len(result.deltas) == 2
    assert all(d.rank == len(REQUESTS) for d in result.deltas.values())
    assert [r["subject"] for r in result.info["requests"]] == [r.subject for r in REQUESTS]
    with result.applied(lm):
        for request in REQUESTS:
            top = next_token_logprobs(lm, [request.text])[0].argmax().item()
            assert top == target_ids(lm, request.target_new)[0], f"{family}: {request.subject} not edited"


def test_memit_rejects_bad_layers(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="ascending"):
        _editor(tmp_path, layers=(2, 1)).edit(lm, REQUESTS[:1])
    with pytest.raises(ValueError, match="has 4 layers"):
        _editor(tmp_path, layers=(3, 4)).edit(lm, REQUESTS[:1])
    with pytest.raises(ValueError, match="mom2_weight"):
        MemitConfig(mom2_weight=-1.0)


def test_weight_edit_keeps_its_keys_through_save_and_load(tmp_path):
    lm = tiny_lm("llama")
    result = _editor(tmp_path).edit(lm, REQUESTS[:2])
    assert set(result.keys) == set(result.deltas)
    loaded = WeightEdit.load(result.save(tmp_path / "edit.safetensors"))
    for name, keys in result.keys.items():
        assert keys.shape == (lm.arch.d_mlp(lm.model), 2)
        assert torch.equal(loaded.keys[name], keys)
        assert torch.equal(loaded.deltas[name].full(), result.deltas[name].full())


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_value_change_for_residual_moves_the_block_write(family):
    # The down-projection output change that makes the MLP's residual write move by r (small r).
    lm = tiny_lm(family)
    layer = 1
    torch.manual_seed(0)
    v = torch.randn(3, lm.arch.d_model(lm.model))
    r = 1e-3 * torch.randn_like(v)
    d = lm.arch.value_change_for_residual(lm.model, layer, v, r)
    post = lm.arch.mlp_post_norm
    write = (lambda x: x) if post is None else lmedit.models.arch._get(lm.arch.blocks(lm.model)[layer], post)
    with torch.no_grad():
        moved = write(v + d) - write(v)
    # RMSNorm's fixed output scale removes r's component along the write itself: compare the rest
    out = write(v).detach()
    along = (r * out).sum(-1, keepdim=True) / (out * out).sum(-1, keepdim=True) * out
    torch.testing.assert_close(moved, r - (along if post else 0), rtol=0.05, atol=2e-5)


def test_memit_keys_are_read_at_the_edited_layers(tmp_path):
    lm = tiny_lm("llama")
    result = _editor(tmp_path).edit(lm, REQUESTS[:1])
    assert result.info["layers"] == [1, 2]
    names = sorted(result.deltas)
    assert names == sorted(lm.arch.param_name(lm.model, layer, "mlp_out") for layer in (1, 2))


def test_edit_from_targets_reproduces_edit_and_lets_lambda_vary(tmp_path):
    # A λ sweep optimises the targets once (benchmarks/sweep_memit_lambda.py): the split must not change the edit.
    lm = tiny_lm("llama")
    editor = _editor(tmp_path)
    whole = editor.edit(lm, REQUESTS)
    targets = editor.optimize_targets(lm, REQUESTS)
    split = editor.edit_from_targets(lm, REQUESTS, targets)
    assert whole.deltas.keys() == split.deltas.keys()
    for name in whole.deltas:
        assert torch.equal(whole.deltas[name].full(torch.float64), split.deltas[name].full(torch.float64))
    looser = _editor(tmp_path, mom2_weight=1.0).edit_from_targets(lm, REQUESTS, targets)
    assert looser.info["update_norm"] > split.info["update_norm"]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_per_layer_values_reproduce_the_optimised_forward(family):
    # With several layers, v_star[j] is the output layer j had in the optimised forward (its value given the
    # earlier layers' δ, plus its own δ): writing those values in place reproduces the optimised NLL exactly.
    lm = tiny_lm(family)
    request = REQUESTS[0]
    layers = [1, 2]
    result = optimize_values(lm, layers, [request], [""], ValueOptions(steps=4, clamp_norm_factor=4.0),
                             site_kind="mlp.out")[0]
    assert result.v_star.shape == result.v_init.shape == (len(layers), lm.arch.d_model(lm.model))
    last = subject_span(lm, request.prompt, request.subject).last

    def nll_with(values: torch.Tensor) -> float:
        def put(activation, site):
            out = activation.clone()
            out[0, last] = values[layers.index(site.layer)].to(out.dtype)
            return out

        with patch(lm, {Site("mlp.out", layer): put for layer in layers}):
            score = score_targets(lm, [request.text], [request.target_new])[0]
        return -score.logprob / score.n_tokens

    assert nll_with(result.v_star) == pytest.approx(result.nll, rel=1e-4, abs=1e-5)
    # v_init + δ (the later layer's δ on top of its *unedited* value) is a different forward
    naive = result.v_init.clone()
    naive[0] = result.v_star[0]
    naive[1] = result.v_init[1] + (result.v_star[1] - _seen_layer_value(lm, request, layers, result.v_star[0]))
    assert abs(nll_with(naive) - result.nll) > 1e-3


def _seen_layer_value(lm, request, layers, first_value):
    """Layer layers[1]'s output at the subject's last token when layer layers[0]'s output there is `first_value`."""
    last = subject_span(lm, request.prompt, request.subject).last

    def put(activation, site):
        out = activation.clone()
        out[0, last] = first_value.to(out.dtype)
        return out

    with patch(lm, {Site("mlp.out", layers[0]): put}), capture(lm, [Site("mlp.out", layers[1])]) as acts:
        lm.model(input_ids=torch.tensor([prompt_ids(lm, request.text)]), use_cache=False)
    return acts[Site("mlp.out", layers[1])][0, last].to(first_value.dtype)
