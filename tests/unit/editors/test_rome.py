import pytest
import torch

import lmedit
from lmedit.editors.base import WeightEdit
from lmedit.editors.rome import RomeConfig, RomeEditor, rank_one_update
from lmedit.editors.steps.mass import request_keys
from lmedit.errors import EditFailedError, LMEditError
from lmedit.stats import StatsCache
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.scoring import next_token_logprobs
from lmedit.tokens import target_ids

# The subject ends the prompt: in a random 4-layer model, little flows from an earlier token to the last one,
# so a fact "stored" mid-prompt would barely reach the prediction (real models are tested in tests/slow).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")


def _editor(tmp_path, **kw):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    cfg = RomeConfig(layer=1, corpus=f"file:{corpus}", corpus_tokens=4000, prefixes_short=3, prefixes_long=2, **kw)
    return RomeEditor(cfg, cache=StatsCache(tmp_path))


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap):
    return all(torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


def test_rank_one_update_maps_key_to_value():
    torch.manual_seed(0)
    W, b = torch.randn(16, 32), torch.randn(16)
    A = torch.randn(32, 64)
    C = A @ A.T / 64
    k, v = torch.randn(32), torch.randn(16)
    left, right = rank_one_update(W, b, C, k, v)
    W2 = W.double() + left @ right.T
    out = W2 @ k.double() + b.double()
    assert (out - v.double()).norm() / v.norm() < 1e-10


def _paper_update(W, b, C, k_bar, k_bare, v_star):
    """ROME's reference code, written out independently (arXiv:2202.05262; rome/compute_u.py, compute_v.py):
    left_vector = C⁻¹k̄ / ‖C⁻¹k̄‖;  right_vector = (v* − cur_output) / (k_bare · left_vector), cur_output
    being the MLP output at the bare prompt (W k_bare + b);  ΔW = right_vector ⊗ left_vector."""
    W, b, C, k_bar, k_bare, v_star = (t.double() for t in (W, b, C, k_bar, k_bare, v_star))
    left_vector = torch.linalg.inv(C) @ k_bar
    left_vector = left_vector / left_vector.norm()
    cur_output = W @ k_bare + b
    right_vector = (v_star - cur_output) / torch.dot(k_bare, left_vector)
    return torch.outer(right_vector, left_vector)


def value_problem(seed: int):
    """A random down-projection W (8×16) with bias, key statistics C, two keys and a target value."""
    torch.manual_seed(seed)
    W, b, A = torch.randn(8, 16), torch.randn(8), torch.randn(16, 40)
    return W, b, A @ A.T / 40, torch.randn(16), torch.randn(16), torch.randn(8)


def test_original_key_mix_is_the_papers_update():
    W, b, C, k_bar, k_bare, v = value_problem(1)
    left, right = rank_one_update(W, b, C, k_bar, v, k_solve=k_bare)
    ours, paper = left @ right.T, _paper_update(W, b, C, k_bar, k_bare, v)
    assert (ours - paper).norm() / paper.norm() < 1e-6
    edited = W.double() + ours
    # the paper's update makes the bare prompt's key produce v* exactly ...
    assert (edited @ k_bare.double() + b.double() - v.double()).norm() / v.norm() < 1e-6
    # ... and its direction in key space is C⁻¹k̄ (the averaged key), not C⁻¹k_bare
    direction = torch.linalg.solve(C.double(), k_bar.double())
    torch.testing.assert_close(right[:, 0] / right[:, 0].norm(), direction / direction.norm())


def test_default_mode_solves_at_the_averaged_key():
    # R-ROME (arXiv:2403.07175): the same averaged key in both places, so W' k̄ + b = v*.
    W, b, C, k_bar, k_bare, v = value_problem(2)
    left, right = rank_one_update(W, b, C, k_bar, v)
    edited = W.double() + left @ right.T
    assert (edited @ k_bar.double() + b.double() - v.double()).norm() / v.norm() < 1e-6
    assert (edited @ k_bare.double() + b.double() - v.double()).norm() / v.norm() > 1e-3
    paper = _paper_update(W, b, C, k_bar, k_bar, v)  # the paper's formula with k_bare := k̄ is the same update
    assert ((left @ right.T) - paper).norm() / paper.norm() < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "gemma3_text"])
