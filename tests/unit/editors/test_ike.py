"""IKE on tiny random models, with the weightless lexical encoder standing in for all-MiniLM-L6-v2.

What is checked: the text the base model reads (the paper's "New Fact:"/"Prompt:" format, demonstrations of
the three kinds, least similar first), retrieval order by similarity, truncation of demonstrations to the
model's context (and refusing a request that cannot fit), scope "similar", save/load round trip, undo, the
shipped pool's provenance and disjointness from the starter set, and the ledger's record of an IKE edit.
The in-context edit on gemma3-270m: tests/slow/test_ike_real.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.editors import load_edit
from lmedit.editors.ike import (DEMO_KINDS, IkeConfig, IkeEdit, IkeEditor, PoolFact, demonstration_text, ike_text,
                                load_pool, retrieve)
from lmedit.editors.serac.scope import LexicalEncoder
from lmedit.errors import ConfigError, EditFileError, InputFileError, RequestError
from lmedit.scoring import next_token_logprobs
from lmedit.testing import tiny_lm
from lmedit.tokens import context_length, prompt_ids

EIFFEL = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
MESSI = lmedit.EditRequest("{} plays the sport of", "Lionel Messi", "tennis", "soccer")


def ike(**overrides) -> IkeEditor:
    return IkeEditor(IkeConfig(**{"encoder": "lexical", "k": 3, "reserve_tokens": 4, **overrides}))


@pytest.fixture
def lm():
    return tiny_lm("llama")


def _fact(subject: str, city: str) -> PoolFact:
    return PoolFact(subject=subject, prompt=f"{subject} is located in the city of", target_new=city,
                    target_true="Berlin", paraphrase=f"Where is {subject}? In", neighbour_prompt="Berlin Zoo is in",
                    neighbour_answer="Berlin")


def test_prompt_format_is_the_papers():
    demo = demonstration_text("Toko Yasuda plays the piano", "Toko Yasuda is incredible at", "piano")
    assert demo == "New Fact: Toko Yasuda plays the piano.\nPrompt: Toko Yasuda is incredible at piano\n\n"
    text = ike_text([demo], "The Eiffel Tower is located in the city of Rome", "The Eiffel Tower is in")
    assert text == demo + "New Fact: The Eiffel Tower is located in the city of Rome.\nPrompt: The Eiffel Tower is in"
    fact = _fact("Big Ben", "Rome")
    assert fact.demonstration("copy").endswith("Prompt: Big Ben is located in the city of Rome\n\n")
    assert fact.demonstration("update").endswith("Prompt: Where is Big Ben? In Rome\n\n")
    assert fact.demonstration("retain").endswith("Prompt: Berlin Zoo is in Berlin\n\n")


def test_retrieval_orders_by_similarity_most_similar_last():
    encoder = LexicalEncoder()
    pool = [_fact("Sydney Opera House", "Oslo"), _fact("The Eiffel Tower", "Madrid"),
            _fact("The Eiffel Bridge", "Lyon"), _fact("Tower Bridge", "Lima")]
    keys = encoder.encode([p.fact for p in pool])
    query = encoder.encode(["The Eiffel Tower is located in the city of Rome"])[0]
    order = sorted(range(len(pool)), key=lambda i: -float(keys[i] @ query))
    demos = retrieve(query, pool, keys, 3)
    expected = [pool[i].demonstration(DEMO_KINDS[r]) for r, i in enumerate(order[:3])][::-1]
    assert demos == expected and order[0] == 1  # the same-subject record is nearest ...
    skipped = retrieve(query, pool, keys, 3, exclude_subject="the eiffel tower")
    assert all("The Eiffel Tower is located" not in d for d in skipped)  # ... and left out for that subject
    assert retrieve(query, pool, keys, 0) == []


def test_edit_reads_fact_and_demonstrations_and_undo_restores(lm):
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    before = next_token_logprobs(lm, [EIFFEL.text])[0]
    edit = ike().edit(lm, [EIFFEL])
    assert isinstance(edit, IkeEdit) and len(edit.entries[0].demonstrations) == 3
    assert all(d.startswith("New Fact: ") and d.endswith("\n\n") for d in edit.entries[0].demonstrations)
    with edit.applied(lm):
        text = lm.edits.route([EIFFEL.text])[0]
        assert text.endswith("New Fact: The Eiffel Tower is located in the city of Rome.\nPrompt: " + EIFFEL.text)
        assert edit.entries[0].demonstrations[-1] + "New Fact: The Eiffel" in text  # most similar next to the fact
        assert lm.edits.route(["Toyota is a company from"])[0].endswith("Prompt: Toyota is a company from")  # scope all
        assert not torch.equal(next_token_logprobs(lm, [EIFFEL.text])[0], before)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in snapshot.items())
    assert lm.edits.route([EIFFEL.text]) == [EIFFEL.text]
    assert torch.equal(next_token_logprobs(lm, [EIFFEL.text])[0], before)


def test_each_input_reads_its_nearest_fact_and_scope_similar_leaves_others(lm):
    edit = ike(k=0).edit(lm, [EIFFEL, MESSI])
    with edit.applied(lm):
        assert "Lionel Messi plays the sport of tennis" in lm.edits.route(["Which sport does Lionel Messi play?"])[0]
        assert "Eiffel Tower is located in the city of Rome" in lm.edits.route(["Where is the Eiffel Tower?"])[0]
    similar = ike(k=0, scope="similar", threshold=0.5).edit(lm, [EIFFEL])
    with similar.applied(lm):
        assert lm.edits.route(["Toyota is a company from"]) == ["Toyota is a company from"]
        assert lm.edits.route([EIFFEL.text]) != [EIFFEL.text]


def test_demonstrations_are_truncated_to_the_context_least_similar_first(lm):
    limit = context_length(lm)
    edit = ike(k=12, reserve_tokens=4).edit(lm, [EIFFEL])
    full = ike_text(edit.entries[0].demonstrations, edit.entries[0].statement, EIFFEL.text)
    assert len(prompt_ids(lm, full)) > limit  # 12 demonstrations do not fit a 128-token context
    with edit.applied(lm):
        text = lm.edits.route([EIFFEL.text])[0]
        assert len(prompt_ids(lm, text)) <= limit - 4
        kept = [d for d in edit.entries[0].demonstrations if d in text]
        assert kept and kept == list(edit.entries[0].demonstrations[-len(kept):])  # the most similar are kept
        next_token_logprobs(lm, [EIFFEL.text])  # scoring the routed text runs within the context
        long_prompt = "Where is it " * 30
        assert lm.edits.route([long_prompt]) == [long_prompt]  # no room for the fact: left unclaimed


def test_a_request_that_cannot_fit_with_its_fact_is_refused(lm):
    # ~50 tokens alone (fits the 128-token context), ~115 with its fact in front: with 16 reserved it cannot fit.
    long = lmedit.EditRequest("{} " + "is a big tower " * 5 + "in", "The Eiffel Tower", "Rome", "Paris")
    with pytest.raises(RequestError, match="edit request 0: IKE reads 'New Fact"):
        ike(reserve_tokens=16).edit(lm, [long])
    assert ike(reserve_tokens=0).edit(lm, [long]).requests == (long,)


def test_config_checks():
    with pytest.raises(ConfigError, match="IkeConfig.scope"):
        IkeConfig(scope="some")
    with pytest.raises(ConfigError, match="IkeConfig.encoder"):
        IkeConfig(encoder="bert")
    with pytest.raises(ConfigError, match="k"):
        IkeConfig(k=-1)


def test_save_load_round_trip(lm, tmp_path):
    edit = ike().edit(lm, [EIFFEL, MESSI])
    loaded = load_edit(edit.save(tmp_path / "ike.safetensors"))
    assert isinstance(loaded, IkeEdit) and loaded.requests == edit.requests
    assert loaded.metadata() == edit.metadata()
    assert torch.equal(loaded.tensors()["keys"], edit.tensors()["keys"])
    with edit.applied(lm):
        expected = lm.edits.route([EIFFEL.text, "Toyota is a company from"])
    with loaded.applied(lm):
        assert lm.edits.route([EIFFEL.text, "Toyota is a company from"]) == expected
    tensors, meta = edit.tensors(), edit.metadata()
    common = {"base_fingerprint": lm.fingerprint, "method": "ike"}
    with pytest.raises(EditFileError, match="'scope'"):
        IkeEdit.from_saved(tensors, {**meta, "scope": "x"}, common)
    with pytest.raises(EditFileError, match="2 entries but tensor 'keys' has 1 rows"):
        IkeEdit.from_saved({"keys": tensors["keys"][:1]}, meta, common)
    with pytest.raises(EditFileError, match=r"'entries'\[0\]"):
        IkeEdit.from_saved(tensors, {**meta, "entries": [{"statement": "x"}] * 2}, common)


def test_shipped_pool_has_provenance_and_no_starter_subject():
    pool = load_pool()
    assert 100 <= len(pool) <= 200
    from importlib.resources import files

    lines = (files("lmedit") / "data" / "ike_demos.jsonl").read_text().splitlines()
    assert "counterfact-train.json" in json.loads(lines[0])["_source"]
    starter = [json.loads(line) for line in (files("lmedit") / "data" / "starter.jsonl").read_text().splitlines()]
    subjects = {r["requested_rewrite"]["subject"].lower() for r in starter}
    assert not subjects & {p.subject.lower() for p in pool}
    assert all(json.loads(line)["case_id"] > 2000 for line in lines[1:])


def test_a_bad_pool_file_names_line_and_field(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"subject": "X", "prompt": "X is in"}) + "\n")
    with pytest.raises(InputFileError, match="line 1: field 'target_new'"):
        load_pool(path)


def test_ledger_records_and_reverts_an_ike_edit(lm, tmp_path):
    from lmedit.ledger import AuditConfig, Ledger
    from lmedit.ledger.audit import CHECKS

    lenient = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                          generation_tokens=0)
    ledger = Ledger(tmp_path / "ledger", audit_config=lenient)
    edit = ike(k=1).edit(lm, [EIFFEL])
    commit = ledger.record(lm, edit)
    row = ledger.entry(commit.edit_id)
    assert commit.recorded and row.kind == "wrapper" and row.method == "ike"
    saved = load_edit(ledger.path / "patches" / row.patch)
    assert isinstance(saved, IkeEdit) and saved.metadata() == edit.metadata()
    assert lm.edits.route([EIFFEL.text]) != [EIFFEL.text]
    ledger.revert(commit.edit_id, lm)
    assert lm.edits.route([EIFFEL.text]) == [EIFFEL.text]


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_harness_runs_ike(lm, mode):
    from lmedit.eval import EvalRecord, evaluate
    from lmedit.eval.records import Probe

    facts = [("Toko Yasuda", "{} plays the instrument", "piano", "guitar", "John Lennon"),
             ("Toyota", "{} is a company from the country", "Germany", "Japan", "Honda"),
             ("Lionel Messi", "{} plays the sport of", "tennis", "soccer", "Neymar")]
    records = [EvalRecord(str(i), (lmedit.EditRequest(prompt, subject, new, true),),
                          paraphrases=(Probe(f"{subject}: " + prompt.format("it"), new, true),),
                          neighborhood=(Probe(prompt.format(neighbour), true, new),))
               for i, (subject, prompt, new, true, neighbour) in enumerate(facts)]
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = evaluate(lm, records, ike(k=1), mode=mode, batch_size=2, checkpoint_every=5, n_drift=0, n_bootstrap=20)
    rows = [r for r in result.rows if r.get("kind", "edited") == "edited"]
    assert len(rows) == len(records)
    for row in rows:  # every prompt is read with the fact in context, so its scores move
        assert row["edited"]["efficacy_magnitude"] != row["unedited"]["efficacy_magnitude"]
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in snapshot.items())
    assert lm.edits.route([records[0].requests[0].text]) == [records[0].requests[0].text]  # all undone
