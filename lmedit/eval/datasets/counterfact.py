"""CounterFact (Meng et al. 2022, arXiv:2202.05262) and MultiCounterFact (Meng et al. 2023, arXiv:2210.07229).

Two public layouts, recognised per record:
  ROME JSON   {"case_id", "requested_rewrite": {"prompt" with {}, "subject", "target_new": {"str"},
              "target_true": {"str"}, "relation_id"}, "paraphrase_prompts", "neighborhood_prompts",
              "attribute_prompts", "generation_prompts"}
  EasyEdit    {"case_id", "prompt" (filled), "subject", "target_new", "ground_truth", "rephrase_prompt",
              "locality_prompt", "locality_ground_truth"}  (one paraphrase, one neighbour, nothing else)
Neighbourhood prompts share target_true, so each is a probe target_true vs target_new. Reference text
for consistency: ROME's attribute prompts (other subjects whose object is target_new) completed with
target_new, since the attribute snippets file is not distributed with the records.

`request_from_record(record)` reads just the edit request of one record (either layout): `lmedit edit
--request FILE` takes CounterFact files through it.

Not handled: ROME's Wikipedia attribute snippets and IDF file (consistency uses the IDF of the run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmedit.errors import RequestError
from lmedit.eval.datasets.reading import (BadField, Issues, each_record, make_request, require, shown, string, strings,
                                      text_of)
from lmedit.eval.records import EvalRecord, Probe
from lmedit.registry import datasets
from lmedit.types import EditRequest

ROME_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
MEMIT_URL = "https://memit.baulab.info/data/dsets/multi_counterfact.json"


def _rome_request(issues: Issues, index: int, raw: dict[str, Any]) -> EditRequest | None:
    case_id = raw.get("case_id")
    rewrite = raw["requested_rewrite"]
    if not isinstance(rewrite, dict):
        issues.add(index, case_id, "requested_rewrite", "must be an object")
        return None
    missing = require(rewrite, ("prompt", "subject", "target_new", "target_true"))
    if missing:
        issues.add(index, case_id, f"requested_rewrite.{missing[0]}", f"missing (also missing: {missing[1:]})"
                   if len(missing) > 1 else "missing")
        return None
    true = text_of(rewrite["target_true"])
    if not isinstance(true, str) or not true.strip():  # the neighbourhood probes' answer: needed
        issues.add(index, case_id, "requested_rewrite.target_true", f"must be a non-empty string, got {shown(true)}")
        return None
    return make_request(issues, index, case_id, "requested_rewrite", rewrite["prompt"], rewrite["subject"],
                        text_of(rewrite["target_new"]), true)


def _rome(issues: Issues, index: int, raw: dict[str, Any], source: str) -> EvalRecord | None:
    case_id = raw.get("case_id")
    request = _rome_request(issues, index, raw)
    if request is None:
        return None
    lists = {k: strings(raw.get(k), k)
             for k in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")}
    relation = raw["requested_rewrite"].get("relation_id")
    if relation is not None and not isinstance(relation, str):
        raise BadField("requested_rewrite.relation_id", f"must be a string (a Wikidata id), got {type(relation).__name__}")
    new, true = request.target_new, request.target_true
    return EvalRecord(
        case_id=str(case_id),
        requests=(request,),
        paraphrases=tuple(Probe(p, new, true) for p in lists["paraphrase_prompts"]),
        neighborhood=tuple(Probe(p, true, new) for p in lists["neighborhood_prompts"]),  # type: ignore[arg-type]
        generation_prompts=tuple(lists["generation_prompts"]),  # type: ignore[arg-type]
        reference_texts=tuple(f"{p} {new}." for p in lists["attribute_prompts"]),  # type: ignore[union-attr]
        relation=relation,
        source=source,
    )


def _easyedit_request(issues: Issues, index: int, raw: dict[str, Any]) -> EditRequest | None:
    case_id = raw.get("case_id")
    missing = require(raw, ("prompt", "subject", "target_new", "ground_truth"))
    if missing:
        issues.add(index, case_id, missing[0], "missing" if len(missing) == 1 else f"missing (also {missing[1:]})")
        return None
    return make_request(issues, index, case_id, "", raw["prompt"], raw["subject"], text_of(raw["target_new"]),
                        text_of(raw["ground_truth"]))


def _easyedit(issues: Issues, index: int, raw: dict[str, Any], source: str) -> EvalRecord | None:
    case_id = raw.get("case_id")
    request = _easyedit_request(issues, index, raw)
    if request is None:
        return None
    paraphrases, neighborhood = [], []
    rephrase = string(raw.get("rephrase_prompt") or None, "rephrase_prompt", optional=True)
    if rephrase is not None:
        paraphrases.append(Probe(rephrase, request.target_new, request.target_true))
    locality = string(raw.get("locality_prompt") or None, "locality_prompt", optional=True)
    if locality is not None:
        answer = raw.get("locality_ground_truth")
        if not isinstance(answer, str) or not answer.strip():
            issues.add(index, case_id, "locality_ground_truth", "missing while locality_prompt is given")
            return None
        neighborhood.append(Probe(locality, answer.strip(), request.target_new))
    return EvalRecord(case_id=str(case_id), requests=(request,), paraphrases=tuple(paraphrases),
                      neighborhood=tuple(neighborhood), source=source)


# Keys only the EasyEdit layout has (its prompt, subject and target_new are shared with lmedit's request format).
EASYEDIT_KEYS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")


def is_counterfact_record(record: Any) -> bool:
    """Whether `record` is in one of CounterFact's layouts (ROME's `requested_rewrite`, or EasyEdit's keys)."""
    return isinstance(record, dict) and ("requested_rewrite" in record or any(k in record for k in EASYEDIT_KEYS))


def request_from_record(record: Any) -> EditRequest:
    """The edit request of one CounterFact record, ROME or EasyEdit layout (EasyEdit's filled prompt gets its `{}`).

    Raises:
        RequestError: not a CounterFact record, or one whose fields make no request (the field is named).
    """
    if not is_counterfact_record(record):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise RequestError(f"not a CounterFact record: neither the ROME layout (requested_rewrite) nor the EasyEdit "
                           f"layout (prompt, subject, target_new, ground_truth); got {keys}")
    issues = Issues("")
    request = (_rome_request if "requested_rewrite" in record else _easyedit_request)(issues, 0, record)
    if request is None:
        issue = issues.items[0]
        raise RequestError(f"field {issue.field!r}: {issue.message}")
    return request


def load_counterfact(path: Path, issues: Issues) -> list[EvalRecord]:
    """Read CounterFact in either layout (see the module docstring); invalid records go to `issues`."""
    def parse(index: int, case_id: str | int, raw: dict[str, Any]) -> EvalRecord | None:
        source = f"{path.name}:{index}"
        if "requested_rewrite" in raw:
            return _rome(issues, index, raw, source)
        if "ground_truth" in raw or "prompt" in raw:
            return _easyedit(issues, index, raw, source)
        raise BadField("requested_rewrite", f"missing: neither the ROME layout (requested_rewrite) nor the EasyEdit "
                                            f"layout (prompt/ground_truth); keys are {sorted(raw)[:8]}")

    return each_record(path, issues, parse, case_id_required=True)


datasets.register("counterfact", filename="counterfact.json", url=ROME_URL,
                  description="CounterFact (ROME JSON or EasyEdit layout)")(load_counterfact)
datasets.register("multi_counterfact", filename="multi_counterfact.json", url=MEMIT_URL,
                  description="MultiCounterFact (MEMIT; ROME JSON layout)")(load_counterfact)
