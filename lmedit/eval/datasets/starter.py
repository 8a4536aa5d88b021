"""The starter set shipped with lmedit: facts the default model (gemma3-270m) completes correctly.

Built and checked by `scripts/build_starter.py` (greedy generation must start with the true object).
Layout, one JSON object per line:
  {"case_id", "relation", "requested_rewrite": {ROME layout}, "paraphrase_prompts": [...],
   "neighborhood": [{"prompt", "target"}]   (other known facts; compared against target_new),
   "generation_prompts": [...], "reference_texts": [...],
   "implications": [{"kind", "prompt" with {}, "subject", "target", "foil"}], "known": {...}}
Implication kinds: symmetric (spouse, antonym), transitive (landmark -> city -> country) and reverse
(capital -> country, book -> author, company -> founder).

Not handled: other models may not know these facts; rebuild with `--model` for them.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from lmedit.eval.datasets.reading import (BadField, Issues, each_record, items, make_request, mapping, require, string, strings,
                                      text_of)
from lmedit.eval.records import EvalRecord, Probe
from lmedit.registry import datasets
from lmedit.types import EditRequest


def starter_path() -> Path:
    return Path(str(files("lmedit") / "data" / "starter.jsonl"))


def load_starter(path: Path, issues: Issues) -> list[EvalRecord]:
    """Read starter-layout records (see the module docstring)."""
    def parse(index: int, case_id: str | int, raw: dict[str, Any]) -> EvalRecord | None:
        rw = mapping(raw["requested_rewrite"], "requested_rewrite")
        request = make_request(issues, index, case_id, "requested_rewrite", rw.get("prompt"), rw.get("subject"),
                               text_of(rw.get("target_new")), text_of(rw.get("target_true")))
        if request is None:
            return None
        neighborhood = []
        for j, item in enumerate(items(raw.get("neighborhood"), "neighborhood")):
            if not isinstance(item, dict) or require(item, ("prompt", "target")):
                raise BadField(f"neighborhood[{j}]", "needs 'prompt' and 'target'")
            neighborhood.append(Probe(string(item["prompt"], f"neighborhood[{j}].prompt"),
                                      string(item["target"], f"neighborhood[{j}].target"), request.target_new))
        implications = []
        fields = ("kind", "prompt", "subject", "target", "foil")
        for j, item in enumerate(items(raw.get("implications"), "implications")):
            if not isinstance(item, dict) or require(item, fields) \
                    or not all(isinstance(item[f], str) for f in fields) or item["prompt"].count("{}") != 1:
                raise BadField(f"implications[{j}]", f"needs strings {fields}, prompt with one '{{}}'")
            # The subject goes where "{}" is; str.format would also read any other braces of stored text.
            implications.append(Probe(item["prompt"].replace("{}", item["subject"], 1), item["target"], item["foil"],
                                      kind=item["kind"]))
        relation = raw.get("relation")
        if relation is not None and not isinstance(relation, str):
            raise BadField("relation", f"must be a string, got {type(relation).__name__}")
        return EvalRecord(
            case_id=str(case_id), requests=(request,),
            paraphrases=tuple(Probe(p, request.target_new, request.target_true)
                              for p in strings(raw.get("paraphrase_prompts"), "paraphrase_prompts")),
            neighborhood=tuple(neighborhood),
            generation_prompts=strings(raw.get("generation_prompts"), "generation_prompts"),
            reference_texts=strings(raw.get("reference_texts"), "reference_texts"),
            implications=tuple(implications),
            relation=relation, source=f"{path.name}:{index}",
        )

    return each_record(path, issues, parse, fields=("requested_rewrite",))


datasets.register("starter", filename=None, url=None, description="facts gemma3-270m knows (shipped)",
                  default_path=starter_path)(load_starter)


def starter_requests(*case_ids: str) -> list[EditRequest]:
    """The edit requests of the named starter records (e.g. "capital-0"), in the order given."""
    records = {r["case_id"]: r for r in map(json.loads, starter_path().read_text(encoding="utf-8").splitlines())}
    missing = [c for c in case_ids if c not in records]
    if missing:
        raise KeyError(f"no starter record with case_id {missing[0]!r}")
    return [EditRequest.from_dict(records[c]["requested_rewrite"]) for c in case_ids]