def test_rome_edit_on_tiny_model(family, tmp_path):
    lm = tiny_lm(family)
    snap = _snapshot(lm)
    editor = _editor(tmp_path)
    result = editor.edit(lm, [REQUEST])
    assert _same(lm, snap), "edit() must not change the weights"
    assert isinstance(result, WeightEdit) and len(result.deltas) == 1
    (name, delta), = result.deltas.items()
    assert delta.rank == 1
    # W' k* = v*: recompute k* and the layer's output after applying the edit
    prefixes = lmedit.editors.steps.value.context_prefixes(lm, ((5, 3), (10, 2)), seed=0, cache=editor.cache)
    k_star = request_keys(lm, 1, [REQUEST], prefixes)[0].to(torch.float32)
    module = lm.arch.block_module(lm.model, 1, "mlp_out")
    first_new = target_ids(lm, "Rome")[0]
    before = next_token_logprobs(lm, [REQUEST.text])[0]
    with result.applied(lm):
        v_after = module(k_star)
        after = next_token_logprobs(lm, [REQUEST.text])[0]
    info = result.info["requests"][0]
    assert info["v_nll"] < -before[first_new].item() - 2.0  # v* makes target_new much more likely
    assert after[first_new] > before[first_new] + 2.0
    if family != "gemma3_text":  # Gemma's post-MLP norm damps one token's change in a random 4-layer model
        assert after.argmax().item() == first_new  # the edit changes the top-1 prediction
    assert _same(lm, snap), "undo must be bit-exact"
    # W' k* = v*: the edited layer maps k* to the optimised value
    v_star = torch.tensor(info["v_star"])
    assert ((v_after - v_star).norm() / v_star.norm()).item() < 1e-4
    assert (v_after - module(k_star)).norm() > 0.1 * v_star.norm()  # and the unedited layer does not


def test_save_load_round_trip(tmp_path):
    lm = tiny_lm("llama")
    result = _editor(tmp_path).edit(lm, [REQUEST])
    path = result.save(tmp_path / "edit.safetensors")
    loaded = WeightEdit.load(path)
    assert loaded.requests == (REQUEST,) and loaded.method == "rome"
    (name, delta), = loaded.deltas.items()
    assert delta.left is not None and delta.dense is None  # factors, not a full matrix
    torch.testing.assert_close(delta.full(), result.deltas[name].full())
    with result.applied(lm):
        a = lm.model(**lm.encode([REQUEST.text])).logits
    with loaded.applied(lm):
        b = lm.model(**lm.encode([REQUEST.text])).logits
    assert torch.equal(a, b)


def test_apply_refuses_other_model_and_nan(tmp_path):
    lm = tiny_lm("llama")
    result = _editor(tmp_path).edit(lm, [REQUEST])
    other = tiny_lm("llama", seed=1)
    snap = _snapshot(other)
    with pytest.raises(LMEditError, match="fingerprint"):
        result.apply(other)
    assert _same(other, snap)
    (name, delta), = result.deltas.items()
    delta.left[0, 0] = float("nan")
    with pytest.raises(EditFailedError, match="non-finite"):
        result.apply(lm)
    snap = _snapshot(lm)
    assert not result.is_applied and _same(lm, snap)


def test_failed_edit_leaves_weights_untouched(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    snap = _snapshot(lm)
    editor = _editor(tmp_path)

    def boom(*args, **kwargs):
        raise RuntimeError("solver failed")

    monkeypatch.setattr("lmedit.editors.rome.rank_one_update", boom)
    second = lmedit.EditRequest("{} plays the sport of", "Michael Jordan", "soccer")
    with pytest.raises(RuntimeError, match="solver failed"):
        editor.edit(lm, [REQUEST, second])
    assert _same(lm, snap)


def test_sequential_requests_and_undo_order(tmp_path):
    lm = tiny_lm("gpt2")
    snap = _snapshot(lm)
    editor = _editor(tmp_path)
    second = lmedit.EditRequest("{} plays the sport of", "Michael Jordan", "soccer")
    both = editor.edit(lm, [REQUEST, second])
    assert next(iter(both.deltas.values())).rank == 2
    first = editor.edit(lm, [REQUEST]).apply(lm)
    later = editor.edit(lm, [second]).apply(lm, check_fingerprint=False)
    with pytest.raises(LMEditError, match="undo them first"):
        first.undo()
    later.undo()
    first.undo()
    assert _same(lm, snap)
