"""The harness end to end on a tiny model: modes, restoring weights, bad records, resume, progress, report, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmedit
from lmedit.errors import LMEditError
from lmedit.eval import DatasetError, EvalRecord, evaluate, load_dataset
from lmedit.eval.report import write_report
from lmedit.registry import editors
from lmedit.types import EditRequest

TEST_EDITOR = "test_unembed"  # registered by this folder's conftest.py


@pytest.fixture(scope="module")
def starter():
    return load_dataset("starter")


def calls(reset: bool = False) -> int:
    editor_class = editors.get(TEST_EDITOR)
    if reset:
        editor_class.calls = 0
    return editor_class.calls


def state_dict(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def means(result, state="edited"):
    return {k: v["mean"] for k, v in result.summary[state]["metrics"].items()}


def test_single_mode_edits_measures_and_restores(tiny_llama, starter):
    before = state_dict(tiny_llama)
    result = evaluate(tiny_llama, starter, TEST_EDITOR, limit=4, n_bootstrap=50)
    after = state_dict(tiny_llama)
    assert all(torch.equal(before[k], after[k]) for k in before)
    edited, unedited = means(result), means(result, "unedited")
    assert edited["efficacy_score"] == 1.0 and edited["efficacy_acc"] > unedited["efficacy_acc"]
    assert unedited["neighborhood_kl"] == 0.0 and edited["neighborhood_kl"] > 0.0
    assert edited["rewrite_kl"] > 0.0
    assert len(result.rows) == 4 and all(r["n_edits"] == 1 for r in result.rows)
    assert result.summary["edited"]["score"]["n"] == 4


def test_noop_baseline_equals_the_unedited_model(tiny_llama, starter):
    result = evaluate(tiny_llama, starter, "noop", limit=3, n_bootstrap=50)
    for row in result.rows:
        assert row["edited"] == row["unedited"]


def test_batch_mode(tiny_llama, starter):
    before = state_dict(tiny_llama)
    result = evaluate(tiny_llama, starter, TEST_EDITOR, limit=5, mode="batch", batch_size=2, n_bootstrap=50)
    assert [r["n_edits"] for r in result.rows] == [2, 2, 2, 2, 1]
    assert means(result)["efficacy_score"] > means(result, "unedited")["efficacy_score"]
    assert all(torch.equal(v, state_dict(tiny_llama)[k]) for k, v in before.items())


def test_sequential_mode_remeasures_all_earlier_edits_and_drift(tiny_llama, starter, tmp_path):
    before = state_dict(tiny_llama)
    result = evaluate(tiny_llama, starter, TEST_EDITOR, limit=4, mode="sequential", checkpoint_every=2, n_drift=3,
                      n_bootstrap=50, out_dir=tmp_path / "seq")
    edited = [r for r in result.rows if r.get("kind") == "edited"]
    drift = [r for r in result.rows if r.get("kind") == "drift"]
    assert sorted((r["n_edits"], r["case_id"]) for r in edited) == sorted(
        [(2, r.case_id) for r in starter.records[:2]] + [(4, r.case_id) for r in starter.records[:4]])
    assert [r["n_edits"] for r in drift] == [2] * 3 + [4] * 3
    assert {r["case_id"] for r in drift}.isdisjoint(r.case_id for r in starter.records[:4])
    curves = result.summary["curves"]["efficacy_score"]
    assert [p["n_edits"] for p in curves] == [2, 4]
    assert [p["n_edits"] for p in result.summary["drift_curves"]["rewrite_kl"]] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "seq" / "edits").iterdir()) == [f"{i:05d}.safetensors" for i in range(4)]
    assert all(torch.equal(v, state_dict(tiny_llama)[k]) for k, v in before.items())


def test_invalid_records_are_skipped_and_counted_or_fail_in_strict_mode(tiny_llama, monkeypatch):
    import lmedit.eval.measure as measure_module
    from lmedit.errors import RequestError
    from lmedit.tokens import target_ids

    def no_tokens_for_void(lm, target):  # as lmedit.tokens.target_ids does when a tokenizer drops the target
        if target == "VOID":
            raise RequestError(f"target {target!r} tokenizes to no tokens")
        return target_ids(lm, target)

    monkeypatch.setattr(measure_module, "target_ids", no_tokens_for_void)
    good = EvalRecord("ok", (EditRequest("{} is located in the city of", "The Louvre", "Rome", "Paris"),))
    empty_target = EvalRecord("bad", (EditRequest("{} is located in the city of", "The Louvre", "VOID", "Paris"),))
    result = evaluate(tiny_llama, [good, empty_target], "noop", n_bootstrap=10)
    assert result.summary["n_records"] == 1
    assert result.summary["skipped"]["count"] == 1 and result.summary["skipped"]["items"][0]["case_id"] == "bad"
    with pytest.raises(DatasetError, match=r"case_id bad\).*tokenizes to no tokens"):
        evaluate(tiny_llama, [good, empty_target], "noop", strict=True)


def test_resume_skips_finished_records(tiny_llama, starter, tmp_path):
    out = tmp_path / "run"
    evaluate(tiny_llama, starter, TEST_EDITOR, limit=2, out_dir=out, n_bootstrap=10)
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # interrupted mid-line
    with pytest.raises(LMEditError, match="already holds results"):
        evaluate(tiny_llama, starter, TEST_EDITOR, limit=2, out_dir=out)
    calls(reset=True)
    result = evaluate(tiny_llama, starter, TEST_EDITOR, limit=2, out_dir=out, resume=True, n_bootstrap=10)
    assert calls() == 1  # only the record whose line was cut off
    assert len(result.rows) == 2 and len((out / "records.jsonl").read_text().splitlines()) == 2
    with pytest.raises(LMEditError, match="differs in"):
        evaluate(tiny_llama, starter, "noop", limit=2, out_dir=out, resume=True)
    calls(reset=True)
    grown = evaluate(tiny_llama, starter, TEST_EDITOR, limit=3, out_dir=out, resume=True, n_bootstrap=10)
    assert calls() == 1 and len(grown.rows) == 3  # a larger --limit only evaluates the new record


def test_sequential_resume_reapplies_saved_edits(tiny_llama, starter, tmp_path):
    out = tmp_path / "seq"
    kwargs = dict(limit=3, mode="sequential", checkpoint_every=1, n_drift=1, n_bootstrap=10, out_dir=out)
    full = evaluate(tiny_llama, starter, TEST_EDITOR, **kwargs)
    rows = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["n_edits"] < 3 or r["kind"] == "health"]  # stopped before checkpoint 3
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    calls(reset=True)
    resumed = evaluate(tiny_llama, starter, TEST_EDITOR, resume=True, **kwargs)
    assert calls() == 0  # all three edits were re-applied from edits/
    last = lambda res: sorted((r["case_id"], r["edited"]["efficacy_score"]) for r in res.rows  # noqa: E731
                              if r.get("kind") == "edited" and r["n_edits"] == 3)
    assert last(resumed) == last(full)
    # The edits' times survive the resume (from the health rows), though the edits were not made again.
    times = lambda res: sorted((r["case_id"], r["edit_seconds"]) for r in res.rows  # noqa: E731
                               if r.get("kind") == "edited" and r["n_edits"] == 3)
    assert times(resumed) == times(full) and all(t > 0 for _, t in times(full))


def test_progress_callback_reports_eta(tiny_llama, starter):
    events = []
    evaluate(tiny_llama, starter, "noop", limit=3, n_bootstrap=10, progress=events.append)
    assert [e.done for e in events] == [1, 2, 3] and events[-1].total == 3
    assert events[-1].eta_s == 0.0 and all(e.eta_s is not None for e in events)


def test_report_tables_and_plots(tiny_llama, starter, tmp_path):
    evaluate(tiny_llama, starter, TEST_EDITOR, limit=3, out_dir=tmp_path / "a", n_bootstrap=10, generation_tokens=4)
    evaluate(tiny_llama, starter, TEST_EDITOR, limit=3, out_dir=tmp_path / "b", mode="sequential",
             checkpoint_every=1, n_drift=2, n_bootstrap=10)
    paths = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    md = paths["markdown"].read_text()
    assert re.search(r"^\| unedited \| 3 \|", md, re.M) and f"| {TEST_EDITOR} | 3 |" in md
    assert "ES ↑" in md and "NKL ↓" in md and "Rel. ↑" in md
    assert "<table>" in paths["html"].read_text()
    for name in ("metric_bars", "sequential_curves", "sequential_drift", "loud_facts"):
        assert (tmp_path / "report" / "plots" / f"{name}.png").stat().st_size > 0
        assert (tmp_path / "report" / "plots" / f"{name}.svg").exists()


def test_cli_eval_writes_jsonl_summary_report(tiny_llama, tmp_path, monkeypatch):
    import argparse

    import lmedit.cli.eval as cli_eval
    from lmedit.cli.main import SUBCOMMANDS

    assert "eval" in SUBCOMMANDS

    def main(argv):  # the eval subcommand alone, as lmedit.cli.main wires it
        parser = argparse.ArgumentParser(prog="lmedit")
        cli_eval.add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.run(args)

    monkeypatch.setattr(cli_eval, "load_model", lambda args: tiny_llama)
    out = tmp_path / "cli"
    code = main(["eval", "--method", TEST_EDITOR, "--method", "noop", "--dataset", "starter", "--limit", "2",
                 "--out", str(out)])
    assert code == 0
    for method in (TEST_EDITOR, "noop"):
        assert (out / f"{method}-single" / "records.jsonl").exists()
        summary = json.loads((out / f"{method}-single" / "summary.json").read_text())
        assert summary["run"]["method"] == method
    assert (out / "report.md").exists() and (out / "plots" / "metric_bars.svg").exists()
    assert main(["eval", "--report-only", str(out / "noop-single"), "--out", str(tmp_path / "r2")]) == 0


def test_public_api_exports_evaluate():
    assert lmedit.evaluate is evaluate


def test_eval_and_cli_never_name_a_method():
    """Quoted editor registry keys must not appear in eval/ or cli/ code (epilog examples are prose)."""
    root = Path(lmedit.__file__).parent
    names = [n for n in editors.names()]
    files = list((root / "eval").rglob("*.py")) + list((root / "cli").rglob("*.py"))
    offenders = []
    for path in files:
        text = path.read_text()
        for name in names:
            if re.search(rf"""(['"]){re.escape(name)}\1""", text):
                offenders.append(f"{path.relative_to(root)}: {name!r}")
    assert not offenders, offenders


@pytest.mark.parametrize("name,path", [("zsre", "zsre/zsre-train-22.json"),
                                       ("mquake", "mquake/MQuAKE-CF-3k-last3.json"),
                                       ("counterfact", "counterfact/least_orthogonal.json")])
def test_public_samples_run_through_the_harness(tiny_llama, test_data, name, path):
    result = evaluate(tiny_llama, name, TEST_EDITOR, data_path=test_data / path, limit=2, n_bootstrap=10)
    edited, unedited = means(result), means(result, "unedited")
    assert result.summary["n_records"] == 2
    assert edited["efficacy_acc"] > unedited["efficacy_acc"]
    if name == "zsre":  # unrelated NQ questions have no foil: token accuracy only
        assert edited["neighborhood_score"] is None and edited["neighborhood_acc"] is not None
    if name == "mquake":
        assert edited["multihop_accuracy"] is not None


class _DisableSecond(lmedit.editors.Editor):
    """Test-only: a harmless tiny edit, except the second request, whose edit adds large noise to the unembedding."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def edit(self, lm, requests):
        self.n += 1
        weight = lm.model.get_output_embeddings().weight
        name = next(n for n, p in lm.model.named_parameters() if p is weight)
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(self.n))
        scale = 30.0 if self.n == 2 else 1e-4
        return lmedit.editors.WeightEdit({name: lmedit.editors.ParamDelta(dense=scale * noise)},
                                         requests=tuple(requests), method="disable_second")


@pytest.mark.parametrize("refuse", [False, True])
def test_sequential_health_flags_a_disabling_edit(tiny_llama, starter, tmp_path, refuse):
    before = state_dict(tiny_llama)
    result = evaluate(tiny_llama, starter, _DisableSecond(), limit=3, mode="sequential", checkpoint_every=3,
                      n_drift=1, n_bootstrap=10, out_dir=tmp_path / "h", refuse_disabling=refuse, disabling_rise=0.5)
    health = result.summary["health"]["edits"]
    assert [h["n_edits"] for h in health] == [1, 2, 3]
    assert all(h["edit_seconds"] > 0 for h in health)  # each edit's time, also before any checkpoint
    assert [h["flagged"] for h in health] == [False, True, False]
    assert health[1]["probe_loss_rise"] > 0.5 and abs(health[0]["probe_loss_rise"]) < 0.5
    assert health[1]["update_norm"] > 100 * health[0]["update_norm"]
    assert health[1]["kept"] is (not refuse)
    reasons = result.summary["skipped"]["by_reason"]
    assert reasons.get("disabling", 0) == (1 if refuse else 0)
    final = [r for r in result.rows if r.get("kind") == "edited" and r["n_edits"] == 3]
    assert len(final) == (2 if refuse else 3)
    assert all(torch.equal(v, state_dict(tiny_llama)[k]) for k, v in before.items())
    paths = write_report([tmp_path / "h"], tmp_path / "report")
    assert (tmp_path / "report" / "plots" / "sequential_health.png").exists(), paths
