"""MQuAKE multi-hop knowledge editing (Zhong et al. 2023, arXiv:2305.14795).

Each case holds several edits (`requested_rewrite[]`, ROME layout) applied together, three multi-hop
`questions` whose answer should move from `answer` to `new_answer`, and `new_single_hops` (the chain
of facts after the edits, as cloze prompts). Questions are scored as "Q: {question} A:" continuations,
new answer against old answer; the single hops whose answer changed become implication probes.

Not handled: answer aliases (kept in `meta`), MeLLo/in-context prompting, generation-based accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmedit.eval.datasets.reading import Issues, each_record, items, make_request, mapping, string, strings, text_of
from lmedit.eval.records import EvalRecord, Probe
from lmedit.registry import datasets

MQUAKE_URL = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k-v2.json"


def load_mquake(path: Path, issues: Issues) -> list[EvalRecord]:
    """Read MQuAKE cases; a case with any invalid edit is skipped whole."""
    def parse(index: int, case_id: str | int, raw: dict[str, Any]) -> EvalRecord | None:
        requests = []
        for j, rw in enumerate(items(raw["requested_rewrite"], "requested_rewrite")):
            field = f"requested_rewrite[{j}]"
            rw = mapping(rw, field)
            request = make_request(issues, index, case_id, field, rw.get("prompt"), rw.get("subject"),
                                   text_of(rw.get("target_new")), text_of(rw.get("target_true")))
            if request is None:
                return None
            requests.append(request)
        answer = string(text_of(raw["answer"]), "answer")
        new_answer = string(text_of(raw["new_answer"]), "new_answer")
        questions = tuple(Probe(f"Q: {q} A:", new_answer, answer) for q in strings(raw["questions"], "questions"))
        old_hops = items(raw.get("single_hops"), "single_hops")
        hops = []
        for j, hop in enumerate(items(raw.get("new_single_hops"), "new_single_hops")):
            old = old_hops[j].get("answer") if j < len(old_hops) and isinstance(old_hops[j], dict) else None
            if isinstance(hop, dict) and hop.get("cloze") and hop.get("answer") and old and old != hop["answer"]:
                hops.append(Probe(string(hop["cloze"], f"new_single_hops[{j}].cloze"),
                                  string(hop["answer"], f"new_single_hops[{j}].answer"),
                                  string(old, f"single_hops[{j}].answer"), kind="hop"))
        return EvalRecord(
            case_id=str(case_id), requests=tuple(requests), multihop=questions, implications=tuple(hops),
            source=f"{path.name}:{index}",
            meta={"new_answer_alias": raw.get("new_answer_alias", []), "answer_alias": raw.get("answer_alias", [])},
        )

    return each_record(path, issues, parse, fields=("requested_rewrite", "questions", "answer", "new_answer"))


datasets.register("mquake", filename="MQuAKE-CF-3k-v2.json", url=MQUAKE_URL,
                  description="MQuAKE multi-hop edits")(load_mquake)
