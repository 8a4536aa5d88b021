"""LoRA on the real default model with its shipped gemma3-270m settings. Slow: real weights on CPU."""

import pytest
import torch

from lmedit.editors import get_editor
from lmedit.eval.datasets.starter import starter_requests
from lmedit.scoring import score_targets
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow


def test_a_starter_fact_flips_with_the_gemma_settings_and_undo_is_bit_exact(gemma):
    editor = get_editor("lora", CONFIG_ROOT / "lora" / "gemma3-270m.yaml")
    request, = starter_requests("capital-0")  # France's capital -> Rome
    snapshot = {k: v.clone() for k, v in gemma.model.state_dict().items()}

    def margin() -> float:  # log P(target_new) − log P(target_true) on the edit prompt
        new, true = score_targets(gemma, [request.text] * 2, [request.target_new, request.target_true])
        return new.logprob - true.logprob

    before = margin()
    assert before < 0, f"the unedited model should prefer {request.target_true!r}: {before}"
    edit = editor.edit(gemma, [request])
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items()), "edit() wrote weights"
    (name, delta), = edit.deltas.items()
    assert delta.rank == editor.config.rank and edit.info["layers"] == list(editor.config.layers)
    with edit.applied(gemma):
        after = margin()
    assert after > 0, f"efficacy failed: margin {before:.2f} -> {after:.2f}"
    assert all(torch.equal(snapshot[k], v) for k, v in gemma.model.state_dict().items()), "undo is not bit-exact"
