"""MEND on the real built-in models: the training pipeline, checkpoint and edit path on real weights. Slow: CPU."""

import json
from pathlib import Path

import pytest
import torch

import lmedit
from lmedit.config import load_config
from lmedit.editors.mend.config import MendConfig
from lmedit.editors.mend.editor import MendEditor, gradient_pieces, request_rows
from lmedit.eval.datasets import load_dataset
from lmedit.tokens import prompt_ids, target_ids
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
TRAIN = ROOT / "tests" / "data" / "counterfact" / "easyedit-train-40.json"
EIFFEL = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def test_gemma_bos_contributes_no_piece(gemma):
    # Gemma prepends <bos>, whose activations are the same for every prompt: an edit piece there would reach every input.
    ids = prompt_ids(gemma, EIFFEL.text)
    assert ids[0] == gemma.tokenizer.bos_token_id
    pieces, _ = gradient_pieces(gemma, [17], request_rows(gemma, [EIFFEL]))
    assert pieces.u[17].shape == (len(ids) - 1 + len(target_ids(gemma, "Rome")) - 1, 2048)
    assert torch.isfinite(pieces.delta[17]).all() and pieces.delta[17].abs().sum() > 0


def test_smollm_train_three_steps_then_edit(smollm, tmp_path):
    # Three steps are no training; this checks the pipeline on a real model (the tail start after 27 frozen
    # blocks, checkpoint metadata, editing through the checkpoint). docs/mend.md has the learning curves.
    assert TRAIN.exists(), f"the CounterFact train split is expected at {TRAIN}"
    records = load_dataset("counterfact", TRAIN, limit=40).records
    config = load_config(MendConfig, CONFIG_ROOT / "mend" / "smollm2-135m.yaml",
                         ["steps=3", "val_size=4", "val_every=3"])
    editor = MendEditor(config)
    summary = editor.fit(smollm, records, out_dir=tmp_path / "run")
    assert summary["steps"] == 3 and summary["final"]["pre_edit_nll"] > 0
    meta = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert meta["base_fingerprint"] == smollm.fingerprint and [h["step"] for h in meta["history"]] == [0, 3]

    snapshot = {k: v.clone() for k, v in smollm.model.state_dict().items()}
    edit = editor.edit(smollm, [EIFFEL])
    assert all(torch.equal(v, smollm.model.state_dict()[k]) for k, v in snapshot.items())
    assert set(edit.deltas) == {smollm.arch.param_name(smollm.model, l, "mlp_out") for l in (27, 28, 29)}
    with edit.applied(smollm):
        assert not torch.equal(snapshot[next(iter(edit.deltas))], smollm.model.state_dict()[next(iter(edit.deltas))])
    assert all(torch.equal(v, smollm.model.state_dict()[k]) for k, v in snapshot.items())
