"""GRACE (editors/grace.py) and the adaptor edit kind (editors/adaptor.py) on tiny random models: the edit, inputs
it does not match left bit-identical, exact undo, conflicting entries, save/load, generation with a cache, failures."""

import pytest
import torch

import lmedit
from lmedit.editors import AdaptorEdit, load_edit
from lmedit.editors.grace import DEPTH, GraceConfig, GraceEdit, GraceEditor, effective_radii
from lmedit.errors import ConfigError, EditFileError, LMEditError, RequestError
from lmedit.scoring import next_token_logprobs
from lmedit.testing import interrupt_at, tiny_lm
from lmedit.tokens import prompt_ids, target_ids
from lmedit.types import EditDescriptor, Site

# The subject ends the prompt (see tests/contract/test_editors.py for why, on a random 4-layer model).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
OTHER = lmedit.EditRequest("Where is {}", "The Louvre", "Seattle", "Paris")
SETTINGS = dict(layer=1, eps=0.1, lr=1.0, steps=20)
UNRELATED = ["The Space Needle is in", "Hello world", "Paris is a city"]


def _editor(**changes) -> GraceEditor:
    return GraceEditor(GraceConfig(**{**SETTINGS, **changes}))


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap) -> bool:
    return all(torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


def _logits(lm, texts):
    """Full logits of each text (every position), one forward each."""
    out = []
    with torch.no_grad():
        for text in texts:
            out.append(lm.model(input_ids=torch.tensor([prompt_ids(lm, text)], device=lm.device)).logits[0])
    return out


def _hooks(lm, layer=1) -> int:
    return len(lm.arch.block_module(lm.model, layer, "mlp_out")._forward_hooks)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_flips_the_fact_without_writing_weights_and_undo_is_exact(family):
    lm = tiny_lm(family)
    snap = _snapshot(lm)
    before = next_token_logprobs(lm, [REQUEST.text])[0]
    logits_before = _logits(lm, [REQUEST.text, *UNRELATED])
    edit = _editor().edit(lm, [REQUEST])
    assert _same(lm, snap) and not lm.edits and _hooks(lm) == 0, "edit() changed the model"
    assert isinstance(edit, AdaptorEdit) and edit.kind == "adaptor" and edit.site == Site("mlp.out", 1)
    assert edit.info["losses"][-1] < edit.info["losses"][0]
    new_first = target_ids(lm, REQUEST.target_new)[0]
    with edit.applied(lm):
        assert next_token_logprobs(lm, [REQUEST.text])[0].argmax().item() == new_first
        assert _same(lm, snap) and _hooks(lm) == 1 and list(lm.edits) == [edit]
    assert _same(lm, snap) and _hooks(lm) == 0 and not lm.edits
    assert torch.equal(next_token_logprobs(lm, [REQUEST.text])[0], before)
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, [REQUEST.text, *UNRELATED]), logits_before))


def test_inputs_it_does_not_match_are_bit_identical(tiny_llama):
    lm = tiny_llama
    before = _logits(lm, UNRELATED)
    edit = _editor().edit(lm, [REQUEST])
    with edit.applied(lm):
        after = _logits(lm, UNRELATED)
        edited = _logits(lm, [REQUEST.text])[0]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    # On the edit prompt only the last position matched: the earlier positions' logits are untouched.
    unedited = _logits(lm, [REQUEST.text])[0]
    assert torch.equal(edited[:-1], unedited[:-1]) and not torch.equal(edited[-1], unedited[-1])


def test_teacher_forced_scoring_sees_the_edit(tiny_llama):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    new, true = lmedit.score(lm, [REQUEST.text] * 2, [REQUEST.target_new, REQUEST.target_true])
    with edit.applied(lm):
        new_after, true_after = lmedit.score(lm, [REQUEST.text] * 2, [REQUEST.target_new, REQUEST.target_true])
    assert new.logprob < true.logprob and new_after.logprob > true_after.logprob


def test_generation_with_a_cache_matches_full_forwards(tiny_llama):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    ids = torch.tensor([prompt_ids(lm, REQUEST.text)], device=lm.device)
    with edit.applied(lm), torch.no_grad():
        cached = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                   do_sample=False, use_cache=True, pad_token_id=lm.tokenizer.pad_token_id)
        full = ids
        for _ in range(5):  # greedy, every position recomputed at every step
            nxt = lm.model(input_ids=full, use_cache=False).logits[0, -1].argmax()
            full = torch.cat([full, nxt.view(1, 1)], dim=1)
    assert torch.equal(cached, full)
    assert cached[0, ids.shape[1]].item() == target_ids(lm, REQUEST.target_new)[0]


def test_conflicting_entries_split_their_radii_and_undo_restores_them(tiny_llama):
    lm = tiny_llama
    # eps 10 ‖k‖: each ball alone would hold the other's key.
    first = _editor(eps=10.0).edit(lm, [REQUEST])
    second = _editor(eps=10.0).edit(lm, [OTHER])
    half = float((first.keys - second.keys).norm()) / 2
    first.apply(lm)
    assert torch.equal(first.used_radii(), first.radii)
    second.apply(lm)
    assert _hooks(lm) == 1, "one hook serves every GRACE edit at a layer"
    torch.testing.assert_close(first.used_radii(), torch.tensor([half]))
    torch.testing.assert_close(second.used_radii(), torch.tensor([half]))
    assert torch.equal(first.radii, 10.0 * first.keys.norm(dim=-1)), "an edit's own radius never changes"
    # Each prompt is answered by its own entry.
    rome, seattle = target_ids(lm, "Rome")[0], target_ids(lm, "Seattle")[0]
    got = next_token_logprobs(lm, [REQUEST.text, OTHER.text]).argmax(-1).tolist()
    assert got == [rome, seattle]
    first.undo()  # the hook's first holder goes: the hook stays for the other
    assert _hooks(lm) == 1 and torch.equal(second.used_radii(), second.radii)
    second.undo()
    assert _hooks(lm) == 0 and not lm.edits


