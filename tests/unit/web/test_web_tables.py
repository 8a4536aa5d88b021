"""What the web app's pages show (lmedit/web/tables.py, charts.py), built from small stand-ins of library
results: the before/after table, audit checks and verdict, the Compare table and chart, the Ledger table,
status lines and the trace's suggested layer. Plain Python, no model, no browser."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lmedit.errors import RequestError
from lmedit.eval.records import EvalRecord, Probe
from lmedit.ledger.audit import AuditReport, CheckResult
from lmedit.types import EditRequest
from lmedit.web import tables
from lmedit.web.tables import CompareResult, ProbeLine


def _record() -> EvalRecord:
    request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    return EvalRecord("1", (request,),
                      paraphrases=(Probe("P1", "Rome", "Paris"), Probe("P2", "Rome", "Paris"), Probe("Mine", "Rome", "Paris")),
                      neighborhood=(Probe("N1 is in", "Berlin", "Rome"), Probe("N2 is in", "Tokyo", "Rome"),
                                    Probe("My neighbour is in", "Paris", "Rome")))


def test_shown_probes_put_the_users_own_first_and_one_loud_fact():
    lines = tables.shown_probes(_record(), ["Mine"], [("My neighbour is in", "Paris")])
    assert [(x.group, x.prompt) for x in lines] == [
        ("rewrite", "The Eiffel Tower is located in the city of"), ("paraphrase", "Mine"), ("paraphrase", "P1"),
        ("neighborhood", "My neighbour is in"), ("neighborhood", "N1 is in"),
        ("neighborhood_plus", "The Eiffel Tower is located in the city of Rome. My neighbour is in")]
    assert lines[-1].target == "Paris" and lines[-1].foil == "Rome"
    assert len(tables.shown_probes(_record())) == 6  # without the user's: the first two of each


def test_before_after_table_has_a_row_per_answer_side_by_side():
    line = ProbeLine("rewrite", "The Eiffel Tower is located in the city of", "Rome", "Paris", (0.0007, 0.9),
                     (0.9922, 2.5e-6), " Paris, France", " Rome, Italy")
    out = tables.before_after([line, ProbeLine("neighborhood", "N", "Berlin", None, (0.5, None), (0.4, None))])
    assert out["headers"] == list(tables.BEFORE_AFTER_HEADERS)
    assert out["data"] == [
        ["edit prompt", "The Eiffel Tower is located in the city of", "Rome (should win)", "0.0007", "0.9922",
         "Paris, France", "Rome, Italy"],
        ["", "", "Paris", "0.9000", "2.5e-06", "", ""],
        ["neighbour", "N", "Berlin (should win)", "0.5000", "0.4000", "", ""]]
    assert tables.moved([line]) == "P(Rome) on the edit prompt: 0.0007 → 0.9922"
    assert tables.prob(None) == "—" and tables.prob(math.nan) == "—" and tables.prob(0.0) == "0.0000"


def _report(verdict: str = "warn") -> AuditReport:
    checks = {"efficacy": CheckResult("efficacy", 1.0, 0.0, "keep", 1.0, 0.5),
              "paraphrase": CheckResult("paraphrase", 0.25, 0.0, "warn", 0.5, None),
              "neighborhood": CheckResult("neighborhood", None, None, None, 0.8, 0.5)}
    return AuditReport(verdict=verdict, checks=checks, metrics={"reference": {}, "edited": {}}, probes=[],
                       reference="model without the edit")


def test_audit_checks_and_verdict():
    assert tables.audit_checks(_report())["data"] == [
        ["efficacy", "1.000", "0.000", "1.000", "0.500", "keep"], ["paraphrase", "0.250", "0.000", "0.500", "n/a", "warn"],
        ["neighborhood", "n/a", "n/a", "0.800", "0.500", "n/a"]]
    line = tables.verdict(_report(), recorded=3)
    assert "lmedit-note" in line and "audit: warn (paraphrase), against the model without the edit; recorded as edit 3" in line
    refused = tables.verdict(_report("refuse"), refused_note=True)
    assert "lmedit-error" in refused and "error:" not in refused and "not recorded, the model is unchanged" in refused


def test_status_lines_escape_text_and_never_show_a_traceback():
    assert tables.status("ok", "<b>x</b>\n  y") == '<div class="lmedit-status lmedit-ok">&lt;b&gt;x&lt;/b&gt;; y</div>'
    assert "error: subject: required" in tables.error_status(RequestError("subject: required"))
    bug = tables.error_status(ZeroDivisionError("division by zero"))
    assert "internal error (ZeroDivisionError: division by zero)" in bug and "Traceback" not in bug


def test_compare_table_and_chart(tmp_path):
    metrics = {"efficacy_score": 1.0, "paraphrase_score": 0.75, "neighborhood_score": 0.875,
               "specificity_plus_score": 0.5, "fluency": 3.71}
    results = [CompareResult("alpha", metrics, 8.4321, "keep", "shipped for m"),
               CompareResult("beta", None, None, None, "failed: needs training")]
    out = tables.compare_table(results, {**metrics, "efficacy_score": 0.0})
    assert out["headers"][0] == "method" and out["headers"][-3:] == ["edit time (s)", "audit", "settings / note"]
    assert out["data"] == [["(before the edit)", "0.000", "0.750", "0.875", "0.500", "3.710", "", "", ""],
                           ["alpha", "1.000", "0.750", "0.875", "0.500", "3.710", "8.43", "keep", "shipped for m"],
                           ["beta", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "—", "failed: needs training"]]
    from lmedit.web.charts import compare_chart

    path = compare_chart(results, metrics, tmp_path / "c.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_ledger_tables():
    row = SimpleNamespace(id=2, state="applied", verdict=None, method="m", kind="weight", created="now",
                          requests=[{"prompt": "{} is in {1}", "subject": "X", "target_new": "B", "target_true": "A"},
                                    {"input": "Q?", "output": "Yes"}])
    assert tables.ledger_table([row])["data"] == [[2, "applied", "n/a", "m", "weight", "X is in {1} → B (was A); Q? → Yes",
                                                   "now"]]
    assert tables.ledger_table([])["data"] == [[""] * 7]  # an empty table keeps its columns
    reaudit = tables.reaudit_table({1: _report("refuse")})["data"][0]
    assert reaudit[:4] == [1, "refuse", "yes", "1.000"] and reaudit[-1] == "paraphrase"


@pytest.mark.parametrize("row, expected", [([0.1, 0.5, float("nan"), 0.2], 1), ([math.nan] * 3, None)])
def test_peak_layer_is_the_mlp_peak_at_the_last_subject_token(row, expected):
    result = SimpleNamespace(scores=[[0.9, 0.9, 0.9, 0.9], row, [1.0] * 4], subject_range=(0, 1))
    assert tables.peak_layer(result) == expected
