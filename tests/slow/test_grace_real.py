"""GRACE on the real default model with its shipped gemma3-270m settings. Slow: real weights on CPU."""

import pytest
import torch

from lmedit.editors import get_editor
from lmedit.eval.datasets.starter import starter_requests
from lmedit.scoring import score_targets
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow


def test_a_starter_fact_flips_a_neighbour_is_untouched_and_undo_is_exact(gemma):
    editor = get_editor("grace", CONFIG_ROOT / "grace" / "gemma3-270m.yaml")
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
    assert kept_after == kept, "the neighbour prompt's scores changed: its keys matched the entry"
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items())
    assert scores() == (margin, kept), "undo is not exact"
