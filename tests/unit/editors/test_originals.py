"""What weight edits keep for their bit-exact undo (lmedit.editors.originals): a copy per `KEEP_EVERY` edits of a
parameter, the values between rebuilt from the edits below and checked by digest."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.editors import ParamDelta, WeightEdit
from lmedit.editors.originals import KEEP_EVERY, Chained, digest
from lmedit.errors import LMEditError
from lmedit.testing import tiny_lm

DOWN0, DOWN1 = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture
def lm():
    return tiny_lm("llama")


def _edit(lm, seed: int, *params: str, rank: int | None = None) -> WeightEdit:
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in params:
        rows, cols = lm.model.get_parameter(name).shape
        if rank is None:
            deltas[name] = ParamDelta(dense=1e-2 * torch.randn(rows, cols, generator=gen))
        else:
            deltas[name] = ParamDelta(left=1e-2 * torch.randn(rows, rank, generator=gen),
                                      right=torch.randn(cols, rank, generator=gen))
    return WeightEdit(deltas=deltas, requests=(REQUEST,), method="test", base_fingerprint=lm.fingerprint)


def _value(lm, name):
    return lm.model.get_parameter(name).detach().clone()


def test_a_long_run_of_edits_keeps_one_copy_per_keep_every_and_undoes_bit_for_bit(lm):
    n = 2 * KEEP_EVERY + 5
    states, edits = [], []
    for i in range(n):
        states.append((_value(lm, DOWN0), _value(lm, DOWN1)))
        params = (DOWN0, DOWN1) if i % 3 == 0 else (DOWN0,)
        edits.append(_edit(lm, i, *params, rank=None if i % 2 else 2).apply(lm))
    copies = sum(isinstance(e._originals[DOWN0], torch.Tensor) for e in edits)
    assert copies == -(-n // KEEP_EVERY)  # the first edit, then every KEEP_EVERY-th
    assert [isinstance(e._originals[DOWN0], torch.Tensor) for e in edits[:KEEP_EVERY + 1]] == \
        [True] + [False] * (KEEP_EVERY - 1) + [True]
    # The chain of the other parameter (every third edit) counts its own edits.
    assert sum(isinstance(e._originals[DOWN1], torch.Tensor) for e in edits if DOWN1 in e.deltas) == \
        -(-len(edits[::3]) // KEEP_EVERY)
    assert isinstance(edits[n - 2]._originals[DOWN0], Chained)
    for i in reversed(range(n)):  # each undo gives back exactly the value before that edit
        assert torch.equal(edits[i].original(DOWN0), states[i][0])
        edits[i].undo()
        if i == n - 1:  # the values rebuilt on the way are kept by the edits below, down to the nearest copy
            last_copy = (n - 1) // KEEP_EVERY * KEEP_EVERY
            assert all(DOWN0 in e._rebuilt for e in edits[last_copy + 1:n - 1])
            assert not any(DOWN0 in e._rebuilt for e in edits[:last_copy + 1])  # the copy and below: not rebuilt
        assert torch.equal(_value(lm, DOWN0), states[i][0]) and torch.equal(_value(lm, DOWN1), states[i][1])
    assert not lm.edits


def test_a_value_written_outside_the_edits_is_copied_not_chained(lm):
    a = _edit(lm, 0, DOWN0).apply(lm)
    with torch.no_grad():
        lm.model.get_parameter(DOWN0).add_(0.5)  # something other than an edit writes the weights
    changed = _value(lm, DOWN0)
    b = _edit(lm, 1, DOWN0).apply(lm)
    assert isinstance(b._originals[DOWN0], torch.Tensor)  # the edit below did not write this value
    c = _edit(lm, 2, DOWN0).apply(lm)
    assert isinstance(c._originals[DOWN0], Chained)
    c.undo()
    b.undo()
    assert torch.equal(_value(lm, DOWN0), changed)
    a.undo()


def test_a_value_that_does_not_rebuild_is_refused_and_nothing_is_written(lm):
    a = _edit(lm, 0, DOWN0).apply(lm)
    b = _edit(lm, 1, DOWN0).apply(lm)
    assert isinstance(b._originals[DOWN0], Chained)
    edited = _value(lm, DOWN0)
    saved = a.deltas[DOWN0].dense.clone()
    a.deltas[DOWN0].dense.mul_(2.0)  # a's delta changed in place after it was applied
    with pytest.raises(LMEditError, match="does not rebuild exactly"):
        b.undo()
    assert torch.equal(_value(lm, DOWN0), edited) and list(lm.edits) == [a, b]
    a.deltas[DOWN0].dense.copy_(saved)
    b.undo()
    a.undo()
    assert not lm.edits


def test_suspending_the_top_of_a_chain_gives_the_value_below_it(lm):
    base = _value(lm, DOWN0)
    edits = [_edit(lm, i, DOWN0).apply(lm) for i in range(6)]
    below = _value(lm, DOWN0)
    top = [_edit(lm, 10 + i, DOWN0, rank=1).apply(lm) for i in range(3)]
    edited = _value(lm, DOWN0)
    assert isinstance(top[0]._originals[DOWN0], Chained)  # rebuilt from the six below
    with lm.edits.suspended(top, lm=lm):
        assert torch.equal(_value(lm, DOWN0), below) and list(lm.edits) == edits
    assert torch.equal(_value(lm, DOWN0), edited) and list(lm.edits) == edits + top
    assert digest(edited) == top[-1]._wrote[DOWN0][0]  # the next edit still chains onto the last one
    with lm.edits.suspended(lm=lm):
        assert torch.equal(_value(lm, DOWN0), base) and not lm.edits
    for edit in reversed(edits + top):
        edit.undo()
    assert torch.equal(_value(lm, DOWN0), base)


def test_bfloat16_weights_chain_and_undo_bit_for_bit():
    lm = tiny_lm("llama")
    lm.model.to(torch.bfloat16)
    base = _value(lm, DOWN0)
    edits = [_edit(lm, i, DOWN0).apply(lm) for i in range(4)]
    assert _value(lm, DOWN0).dtype == torch.bfloat16
    assert [isinstance(e._originals[DOWN0], Chained) for e in edits] == [False, True, True, True]
    for edit in reversed(edits):
        edit.undo()
    assert torch.equal(_value(lm, DOWN0), base)


def test_a_trial_apply_and_undo_before_each_apply_keeps_nothing_extra(lm):
    """The destructive-edit check applies an edit, measures, undoes it, then the edit is applied for good: the
    values that undo rebuilt go when the parameter is next written, so memory stays one copy per KEEP_EVERY."""
    base = _value(lm, DOWN0)
    edits = []
    for i in range(KEEP_EVERY + 4):
        edit = _edit(lm, i, DOWN0)
        edit.apply(lm)
        edit.undo()  # the trial
        edit.apply(lm)
        edits.append(edit)
        assert not any(e._rebuilt for e in edits)
    assert sum(isinstance(e._originals[DOWN0], torch.Tensor) for e in edits) == 2
    for edit in reversed(edits):
        edit.undo()
    assert torch.equal(_value(lm, DOWN0), base)


def test_lmedit_edit_with_its_destructive_check_chains_the_old_values(lm):
    """Through `lmedit.edit` (which checks each edit on the model before applying it), sequential edits keep
    copies only every KEEP_EVERY edits."""
    edits = [lmedit.edit(lm, lmedit.EditRequest("{} is located in", f"Subject {i}", "Rome", "Paris"),
                         method="rome", config={"layer": 1}) for i in range(4)]
    name = next(iter(edits[0].deltas))
    assert [isinstance(e._originals[name], Chained) for e in edits] == [False, True, True, True]
    assert not any(e._rebuilt for e in edits)
    for edit in reversed(edits):
        edit.undo()


def test_a_trial_apply_keeps_a_copy_so_its_undo_rebuilds_nothing(lm, monkeypatch):
    """Editors' intermediate steps and the destructive-edit check apply with `trial=True`: the step keeps a
    copy, and undoing it neither rebuilds a value nor leaves one behind on the edits below."""
    import lmedit.editors.base as base

    edits = [_edit(lm, i, DOWN0).apply(lm) for i in range(5)]
    before = _value(lm, DOWN0)
    rebuilt = []
    monkeypatch.setattr(base, "rebuild", lambda *a: rebuilt.append(1) or None)
    step = _edit(lm, 9, DOWN0).apply(lm, trial=True)
    assert isinstance(step._originals[DOWN0], torch.Tensor)
    step.undo()
    assert rebuilt == [] and torch.equal(_value(lm, DOWN0), before) and not any(e._rebuilt for e in edits)
    chained = _edit(lm, 10, DOWN0).apply(lm)  # not a trial: chained, and its undo rebuilds
    assert isinstance(chained._originals[DOWN0], Chained)
    monkeypatch.undo()
    chained.undo()
    for edit in reversed(edits):
        edit.undo()
