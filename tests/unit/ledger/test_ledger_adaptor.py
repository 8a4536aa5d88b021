"""Adaptor edits (GRACE's codebook) in the ledger on a tiny model: recorded, audited, reverted, re-applied, rebuilt
from their patch files; `export_model` refuses them, saying a codebook cannot be merged into weights."""

import pytest
import torch
from ledger_helpers import LENIENT, REQUESTS, random_edit, same_weights, snapshot

from lmedit.editors.grace import GraceEdit
from lmedit.ledger import Ledger, LedgerError
from lmedit.scoring import next_token_logprobs
from lmedit.testing import tiny_lm

SETTINGS = {"layer": 1, "eps": 0.1, "lr": 1.0, "steps": 20}


def test_a_grace_edit_is_kept_reverted_reapplied_and_not_exported(tmp_path, lm):
    prompt = REQUESTS[0].text
    base_weights, base_logprobs = snapshot(lm), next_token_logprobs(lm, [prompt])
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    commit = ledger.edit(lm, REQUESTS[0], "grace", config=SETTINGS)
    assert commit.recorded and ledger.entry(1).kind == "adaptor" and ledger.entry(1).method == "grace"
    assert commit.report.checks["efficacy"].value is not None
    assert isinstance(ledger.load_edit(1), GraceEdit) and ledger.audit(1, lm).checks["efficacy"].value is not None
    edited = next_token_logprobs(lm, [prompt])
    assert not torch.equal(edited, base_logprobs) and same_weights(snapshot(lm), base_weights)

    ledger.record(lm, random_edit(lm, REQUESTS[1], seed=0))  # a weight edit after it
    ledger.revert(1, lm, audit=False)
    assert [e.kind for e in lm.edits] == ["weight"]
    ledger.revert(2, lm, audit=False)
    assert not lm.edits and torch.equal(next_token_logprobs(lm, [prompt]), base_logprobs)
    ledger.reapply(1, lm, audit=False)
    assert torch.equal(next_token_logprobs(lm, [prompt]), edited)

    fresh = tiny_lm("llama")  # rebuilt from the patch files alone
    ledger.apply(fresh)
    assert torch.equal(next_token_logprobs(fresh, [prompt]), edited)
    with pytest.raises(LedgerError, match=r"1 \(adaptor\).*grace.*codebook.*cannot be merged into the weights"):
        ledger.export_model(lm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
