"""One bad dataset record is one reported issue, never an aborted load or a raw Python error.

For every built-in loader (counterfact, zsre, mquake, starter): a valid one-record JSON lines file loads; a
file holding good records and one malformed record (wrong field type, missing field, non-string prompt, a
record that is not an object, a line that is not JSON) loads the good records and reports the bad one as
one issue naming file, index, case id and field (also as a `DatasetWarning`); `strict=True` raises that
issue; a file with no valid record is an error. A sweep puts every JSON type into every field of every
layout and asserts only `LMEditError`s escape. The CLI's `lmedit eval --strict` prints one `error:` line.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

from lmedit.cli.main import main
from lmedit.errors import LMEditError
from lmedit.eval.datasets import DatasetError, DatasetWarning, load_dataset

COUNTERFACT = {
    "case_id": 7, "requested_rewrite": {"prompt": "{}, a citizen of", "relation_id": "P27", "subject": "Ada",
                                        "target_new": {"str": "Belgium"}, "target_true": {"str": "Switzerland"}},
    "paraphrase_prompts": ["Ada holds a citizenship from"], "neighborhood_prompts": ["Bob, a citizen of"],
    "attribute_prompts": ["Carl, a citizen of"], "generation_prompts": ["Ada is"],
}
EASYEDIT = {"case_id": 8, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
            "locality_prompt": "The mother tongue of Bob is", "locality_ground_truth": "German"}
ZSRE = {"case_id": 3, "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
        "rephrase": "What university did Watts Humphrey take part in?", "loc": "nq question: who played desmond",
        "loc_ans": "Sam Anderson"}
MQUAKE = {"case_id": 11,
          "requested_rewrite": [{"prompt": "{} was performed by", "subject": "Lady Madonna",
                                 "target_new": {"str": "Madonna"}, "target_true": {"str": "The Beatles"}}],
          "questions": ["Who performed Lady Madonna?"], "answer": "The Beatles", "new_answer": "Madonna",
          "single_hops": [{"cloze": "Lady Madonna was performed by", "answer": "The Beatles"}],
          "new_single_hops": [{"cloze": "Lady Madonna was performed by", "answer": "Madonna"}]}
STARTER = {"case_id": "capital-0", "relation": "capital",
           "requested_rewrite": {"prompt": "The capital of {} is the city of", "subject": "France",
                                 "target_true": {"str": "Paris"}, "target_new": {"str": "Rome"}},
           "paraphrase_prompts": ["The capital of France is called"],
           "neighborhood": [{"prompt": "The capital of Germany is the city of", "target": "Berlin"}],
           "generation_prompts": ["France is"], "reference_texts": ["Rome is the capital of France."],
           "implications": [{"kind": "reverse", "prompt": "{} is the capital of", "subject": "Rome",
                             "target": "France", "foil": "Italy"}]}
GOOD = {"counterfact": COUNTERFACT, "zsre": ZSRE, "mquake": MQUAKE, "starter": STARTER}


def _with_id(record: dict, case_id) -> dict:
    return {**copy.deepcopy(record), "case_id": case_id}


def _jsonl(tmp_path, name: str, lines: list) -> object:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _load(name, path, **kw):
    """Load, returning the dataset and the DatasetWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(name, path, **kw)
    return ds, [w for w in caught if issubclass(w.category, DatasetWarning)]


# ---- valid files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOOD))
def test_one_record_jsonl_loads(tmp_path, name):
    ds, warned = _load(name, _jsonl(tmp_path, "one.jsonl", [GOOD[name]]))
    assert len(ds) == 1 and ds.issues == [] and warned == []
    assert ds.records[0].case_id == str(GOOD[name]["case_id"])


def test_one_object_over_several_lines_and_a_bom_load(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(COUNTERFACT, indent=2), encoding="utf-8-sig")
    ds, _ = _load("counterfact", path)
    assert [r.case_id for r in ds.records] == ["7"] and ds.records[0].requests[0].subject == "Ada"


