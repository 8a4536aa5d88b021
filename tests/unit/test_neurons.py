"""Knowledge neurons (arXiv:2104.08696): integrated-gradients attribution, selection, the KN editor, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.editors.kn import KnConfig, KnEditor
from lmedit.errors import EditFailedError
from lmedit.hooks import patch
from lmedit.neurons import attribute, candidates, find_knowledge_neurons, refine, shared
from lmedit.scoring import logits_at, next_token_logprobs
from lmedit.stats import StatsCache
from lmedit.testing import tiny_lm
from lmedit.tokens import pad_batch, prompt_ids, target_ids
from lmedit.types import Site

PROMPT = "Where is The Eiffel Tower"
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")


def _prob_with_layer_scaled(lm, prompt: str, layer: int, alpha: float, token: int) -> float:
    """P(token) with layer's MLP key at the last position multiplied by alpha: a plain full-prompt forward."""
    def scale(act, site):
        out = act.clone()
        out[:, -1] = alpha * out[:, -1]
        return out

    with patch(lm, {Site("mlp.key", layer): scale}):
        return next_token_logprobs(lm, [prompt])[0, token].exp().item()


# --- attribution ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_integrated_gradients_completeness(family):
    # Σ_i attr_l,i = P(full activation) − P(layer l zeroed), up to the Riemann error (midpoint rule, 64 steps).
    lm = tiny_lm(family)
    result = attribute(lm, PROMPT, None, steps=64)
    token = result.target_id
    p_full = next_token_logprobs(lm, [PROMPT])[0, token].exp().item()
    assert result.prob == pytest.approx(p_full, rel=1e-5)
    for layer in range(lm.n_layers):
        p_zero = _prob_with_layer_scaled(lm, PROMPT, layer, 0.0, token)
        assert result.prob_zero[layer].item() == pytest.approx(p_zero, rel=1e-4, abs=1e-7)
        total = result.scores[layer].sum().item()
        assert abs(total - (p_full - p_zero)) <= 0.01 * abs(p_full - p_zero) + 1e-6, (layer, total, p_full - p_zero)
    assert result.completeness_gap.abs().max() < 1e-5


def test_riemann_error_shrinks_with_steps(tiny_llama):
    coarse = attribute(tiny_llama, PROMPT, None, steps=2).completeness_gap.abs().sum()
    fine = attribute(tiny_llama, PROMPT, None, steps=32).completeness_gap.abs().sum()
    assert fine < coarse / 10


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_attribution_matches_one_layer_at_a_time(family):
    # attribute() runs several layers' steps in one single-token forward over a cached prefix; the reference
    # here scales one layer in full-prompt forwards, one step per row, and integrates the gradient itself.
    lm = tiny_lm(family)
    steps, layer = 8, 2
    result = attribute(lm, PROMPT, "Paris", steps=steps, max_rows=4 * (steps + 1))
    token = target_ids(lm, "Paris")[0]
    ids = prompt_ids(lm, PROMPT)
    batch = pad_batch(lm, [ids] * steps)
    base = result.activations[layer]
    points = (((torch.arange(steps) + 0.5) / steps)[:, None] * base).requires_grad_(True)

    def scale(act, site):
        out = act.clone()
        out[:, len(ids) - 1] = points
        return out

    with torch.enable_grad(), patch(lm, {Site("mlp.key", layer): scale}):
        logits = logits_at(lm, batch.model_inputs(), torch.arange(steps), torch.full((steps,), len(ids) - 1))
        torch.softmax(logits.float(), -1)[:, token].sum().backward()
    expected = base * points.grad.mean(0)
    torch.testing.assert_close(result.scores[layer], expected, rtol=1e-4, atol=1e-8)


def test_layer_subset_and_bad_layers(tiny_llama):
    result = attribute(tiny_llama, PROMPT, "Paris", steps=4, layers=[1, 3])
    assert result.layers == (1, 3)
    assert result.scores[[0, 2]].abs().sum() == 0
    assert result.scores[[1, 3]].abs().sum() > 0
    assert torch.isnan(result.prob_zero[0]) and not torch.isnan(result.prob_zero[1])
    with pytest.raises(ValueError, match="out of range"):
        attribute(tiny_llama, PROMPT, "Paris", layers=[4])
    with pytest.raises(ValueError, match="steps"):
        attribute(tiny_llama, PROMPT, "Paris", steps=0)


def test_no_target_scores_the_top_prediction(tiny_llama):
    result = attribute(tiny_llama, PROMPT, None, steps=2)
    assert result.target_id == int(next_token_logprobs(tiny_llama, [PROMPT])[0].argmax())


# --- selection ---------------------------------------------------------------------------------------------


