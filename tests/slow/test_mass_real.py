"""MEMIT and AlphaEdit on the real default model with their gemma3-270m configs. Slow: real weights on CPU."""


import pytest
import torch

from lmedit.editors import get_editor
from lmedit.eval.datasets.starter import starter_requests
from lmedit.scoring import score_targets
from lmedit.types import EditRequest
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow
CONFIGS = CONFIG_ROOT
CASES = ("capital-0", "landmark_city-0", "official_language-0")  # France→Rome, Eiffel Tower→Rome, Brazil→French


def _requests() -> list[EditRequest]:
    return starter_requests(*CASES)


def _margins(lm, requests) -> list[float]:
    """log P(target_new) − log P(target_true) on each edit prompt."""
    scores = score_targets(lm, [r.text for r in requests] * 2,
                           [r.target_new for r in requests] + [r.target_true for r in requests])
    n = len(requests)
    return [scores[i].logprob - scores[i + n].logprob for i in range(n)]


def test_memit_edits_two_facts_in_one_call(gemma):
    requests = _requests()[:2]
    snapshot = {k: v.clone() for k, v in gemma.model.state_dict().items()}
    before = _margins(gemma, requests)
    assert all(m < 0 for m in before), before
    edit = get_editor("memit", CONFIGS / "memit" / "gemma3-270m.yaml").edit(gemma, requests)
    assert edit.info["targets"] == "values" and edit.info["layers"] == [2, 3, 4, 5]
    with edit.applied(gemma):
        after = _margins(gemma, requests)
    assert all(m > 0 for m in after), after
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items())


def test_alphaedit_second_edit_keeps_the_first(gemma):
    first, second = _requests()[:2]
    editor = get_editor("alphaedit", CONFIGS / "alphaedit" / "gemma3-270m.yaml")
    one = editor.edit(gemma, [first]).apply(gemma)
    try:
        held = _margins(gemma, [first])[0]
        two = editor.edit(gemma, [second]).apply(gemma)
        try:
            assert all(item["preserved_edit_keys"] == 1 for item in two.info["per_layer"])
            still, new = _margins(gemma, [first, second])
        finally:
            two.undo()
    finally:
        one.undo()
    assert held > 0 and new > 0, (held, new)
    assert still > 0.5 * held, f"the second edit eroded the first: {held:.2f} -> {still:.2f}"
