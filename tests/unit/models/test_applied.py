"""`lm.edits` (lmedit.models.applied.AppliedEdits): the one owner of which edits are applied to a model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lmedit
from lmedit.editors import ParamDelta, WeightEdit, WrapperEdit
from lmedit.errors import LMEditError
from lmedit.ledger import Ledger
from lmedit.testing import tiny_lm

REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")


def _weight_edit(lm, param: str, scale: float = 1e-3, keys: int = 0) -> WeightEdit:
    p = dict(lm.model.named_parameters())[param]
    torch.manual_seed(1)
    edit = WeightEdit(deltas={param: ParamDelta(dense=scale * torch.randn_like(p))}, requests=(REQUEST,),
                      method="test", base_fingerprint=lm.fingerprint)
    if keys:
        edit.keys[param] = torch.randn(p.shape[1], keys)
    return edit


class _Claims(WrapperEdit, wrapper="test-claims"):
    """A wrapper that claims prompts containing `word` with a fixed score and rewrites them to `text`."""

    def __init__(self, word: str, score: float, text: str) -> None:
        super().__init__(method="test-claims")
        self.word, self.score, self.text = word, score, text

    @property
    def requests(self):
        return ()

    def match(self, prompts):
        return [(self.score, self.text) if self.word in p else None for p in prompts]

    def tensors(self):
        return {}

    def metadata(self):
        return {"word": self.word}

    @classmethod
    def from_saved(cls, tensors, metadata, common):
        return cls(metadata["word"], 0.0, "")


@pytest.fixture
def lm():
    return tiny_lm("llama")


def test_apply_and_undo_push_and_remove(lm):
    a = _weight_edit(lm, "model.layers.0.mlp.down_proj.weight")
    b = _weight_edit(lm, "model.layers.1.mlp.down_proj.weight")
    assert list(lm.edits) == [] and not lm.edits
    a.apply(lm)
    b.apply(lm)
    assert list(lm.edits) == [a, b] and len(lm.edits) == 2 and a in lm.edits
    assert lm.edits.after(a) == [b] and lm.edits.after(b) == []
    assert lm.edits.of_kind("weight") == [a, b] and lm.edits.of_kind("wrapper") == []
    a.undo()  # different parameters: any order
    assert list(lm.edits) == [b]
    with pytest.raises(LMEditError, match="not applied"):
        lm.edits.after(a)
    b.undo()
    assert not lm.edits


def test_two_bundles_of_one_model_share_the_stack(lm):
    other = replace(lm)  # a second LM bundle around the same transformers model
    edit = _weight_edit(lm, "model.layers.0.mlp.down_proj.weight").apply(lm)
    assert list(other.edits) == [edit]
    assert list(tiny_lm("llama").edits) == []  # another model object: its own stack
    edit.undo()


def test_nothing_is_stored_on_the_model_object(lm):
    before = set(vars(lm.model))
    edit = _weight_edit(lm, "model.layers.0.mlp.down_proj.weight").apply(lm)
    assert set(vars(lm.model)) == before
    edit.undo()


def test_keys_of_the_applied_edits_of_a_parameter(lm):
    param = "model.layers.1.mlp.down_proj.weight"
    assert lm.edits.keys(param) is None
    a = _weight_edit(lm, param, keys=2).apply(lm)
    b = _weight_edit(lm, param, keys=3).apply(lm)
    keys = lm.edits.keys(param)
    assert keys.dtype == torch.float64 and keys.shape == (a.keys[param].shape[0], 5)
    assert torch.equal(keys, torch.cat([a.keys[param], b.keys[param]], 1).double())
    b.undo()
    a.undo()


def test_route_takes_the_best_claim_and_leaves_the_rest(lm):
    low = _Claims("Tower", 0.2, "low").apply(lm)
    high = _Claims("Eiffel", 0.9, "high").apply(lm)
    assert lm.edits.route(["The Eiffel Tower", "Tower Bridge", "Paris"]) == ["high", "low", "Paris"]
    high.undo()
    assert lm.edits.route(["The Eiffel Tower"]) == ["low"]
    low.undo()
    assert lm.edits.route(["The Eiffel Tower"]) == ["The Eiffel Tower"]


def test_suspended_gives_the_base_model_and_restores_order_and_labels(lm):
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    a = _weight_edit(lm, "model.layers.0.mlp.down_proj.weight").apply(lm)
    b = _weight_edit(lm, "model.layers.0.mlp.down_proj.weight", scale=2e-3).apply(lm)  # same parameter
    lm.edits.label(a, 7)
    edited = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with lm.edits.suspended(lm=lm):
            assert not lm.edits
            assert all(torch.equal(snapshot[k], v) for k, v in lm.model.state_dict().items())
            raise RuntimeError("inside")
    assert list(lm.edits) == [a, b] and lm.edits.labelled() == [(7, a)] and lm.edits.unlabelled() == [b]
    assert all(torch.equal(edited[k], v) for k, v in lm.model.state_dict().items())
    with lm.edits.suspended([b], lm=lm):
        assert list(lm.edits) == [a]
    assert list(lm.edits) == [a, b]
    b.undo()
    a.undo()


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _added(value, param, *edits):
    """`value` with `edits`' deltas for `param` added in order, as `WeightEdit.apply` adds them."""
    for edit in edits:
        value = (value.to(torch.float64) + edit.deltas[param].full(torch.float64, value.device)).to(value.dtype)
    return value


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_suspending_the_top_edits_writes_back_their_values_without_re_adding_deltas(lm, monkeypatch):
    """The fast path: a mixed stack (two weight edits on one parameter, one on another, a wrapper and an
    adaptor between them) comes off for the block and back after it bit for bit, in order, with its labels,
    and no weight edit re-adds its delta; each edit still undoes exactly afterwards."""
    base = _state(lm)
    down0, down1 = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    a = _weight_edit(lm, down0).apply(lm)
    wrapper = _Claims("Eiffel", 0.9, "rewritten").apply(lm)
    grace = lmedit.edit(lm, REQUEST, method="grace", config={"layer": 1, "steps": 3})
    b = _weight_edit(lm, down0, scale=2e-3).apply(lm)
    c = _weight_edit(lm, down1, scale=3e-3).apply(lm)
    lm.edits.label(b, 3)
    stack = [a, wrapper, grace, b, c]
    assert list(lm.edits) == stack
    edited = _state(lm)
    ids = lm.tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    with torch.no_grad():
        served = lm.model(ids).logits
    re_added = []
    original_apply = WeightEdit.apply
    monkeypatch.setattr(WeightEdit, "apply", lambda self, *a, **k: re_added.append(self) or original_apply(self, *a, **k))
    for _ in range(2):  # twice: the edits rejoined as if applied
        with lm.edits.suspended(lm=lm):
            assert not lm.edits and _same(_state(lm), base)
            assert lm.edits.route(["The Eiffel Tower"]) == ["The Eiffel Tower"]
        assert list(lm.edits) == stack and lm.edits.labelled() == [(3, b)]
        assert all(e.is_applied for e in stack) and _same(_state(lm), edited)
        with torch.no_grad():
            assert torch.equal(lm.model(ids).logits, served)  # the adaptor serves again
    with lm.edits.suspended([b, c], lm=lm):  # an explicit top run takes the same path
        assert list(lm.edits) == [a, wrapper, grace]
        assert torch.equal(lm.model.state_dict()[down0], _added(base[down0], down0, a))  # a's value alone
    assert re_added == [] and list(lm.edits) == stack and _same(_state(lm), edited)
    monkeypatch.setattr(WeightEdit, "apply", original_apply)
    for edit in reversed(stack):
        edit.undo()
    assert not lm.edits and _same(_state(lm), base)


