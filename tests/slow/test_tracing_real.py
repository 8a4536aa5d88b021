"""Causal tracing on the real built-in models (slow: loads checkpoints; about a minute on 2 CPU cores)."""

import pytest
import torch

from lmedit.tracing import trace

pytestmark = pytest.mark.slow


def test_space_needle_mlp_effect_peaks_in_middle_layers(gemma):
    # Only the last subject token is traced (n_layers restorations): the paper's early-site claim.
    result = trace(gemma, "The Space Needle is in downtown", "The Space Needle", "Seattle", kind="mlp",
                   tokens=[3, 6])
    torch.set_printoptions(precision=3, sci_mode=False, linewidth=200)
    print(result.tokens, "clean", result.clean_prob, "corrupted", result.corrupted_prob)
    print(result.grid)
    last_subject = result.subject_range[1]
    assert result.tokens[last_subject].strip() == "Needle"
    assert result.clean_prob > 0.3 and result.corrupted_prob < 0.1
    effect = result.effect[last_subject]  # (n_layers,)
    n_layers = effect.shape[0]
    peak = int(effect.argmax())
    assert 1 <= peak <= 2 * n_layers // 3, f"MLP effect peaks at layer {peak} of {n_layers}"
    assert effect[peak] > 0.1
    assert effect[-1].abs() < 0.02  # restoring the last MLPs at the subject does nothing


def test_smollm_trace_runs_and_restores(smollm):
    result = trace(smollm, "The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris",
                   samples=3, tokens=[3, 9])
    print(result.tokens, result.subject_range, result.clean_prob, result.corrupted_prob)
    assert result.clean_prob > result.corrupted_prob
    assert result.scores[-1][-1] == pytest.approx(result.clean_prob, rel=1e-4)
    last_subject = result.subject_range[1]
    assert max(result.scores[last_subject]) > result.corrupted_prob
