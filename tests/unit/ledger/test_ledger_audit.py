"""The audit gate: probes generated from a request, threshold levels, refusing a damaging edit, plots."""

import dataclasses

import pytest
from ledger_helpers import LENIENT, REQUESTS, random_edit, same_weights, snapshot

import lmedit
from lmedit.config import load_config
from lmedit.eval.health import probe_loss
from lmedit.ledger import AuditConfig, AuditReport, Ledger
from lmedit.ledger.audit import level_of
from lmedit.ledger.plots import plot_report
from lmedit.ledger.probes import GENERIC_NEIGHBORS, build_record, record_from_dict, record_to_dict


def test_probes_of_a_starter_fact():
    request = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    record = build_record(request)
    paraphrases = [p.prompt for p in record.paraphrases]
    assert "The Eiffel Tower stands in the city of" in paraphrases  # the starter set's paraphrase
    assert "Here is a fact. The Eiffel Tower is located in the city of" in paraphrases
    assert all(p.target == "Rome" and p.foil == "Paris" for p in record.paraphrases)
    neighbors = {p.prompt: p for p in record.neighborhood}
    # other subjects of the same template from the starter set, besides the generic facts
    assert sum(p.endswith("is located in the city of") and p not in dict(GENERIC_NEIGHBORS) for p in neighbors) >= 2
    assert all(p.foil == "Rome" and "Eiffel" not in p.prompt for p in record.neighborhood)
    assert set(neighbors) >= {p for p, _ in GENERIC_NEIGHBORS}
    (implication,) = record.implications
    assert (implication.kind, implication.target, implication.foil) == ("transitive", "Italy", "France")
    assert record.neighborhood_plus[0].prompt.startswith("The Eiffel Tower is located in the city of Rome. ")
    assert record.essence_prompts == ("The Eiffel Tower is a",)


def test_symmetric_implication_is_derived_for_a_new_fact_of_a_symmetric_relation():
    request = lmedit.EditRequest("{} is married to", "Tom Hanks", "Madonna", "Rita Wilson")
    record = build_record(request, paraphrases=["The wife of Tom Hanks is"], neighbors=[("Jay-Z is married to", "Beyoncé")])
    (implication,) = record.implications
    assert (implication.prompt, implication.target, implication.foil) == ("Madonna is married to", "Tom Hanks",
                                                                          "Rita Wilson")
    assert "The wife of Tom Hanks is" in [p.prompt for p in record.paraphrases]
    assert [p.prompt for p in record.neighborhood].count("Jay-Z is married to") == 1


def test_foil_stands_in_for_a_missing_target_true_and_records_round_trip():
    request = lmedit.EditRequest("Where is {}", "The Space Needle", "Paris")
    record = build_record(request, foil="Seattle")
    assert record.requests[0].target_true == "Seattle" and record.rewrite[0].foil == "Seattle"
    assert record_from_dict(record_to_dict(record)) == record


@pytest.mark.parametrize("value,warn,refuse,higher,level", [
    (1.0, 1.0, 0.5, True, "keep"), (0.75, 1.0, 0.5, True, "warn"), (0.25, 1.0, 0.5, True, "refuse"),
    (0.1, 0.2, 2.0, False, "keep"), (0.3, 0.2, 2.0, False, "warn"), (3.0, 0.2, 2.0, False, "refuse"),
    (3.0, None, None, False, "keep"), (None, 0.2, 2.0, False, None)])
def test_levels(value, warn, refuse, higher, level):
    assert level_of(value, warn, refuse, higher) == level


