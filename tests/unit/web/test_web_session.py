"""The web app's model and state (lmedit/web/session.py) on a tiny random model, without a browser: undo and
failed edits leave the weights bit-identical, the ledger sees only its own edits, a refused edit is not
kept, another model's ledger is refused, one job runs at a time; and the app names no editing method."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

import lmedit
from lmedit.errors import ConfigError, RequestError
from lmedit.ledger import AuditConfig, LedgerError
from lmedit.ledger.audit import CHECKS
from lmedit.registry import editors
from lmedit.testing import TINY_CORPUS, tiny_lm
from lmedit.web import inputs
from lmedit.web.session import Session

LENIENT = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                      generation_tokens=0)
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture
def quick(tmp_path, monkeypatch):
    """Quick ROME settings as the settings box would send them (text statistics, few prefixes), private cache."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    return inputs.settings(f"layer: 1\ncorpus: file:{corpus}\ncorpus_tokens: 2000\nprefixes_short: 2\nprefixes_long: 1")


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())


def test_edit_then_undo_restores_the_weights_and_the_numbers(tmp_path, quick):
    lm = tiny_lm("llama")
    base = _weights(lm)
    session = Session(lm, out_dir=tmp_path / "out", ledger=None, max_new_tokens=2, audit_config=LENIENT)
    last, note = session.edit(REQUEST, "rome", quick)
    assert note == "" and not _same(lm, base) and "1 unrecorded rome edit" in session.state()
    rewrite = last.lines[0]
    assert rewrite.group == "rewrite" and rewrite.after[0] > rewrite.before[0]
    assert {line.group for line in last.lines} == {"rewrite", "paraphrase", "neighborhood", "neighborhood_plus"}
    report, recorded, refused = session.audit_last()
    assert report.checks["efficacy"].value == 1.0 and recorded is None and not refused
    assert not _same(lm, base)  # the audit leaves the edit applied
    line, now = session.undo()
    assert _same(lm, base) and now == line.before[0] and "unrecorded" not in session.state()
    with pytest.raises(RequestError, match="nothing to undo"):
        session.undo()
    saved = session.save_last()
    assert saved.parent == (tmp_path / "out" / "edits").resolve() and lmedit.load_edit(saved).requests[0] == REQUEST


def test_a_refused_or_failing_edit_leaves_the_model_as_it_was(tmp_path, quick):
    lm = tiny_lm("llama")
    base = _weights(lm)
    strict = AuditConfig(efficacy_warn=None, efficacy_refuse=1.5, generation_tokens=0)  # refuses every edit
    session = Session(lm, out_dir=tmp_path / "out", ledger=tmp_path / "ledger", audit_config=strict, max_new_tokens=1)
    session.edit(REQUEST, "rome", quick)
    report, recorded, refused = session.audit_last(record=True)
    assert report.verdict == "refuse" and refused and recorded is None and _same(lm, base)
    assert lmedit.Ledger(tmp_path / "ledger").entries() == []
    session.edit(REQUEST, "rome", quick)  # pending again; a failing edit first undoes it, then changes nothing
    with pytest.raises(ConfigError, match="v_lr"):
        session.edit(REQUEST, "rome", {**quick, "v_lr": 0})
    assert _same(lm, base) and session.pending is None


def test_ledger_record_revert_and_export(tmp_path, quick):
    lm = tiny_lm("llama")
    base = _weights(lm)
    session = Session(lm, out_dir=tmp_path / "out", ledger=tmp_path / "ledger", audit_config=LENIENT, max_new_tokens=1)
    assert "no ledger at" in session.startup_note and not (tmp_path / "ledger").exists()  # created on first record
    session.edit(REQUEST, "rome", quick)
    session.undo()
    report, edit_id, _ = session.record_last()  # the undone edit, applied again by the gate
    assert edit_id == 1 and not _same(lm, base) and "1 applied edit of the ledger" in session.state()
    row, stored, plot = session.ledger_audit(1)
    assert row.state == "applied" and stored.verdict == "keep" and plot.read_bytes()[:4] == b"\x89PNG"
    assert session.export_patch().suffix == ".lmpatch"
    exported = session.export_model("edited")
    assert (exported / "config.json").exists() and exported.parent == (tmp_path / "out" / "models").resolve()
    with pytest.raises(RequestError, match="export name"):
        session.export_model("../outside")
    result = session.revert(1)
    assert result.remaining == [] and _same(lm, base) and session.ledger_rows()[0].state == "reverted"
    with pytest.raises(RequestError, match=r"the ledger has no edit 7 \(ids: 1\)"):
        session.revert(7)
    session.edit(REQUEST, "rome", quick)
    session.undo()
    lmedit.Ledger(tmp_path / "ledger").reapply(1)  # the ledger changes under the app
    session.open_ledger(str(tmp_path / "ledger"))
    with pytest.raises(RequestError, match="changed since the last edit was made"):
        session.record_last()