def test_candidates_threshold_is_relative_to_the_prompts_max():
    scores = torch.zeros(3, 5)
    scores[0, 1] = 1.0    # the max
    scores[1, 2] = 0.2    # exactly t × max: kept (≥, as the authors' code)
    scores[2, 0] = 0.19   # below
    scores[2, 4] = -2.0   # negative attribution: never a candidate
    assert candidates(scores, 0.2) == {(0, 1), (1, 2)}
    assert candidates(scores, 0.1) == {(0, 1), (1, 2), (2, 0)}
    assert candidates(scores * 10, 0.2) == {(0, 1), (1, 2)}  # scale-free
    assert candidates(-scores.abs(), 0.2) == set()  # no positive attribution: nothing
    with pytest.raises(ValueError, match="threshold"):
        candidates(scores, 0.0)


def test_shared_keeps_neurons_in_at_least_p_of_the_prompts():
    a, b, c = (0, 1), (2, 3), (1, 1)
    per_prompt = [{a, b, c}] * 6 + [{a, b}] + [{a}] * 3  # a in 10/10, b in 7/10, c in 6/10
    assert shared(per_prompt, 0.7) == {a, b}        # 7/10 counts despite 0.7 × 10 = 7.000000000000001
    assert shared(per_prompt, 0.71) == {a}
    assert shared(per_prompt, 1.0) == {a}
    assert shared(per_prompt, 0.6) == {a, b, c}
    assert shared([{c}], 0.7) == {c}                # one prompt: its candidates
    with pytest.raises(ValueError, match="share"):
        shared(per_prompt, 0.0)


def test_refine_drops_neurons_common_to_other_facts():
    mine = {(0, 1), (2, 3), (4, 5)}
    others = [{(0, 1), (9, 9)}, {(0, 1)}] + [{(2, 3)}] + [set()] * 7   # (0, 1) in 2/10, (2, 3) in 1/10
    assert refine(mine, others, 0.1) == {(2, 3), (4, 5)}
    assert refine(mine, others, 0.0) == {(4, 5)}
    assert refine(mine, [], 0.1) == mine


def test_find_knowledge_neurons_orders_caps_and_falls_back(tiny_llama):
    prompts = [PROMPT, "Paris. " + PROMPT, "The Louvre. " + PROMPT]
    full = find_knowledge_neurons(tiny_llama, prompts, "Paris", steps=4, threshold=0.2, share=0.6)
    assert len(full.neurons) >= 3, "the seeded tiny llama has several neurons passing t=0.2 in 2 of 3 prompts"
    counts = full.counts()
    assert all(counts[n] >= 2 for n in full.neurons)
    assert all(counts[n] < 2 for n in full.counts() if n not in full.neurons)
    scores = [float(full.scores[n]) for n in full.neurons]
    assert scores == sorted(scores, reverse=True)
    assert full.scores.shape == (tiny_llama.n_layers, tiny_llama.arch.d_mlp(tiny_llama.model))
    assert not full.fallback
    capped = find_knowledge_neurons(tiny_llama, prompts, "Paris", steps=4, threshold=0.2, share=0.6, max_neurons=2)
    assert capped.neurons == full.neurons[:2]
    # t = 1 in every prompt: a neuron would have to be each prompt's single maximum; none is, so the top-k.
    strict = find_knowledge_neurons(tiny_llama, prompts, "Paris", steps=4, threshold=1.0, share=1.0, fallback_top_k=3)
    assert strict.fallback and strict.neurons == full.top(3)
    none = find_knowledge_neurons(tiny_llama, prompts, "Paris", steps=4, threshold=1.0, share=1.0)
    assert none.neurons == [] and not none.fallback


# --- the editor --------------------------------------------------------------------------------------------