def test_audit_config_validates_and_loads_from_yaml(tmp_path):
    with pytest.raises(ValueError, match="efficacy_refuse"):
        AuditConfig(efficacy_warn=0.5, efficacy_refuse=0.9)
    with pytest.raises(ValueError, match="essence_drift_refuse"):
        AuditConfig(essence_drift_warn=2.0, essence_drift_refuse=1.0)
    (tmp_path / "audit.yaml").write_text("neighborhood_refuse: 0.7\nspecificity_plus_refuse: null\n")
    config = load_config(AuditConfig, tmp_path / "audit.yaml", ["probe_loss_warn=0.1"])
    assert (config.neighborhood_refuse, config.specificity_plus_refuse, config.probe_loss_warn) == (0.7, None, 0.1)
    with pytest.raises(ValueError, match="Did you mean 'neighborhood_warn'"):
        load_config(AuditConfig, None, ["neighbourhood_warn=0.5"])


def test_gate_refuses_a_damaging_edit_and_leaves_the_model_unchanged(tmp_path, lm):
    # The random edit realises no fact, so the fact checks are off; a random tiny model's next-token distributions
    # are flat, so its drifts stay small in absolute terms: the drift thresholds are scaled down to match. Its probe
    # loss (7.0 nats) is above the uniform distribution's, so most random edits lower it; this one raises it (+0.17).
    config = AuditConfig(efficacy_warn=None, efficacy_refuse=None, neighborhood_warn=None, neighborhood_refuse=None,
                         essence_drift_warn=0.5, essence_drift_refuse=1.0, probe_loss_warn=0.05, probe_loss_refuse=0.1)
    ledger = Ledger(tmp_path / "ledger", audit_config=config)
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0, scale=0.01), force=True)
    before = snapshot(lm)
    damaging = random_edit(lm, REQUESTS[1], seed=5, scale=50.0, layer=2)
    commit = ledger.record(lm, damaging)
    assert not commit.recorded and commit.report.verdict == "refuse"
    assert {"probe_loss", "essence_drift"} <= set(commit.report.failing("refuse"))
    assert same_weights(before, snapshot(lm)) and [r.id for r in ledger.entries()] == [1]
    forced = ledger.record(lm, random_edit(lm, REQUESTS[1], seed=5, scale=50.0, layer=2), force=True)
    assert forced.edit_id == 2 and ledger.entry(2).verdict == "refuse"


def test_probe_loss_check_is_the_rise_of_the_health_probe_loss(tmp_path, tiny_gpt2):
    # One probe-text loss for the audit, the health check and the safety check (lmedit.eval.health.probe_loss).
    # Tiny GPT-2 has learned positions for 128 tokens only, fewer than the probe text has: it is truncated.
    lm = tiny_gpt2
    edit = random_edit(lm, REQUESTS[0], seed=5, scale=50.0, layer=2)
    before = probe_loss(lm)
    edit.apply(lm)
    after = probe_loss(lm)
    edit.undo()
    assert abs(after - before) > 1e-3
    commit = Ledger(tmp_path / "ledger", audit_config=LENIENT).record(lm, edit, force=True)
    assert commit.report.checks["probe_loss"].value == pytest.approx(after - before, abs=1e-6)


def test_gate_takes_an_audit_of_the_same_states_instead_of_measuring_again(tmp_path, lm, monkeypatch):
    # The web app audits an edit, then the user records it: the gate's verdict and checks are the audit's,
    # bit for bit what the gate measures itself, and nothing is measured twice.
    config = dataclasses.replace(LENIENT, generation_tokens=2, neighborhood_warn=0.8)
    measured = Ledger(tmp_path / "measured", audit_config=config).record(lm, random_edit(lm, REQUESTS[0], seed=3))
    measured_edit = measured.edit
    measured_edit.undo()
    edit = random_edit(lm, REQUESTS[0], seed=3)
    report = lmedit.ledger.audit_edit(lm, edit, config=config)
    ledger = Ledger(tmp_path / "ledger", audit_config=config)
    for wrong, match in ((dataclasses.replace(report, fingerprint="0" * 16), "another model"),
                         (lmedit.ledger.audit_edit(lm, edit, config=LENIENT), "other thresholds")):
        before = snapshot(lm)
        with pytest.raises(lmedit.ledger.LedgerError, match=match):
            ledger.record(lm, edit, audited=wrong)
        assert same_weights(before, snapshot(lm)) and ledger.entries() == []

    def no_measuring(*args, **kwargs):
        raise AssertionError("the gate measured again")

    monkeypatch.setattr("lmedit.ledger.ledger.run_audit", no_measuring)
    commit = ledger.record(lm, edit, audited=report)
    assert commit.recorded and edit.is_applied and commit.report.reference == "previous state"
    stored = ledger.latest_report(commit.edit_id)
    assert stored.verdict == measured.report.verdict
    assert {name: (c.value, c.reference, c.level) for name, c in stored.checks.items()} == \
        {name: (c.value, c.reference, c.level) for name, c in measured.report.checks.items()}