def test_recording_an_audited_edit_takes_the_edit_tabs_audit(tmp_path, quick, monkeypatch):
    # Edit, audit, undo, record: the gate stores the Edit tab's audit instead of measuring the same states again.
    # Once the ledger's applied edits have changed, an older audit is not the gate's and is measured anew.
    import lmedit.ledger.ledger as ledger_module

    gate_runs = []
    monkeypatch.setattr(ledger_module, "run_audit", lambda *a, **k: gate_runs.append(1) or real_run_audit(*a, **k))
    real_run_audit = lmedit.ledger.audit.run_audit
    lm = tiny_lm("llama")
    session = Session(lm, out_dir=tmp_path / "out", ledger=tmp_path / "ledger", audit_config=LENIENT, max_new_tokens=1)
    session.edit(REQUEST, "rome", quick)
    audited, _, _ = session.audit_last()
    session.undo()
    report, edit_id, _ = session.record_last()
    assert edit_id == 1 and gate_runs == [] and report.reference == "previous state"
    assert {n: c.value for n, c in report.checks.items()} == {n: c.value for n, c in audited.checks.items()}
    other = lmedit.EditRequest("Where is {}", "The Louvre", "Seattle", "Paris")
    session.edit(other, "rome", quick)
    session.audit_last()
    session.undo()
    session.revert(1)  # the ledger's state changes after the audit: "make the edit again"
    with pytest.raises(RequestError, match="changed since the last edit was made"):
        session.record_last()
    session.edit(other, "rome", quick)  # made and recorded without an audit of its own: the gate measures
    session.record_last()
    assert gate_runs == [1]


def test_another_models_ledger_is_refused_and_the_model_stays_at_its_base(tmp_path, quick):
    other = tiny_lm("llama", seed=1)
    lmedit.Ledger(tmp_path / "ledger", audit_config=LENIENT).edit(other, REQUEST, "rome", config=quick)
    lm = tiny_lm("llama")
    base = _weights(lm)
    session = Session(lm, out_dir=tmp_path / "out", ledger=tmp_path / "ledger")
    assert "not opened" in session.startup_note and "hash" in session.startup_note and session.ledger is None
    with pytest.raises(LedgerError, match="hash"):
        session.open_ledger(str(tmp_path / "ledger"))
    assert _same(lm, base) and session.ledger is None


def test_compare_audits_each_method_and_reports_failures_in_its_row(tmp_path):
    lm = tiny_lm("llama")
    base = _weights(lm)
    session = Session(lm, out_dir=tmp_path / "out", audit_config=LENIENT)
    out = session.compare(REQUEST, ["noop", "mend"])
    assert [r.method for r in out.results] == ["noop", "mend"] and _same(lm, base)
    noop, mend = out.results
    assert noop.metrics == {k: v for k, v in out.reference.items()} and noop.seconds > 0  # no change at all
    assert mend.metrics is None and mend.note.startswith("failed: MEND needs a trained editor network")
    assert out.chart is not None and out.chart.exists()
    with pytest.raises(RequestError, match="methods: choose at least one"):
        session.compare(REQUEST, [])


def test_one_job_at_a_time(tmp_path):
    session = Session(tiny_lm("llama"), out_dir=tmp_path / "out")
    query = inputs.trace_query("Where is The Eiffel Tower", "The Eiffel Tower", None, 1)
    done = threading.Event()
    with session.lock:  # a job in progress
        worker = threading.Thread(target=lambda: (session.trace(query), done.set()))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not done.is_set()
    worker.join(timeout=60)
    assert done.is_set()


def test_the_app_names_no_editing_method():
    # Like the CLI and the harness: methods come from the registry, never from the app's code.
    root = Path(lmedit.__file__).parent
    sources = [*sorted((root / "web").glob("*.py")), root / "cli" / "serve.py"]
    found = [f"{path.name}: {name}" for path in sources for name in editors.names()
             if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", path.read_text())]
    assert len(sources) >= 6 and not found, found
