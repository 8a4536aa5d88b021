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