def _editor(tmp_path, **overrides) -> KnEditor:
    return KnEditor(KnConfig(n_prefixes=0, steps=4, **overrides), cache=StatsCache(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kn_update_moves_value_columns_toward_the_new_token(family, tmp_path):
    lm = tiny_lm(family)
    editor = _editor(tmp_path, lambda_add=8.0, lambda_erase=1.0, max_neurons=4)
    result = editor.edit(lm, [REQUEST])
    neurons = [(layer, index) for layer, index, _ in result.info["requests"][0]["neurons"]]
    assert 1 <= len(neurons) <= 4
    unembed = lm.arch.module_for(lm.model, Site("logits"))[0].weight.double()
    e_new = unembed[target_ids(lm, "Rome")[0]]
    e_old = unembed[target_ids(lm, "Paris")[0]]
    kn = editor.locate(lm, REQUEST)
    before = {layer: lm.arch.weight(lm.model, layer, "mlp_out").detach().double().clone() for layer, _ in neurons}
    with result.applied(lm):
        for layer in before:
            W = lm.arch.weight(lm.model, layer, "mlp_out").detach().double()
            changed = (W - before[layer]).abs().sum(0) > 0
            assert set(changed.nonzero()[:, 0].tolist()) == {i for l_, i in neurons if l_ == layer}
            for index in (i for l_, i in neurons if l_ == layer):
                v = before[layer][:, index]
                sign = 1.0 if kn.activations[layer, index] >= 0 else -1.0
                expected = v + sign * v.norm() * (8.0 * e_new / e_new.norm() - 1.0 * e_old / e_old.norm())
                torch.testing.assert_close(W[:, index], expected, rtol=1e-5, atol=1e-6)


def test_kn_without_target_true_only_adds(tiny_llama, tmp_path):
    request = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome")
    result = _editor(tmp_path, lambda_add=8.0).edit(tiny_llama, [request])
    for delta in result.deltas.values():
        assert delta.rank is not None
        erase = delta.left[:, 1::2] if tiny_llama.arch.weight_layout == "out_in" else delta.right[:, 1::2]
        assert erase.abs().sum() == 0  # ê_old column is zero
    assert result.info["requests"][0]["scored_token"] == tiny_llama.tokenizer.decode(
        [int(next_token_logprobs(tiny_llama, [request.text])[0].argmax())])


def test_kn_fails_cleanly_without_neurons_or_falls_back(tiny_llama, tmp_path, monkeypatch):
    snapshot = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    editor = _editor(tmp_path)
    real_locate = editor.locate

    def nothing_passes(lm, request, index=0, total=1):
        found = real_locate(lm, request, index, total)
        found.neurons = []
        return found

    monkeypatch.setattr(editor, "locate", nothing_passes)
    with pytest.raises(EditFailedError, match="no knowledge neuron passed"):
        editor.edit(tiny_llama, [REQUEST])
    assert all(torch.equal(snapshot[k], v) for k, v in tiny_llama.model.state_dict().items())

    fallback = _editor(tmp_path, fallback_top_k=2)
    monkeypatch.setattr(fallback, "locate", nothing_passes)
    result = fallback.edit(tiny_llama, [REQUEST])
    info = result.info["requests"][0]
    assert info["fallback"] and len(info["neurons"]) == 2


def test_kn_refuses_targets_with_the_same_first_token(tiny_llama, tmp_path):
    request = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Paris, France", "Paris")
    with pytest.raises(EditFailedError, match="same token"):
        _editor(tmp_path).edit(tiny_llama, [request])


def test_kn_refines_against_builtin_facts_and_caches_them(tiny_llama, tmp_path):
    editor = _editor(tmp_path, refine_facts=3, refine_share=0.0, fallback_top_k=1)
    result = editor.edit(tiny_llama, [REQUEST])
    contrast = editor.contrast_sets(tiny_llama)
    assert len(contrast) == 3 and all(contrast)
    assert list(tmp_path.glob(f"{tiny_llama.weights_hash}/kn-contrast-n3-*.json"))
    info = result.info["requests"][0]
    edited = {(layer, index) for layer, index, _ in info["neurons"]}
    dropped = {tuple(n) for n in info["dropped_by_refining"]}
    assert not info["fallback"] and edited and dropped
    assert not edited & set().union(*contrast)   # refine_share 0: anything a contrast fact has is dropped
    assert dropped <= set().union(*contrast)
    assert editor.contrast_sets(tiny_llama) == contrast  # read back from the cache file


def test_kn_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        KnConfig(threshold=0.0)
    with pytest.raises(ValueError, match="share"):
        KnConfig(share=1.5)
    with pytest.raises(ValueError, match="lambda"):
        KnConfig(lambda_add=0.0)
    with pytest.raises(ValueError, match="layers"):
        KnConfig(layers=(-1,))


# --- the CLI -----------------------------------------------------------------------------------------------


def test_neurons_command_writes_json_and_png(model_dir, tmp_path, capsys):
    out = tmp_path / "kn"
    code = main(["neurons", "--model", str(model_dir), "Where is {}", "--subject", "The Eiffel Tower",
                 "--target", "Paris", "--paraphrase", "Paris. Where is The Eiffel Tower", "--steps", "4",
                 "--top", "5", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "knowledge neuron" in printed and "attribution" in printed
    data = json.loads((out / "neurons.json").read_text())
    assert len(data["prompts"]) == 2 and data["target_token"].strip() == "Paris"
    assert len(data["scores"]) == 4 and len(data["scores"][0]) == 128  # (n_layers, d_mlp) of the tiny llama
    assert all({"layer", "index", "score", "prompts"} <= set(row) for row in data["neurons"])
    png = (out / "neurons.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_neurons_command_rejects_a_subject_not_in_the_prompt(model_dir, capsys):
    code = main(["neurons", "--model", str(model_dir), "Where is Paris", "--subject", "Rome", "--target", "x"])
    assert code == 2
    assert "does not occur" in capsys.readouterr().err
