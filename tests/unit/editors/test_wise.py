"""WISE (editors/wise.py) on tiny random models: the edit lands without writing weights, inputs the router leaves to
the main memory are bit-identical, exact undo, two edits merged and one undone, save/load, the masked gradient,
Ties-merging, failures."""

import pytest
import torch

import lmedit
from lmedit.editors import AdaptorEdit, load_edit
from lmedit.editors.wise import (
    GENERIC_PROMPTS,
    WiseConfig,
    WiseEdit,
    WiseEditor,
    edit_mask,
    ties_merge,
)
from lmedit.errors import ConfigError, EditFileError, LMEditError, RequestError
from lmedit.hooks import capture
from lmedit.scoring import next_token_logprobs
from lmedit.testing import tiny_lm
from lmedit.tokens import pad_batch, prompt_ids, target_ids
from lmedit.types import EditDescriptor, Site

# The subject ends the prompt (see tests/contract/test_editors.py for why, on a random 4-layer model).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
OTHER = lmedit.EditRequest("Where is {}", "The Louvre", "Seattle", "Paris")
SETTINGS = {"layer": 1, "lr": 0.03, "steps": 30}


def _editor(**changes) -> WiseEditor:
    return WiseEditor(WiseConfig(**{**SETTINGS, **changes}))


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap) -> bool:
    return all(torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


def _logits(lm, texts):
    """Full logits of each text (every position), one forward each."""
    with torch.no_grad():
        return [lm.model(input_ids=torch.tensor([prompt_ids(lm, t)], device=lm.device)).logits[0] for t in texts]


def _keys(lm, text, layer=1):
    site = Site("mlp.key", layer)
    with torch.no_grad(), capture(lm, [site], stop_after=site) as acts:
        lm.model(input_ids=torch.tensor([prompt_ids(lm, text)], device=lm.device))
    return acts[site][0]  # (pos, d_mlp)


def _hooks(lm, layer=1) -> int:
    return len(lm.arch.block_module(lm.model, layer, "mlp_out")._forward_hooks)


def _top(lm, text) -> int:
    return next_token_logprobs(lm, [text])[0].argmax().item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_lands_without_writing_weights_and_undo_is_exact(family):
    lm = tiny_lm(family)
    snap = _snapshot(lm)
    texts = [REQUEST.text, *GENERIC_PROMPTS[:2]]
    before = _logits(lm, texts)
    edit = _editor().edit(lm, [REQUEST])
    assert _same(lm, snap) and not lm.edits and _hooks(lm) == 0, "edit() changed the model"
    assert isinstance(edit, AdaptorEdit) and edit.kind == "adaptor" and edit.site == Site("mlp.out", 1)
    assert edit.info["separated"] and edit.info["losses"][-1] < edit.info["losses"][0]
    with edit.applied(lm):
        assert _top(lm, REQUEST.text) == target_ids(lm, REQUEST.target_new)[0]
        assert _same(lm, snap) and _hooks(lm) == 1 and list(lm.edits) == [edit]
    assert _same(lm, snap) and _hooks(lm) == 0 and not lm.edits
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, texts), before))


def test_inputs_routed_to_the_main_memory_are_bit_identical(tiny_llama):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    quiet = [t for t in GENERIC_PROMPTS if bool((edit.activations(_keys(lm, t)) <= edit.threshold).all())]
    assert len(quiet) >= 4, "the router should leave most of the irrelevant prompts it trained on alone"
    before = _logits(lm, quiet + [REQUEST.text])
    with edit.applied(lm):
        after = _logits(lm, quiet + [REQUEST.text])
    assert all(torch.equal(a, b) for a, b in zip(after[:-1], before[:-1]))
    # The edit prompt reads the side memory from its last subject token on: earlier positions are untouched.
    fired = (edit.activations(_keys(lm, REQUEST.text)) > edit.threshold).nonzero()
    first = int(fired.min())
    assert torch.equal(after[-1][:first], before[-1][:first]) and not torch.equal(after[-1][first:], before[-1][first:])
    # In one batch with the edit prompt, a quiet row is still the unedited model's, bit for bit.
    batch = pad_batch(lm, [prompt_ids(lm, REQUEST.text), prompt_ids(lm, quiet[0])])
    with torch.no_grad():
        unedited = lm.model(**batch.model_inputs()).logits
        with edit.applied(lm):
            edited = lm.model(**batch.model_inputs()).logits
    n = batch.lengths[1]  # its real positions (right-padding after them may fire: nothing reads it)
    assert torch.equal(edited[1, :n], unedited[1, :n]) and not torch.equal(edited[0], unedited[0])


def test_two_edits_share_one_hook_and_undoing_the_first_leaves_the_second(tiny_llama):
    lm = tiny_llama
    first = _editor().edit(lm, [REQUEST])
    second = _editor().edit(lm, [OTHER])
    assert not torch.equal(edit_mask(first.delta.shape, 0.2, 0, [REQUEST]), edit_mask(second.delta.shape, 0.2, 0, [OTHER]))
    alone = _logits(lm, [OTHER.text])[0]
    with second.applied(lm):
        expected = _logits(lm, [OTHER.text])[0]
    first.apply(lm)
    second.apply(lm)
    assert _hooks(lm) == 1, "one hook serves every WISE edit at a layer"
    assert _top(lm, OTHER.text) == target_ids(lm, "Seattle")[0] and _top(lm, REQUEST.text) == target_ids(lm, "Rome")[0]
    first.undo()  # the hook's holder goes: the hook stays for the other, whose side memory is its own again
    assert _hooks(lm) == 1 and torch.equal(_logits(lm, [OTHER.text])[0], expected)
    second.undo()
    assert _hooks(lm) == 0 and not lm.edits and torch.equal(_logits(lm, [OTHER.text])[0], alone)