def test_a_block_that_changes_the_model_gets_every_delta_re_added(lm):
    """When the block leaves an edit applied, or writes the weights, the suspended edits are re-applied one by
    one on top (what undo-then-apply always gave), not overwritten by the saved values."""
    down0 = "model.layers.0.mlp.down_proj.weight"
    base = lm.model.state_dict()[down0].clone()
    a = _weight_edit(lm, down0).apply(lm)
    b = _weight_edit(lm, down0, scale=2e-3).apply(lm)
    inner = _weight_edit(lm, down0, scale=5e-3)
    with lm.edits.suspended(lm=lm):
        inner.apply(lm)  # left applied
    assert list(lm.edits) == [inner, a, b]
    assert torch.equal(lm.model.state_dict()[down0], _added(base, down0, inner, a, b))
    for edit in (b, a, inner):
        edit.undo()
    a.apply(lm)
    b.apply(lm)
    with lm.edits.suspended(lm=lm), torch.no_grad():
        dict(lm.model.named_parameters())[down0].add_(1.0)  # the block writes the weights itself
    assert list(lm.edits) == [a, b]
    assert torch.equal(lm.model.state_dict()[down0], _added(base + 1.0, down0, a, b))
    b.undo()
    a.undo()
    assert torch.equal(lm.model.state_dict()[down0], base + 1.0)