def test_easyedit_layout_one_record(tmp_path):
    ds, _ = _load("counterfact", _jsonl(tmp_path, "ee.jsonl", [EASYEDIT]))
    record = ds.records[0]
    assert record.requests[0].prompt == "The mother tongue of {} is"
    assert record.paraphrases[0].prompt == "Danielle Darrieux speaks" and record.neighborhood[0].target == "German"


def test_starter_implication_is_filled_without_str_format(tmp_path):
    braces = _with_id(STARTER, "braces")
    braces["implications"][0]["prompt"] = "{0} and {} is the capital of"  # other braces stay text
    ds, _ = _load("starter", _jsonl(tmp_path, "s.jsonl", [braces]))
    assert ds.records[0].implications[0].prompt == "{0} and Rome is the capital of"


# ---- one bad record among good ones ------------------------------------------------------------------------


def _set(path: str, value):
    """A change of one field (dotted path, list indexes as numbers) of a record."""
    def change(record):
        keys = path.split(".")
        target = record
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if value is _DROP:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
        return record
    return change


_DROP = object()

# (dataset, change of the good record, field the issue names, text in its message)
BAD_RECORDS = [
    ("counterfact", _set("requested_rewrite", "Ada, a citizen of Belgium"), "requested_rewrite", "must be an object"),
    ("counterfact", _set("requested_rewrite.subject", 5), "requested_rewrite.subject", "non-empty string, got 5"),
    ("counterfact", _set("requested_rewrite.prompt", ["{}"]), "requested_rewrite.prompt", "non-empty string"),
    ("counterfact", _set("requested_rewrite.target_new", {"id": "Q1"}), "requested_rewrite.target_new", "string"),
    ("counterfact", _set("requested_rewrite.subject", _DROP), "requested_rewrite.subject", "missing"),
    ("counterfact", _set("requested_rewrite.relation_id", ["P27"]), "requested_rewrite.relation_id", "string"),
    ("counterfact", _set("paraphrase_prompts", "Ada holds"), "paraphrase_prompts", "must be a list"),
    ("counterfact", _set("neighborhood_prompts", ["Bob", 3]), "neighborhood_prompts[1]", "must be a string"),
    ("counterfact", _set("case_id", {"id": 1}), "case_id", "non-empty string or an integer"),
    ("counterfact", _set("case_id", _DROP), "case_id", "missing"),
    ("counterfact", lambda r: {**EASYEDIT, "case_id": 9, "rephrase_prompt": 4}, "rephrase_prompt", "string"),
    ("counterfact", lambda r: {**EASYEDIT, "case_id": 9, "locality_ground_truth": None}, "locality_ground_truth",
     "missing while locality_prompt"),
    ("counterfact", lambda r: {**EASYEDIT, "case_id": 9, "prompt": 12}, "prompt", "non-empty string"),
    ("zsre", _set("answers", "Illinois"), "answers", "list of strings"),
    ("zsre", _set("answers", [5]), "answers", "list of strings"),
    ("zsre", _set("answers", []), "answers", "missing"),
    ("zsre", _set("src", 42), "prompt", "non-empty string"),
    ("zsre", _set("loc", 1), "loc", "non-empty string"),
    ("zsre", _set("rephrase", {"q": "?"}), "rephrase", "non-empty string"),
    ("zsre", _set("loc_ans", _DROP), "loc_ans", "missing while loc"),
    ("mquake", _set("requested_rewrite", 3), "requested_rewrite", "must be a list"),
    ("mquake", _set("requested_rewrite.0", "edit"), "requested_rewrite[0]", "must be a JSON object"),
    ("mquake", _set("requested_rewrite.0.subject", None), "requested_rewrite[0].subject", "non-empty string"),
    ("mquake", _set("questions", "Who?"), "questions", "must be a list"),
    ("mquake", _set("questions", [1]), "questions[0]", "must be a string"),
    ("mquake", _set("answer", ["The Beatles"]), "answer", "non-empty string"),
    ("mquake", _set("single_hops", 5), "single_hops", "must be a list"),
    ("mquake", _set("new_single_hops", {"cloze": "x"}), "new_single_hops", "must be a list"),
    ("mquake", _set("new_single_hops.0.cloze", 5), "new_single_hops[0].cloze", "non-empty string"),
    ("starter", _set("requested_rewrite", "France -> Rome"), "requested_rewrite", "must be a JSON object"),
    ("starter", _set("requested_rewrite.prompt", 1), "requested_rewrite.prompt", "non-empty string"),
    ("starter", _set("neighborhood", 2), "neighborhood", "must be a list"),
    ("starter", _set("neighborhood.0.target", 5), "neighborhood[0].target", "non-empty string"),
    ("starter", _set("implications.0.prompt", 3), "implications[0]", "needs strings"),
    ("starter", _set("implications.0.prompt", "{} of {}"), "implications[0]", "one '{}'"),
    ("starter", _set("paraphrase_prompts", [None]), "paraphrase_prompts[0]", "must be a string"),
    ("starter", _set("reference_texts", "Rome."), "reference_texts", "must be a list"),
    ("starter", _set("relation", ["capital"]), "relation", "must be a string"),
]


