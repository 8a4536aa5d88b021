"""The evaluation harness end to end on the real default model: ROME single, FT-L sequential (starter facts).

ROME runs with the default model's config file (its layer chosen from tracing evidence, so no tracing runs
here; statistics cached after the first run).
"""

from __future__ import annotations


import pytest
import torch

from lmedit.eval import evaluate, load_dataset
from lmedit.settings import CONFIG_ROOT

ROME_SETTINGS = str(CONFIG_ROOT / "rome" / "gemma3-270m.yaml")


@pytest.mark.slow
def test_rome_on_starter_facts_single_and_sequential(gemma, tmp_path):
    starter = load_dataset("starter")
    before = {k: v.clone() for k, v in gemma.model.state_dict().items()}

    # Generation on (the fluency and derailment metrics), 4 tokens instead of the default 16 to keep this short.
    single = evaluate(gemma, starter, "rome", limit=1, editor_config=ROME_SETTINGS, n_bootstrap=200,
                      generation_tokens=4, out_dir=tmp_path / "single")
    unedited = single.summary["unedited"]["metrics"]
    edited = single.summary["edited"]["metrics"]
    # The default model knows these facts: it prefers target_true before the edit, target_new after.
    assert unedited["efficacy_score"]["mean"] == 0.0 and unedited["neighborhood_score"]["mean"] >= 0.8
    assert edited["efficacy_score"]["mean"] == 1.0 and edited["efficacy_magnitude"]["mean"] > 0.5
    assert edited["neighborhood_kl"]["mean"] > 0.0

    assert edited["fluency"]["mean"] > 0 and edited["derailment"]["mean"] is not None
    # sequential: the machinery (re-measuring earlier edits, drift, health) on the real model, with FT-L's shipped
    # settings (a second per edit; ROME's own real-model edits are tested elsewhere) and without generation
    sequential = evaluate(gemma, starter, "ft_l", limit=2, mode="sequential", checkpoint_every=1, n_drift=1,
                          n_bootstrap=200, generation_tokens=0, out_dir=tmp_path / "sequential")
    assert sequential.summary["run"]["settings"].startswith("shipped for gemma3-270m")
    last = [r for r in sequential.rows if r.get("kind") == "edited" and r["n_edits"] == 2]
    assert len(last) == 2  # the first edit is re-measured after the second
    assert sequential.summary["edited"]["metrics"]["efficacy_score"]["mean"] >= 0.5
    assert [p["n_edits"] for p in sequential.summary["drift_curves"]["rewrite_kl"]] == [1, 2]

    after = gemma.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