def test_the_masked_gradient_only_touches_the_edits_subset(tiny_llama):
    lm = tiny_llama
    edit = _editor(mask_ratio=0.3).edit(lm, [REQUEST])
    mask = edit_mask(edit.delta.shape, 0.3, 0, [REQUEST])
    assert 0.2 < mask.float().mean() < 0.4
    assert bool((edit.delta[~mask] == 0).all()) and (edit.delta[mask] != 0).float().mean() > 0.9
    assert edit.info["trained_entries"] == int((edit.delta != 0).sum())


def test_norm_constraint_clamps_every_entry(tiny_llama):
    edit = _editor(norm_constraint=1e-3, steps=5).edit(tiny_llama, [REQUEST])
    assert 0 < edit.delta.abs().max() <= torch.tensor(1e-3)  # the bound in float32


def test_ties_merge_elects_signs_and_averages_the_agreeing():
    a = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    b = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    c = torch.tensor([[0.0, -1.0, 0.0, 0.0]])
    assert torch.equal(ties_merge([a]), a)
    assert ties_merge([a, b]).tolist() == [[2.0, -2.0, 0.0, 3.0]]
    assert ties_merge([a, b, c]).tolist() == [[2.0, -1.5, 0.0, 3.0]]


def test_shards_are_trained_apart_and_merged(tiny_llama):
    lm = tiny_llama
    edit = _editor(shards=2).edit(lm, [REQUEST, OTHER])
    assert len(edit.info["shards"]) == 2 and len(edit.info["subject_acts"]) == 2
    with edit.applied(lm):
        assert _top(lm, REQUEST.text) == target_ids(lm, "Rome")[0]


def test_save_load_round_trip(tiny_llama, tmp_path):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    loaded = load_edit(edit.save(tmp_path / "wise.safetensors"))
    assert isinstance(loaded, WiseEdit) and loaded.site == edit.site and loaded.requests == edit.requests
    assert loaded.method == "wise" and loaded.config["lr"] == 0.03 and loaded.base_fingerprint == lm.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors().values(), edit.tensors().values()))
    with edit.applied(lm):
        expected = _logits(lm, [REQUEST.text])[0]
    with loaded.applied(lm):
        assert torch.equal(_logits(lm, [REQUEST.text])[0], expected)


def test_a_damaged_file_is_refused_on_load(tiny_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _editor(steps=2).edit(tiny_llama, [REQUEST]).save(tmp_path / "wise.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    save_file({"delta": tensors["delta"]}, str(tmp_path / "no-threshold.safetensors"), metadata=meta)
    with pytest.raises(EditFileError, match="'threshold'"):
        load_edit(tmp_path / "no-threshold.safetensors")
    save_file({**tensors, "threshold": -tensors["threshold"]}, str(tmp_path / "negative.safetensors"), metadata=meta)
    with pytest.raises(EditFileError, match="positive"):
        load_edit(tmp_path / "negative.safetensors")


@pytest.mark.parametrize("bad", [[], [EditDescriptor("The Eiffel Tower is in Rome.")]])
def test_a_bad_request_leaves_nothing_applied(tiny_llama, bad):
    lm = tiny_llama
    snap = _snapshot(lm)
    with pytest.raises((RequestError, LMEditError)):
        lmedit.edit(lm, bad, "wise", config=SETTINGS)
    assert not lm.edits and _hooks(lm) == 0 and _same(lm, snap)


def test_an_edit_that_does_not_fit_the_model_is_refused_unapplied(tiny_llama):
    lm = tiny_llama
    edit = _editor(steps=2).edit(lm, [REQUEST])
    for broken in (WiseEdit(edit.requests, edit.delta * torch.nan, edit.threshold, site=edit.site),
                   WiseEdit(edit.requests, edit.delta[:, :5], edit.threshold, site=edit.site),
                   WiseEdit(edit.requests, edit.delta, edit.threshold, site=Site("mlp.out", 9))):
        with pytest.raises(LMEditError):
            broken.apply(lm)
        assert not lm.edits and _hooks(lm) == 0 and not broken.is_applied
    with pytest.raises(LMEditError, match="fingerprint"):
        edit.apply(tiny_lm("llama", seed=1))


def test_settings_are_checked(tiny_llama):
    for bad in ({"mask_ratio": 0.0}, {"mask_ratio": 1.5}, {"lr": -1.0}, {"steps": 0}, {"layer": -1},
                {"alpha": 0.6, "beta": 0.5}, {"act_ratio": 0.0}, {"act_ratio": 1.0}, {"shards": 0}):
        with pytest.raises(ConfigError):
            WiseConfig(**bad)
    with pytest.raises(ConfigError, match="out of range"):
        _editor(layer=4).edit(tiny_llama, [REQUEST])