@pytest.mark.parametrize("name, change, field, text", BAD_RECORDS,
                         ids=[f"{n}-{f}-{i}" for i, (n, _, f, _) in enumerate(BAD_RECORDS)])
def test_bad_record_is_skipped_as_one_issue(tmp_path, name, change, field, text):
    good = GOOD[name]
    bad = change(_with_id(good, "bad-1"))
    path = _jsonl(tmp_path, "mixed.jsonl", [_with_id(good, "a"), bad, _with_id(good, "b")])
    ds, warned = _load(name, path)
    assert [r.case_id for r in ds.records] == ["a", "b"]
    assert len(ds.issues) == 1 and len(warned) == 1, ds.issues
    issue = ds.issues[0]
    assert issue.file == str(path) and issue.index == 1 and issue.field == field and text in issue.message, issue
    expected_id = bad.get("case_id") if isinstance(bad.get("case_id"), (str, int)) else None
    assert issue.case_id == (None if expected_id is None else str(expected_id))
    assert str(issue) in str(warned[0].message) and "mixed.jsonl" in str(warned[0].message)
    with pytest.raises(DatasetError, match=f"record 1.*field '{field}'".replace("[", r"\[").replace("]", r"\]")):
        load_dataset(name, path, strict=True)


@pytest.mark.parametrize("name", sorted(GOOD))
@pytest.mark.parametrize("bad, message", [
    ("[1, 2]", "must be a JSON object, got list"),
    ('"a record"', "must be a JSON object, got str"),
    ("null", "must be a JSON object, got NoneType"),
    ('{"case_id": 5, "requested_rewrite": ', "line 2 is not valid JSON"),
    ("NaN", "must be a JSON object, got float"),
    ("[" * 5000 + "]" * 5000, ""),  # nested past Python's recursion limit
])
def test_line_that_is_not_a_record(tmp_path, name, bad, message):
    path = _jsonl(tmp_path, "lines.jsonl", [_with_id(GOOD[name], "a"), bad, _with_id(GOOD[name], "b")])
    ds, warned = _load(name, path)
    assert [r.case_id for r in ds.records] == ["a", "b"] and len(ds.issues) == 1 and len(warned) == 1
    assert ds.issues[0].index == 1 and message in ds.issues[0].message and ds.issues[0].field == ""
    with pytest.raises(DatasetError, match="record 1"):
        load_dataset(name, path, strict=True)


