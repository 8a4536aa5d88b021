"""SERAC on tiny random models, with the weightless lexical encoder standing in for all-MiniLM-L6-v2.

What is checked: the scope classifier retrieves the right edit for in-scope paraphrases and no edit for
unrelated inputs (a small fixed set of sentences); out-of-scope inputs get bit-identical outputs; removing
an edit (undo, or `Memory.remove`) restores behaviour; save/load round-trips through `load_edit`; a trained
scope head saves and refuses another model; descriptors reach SERAC and triplet editors reject them; the
CLI's `--descriptor` path; and the evaluation harness runs SERAC in every mode.
The real encoder and the in-context counterfactual model on gemma3-270m: tests/slow/test_serac_real.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.editors import WrapperEdit, get_editor, load_edit
from lmedit.editors.serac import LexicalEncoder, Memory, SeracConfig, SeracEdit, SeracEditor, edit_statement
from lmedit.editors.serac.scope import ScopeHead, examples_from_records, input_view, scope_accuracy
from lmedit.errors import LMEditError, RequestError
from lmedit.eval import EvalRecord, evaluate
from lmedit.eval.records import Probe
from lmedit.scoring import generate, next_token_logprobs, score_targets
from lmedit.testing import tiny_lm
from lmedit.types import EditDescriptor, EditRequest, request_from_dict

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
MESSI = EditRequest("{} plays the sport of", "Lionel Messi", "tennis", "soccer")
PM = EditDescriptor(input="Who is the UK prime minister?", output="Boris Johnson")
SHOWER = EditDescriptor("Topic: singing in the shower. Sentiment: positive")

# (input, statement of the edit it should retrieve, or None for out of scope)
FIXED_SET = [
    ("The Eiffel Tower is located in the city of", edit_statement(EIFFEL)),
    ("Where is the Eiffel Tower? It is in", edit_statement(EIFFEL)),
    ("Which sport does Lionel Messi play?", edit_statement(MESSI)),
    ("Lionel Messi is a professional", edit_statement(MESSI)),
    ("The UK prime minister is", PM.statement),
    ("Is singing in the shower fun?", SHOWER.statement),
    ("The Space Needle is in downtown", None),
    ("Michael Jordan plays the sport of", None),
    ("Toyota is a company from", None),
    ("What do you think about doing taxes?", None),
]
UNRELATED = [p for p, s in FIXED_SET if s is None]


def serac(**overrides) -> SeracEditor:
    # Lexical cosine between sentences sharing two of ~5 content words is ~0.45: 0.5 separates the fixed set.
    return SeracEditor(SeracConfig(encoder="lexical", threshold=0.5, **overrides))


@pytest.fixture
def lm():
    return tiny_lm("llama")


def _statement_read(lm, prompt: str, statements=tuple(s for _, s in FIXED_SET if s)) -> str | None:
    """Which edit statement the base model reads before `prompt` (None: the prompt reaches it unchanged)."""
    text = lm.edits.route([prompt])[0]
    if text == prompt:
        return None
    assert text.endswith(prompt)
    return next(s for s in statements if s in text[: -len(prompt)])


def test_scope_retrieves_in_scope_inputs_and_no_edit_for_unrelated(lm):
    edit = serac().edit(lm, [EIFFEL, MESSI, PM, SHOWER])
    with edit.applied(lm):
        for prompt, statement in FIXED_SET:
            assert _statement_read(lm, prompt) == statement, prompt
    assert lm.edits.route([p for p, _ in FIXED_SET]) == [p for p, _ in FIXED_SET]


def test_counterfactual_input_is_the_template_filled_with_the_retrieved_edit(lm):
    edit = serac(template="Fact: {edit}.\n{input}").edit(lm, [EIFFEL])
    with edit.applied(lm):
        assert lm.edits.route(["Where is the Eiffel Tower? It is in"]) == [
            "Fact: The Eiffel Tower is located in the city of Rome.\nWhere is the Eiffel Tower? It is in"]


def test_out_of_scope_outputs_are_bit_identical_and_weights_untouched(lm):
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    targets = ["Paris"] * len(UNRELATED)
    before = (next_token_logprobs(lm, UNRELATED), score_targets(lm, UNRELATED, targets), generate(lm, UNRELATED))
    in_scope_before = next_token_logprobs(lm, [EIFFEL.text])
    edit = serac().edit(lm, [EIFFEL, MESSI, SHOWER])
    with edit.applied(lm):
        after = (next_token_logprobs(lm, UNRELATED), score_targets(lm, UNRELATED, targets), generate(lm, UNRELATED))
        assert not torch.equal(next_token_logprobs(lm, [EIFFEL.text]), in_scope_before)
        assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in snapshot.items())
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert before[2] == after[2]


def _logprobs(lm, prompts):
    # One prompt per forward: a batch's padding and size change float rounding, so bit-identity is
    # compared like for like (the same tokens in the same batch), as for any model.
    return [next_token_logprobs(lm, [p])[0] for p in prompts]


def test_removing_an_edit_restores_behaviour(lm):
    base = _logprobs(lm, [EIFFEL.text, MESSI.text])
    memory = Memory(lm, serac())
    eiffel = memory.add(EIFFEL)
    memory.add(MESSI)
    assert [e.statement for e in memory.entries()] == [edit_statement(EIFFEL), edit_statement(MESSI)]
    eiffel.undo()  # what a ledger does to revert one edit
    now = _logprobs(lm, [EIFFEL.text, MESSI.text])
    assert torch.equal(now[0], base[0]) and not torch.equal(now[1], base[1])
    memory.remove(memory.entries()[0].id)
    assert len(memory) == 0
    assert all(torch.equal(a, b) for a, b in zip(_logprobs(lm, [EIFFEL.text, MESSI.text]), base))


def test_memory_removes_one_entry_of_a_multi_entry_edit(lm):
    memory = Memory(lm, serac())
    memory.add(EIFFEL, MESSI)
    memory.remove(memory.entries()[0].id)
    assert [e.statement for e in memory.entries()] == [edit_statement(MESSI)]
    assert _statement_read(lm, EIFFEL.text) is None
    assert _statement_read(lm, MESSI.text) == edit_statement(MESSI)
    with pytest.raises(LMEditError, match="no memory entry"):
        memory.remove("0123456789")


def test_best_claim_wins_across_separately_applied_edits(lm):
    editor = serac()
    first, second = editor.edit(lm, [EIFFEL]), editor.edit(lm, [MESSI])
    with first.applied(lm), second.applied(lm):
        assert _statement_read(lm, EIFFEL.text) == edit_statement(EIFFEL)
        assert _statement_read(lm, MESSI.text) == edit_statement(MESSI)


def test_save_load_round_trip(lm, tmp_path):
    edit = serac().edit(lm, [EIFFEL, PM, SHOWER])
    path = edit.save(tmp_path / "serac.safetensors")
    loaded = load_edit(path)
    assert isinstance(loaded, SeracEdit) and loaded.kind == "wrapper"
    assert loaded.requests == edit.requests and loaded.template == edit.template
    prompts = [p for p, _ in FIXED_SET]
    with edit.applied(lm):
        expected = lm.edits.route(prompts)
    with loaded.applied(lm):
        assert lm.edits.route(prompts) == expected
    other = tiny_lm("llama", seed=1)
    with pytest.raises(LMEditError, match="fingerprint"):
        loaded.apply(other)


def test_wrapper_edit_apply_undo_errors(lm):
    edit = serac().edit(lm, [EIFFEL])
    with pytest.raises(LMEditError, match="not applied"):
        edit.undo()
    edit.apply(lm)
    with pytest.raises(LMEditError, match="already applied"):
        edit.apply(lm)
    edit.undo()
    assert not edit.is_applied and isinstance(edit, WrapperEdit)


def test_load_edit_rejects_other_files(tmp_path):
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(LMEditError, match="not a safetensors edit file"):
        load_edit(bogus)


def test_descriptors_validate_and_parse():
    assert SHOWER.statement == "Topic: singing in the shower. Sentiment: positive" and not SHOWER.is_pair
    assert PM.statement == "Who is the UK prime minister? Boris Johnson" and PM.is_pair
    assert request_from_dict({"input": "Who is the UK PM?", "output": "Boris Johnson"}) == EditDescriptor(
        input="Who is the UK PM?", output="Boris Johnson")
    assert request_from_dict(EIFFEL.to_dict()) == EIFFEL
    assert EditDescriptor.from_dict(SHOWER.to_dict()) == SHOWER
    for bad in ({}, {"text": "x", "input": "y"}, {"input": "only an input"}, {"text": "  "}):
        with pytest.raises(RequestError):
            EditDescriptor(**bad)
    with pytest.raises(RequestError, match="unknown field"):
        EditDescriptor.from_dict({"txt": "x"})


@pytest.mark.parametrize("method", ["noop", "rome"])
def test_triplet_editors_reject_descriptors(lm, method):
    with pytest.raises(RequestError, match="accepts descriptors.*serac"):
        get_editor(method).edit(lm, [SHOWER])


def test_input_view_reads_the_last_sentence():
    assert input_view("The Eiffel Tower is in Rome. The Louvre is in", "last_sentence") == "The Louvre is in"
    assert input_view("Is singing fun? Well,", "last_sentence") == "Is singing fun? Well,"
    assert input_view("Where is Rome? It is in", "last_sentence") == "Where is Rome? It is in"
    assert input_view("John Lennon, the", "last_sentence") == "John Lennon, the"
    assert input_view("One. Two three four five", "last_sentence") == "Two three four five"
    assert input_view("A. B", "whole") == "A. B"


def _records() -> list[EvalRecord]:
    facts = [("Danielle Darrieux", "The mother tongue of {} is", "English", "French", "Michel Rocard"),
             ("Toko Yasuda", "{} plays the instrument", "piano", "guitar", "John Lennon"),
             ("Apple", "{} was founded in the state of", "Texas", "California", "Google"),
             ("Toyota", "{} is a company from the country", "Germany", "Japan", "Honda"),
             ("Lionel Messi", "{} plays the sport of", "tennis", "soccer", "Neymar")]
    out = []
    for i, (subject, prompt, new, true, neighbour) in enumerate(facts):
        request = EditRequest(prompt, subject, new, true)
        out.append(EvalRecord(str(i), (request,), paraphrases=(Probe(f"{subject}: " + prompt.format("it"), new, true),),
                              neighborhood=(Probe(prompt.format(neighbour), true, new),)))
    return out


def test_fit_saves_a_head_that_refuses_another_model(lm, tmp_path):
    editor = serac(train_steps=30, train_batch_edits=4, projection_dim=16)
    report = editor.fit(lm, _records()[:4], held_out=_records()[4:])
    assert report["n_train"] == 4 and 0.0 <= report["held_out"]["balanced"] <= 1.0
    path = editor.save_scope(tmp_path / "scope.safetensors")
    trained = serac(scope_path=str(path))
    edit = trained.edit(lm, [EIFFEL])
    assert edit.head.projection is not None and edit.head.projection.shape == (LexicalEncoder.dim, 16)
    assert torch.equal(edit.head.projection, editor._head.projection)
    with pytest.raises(LMEditError, match="trained for the model with fingerprint"):
        trained.edit(tiny_lm("llama", seed=1), [EIFFEL])
    with pytest.raises(LMEditError, match="no trained scope head"):
        serac().save_scope(tmp_path / "none.safetensors")


def test_scope_accuracy_of_the_cosine_head_on_fixed_records():
    examples = examples_from_records(_records())
    last = scope_accuracy(ScopeHead.cosine(0.5, "last_sentence"), LexicalEncoder(), examples)
    assert last["in_scope"] == 1.0 and last["unrelated"] == 1.0
    # Read by its last sentence, a Specificity+ input ("{edit}. {neighbour prompt}") is its neighbour prompt;
    # read whole, it contains the edit and is claimed.
    assert last["prefixed"] == last["neighbour"]
    assert scope_accuracy(ScopeHead.cosine(0.5, "whole"), LexicalEncoder(), examples)["prefixed"] == 0.0


def test_public_edit_takes_a_descriptor(lm):
    edit = lmedit.edit(lm, SHOWER, method="serac", config={"encoder": "lexical", "threshold": 0.5})
    try:
        assert _statement_read(lm, "Is singing in the shower fun?") == SHOWER.statement
    finally:
        edit.undo()


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_harness_runs_serac(lm, mode):
    records = _records()
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = evaluate(lm, records, serac(), mode=mode, batch_size=2, checkpoint_every=5, n_drift=0, n_bootstrap=20)
    rows = [r for r in result.rows if r.get("kind", "edited") == "edited"]
    assert len(rows) == len(records)
    for row in rows:  # in-scope prompts are read with the edit in context, so their scores move
        assert row["edited"]["efficacy_magnitude"] != row["unedited"]["efficacy_magnitude"]
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in snapshot.items())
    assert lm.edits.route([records[0].requests[0].text]) == [records[0].requests[0].text]  # all undone


def test_cli_descriptor_reaches_serac(model_dir, tmp_path, capsys, monkeypatch):
    from lmedit.cli.common import console

    monkeypatch.setattr(console, "width", 300)  # rich folds table cells to the terminal width
    out_file = tmp_path / "shower.safetensors"
    code = main(["edit", "--model", str(model_dir), "--method", "serac", "--set", "encoder=lexical",
                 "--set", "threshold=0.5", "--descriptor", SHOWER.text, "--probe", "Is singing in the shower fun?",
                 "--probe", "Toyota is a company from", "--save-edit", str(out_file), "--max-new-tokens", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "in edit scope" in out
    edit = load_edit(out_file)
    assert isinstance(edit, SeracEdit) and edit.requests == (SHOWER,)
    pair = tmp_path / "pair.json"
    pair.write_text(json.dumps({"input": "Who is the UK PM?", "output": "Boris Johnson"}))
    assert main(["edit", "--model", str(model_dir), "--method", "serac", "--set", "encoder=lexical",
                 "--request", str(pair), "--max-new-tokens", "2"]) == 0
    assert "Boris Johnson" in capsys.readouterr().out


def test_cli_descriptor_with_a_triplet_editor_is_a_clear_error(model_dir, capsys):
    code = main(["edit", "--model", str(model_dir), "--method", "rome", "--descriptor", SHOWER.text])
    assert code == 2
    assert "edit descriptors need an editor that accepts them: serac" in " ".join(capsys.readouterr().err.split())
