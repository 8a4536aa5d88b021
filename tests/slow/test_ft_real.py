"""FT, FT-L and FT-M on the real default model with their gemma3-270m configs. Slow: real weights on CPU."""


import pytest
import torch

from lmedit.editors import get_editor
from lmedit.eval.datasets.starter import starter_requests
from lmedit.scoring import score_targets
from lmedit.types import EditRequest
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow
CONFIGS = CONFIG_ROOT
CASES = ("capital-0", "official_language-0")  # France→Rome, Brazil→French


def _requests() -> list[EditRequest]:
    return starter_requests(*CASES)


def _margin(lm, request: EditRequest) -> float:
    """log P(target_new) − log P(target_true) on the edit prompt."""
    new, true = score_targets(lm, [request.text] * 2, [request.target_new, request.target_true])
    return new.logprob - true.logprob


@pytest.mark.parametrize("method", ["ft", "ft_l", "ft_m"])
def test_starter_facts_flip_with_the_gemma_config(method, gemma, capsys):
    editor = get_editor(method, CONFIGS / method / "gemma3-270m.yaml")
    snapshot = {k: v.clone() for k, v in gemma.model.state_dict().items()}
    margins = []
    for request in _requests():
        before = _margin(gemma, request)
        assert before < 0, f"the unedited model should prefer {request.target_true!r}: {before}"
        edit = editor.edit(gemma, [request])
        assert edit.info["losses"][-1] < edit.info["losses"][0]
        if method == "ft_m":  # FT-M takes every step: no early stop
            assert edit.info["steps"] == editor.config.steps
        if method == "ft_l":  # the L∞ bound holds on the real weights (float32 rounding aside)
            params = dict(gemma.model.named_parameters())
            for name, delta in edit.deltas.items():
                rounding = torch.finfo(torch.float32).eps * params[name].abs().max().item()
                assert delta.full().abs().max().item() <= editor.config.norm_constraint + rounding
        with edit.applied(gemma):
            after = _margin(gemma, request)
        margins.append((before, after))
        assert after > 0, f"{method}: efficacy failed for {request.subject!r}: margin {before:.2f} -> {after:.2f}"
    with capsys.disabled():
        print(f"\n{method} on gemma3-270m, log P(new) - log P(true) before -> after: {margins}")
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items()), "weights bit-identical"
