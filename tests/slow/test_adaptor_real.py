"""The adaptor editors (GRACE, WISE) on the real default model with their shipped gemma3-270m settings. Slow."""

import pytest
import torch

from lmedit.editors import get_editor
from lmedit.eval.datasets.starter import starter_requests
from lmedit.scoring import score_targets
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_a_starter_fact_flips_a_neighbour_is_untouched_and_undo_is_exact(method, gemma):
    editor = get_editor(method, CONFIG_ROOT / method / "gemma3-270m.yaml")
    request, = starter_requests("capital-0")  # France's capital -> Rome
    neighbour = "The capital of Germany is the city of"
    snapshot = {k: v.clone() for k, v in gemma.model.state_dict().items()}

    def scores():  # log P(target_new) − log P(target_true) on the edit prompt; the neighbour's Berlin, Rome
        new, true, berlin, rome = score_targets(gemma, [request.text] * 2 + [neighbour] * 2,
                                                [request.target_new, request.target_true, "Berlin", "Rome"])
        return new.logprob - true.logprob, (berlin.logprob, rome.logprob)

    margin, kept = scores()
    assert margin < 0, f"the unedited model should prefer {request.target_true!r}: {margin}"
    edit = editor.edit(gemma, [request])
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items()), "edit() wrote weights"
    with edit.applied(gemma):
        after, kept_after = scores()
    assert after > 0, f"efficacy failed: margin {margin:.2f} -> {after:.2f}"
    # GRACE: the neighbour's keys must not match the entry; WISE: the router must keep it on the main memory
    assert kept_after == kept, f"{method}: the neighbour prompt's scores changed"
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items())
    assert scores() == (margin, kept), "undo is not exact"


def test_wise_edits_made_in_sequence_share_a_memory_and_undo_restores_each_earlier_state(gemma):
    """Two starter facts edited one after another with gemma3-270m's shipped WISE settings: the second is trained
    into the first's side memory; both flip with both applied; undoing the second gives back exactly the first
    alone, and undoing both restores the model bit for bit. (Undone in the other order, the second's increment is
    left without the first's, on top of which it was trained: see docs/editors.md, "WISE".)"""
    editor = get_editor("wise", CONFIG_ROOT / "wise" / "gemma3-270m.yaml")
    first_request, = starter_requests("capital-0")
    second_request, = starter_requests("landmark_city-0")
    requests = [first_request, second_request]
    unedited = _margins(gemma, requests)
    assert max(unedited) < 0, f"the unedited model should prefer the true targets: {unedited}"
    first = editor.edit(gemma, [first_request]).apply(gemma)
    first_only = _margins(gemma, requests)
    assert first_only[0] > 0, f"the first edit alone: {first_only}"
    second = editor.edit(gemma, [second_request]).apply(gemma)
    assert second.memory == first.memory and not second.founder and second.info["memory_edits_before"] == 1
    both = _margins(gemma, requests)
    assert min(both) > 0, f"with both applied: {both}"
    second.undo()
    assert _margins(gemma, requests) == first_only
    first.undo()
    assert not gemma.edits and _margins(gemma, requests) == unedited


def _margins(lm, requests):
    """log P(target_new) − log P(target_true) on each request's prompt."""
    texts = [r.text for r in requests for _ in range(2)]
    targets = [t for r in requests for t in (r.target_new, r.target_true)]
    scores = score_targets(lm, texts, targets)
    return [scores[2 * i].logprob - scores[2 * i + 1].logprob for i in range(len(requests))]