def test_suspending_edits_that_are_not_the_top_undoes_them_one_by_one(lm):
    down0, down1 = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    a = _weight_edit(lm, down0).apply(lm)
    b = _weight_edit(lm, down0, scale=2e-3).apply(lm)
    c = _weight_edit(lm, down1, scale=3e-3).apply(lm)
    edited = _state(lm)
    with pytest.raises(LMEditError, match="undo them first"):  # a is under b on the same parameter
        with lm.edits.suspended([a], lm=lm):
            pass
    assert list(lm.edits) == [a, b, c] and _same(_state(lm), edited)
    with lm.edits.suspended([b], lm=lm):  # not the top (c is), but nothing above it shares its parameter
        assert list(lm.edits) == [a, c]
    assert list(lm.edits) == [a, c, b] and _same(_state(lm), edited)
    for edit in (b, c, a):
        edit.undo()


def test_ledger_ids_live_on_the_stack(lm, tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    edit = _weight_edit(lm, "model.layers.1.mlp.down_proj.weight")
    result = ledger.record(lm, edit, force=True)
    assert result.recorded
    assert lm.edits.ledger == str(ledger.path) and lm.edits.labelled() == [(result.edit_id, edit)]
    # A second Ledger object on the same directory sees the model as already in its state: no rebuild.
    again = Ledger(tmp_path / "ledger")
    assert again.apply(lm) == [result.edit_id] and list(lm.edits) == [edit]
    again.detach(lm)
    assert not lm.edits and lm.edits.ledger == str(ledger.path)
    # An edit applied outside the ledger is seen by another ledger as foreign.
    outside = _weight_edit(lm, "model.layers.2.mlp.down_proj.weight").apply(lm)
    with pytest.raises(LMEditError, match="outside this ledger"):
        Ledger(tmp_path / "other").apply(lm)
    outside.undo()


def test_every_edit_kind_declares_one_metadata_record_and_saves_it(lm, tmp_path):
    from lmedit.editors import EditMeta, get_editor, load_edit

    weight = _weight_edit(lm, "model.layers.0.mlp.down_proj.weight")
    weight.info["loss"] = 0.5
    wrapper = get_editor("serac", {"encoder": "lexical", "threshold": 0.3}).edit(lm, [REQUEST])
    for edit in (weight, wrapper):
        meta = edit.meta
        assert isinstance(meta, EditMeta) and meta.kind == edit.kind
        assert meta.requests == (REQUEST,) and meta.base_fingerprint == lm.fingerprint
        loaded = load_edit(edit.save(tmp_path / f"{edit.kind}.safetensors"))
        assert loaded.meta == meta  # one envelope: the same record comes back for either kind
