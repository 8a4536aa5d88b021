"""The ledger on tiny models: record, revert one edit among many (bit-exact rebuild, re-audit), re-apply,
base-model checks, tampered patches, wrapper edits."""

import pytest
import torch
from ledger_helpers import LENIENT, REQUESTS, random_edit, same_weights, snapshot

import lmedit
from lmedit.editors.base import load_edit
from lmedit.editors.wrapper import WrapperEdit
from lmedit.ledger import Ledger, LedgerError
from lmedit.testing import tiny_lm


def _three_rome_edits(tmp_path, lm, rome_config) -> Ledger:
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    for request in REQUESTS:
        assert ledger.edit(lm, request, "rome", config=rome_config).recorded
    return ledger


def test_public_api_exports_ledger():
    assert lmedit.Ledger is Ledger


def test_record_keeps_requests_patches_and_audits(tmp_path, lm, rome_config):
    base = snapshot(lm)
    ledger = _three_rome_edits(tmp_path, lm, rome_config)
    rows = ledger.entries()
    assert [r.id for r in rows] == [1, 2, 3] and {r.state for r in rows} == {"applied"}
    assert [r.requests[0]["subject"] for r in rows] == [q.subject for q in REQUESTS]
    assert {r.method for r in rows} == {"rome"} and rows[0].config["layer"] == 1
    assert ledger.base_fingerprint == lm.fingerprint and ledger.model == lm.name
    for row in rows:
        assert (ledger.path / "patches" / row.patch).stat().st_size == row.patch_bytes
        (reason, report), = ledger.reports(row.id)
        assert reason == "commit" and report.reference == "previous state"
        assert report.checks["efficacy"].value is not None and report.checks["essence_drift"].value is not None
        assert {p["group"] for p in report.probes} >= {"rewrite", "paraphrase", "neighborhood", "neighborhood_plus"}
    # the model now holds the three patches, applied in order on the base
    fresh = tiny_lm("llama")
    for row in rows:
        ledger.load_edit(row.id).apply(fresh)
    assert same_weights(snapshot(fresh), snapshot(lm)) and not same_weights(base, snapshot(lm))


def test_revert_in_the_middle_is_base_plus_remaining_patches_bit_for_bit(tmp_path, lm, rome_config):
    ledger = _three_rome_edits(tmp_path, lm, rome_config)
    result = ledger.revert(2, lm)
    assert result.remaining == [1, 3] and ledger.entry(2).state == "reverted"

    expected = tiny_lm("llama")
    for edit_id in (1, 3):  # the remaining patches on a fresh copy of the base, in order
        lmedit.load_edit(ledger.path / "patches" / ledger.entry(edit_id).patch).apply(expected)
    assert same_weights(snapshot(expected), snapshot(lm))

    # the remaining edits were re-audited against the base model, and the reports stored
    assert set(result.reports) == {1, 3}
    for edit_id, report in result.reports.items():
        assert report.reference == "base model"
        assert ledger.reports(edit_id)[-1][0] == "revert 2"
        assert report.checks["efficacy"].value == 1.0  # ROME's edits still hold on the tiny model
    assert result.broken == []
    with pytest.raises(LedgerError, match="already reverted"):
        ledger.revert(2, lm)


def test_reapply_restores_the_original_order(tmp_path, lm, rome_config):
    ledger = _three_rome_edits(tmp_path, lm, rome_config)
    all_three = snapshot(lm)
    ledger.revert(2, lm, audit=False)
    result = ledger.reapply(2, lm)
    assert ledger.applied_ids() == [1, 2, 3] and set(result.reports) == {1, 2, 3}
    assert same_weights(all_three, snapshot(lm))
    ledger.detach(lm)
    assert same_weights(snapshot(tiny_lm("llama")), snapshot(lm))
    ledger.apply(lm)
    assert same_weights(all_three, snapshot(lm))
    # reverting them all gives the base model back, bit for bit
    for edit_id in (3, 1, 2):
        ledger.revert(edit_id, lm, audit=False)
    assert same_weights(snapshot(tiny_lm("llama")), snapshot(lm))