def test_entries_with_the_same_target_do_not_shrink_each_other():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    own = torch.tensor([5.0, 5.0, 5.0])
    assert effective_radii(keys, own, ["Rome", "Rome", "Paris"]).tolist() == [1.5, 1.0, 1.0]
    assert effective_radii(keys, own, ["Rome", "Rome", "Rome"]).tolist() == [5.0, 5.0, 5.0]


def test_a_newer_edit_of_the_same_key_supersedes_the_older_until_undone(tiny_llama):
    lm = tiny_llama
    to_rome = _editor().edit(lm, [REQUEST])
    to_seattle = _editor().edit(lm, [REQUEST.__class__(REQUEST.prompt, REQUEST.subject, "Seattle", "Paris")])
    rome, seattle = target_ids(lm, "Rome")[0], target_ids(lm, "Seattle")[0]
    with to_rome.applied(lm):
        with to_seattle.applied(lm):
            assert to_rome.used_radii().item() == -1 and to_seattle.used_radii().item() > 0
            assert next_token_logprobs(lm, [REQUEST.text])[0].argmax().item() == seattle
        assert next_token_logprobs(lm, [REQUEST.text])[0].argmax().item() == rome


def test_save_load_round_trip(tiny_llama, tmp_path):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST, OTHER])
    loaded = load_edit(edit.save(tmp_path / "grace.safetensors"))
    assert isinstance(loaded, GraceEdit) and loaded.site == edit.site and loaded.requests == edit.requests
    assert loaded.method == "grace" and loaded.config["eps"] == 0.1 and loaded.base_fingerprint == lm.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors().values(), edit.tensors().values()))
    with edit.applied(lm):
        expected = _logits(lm, [REQUEST.text, OTHER.text])
    with loaded.applied(lm):
        assert all(torch.equal(a, b) for a, b in zip(_logits(lm, [REQUEST.text, OTHER.text]), expected))


def test_a_damaged_file_is_refused_on_load(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = _editor().edit(tiny_llama, [REQUEST]).save(tmp_path / "grace.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k != "radii"}, str(tmp_path / "no-radii.safetensors"), metadata=meta)
    with pytest.raises(EditFileError, match="'radii'"):
        load_edit(tmp_path / "no-radii.safetensors")
    save_file(tensors, str(tmp_path / "bad-site.safetensors"), metadata={**meta, "site": '{"kind": "mlp.key", "layer": 1}'})
    with pytest.raises(EditFileError, match="mlp.out"):
        load_edit(tmp_path / "bad-site.safetensors")


@pytest.mark.parametrize("bad", [[], [EditDescriptor("The Eiffel Tower is in Rome.")]])
def test_a_bad_request_leaves_nothing_applied(tiny_llama, bad):
    lm = tiny_llama
    snap = _snapshot(lm)
    with pytest.raises((RequestError, LMEditError)):
        lmedit.edit(lm, bad, "grace", config=SETTINGS)
    assert not lm.edits and _hooks(lm) == 0 and _same(lm, snap)


def test_an_edit_that_does_not_fit_the_model_is_refused_unapplied(tiny_llama):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    for broken in (GraceEdit(edit.requests, edit.keys, edit.values * torch.nan, edit.radii, site=edit.site),
                   GraceEdit(edit.requests, edit.keys[:, :5], edit.values, edit.radii, site=edit.site),
                   GraceEdit(edit.requests, edit.keys, edit.values, edit.radii, site=Site("mlp.out", 9))):
        with pytest.raises(LMEditError):
            broken.apply(lm)
        assert not lm.edits and _hooks(lm) == 0 and not broken.is_applied
    with pytest.raises(LMEditError, match="fingerprint"):
        edit.apply(tiny_lm("llama", seed=1))


def test_settings_are_checked_and_the_default_layer_is_at_depth(tiny_llama):
    for bad in ({"eps": 0.0}, {"lr": -1.0}, {"steps": 0}, {"layer": -1}):
        with pytest.raises(ConfigError):
            GraceConfig(**bad)
    with pytest.raises(ConfigError, match="out of range"):
        _editor(layer=4).edit(tiny_llama, [REQUEST])
    edit = GraceEditor(GraceConfig(steps=1)).edit(tiny_llama, [REQUEST])
    assert edit.site == Site("mlp.out", round(DEPTH * 3))


def test_an_interrupted_edit_leaves_the_model_as_it_was(tiny_llama):
    lm = tiny_llama
    snap, flags = _snapshot(lm), [p.requires_grad for p in lm.model.parameters()]
    logits = _logits(lm, [REQUEST.text])
    editor = _editor(early_stop_loss=0.0)
    editor.progress = interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(lm, [REQUEST])
    assert _same(lm, snap) and not lm.edits and [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())
    assert all("forward" not in vars(block) for block in lm.arch.blocks(lm.model))  # start_at stood down
    assert torch.equal(_logits(lm, [REQUEST.text])[0], logits[0])
