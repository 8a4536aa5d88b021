"""The lifelong and adaptor editors of #20 through the evaluation harness, in each mode, on a tiny model.

`lmedit eval --method M --mode {single,batch,sequential}` is `evaluate(..., mode=...)`; IKE and SERAC have
their own harness tests (tests/unit/editors/test_ike.py, test_serac.py), and the real-model runs are in
docs/editors.md. Each run must edit (the edit prompt's score moves) and leave the weights bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from test_editors import _config

from lmedit.eval import evaluate, load_dataset
from lmedit.testing import tiny_lm


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
@pytest.mark.parametrize("method", ["grace", "wise", "lora", "ft_m"])
def test_the_harness_runs_the_method_in_each_mode_and_restores_the_model(method, mode, tmp_path):
    lm = tiny_lm("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = evaluate(lm, load_dataset("starter"), method, limit=3, mode=mode, batch_size=2, checkpoint_every=3,
                      n_drift=0, n_bootstrap=20, generation_tokens=0, editor_config=_config(method, tmp_path))
    rows = [r for r in result.rows if r.get("kind", "edited") == "edited"]
    assert len(rows) == 3 and not result.summary["skipped"]["count"]
    assert all(r["edited"]["efficacy_magnitude"] != r["unedited"]["efficacy_magnitude"] for r in rows)
    if mode == "batch":
        assert sorted(r["n_edits"] for r in rows) == [1, 2, 2]
    if mode == "sequential":
        assert {r["n_edits"] for r in rows} == {3}
    after = lm.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not lm.edits.of_kind("weight") and not lm.edits.of_kind("adaptor")
