"""Behaviour unchanged: every built-in editor's edit equals, bit for bit, the one recorded before the typed edit
stack refactor (#21) — on tiny models of two families, and ROME/MEMIT on the default model for two facts.

The recorded checksums are in tests/data/golden/ (written by tests/contract/golden.py). A deliberate change of
an editor's numbers re-records them there, in the same commit, saying why.
"""

from __future__ import annotations

import json

import pytest
from golden import FAMILIES, GOLDEN, REAL_METHODS, fingerprint, matches, real_edit, tiny_edit, tiny_methods

from lmedit.editors import get_editor
from lmedit.testing import tiny_lm

TINY = json.loads((GOLDEN / "tiny.json").read_text())
REAL = json.loads((GOLDEN / "gemma3-270m.json").read_text())


def test_every_built_in_editor_has_a_golden_edit():
    assert sorted({key.split("/")[0] for key in TINY}) == tiny_methods()
    assert all(TINY[f"{m}/{f}"] for m in tiny_methods() if m != "noop" for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", tiny_methods())
def test_tiny_edit_matches_the_recorded_one(method, family, tmp_path):
    if method == "noop":
        from test_editors import REQUEST

        edit = get_editor("noop").edit(tiny_lm(family), [REQUEST])
    else:
        edit = tiny_edit(method, family, tmp_path)
    problems = matches(fingerprint(edit), TINY[f"{method}/{family}"])
    assert not problems, problems


@pytest.mark.slow
@pytest.mark.parametrize("method", REAL_METHODS)
def test_default_model_edit_matches_the_recorded_one(method, gemma):
    problems = matches(fingerprint(real_edit(method, gemma)), REAL[method])
    assert not problems, problems