def test_revert_without_a_model_only_marks_the_edit(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    result = ledger.revert(1)
    assert result.reports == {} and ledger.applied_ids() == []
    fresh = tiny_lm("llama")
    assert ledger.apply(fresh) == [] and same_weights(snapshot(fresh), snapshot(tiny_lm("llama")))


def test_another_model_is_refused(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    other = tiny_lm("llama", seed=1)
    with pytest.raises(LedgerError, match="model hash mismatch"):
        ledger.apply(other)
    with pytest.raises(LedgerError, match="hash"):
        ledger.record(other, random_edit(other, REQUESTS[1], seed=1))
    assert len(ledger.entries()) == 1


def test_same_sampled_hash_but_other_bits_is_refused(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    edit = random_edit(lm, REQUESTS[0], seed=0)
    ledger.record(lm, edit)
    name = next(iter(edit.deltas))
    other = tiny_lm("llama")
    with torch.no_grad():
        dict(other.model.named_parameters())[name].view(-1)[1] += 1e-3  # index 1: outside the strided sample
    assert lmedit.models.load.weights_fingerprint(other.model) == other.weights_hash == lm.weights_hash
    with pytest.raises(LedgerError, match="different bits"):
        ledger.apply(other)


def test_edits_applied_outside_the_ledger_are_refused(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    other = tiny_lm("llama")
    random_edit(other, REQUESTS[1], seed=5).apply(other)
    with pytest.raises(LedgerError, match="outside this ledger"):
        ledger.apply(other)


def test_tampered_patch_is_refused(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    edit = random_edit(lm, REQUESTS[0], seed=0)
    ledger.record(lm, edit)
    other = random_edit(lm, REQUESTS[0], seed=9)
    other.save(ledger.path / "patches" / ledger.entry(1).patch)  # same name, other content
    with pytest.raises(LedgerError, match="changed on disk"):
        ledger.apply(tiny_lm("llama"))


def test_unknown_edit_id_is_a_clear_error(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    with pytest.raises(LedgerError, match=r"no edit 7 .*edits: \[1\]"):
        ledger.revert(7, lm)


def test_a_file_is_not_a_ledger(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(LedgerError, match="is a file"):
        Ledger(tmp_path / "x")


class MemoEdit(WrapperEdit, wrapper="ledger_test_memo"):
    """Test-only wrapper: prompts that mention a subject are read with "Note: {subject} → {target}." in front."""

    def __init__(self, requests, **common):
        super().__init__(**common)
        self._requests = tuple(requests)

    @property
    def requests(self):
        return self._requests

    def match(self, prompts):
        out = []
        for prompt in prompts:
            hit = next((r for r in self._requests if r.subject in prompt), None)
            out.append(None if hit is None else (1.0, f"Note: {hit.subject} {hit.target_new}. {prompt}"))
        return out

    def tensors(self):
        return {"marker": torch.zeros(1)}

    def metadata(self):
        return {"requests": [r.to_dict() for r in self._requests]}

    @classmethod
    def from_saved(cls, tensors, metadata, common):
        return cls([lmedit.EditRequest.from_dict(r) for r in metadata["requests"]], **common)


def test_wrapper_edits_are_kept_and_reverting_removes_the_memory_entry(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    memo = MemoEdit([REQUESTS[1]], base_fingerprint=lm.fingerprint, method="memo")
    commit = ledger.record(lm, memo)
    assert commit.recorded and ledger.entry(2).kind == "wrapper"
    prompt = REQUESTS[1].text
    assert lm.edits.route([prompt]) != [prompt]  # the memory entry answers this prompt
    assert isinstance(load_edit(ledger.path / "patches" / ledger.entry(2).patch), MemoEdit)

    result = ledger.revert(2, lm)
    assert lm.edits.route([prompt]) == [prompt]  # memory entry gone
    assert result.remaining == [1] and set(result.reports) == {1}
    with pytest.raises(LedgerError, match="not weight edits"):
        ledger.reapply(2, lm, audit=False)
        ledger.export_model(lm, tmp_path / "out")
