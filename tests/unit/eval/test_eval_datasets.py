"""Dataset loaders on the public samples in tests/data and on malformed files."""

from __future__ import annotations

import json

import pytest

from lmedit.eval.datasets import DatasetError, load_dataset
from lmedit.registry import datasets


def write(tmp_path, name, records, jsonl=False):
    path = tmp_path / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


ROME_RECORD = {
    "case_id": 7, "requested_rewrite": {"prompt": "{}, a citizen of", "relation_id": "P27", "subject": "Ada",
                                        "target_new": {"str": "Belgium"}, "target_true": {"str": "Switzerland"}},
    "paraphrase_prompts": ["Ada holds a citizenship from"], "neighborhood_prompts": ["Bob, a citizen of"],
    "attribute_prompts": ["Carl, a citizen of"], "generation_prompts": ["Ada is"],
}


def test_registry_lists_every_dataset():
    assert {"counterfact", "multi_counterfact", "zsre", "mquake", "starter"} <= set(datasets.names())


def test_counterfact_rome_layout_sample(test_data):
    ds = load_dataset("counterfact", test_data / "counterfact/most_orthogonal.json")
    assert len(ds) == 10 and not ds.issues
    r = ds.records[0]
    assert r.case_id == "4088" and r.requests[0].subject == "Ferdinand de Saussure"
    assert r.requests[0].target_new == "Belgium" and r.requests[0].target_true == "Switzerland"
    assert len(r.paraphrases) == 2 and len(r.neighborhood) == 10 and len(r.generation_prompts) == 10
    assert all(p.target == "Switzerland" and p.foil == "Belgium" for p in r.neighborhood)
    plus = r.neighborhood_plus[0].prompt
    assert plus.startswith("Ferdinand de Saussure, a citizen of Belgium. ") and plus.endswith(r.neighborhood[0].prompt)


def test_counterfact_easyedit_layout_sample(test_data):
    ds = load_dataset("counterfact", test_data / "counterfact/easyedit-val-50.json", limit=50)
    assert len(ds) == 50 and not ds.issues
    r = ds.records[0]
    assert "{}" in r.requests[0].prompt and r.requests[0].text.count(r.requests[0].subject) >= 1
    assert len(r.paraphrases) == 1 and len(r.neighborhood) == 1 and r.generation_prompts == ()


def test_zsre_sample(test_data):
    ds = load_dataset("zsre", test_data / "zsre/zsre-train-22.json")
    r = ds.records[0]
    assert r.requests[0].prompt == "What is the product made by {}?"
    assert r.requests[0].target_new == "unmanned aircraft" and r.requests[0].target_true == "uniform"
    assert r.neighborhood[0].foil is None and r.neighborhood[0].prompt.endswith("?")
    assert len(ds) == 20 and [i.field for i in ds.issues] == ["alt", "alt"]


def test_mquake_sample(test_data):
    ds = load_dataset("mquake", test_data / "mquake/MQuAKE-CF-3k-last3.json")
    assert len(ds) == 2
    r = ds.records[0]
    assert len(r.requests) == 4 and len(r.multihop) == 3
    assert r.multihop[0].target == "Turkish" and r.multihop[0].foil == "English"
    assert all(p.kind == "hop" for p in r.implications)


def test_starter_set_is_shipped_and_rich():
    ds = load_dataset("starter")
    assert len(ds) >= 60 and not ds.issues
    assert len({r.relation for r in ds.records}) >= 8
    kinds = {p.kind for r in ds.records for p in r.implications}
    assert {"symmetric", "transitive", "reverse"} <= kinds
    for r in ds.records:
        assert r.paraphrases and r.neighborhood and r.generation_prompts and r.reference_texts


def test_missing_field_is_reported_with_file_record_and_field(tmp_path):
    bad = dict(ROME_RECORD, case_id=8, requested_rewrite={k: v for k, v in ROME_RECORD["requested_rewrite"].items()
                                                           if k != "subject"})
    path = write(tmp_path, "cf.json", [ROME_RECORD, bad])
    ds = load_dataset("counterfact", path)
    assert len(ds) == 1 and len(ds.issues) == 1
    text = str(ds.issues[0])
    assert "cf.json" in text and "record 1" in text and "case_id 8" in text and "requested_rewrite.subject" in text
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 8\).*requested_rewrite.subject"):
        load_dataset("counterfact", path, strict=True)


def test_subject_absent_from_prompt(tmp_path):
    record = {"case_id": 1, "prompt": "The mother tongue of Danielle is", "subject": "Danielle Darrieux",
              "target_new": "English", "ground_truth": "French"}
    ds = load_dataset("counterfact", write(tmp_path, "ee.json", [record, ROME_RECORD]))
    assert [r.case_id for r in ds.records] == ["7"] and "does not occur in the prompt" in ds.issues[0].message
    assert ds.issues[0].field == "subject"


def test_duplicate_case_ids(tmp_path):
    ds = load_dataset("counterfact", write(tmp_path, "dup.jsonl", [ROME_RECORD, ROME_RECORD], jsonl=True))
    assert len(ds) == 1 and ds.issues[0].field == "case_id" and "duplicate" in ds.issues[0].message
    with pytest.raises(DatasetError, match="duplicate"):
        load_dataset("counterfact", tmp_path / "dup.jsonl", strict=True)


def test_unreadable_files(tmp_path):
    (tmp_path / "broken.json").write_text('[{"case_id": 1},\n{"case_id": \n')  # a JSON array that does not parse
    with pytest.raises(DatasetError, match="invalid JSON at line 3"):
        load_dataset("counterfact", tmp_path / "broken.json")
    (tmp_path / "broken.jsonl").write_text('{"case_id": 1}\n{"case_id": \n')  # JSON lines: every record is bad
    with pytest.raises(DatasetError, match=r"holds no valid counterfact record \(2 invalid; first: record 0"):
        load_dataset("counterfact", tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("counterfact", tmp_path / "missing.json")
    with pytest.raises(KeyError, match="Did you mean 'counterfact'"):
        load_dataset("counterfac", tmp_path / "broken.jsonl")


def test_unknown_layout_names_the_record(tmp_path):
    ds = load_dataset("counterfact", write(tmp_path, "x.json", [{"case_id": 3, "question": "?"}, ROME_RECORD]))
    assert "neither the ROME layout" in ds.issues[0].message and ds.issues[0].case_id == "3"
