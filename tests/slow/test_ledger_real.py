"""The ledger's "done when" flow on the real built-in models, all from the command line (slow).

Edit two facts on gemma3-270m with ROME and the ledger (shipped settings), revert the first, export the
patch, import it in a fresh process, export the model for plain transformers, replay the ledger onto
smollm2-135m and back. The module-scoped fixture makes the edits once; each test takes one step from there.
The first edit is the README's first command, run as a new user would (a new process, no --config, from
another directory): first contact's test reads its output (the audit's full-length generations flag the
generation damage that edit does, docs/editors.md "Derailed generations").
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.ledger import Ledger

pytestmark = pytest.mark.slow
# The README's first command (with probes and a ledger), then a second fact.
README_EDIT = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target-new", "Rome",
               "--target-true", "Paris", "--probe", "The Eiffel Tower can be found in the city of",
               "--probe", "The Louvre is located in the city of"]
SECOND = ("The official language of {} is", "Brazil", "French", "Portuguese")
NEVER_TEXT = re.compile(r"<start_of_image>|<end_of_image>|\[multimodal\]|<unused\d+>|<pad>|<mask>")
PROMPTS = ["The Eiffel Tower is located in the city of", "The official language of Brazil is",
           "Barack Obama is married to", "The capital of Japan is the city of"]
# The audits' fluency check generates 4 tokens per probe instead of 16: nothing here asserts on fluency, and
# generation is most of an audit's time on CPU (fluency itself is tested in tests/unit/ledger).
SHORT_AUDIT = ("--audit-set", "generation_tokens=4")
FIGURES = ("efficacy", "paraphrase", "neighborhood", "specificity_plus", "implication", "essence_drift",
           "neighborhood_kl", "fluency_drop", "probe_loss")


def _cli(*args: str) -> None:
    assert main(list(args)) == 0, args


def _fresh_process(*args: str) -> None:
    """Run `lmedit ARGS` in a new Python process."""
    done = subprocess.run([sys.executable, "-m", "lmedit.cli.main", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
        return lm.model(**enc).logits


def _figures(report) -> str:
    return ", ".join(f"{name} {report.checks[name].value:.3f}" if report.checks[name].value is not None
                     else f"{name} n/a" for name in FIGURES)


@pytest.fixture(scope="module")
def first_edit(tmp_path_factory):
    """The README's first command in a new process, from another directory, recording into a new ledger:
    (the ledger directory, the finished process)."""
    root = tmp_path_factory.mktemp("ledger")
    env = {**os.environ, "COLUMNS": "400"}  # one table row per line: nothing hides in rich's wrapping
    proc = subprocess.run([sys.executable, "-m", "lmedit.cli.main", "edit", *README_EDIT, "--ledger", "gemma"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    return root / "gemma", proc


@pytest.fixture(scope="module")
def ledger_dir(first_edit):
    """Two ROME edits on gemma3-270m recorded with the ledger; the first (the README's) reverted."""
    path, proc = first_edit
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prompt, subject, new, old = SECOND
    _cli("edit", "--model", "gemma3-270m", "--ledger", str(path),
         "--prompt", prompt, "--subject", subject, "--target-new", new, "--target-true", old,
         "--max-new-tokens", "1", *SHORT_AUDIT)
    _cli("ledger", "revert", "1", "--ledger", str(path), *SHORT_AUDIT)
    return path


def test_readme_first_command_from_another_directory(first_edit):
    _, proc = first_edit
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rome on gemma3-270m: layer 2; settings: shipped for gemma3-270m (lmedit/configs/rome/gemma3-270m.yaml)" in out
    rows = [line for line in proc.stdout.splitlines() if "city of" in line]
    assert len(rows) == 3 and "Rome" in rows[0] and "Rome" in rows[1] and "Paris" in rows[2], out
    assert not NEVER_TEXT.search(proc.stdout), proc.stdout
    # The edit pushes the model toward <start_of_image> after "Rome, Italy" (0.48 at one step on the
    # paraphrase, against 0.14 unedited): suppressed in the text, flagged by the audit.
    assert re.search(r"derailment_rise .* warn", out), out
    assert re.search(r": warn \(edited vs", out), out
    assert "recorded as edit 1" in out, out


def test_two_edits_audited_and_the_first_reverted(ledger_dir, capsys):
    ledger = Ledger(ledger_dir)
    rows = ledger.entries()
    assert [(r.id, r.state) for r in rows] == [(1, "reverted"), (2, "applied")]
    with capsys.disabled():
        for row in rows:
            commit = ledger.reports(row.id)[0][1]
            print(f"\nedit {row.id} ({row.requests[0]['subject']} -> {row.requests[0]['target_new']}), commit "
                  f"audit {commit.verdict}: {_figures(commit)}")
        for edit_id in (2,):
            reason, report = ledger.reports(edit_id)[-1]
            print(f"edit {edit_id} re-audited after '{reason}' vs the base model: {report.verdict}: {_figures(report)}")
    for row in rows:
        report = ledger.reports(row.id)[0][1]
        assert report.verdict != "refuse" and report.checks["efficacy"].value == 1.0
    for edit_id in (2,):
        reason, report = ledger.reports(edit_id)[-1]
        assert reason == "revert 1" and report.reference == "base model" and report.holds


def test_patch_imported_in_a_fresh_process_gives_identical_outputs(ledger_dir, tmp_path, gemma):
    patch = tmp_path / "edits.lmpatch"
    _cli("ledger", "export", "--ledger", str(ledger_dir), "--patch", str(patch))
    assert patch.stat().st_size < 5_000_000
    _fresh_process("ledger", "import", str(patch), "--ledger", str(tmp_path / "copy"))
    original, imported = Ledger(ledger_dir), Ledger(tmp_path / "copy")
    assert [r.requests for r in imported.entries()] == [r.requests for r in original.entries("applied")]
    try:
        original.apply(gemma)
        expected = _logits(gemma)
        imported.apply(gemma)
        assert torch.equal(_logits(gemma), expected)
    finally:
        imported.detach(gemma)  # the session's shared model goes back to the base weights


def test_exported_model_loads_with_plain_transformers(ledger_dir, tmp_path, gemma):
    out = tmp_path / "gemma-edited"
    _cli("export-model", str(out), "--ledger", str(ledger_dir))
    script = (
        "import sys, torch, transformers\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"enc = tok({PROMPTS!r}, return_tensors='pt', padding=True)\n"
        "with torch.no_grad(): logits = model(**enc).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert 'lmedit' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = Ledger(ledger_dir)
    try:
        ledger.apply(gemma)
        assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(gemma))
    finally:
        ledger.detach(gemma)
    assert [e["id"] for e in json.loads((out / "lmedit-ledger.json").read_text())["edits"]] == [2]


def test_replay_onto_smollm_and_back(ledger_dir, tmp_path, capsys):
    _cli("ledger", "replay", "--ledger", str(ledger_dir), "--onto", "smollm2-135m", "--into", str(tmp_path / "smollm"),
         *SHORT_AUDIT)
    smollm = Ledger(tmp_path / "smollm")
    assert smollm.base_fingerprint != Ledger(ledger_dir).base_fingerprint
    _cli("ledger", "replay", "--ledger", str(tmp_path / "smollm"), "--onto", "gemma3-270m",
         "--into", str(tmp_path / "back"), *SHORT_AUDIT)
    back = Ledger(tmp_path / "back")
    assert back.base_fingerprint == Ledger(ledger_dir).base_fingerprint
    with capsys.disabled():
        for name, ledger in (("smollm2-135m", smollm), ("gemma3-270m (back)", back)):
            for row in ledger.entries():
                report = ledger.reports(row.id)[0][1]
                print(f"\nreplayed onto {name}: {row.requests[0]['subject']} -> {row.requests[0]['target_new']} "
                      f"({row.source}): {report.verdict}: {_figures(report)}")
    # both built-in models take the remaining edit (ROME with each model's shipped settings)
    assert [r.requests[0]["subject"] for r in smollm.entries()] == ["Brazil"]
    assert [r.requests[0]["subject"] for r in back.entries()] == ["Brazil"]
    assert all(ledger.reports(r.id)[0][1].holds for ledger in (smollm, back) for r in ledger.entries())
    assert lmedit.Ledger is Ledger