def test_gate_passes_an_edit_that_changes_nothing(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger")
    commit = ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0, scale=0.0))
    checks = commit.report.checks
    assert checks["essence_drift"].value == pytest.approx(0.0, abs=1e-6)
    assert checks["probe_loss"].value == pytest.approx(0.0, abs=1e-6)
    assert checks["fluency_drop"].value == pytest.approx(0.0, abs=1e-6)
    assert checks["neighborhood"].value == checks["neighborhood"].reference
    assert checks["efficacy"].value == checks["efficacy"].reference


def test_audit_of_a_reverted_edit_asks_whether_it_would_hold(tmp_path, lm, rome_config):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    ledger.edit(lm, REQUESTS[0], "rome", config=rome_config)
    ledger.revert(1, lm, audit=False)
    base = snapshot(lm)
    report = ledger.audit(1, lm)
    assert report.reference == "previous state" and report.checks["efficacy"].value == 1.0
    assert same_weights(base, snapshot(lm))  # the hypothetical re-application was undone
    assert ledger.reports(1)[-1][0] == "audit (reverted edit)"


def test_report_round_trips_and_plots(tmp_path, lm):
    ledger = Ledger(tmp_path / "ledger", audit_config=dataclasses.replace(LENIENT, generation_tokens=4))
    report = ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0)).report
    again = AuditReport.from_dict(report.to_dict())
    assert again.to_dict() == report.to_dict() and again.holds == report.holds
    assert ledger.latest_report(1).to_dict() == report.to_dict()
    path = plot_report(report, tmp_path / "plots" / "edit-1.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_edit_that_pulls_generation_to_never_text_tokens_is_flagged(lm, tmp_path):
    # An unembedding change making <pad> (never generated) the likeliest next token everywhere: the printed
    # generations stay clean, so only the derailment check can see it (docs/editors.md, "Derailed generations").
    import torch

    from lmedit.editors.base import ParamDelta, WeightEdit

    weight = lm.model.get_output_embeddings().weight
    name = next(n for n, p in lm.model.named_parameters() if p is weight)
    left = torch.zeros(weight.shape[0], 1)
    left[lm.tokenizer.pad_token_id] = 1.0
    with torch.no_grad():  # along the final hidden state of the edit prompt: a logit of +500 for <pad> there
        hidden = lm.model(**lm.encode(["Where is The Eiffel Tower"]), output_hidden_states=True).hidden_states[-1][0, -1]
    right = 500.0 * hidden[:, None] / hidden.norm() ** 2
    edit = WeightEdit({name: ParamDelta(left=left, right=right)}, requests=(REQUESTS[0],), method="test",
                      base_fingerprint=lm.fingerprint)
    config = dataclasses.replace(LENIENT, generation_tokens=4, derailment_rise_warn=0.1)
    ledger = Ledger(tmp_path / "ledger", audit_config=config)
    commit = ledger.record(lm, edit, force=True)
    check = commit.report.checks["derailment_rise"]
    assert check.value is not None and check.value > 0.1 and check.level == "warn", check
    assert commit.report.verdict == "warn"