@pytest.mark.parametrize("content, match", [
    ("", "holds no valid counterfact record \\(0 invalid\\)"),
    ("\n  \n", "holds no valid counterfact record"),
    (json.dumps({**COUNTERFACT, "requested_rewrite": 1}) + "\n", "1 invalid; first: record 0 \\(case_id 7\\)"),
    ("3\n", "first: record 0: must be a JSON object, got int"),
    ("[]", "holds no valid"),
])
def test_no_valid_record_is_an_error(tmp_path, content, match):
    path = tmp_path / "nothing.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_dataset("counterfact", path)


def test_duplicates_and_strict_report_the_first_issue_only(tmp_path):
    path = _jsonl(tmp_path, "two-bad.jsonl", [COUNTERFACT, {"case_id": 1}, "{oops", COUNTERFACT])
    ds, warned = _load("counterfact", path)
    assert len(ds) == 1 and [i.index for i in ds.issues] == [1, 2, None] and len(warned) == 3
    with pytest.raises(DatasetError) as info:
        load_dataset("counterfact", path, strict=True)
    assert "record 1 (case_id 1)" in str(info.value) and "record 2" not in str(info.value)
    assert "\n" not in str(info.value)


# ---- every JSON type in every field ------------------------------------------------------------------------

VALUES = [None, 0, -1.5, True, "", " ", "x", "{}", [], [None], ["x"], [[]], {}, {"str": 5}, {"str": "x"}]


def _fields(record: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in record.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += _fields(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out += _fields(value[0], f"{prefix}{key}.0.")
    return out


@pytest.mark.parametrize("name", sorted(GOOD) + ["easyedit"])
def test_any_value_in_any_field_is_an_issue_or_a_record(tmp_path, name):
    dataset, good = ("counterfact", EASYEDIT) if name == "easyedit" else (name, GOOD[name])
    lines, n = [_with_id(good, "good")], 0
    for field in _fields(good):
        if field == "case_id":
            continue
        for value in VALUES:
            lines.append(_set(field, value)(_with_id(good, f"case-{n}")))
            n += 1
    path = _jsonl(tmp_path, "sweep.jsonl", lines)
    try:
        ds, _ = _load(dataset, path)
    except LMEditError as exc:  # pragma: no cover - reported with the failing content
        pytest.fail(f"the load failed instead of skipping records: {exc}")
    assert len(ds.records) + len(ds.issues) == len(lines)  # each record loads or is one issue
    assert "good" in [r.case_id for r in ds.records]
    for record in ds.records:  # what loads is typed: the harness may use it
        for request in record.requests:
            assert all(isinstance(v, str) for v in (request.prompt, request.subject, request.target_new))
        probes = (*record.paraphrases, *record.neighborhood, *record.implications, *record.multihop)
        assert all(isinstance(p.prompt, str) and isinstance(p.target, str) for p in probes)
        assert all(isinstance(t, str) for t in (*record.generation_prompts, *record.reference_texts))
        assert record.relation is None or isinstance(record.relation, str)


# ---- the CLI -----------------------------------------------------------------------------------------------


def test_cli_eval_strict_is_one_error_line(model_dir, tmp_path, capsys):
    bad = _jsonl(tmp_path, "bad.jsonl", [COUNTERFACT, {**COUNTERFACT, "case_id": 8, "paraphrase_prompts": 5}])
    argv = ["eval", "--model", str(model_dir), "--method", "noop", "--dataset", "counterfact", "--data", str(bad)]
    assert main([*argv, "--strict", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "bad.jsonl: record 1 (case_id 8): field 'paraphrase_prompts'" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_eval_reports_a_file_without_records(model_dir, tmp_path, capsys):
    bad = _jsonl(tmp_path, "empty.jsonl", ['{"case_id": 1}'])
    assert main(["eval", "--model", str(model_dir), "--method", "noop", "--dataset", "counterfact",
                 "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "empty.jsonl holds no valid counterfact record" in err[-1]
