"""The web app's form checks (lmedit/web/inputs.py): every field bounded, every refusal an `LMEditError` that
names the field, before the model sees anything. Plain Python, no model, no browser."""

from __future__ import annotations

import pytest

from lmedit.errors import ConfigError, LMEditError, RequestError
from lmedit.web import inputs

KNOWN = ["alpha", "beta", "gamma", "delta", "epsilon"]  # stand-ins: the checks never look at real method names


def test_edit_request_is_checked_by_the_form_then_by_the_library():
    r = inputs.edit_request("  {} is located in the city of ", "The Eiffel Tower", "Rome", "")
    assert (r.prompt, r.subject, r.target_new, r.target_true) == ("{} is located in the city of", "The Eiffel Tower",
                                                                  "Rome", None)
    with pytest.raises(RequestError, match="^subject: required"):
        inputs.edit_request("{} is in", "  ", "Rome", None)
    with pytest.raises(RequestError, match=f"^prompt: at most {inputs.MAX_PROMPT_CHARS} characters, got 201"):
        inputs.edit_request("{}" + "x" * 199, "A", "B", None)
    with pytest.raises(RequestError, match=f"^new target: at most {inputs.MAX_TARGET_CHARS}"):
        inputs.edit_request("{} is", "A", "B" * 61, None)
    with pytest.raises(RequestError, match="exactly one '{}'"):  # the library's own check
        inputs.edit_request("Where is", "A", "B", None)
    with pytest.raises(RequestError, match="^prompt: expected text, got int"):
        inputs.edit_request(5, "A", "B", None)


def test_probe_lines_are_parsed_and_bounded():
    assert inputs.paraphrases("\n Where can you find the Eiffel Tower? \n\n") == ["Where can you find the Eiffel Tower?"]
    assert inputs.neighbors("The Louvre is in = Paris\nA = B = C") == [("The Louvre is in", "Paris"), ("A = B", "C")]
    assert inputs.paraphrases(None) == [] and inputs.neighbors("") == []
    with pytest.raises(RequestError, match=r"^neighbours, line 2: expected PROMPT = ANSWER, got 'no answer here'"):
        inputs.neighbors("a = b\nno answer here")
    with pytest.raises(RequestError, match="^neighbours, line 1: expected PROMPT = ANSWER"):
        inputs.neighbors("prompt = ")
    with pytest.raises(RequestError, match=f"^paraphrases: at most {inputs.MAX_PROBE_LINES} lines, got 6"):
        inputs.paraphrases("\n".join(f"p{i}" for i in range(6)))
    with pytest.raises(RequestError, match="^paraphrases, line 1: at most 200"):
        inputs.paraphrases("x" * 201)


def test_methods_must_be_registered_and_few():
    assert inputs.method(" beta ", KNOWN) == "beta"
    with pytest.raises(RequestError, match=r"^method: 'zeta' is not a registered editor \(known: alpha, beta"):
        inputs.method("zeta", KNOWN)
    assert inputs.methods(["beta", "alpha", "beta"], KNOWN) == ["beta", "alpha"]
    with pytest.raises(RequestError, match="^methods: choose at least one"):
        inputs.methods([], KNOWN)
    with pytest.raises(RequestError, match=f"^methods: at most {inputs.MAX_COMPARE_METHODS} at a time"):
        inputs.methods(KNOWN, KNOWN)


def test_settings_box_takes_a_yaml_mapping_and_round_trips():
    values = {"layer": None, "v_lr": 0.5, "layers": [2, 3], "corpus": "file:/tmp/c.txt"}
    assert inputs.settings(inputs.settings_text(values)) == values
    assert list(inputs.settings(inputs.settings_text(values))) == list(values)  # the config's order is kept
    with pytest.raises(ConfigError, match=r"^settings: not valid YAML \(line 2, column 1\)"):
        inputs.settings("a: 1\n- b")
    with pytest.raises(ConfigError, match="^settings: expected one `field: value` per line, got a YAML list"):
        inputs.settings("- 1\n- 2")
    with pytest.raises(ConfigError, match="^settings: empty"):
        inputs.settings("   ")
    with pytest.raises(ConfigError, match=f"^settings: at most {inputs.MAX_SETTINGS_CHARS}"):
        inputs.settings("a: 1\n" * 1000)


def test_trace_query_wants_a_filled_prompt_holding_the_subject():
    q = inputs.trace_query("The Space Needle is in downtown", "The Space Needle", "", 3.0)
    assert (q.prompt, q.subject, q.answer, q.samples) == ("The Space Needle is in downtown", "The Space Needle", None, 3)
    with pytest.raises(RequestError, match="^prompt: the Trace tab takes the filled prompt"):
        inputs.trace_query("{} is in downtown", "The Space Needle", None, 3)
    with pytest.raises(RequestError, match="^subject: 'Seattle' does not occur in the prompt"):
        inputs.trace_query("The Space Needle is in downtown", "Seattle", None, 3)
    with pytest.raises(RequestError, match=f"^noise samples: expected 1 to {inputs.MAX_TRACE_SAMPLES}, got 0"):
        inputs.trace_query("The Space Needle is in downtown", "The Space Needle", None, 0)
    for bad in (2.5, "x", True, float("nan")):
        with pytest.raises(RequestError, match="^noise samples: expected a whole number"):
            inputs.trace_query("The Space Needle is in downtown", "The Space Needle", None, bad)


def test_ledger_fields():
    assert inputs.edit_id(2.0, [1, 2]) == 2 and inputs.edit_id("1", [1]) == 1
    with pytest.raises(RequestError, match=r"^edit id: the ledger has no edit 3 \(ids: 1, 2\)"):
        inputs.edit_id(3, [1, 2])
    with pytest.raises(RequestError, match="^edit id: required"):
        inputs.edit_id(None, [1])
    assert inputs.export_name("gemma-edited_1.0") == "gemma-edited_1.0"
    for bad in ("../up", ".hidden", "a/b", "x" * 65):
        with pytest.raises(LMEditError, match="^export name: "):
            inputs.export_name(bad)
