"""Fixtures for the evaluation tests: a test-only editor, a model with probabilities set by construction, data paths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lmedit.editors.base import Editor, EditorConfig, ParamDelta, WeightEdit
from lmedit.registry import editors
from lmedit.testing import tiny_lm
from lmedit.tokens import target_ids
from lmedit.types import EditRequest

TEST_DATA = Path(__file__).resolve().parents[2] / "data"  # samples with provenance: tests/data/README.md
TEST_EDITOR = "test_unembed"


def _param_name(lm, param: torch.nn.Parameter) -> str:
    return next(name for name, p in lm.model.named_parameters() if p is param)


class UnembedEditor(Editor[EditorConfig]):
    """Test-only: an unembedding delta making each token of target_new likely after the edit prompt.

    For target token j, with h_j the final-norm state that predicts it (teacher-forced), the delta adds
    BOOST * e_{t_j} (h_j / |h_j|^2)^T: the logit of t_j rises by BOOST at that position (rank = tokens).
    """

    BOOST = 40.0
    calls = 0

    def edit(self, lm, requests: Sequence[EditRequest]) -> WeightEdit:
        type(self).calls += 1
        weight = lm.model.get_output_embeddings().weight  # (d_vocab, d_model)
        lefts, rights = [], []
        for request in requests:
            prompt = lm.tokenizer(request.text)["input_ids"]
            target = target_ids(lm, request.target_new)
            ids = torch.tensor([prompt + target])
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # (pos, d_model)
            for j, token in enumerate(target):
                h = hidden[len(prompt) - 1 + j]
                left = torch.zeros(weight.shape[0])
                left[token] = self.BOOST
                lefts.append(left)
                rights.append(h / h.dot(h))
        delta = ParamDelta(left=torch.stack(lefts, 1), right=torch.stack(rights, 1))
        return WeightEdit(deltas={_param_name(lm, weight): delta}, requests=tuple(requests), method=TEST_EDITOR,
                          base_fingerprint=lm.fingerprint)


if TEST_EDITOR not in editors:
    editors.register(TEST_EDITOR)(UnembedEditor)


@pytest.fixture
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture
def constructed_lm():
    """A tiny GPT-2 whose next-token distribution is softmax(z) at every position, for a known z.

    The final LayerNorm's weight is zeroed and its bias set to e_0, so the unembedding input is e_0
    everywhere and the logits are column 0 of the (tied) unembedding, which we set to z.
    """
    lm = tiny_lm("gpt2", n_layers=1)
    model = lm.model
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(model.config.vocab_size, generator=generator) * 2.0
        model.get_output_embeddings().weight[:, 0] = z
    return lm, z.clone()
