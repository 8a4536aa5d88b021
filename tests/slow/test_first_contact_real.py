"""First contact on the default model: the README's first command, run as a new user would (no --config, from
another directory), uses the shipped settings, says so, generates clean text, and the audit flags the
generation damage the edit does (docs/editors.md, "Derailed generations"). Slow: real weights on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lmedit.scoring import generate_detailed

pytestmark = pytest.mark.slow
EIFFEL = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target-new", "Rome",
          "--target-true", "Paris"]
PROBES = ["--probe", "The Eiffel Tower can be found in the city of", "--probe", "The Louvre is located in the city of"]
NEVER_TEXT = re.compile(r"<start_of_image>|<end_of_image>|\[multimodal\]|<unused\d+>|<pad>|<mask>")


def test_readme_first_command_from_another_directory(tmp_path, gemma):
    ledger = tmp_path / "ledger"
    env = {**os.environ, "COLUMNS": "400"}  # one table row per line: nothing hides in rich's wrapping
    proc = subprocess.run([sys.executable, "-m", "lmedit.cli.main", "edit", *EIFFEL, *PROBES, "--ledger", str(ledger)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
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


def test_python_edit_without_config_uses_the_shipped_settings_and_generates_clean_text(gemma, gemma_eiffel_edit):
    prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower can be found in the city of",
               "The Louvre is located in the city of"]
    before = generate_detailed(gemma, prompts, max_new_tokens=16)
    edit = gemma_eiffel_edit.apply(gemma)  # lmedit.edit(gemma, request) with no config: the session's shared edit
    try:
        assert edit.config["layer"] == 2 and edit.config["clamp_norm_factor"] == 1.0
        after = generate_detailed(gemma, prompts, max_new_tokens=16)
    finally:
        edit.undo()
    assert all(g.text.strip().startswith("Rome") for g in after[:2]) and after[2].text.strip().startswith("Paris")
    assert not any(NEVER_TEXT.search(g.text) for g in before + after)
    # the damage stays visible: the paraphrase's never-text probability rises (measured 0.14 -> 0.48)
    assert after[1].never_text_max > before[1].never_text_max + 0.1
    assert abs(after[2].never_text_max - before[2].never_text_max) < 0.05  # the neighbour is untouched
