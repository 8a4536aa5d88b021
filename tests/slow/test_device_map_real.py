"""The default model with blocks offloaded to disk by accelerate edits and traces like the model loaded whole."""

from __future__ import annotations

import torch

import lmedit
from lmedit.models import params
from lmedit.scoring import next_token_logprobs
from lmedit.testing import disk_map
from lmedit.tracing.single import trace

EIFFEL = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PROMPTS = ["The Eiffel Tower is located in the city of", "The Louvre is located in the city of"]


def test_offloaded_default_model_edits_and_traces_like_the_whole_one(gemma, gemma_eiffel_edit):
    placed = lmedit.load("gemma3-270m", device_map=disk_map(gemma, range(2, 6)))  # ROME's and MEMIT's layers
    name = next(iter(gemma_eiffel_edit.deltas))
    assert params.is_offloaded(placed.model, name) and placed.fingerprint == gemma.fingerprint
    torch.testing.assert_close(next_token_logprobs(placed, PROMPTS), next_token_logprobs(gemma, PROMPTS),
                               rtol=0, atol=1e-4)
    # ROME with the shipped settings: the same update (float32 noise over the v* optimisation), the same model after
    edit = lmedit.edit(placed, EIFFEL, apply=False)
    ours, theirs = edit.deltas[name].full(), gemma_eiffel_edit.deltas[name].full()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4
    with edit.applied(placed), gemma_eiffel_edit.applied(gemma):
        torch.testing.assert_close(next_token_logprobs(placed, PROMPTS), next_token_logprobs(gemma, PROMPTS),
                                   rtol=0, atol=1e-3)
    assert torch.equal(params.read(placed.model, name), params.read(gemma.model, name))  # undo: bit for bit
    # MEMIT at the shipped layers 2-5 (all offloaded) and statistics, with fewer steps and prefixes to save time
    memit = {"layers": [2, 3, 4, 5], "mom2_weight": 500.0, "corpus": "sampled", "corpus_tokens": 5000,
             "v_steps": 6, "prefixes": 2}
    memit_placed = lmedit.edit(placed, EIFFEL, "memit", config=memit, apply=False)
    memit_whole = lmedit.edit(gemma, EIFFEL, "memit", config=memit, apply=False)
    for param, delta in memit_whole.deltas.items():
        assert ((memit_placed.deltas[param].full() - delta.full()).norm() / delta.full().norm()).item() < 1e-4
    # causal tracing through the offloaded blocks (the subject's tokens only, to save time)
    a = trace(placed, PROMPTS[0], "The Eiffel Tower", samples=2, tokens=[1, 2, 3])
    b = trace(gemma, PROMPTS[0], "The Eiffel Tower", samples=2, tokens=[1, 2, 3])
    assert torch.isfinite(torch.as_tensor(b.scores)[1:4]).all()
    torch.testing.assert_close(torch.as_tensor(a.scores), torch.as_tensor(b.scores), rtol=0, atol=1e-4, equal_nan=True)
