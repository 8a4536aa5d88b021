"""zsRE question answering edits (Levy et al. 2017), in the MEND/ROME record format (arXiv:2110.11309).

Record: {"subject", "src" (question containing the subject), "alt" (new answer), "answers" ([true, ...]),
"rephrase" (paraphrased question), "loc" (an unrelated Natural Questions query), "loc_ans"}.
As in ROME/MEMIT's zsRE evaluation the edit prompt is `src` with the subject replaced by `{}`, the
paraphrase is `rephrase`, and specificity is measured on `loc + "?"` completed by `loc_ans` (token
accuracy only: there is no foil for an unrelated question).

Not handled: `cond` (MEND's conditioning string) is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmedit.eval.datasets.reading import BadField, Issues, each_record, make_request, shown, string
from lmedit.eval.records import EvalRecord, Probe
from lmedit.registry import datasets

ZSRE_URL = "https://rome.baulab.info/data/dsets/zsre_mend_eval.json"


def load_zsre(path: Path, issues: Issues) -> list[EvalRecord]:
    """Read zsRE records (JSON array or lines); the record index is the case id when none is given."""
    def parse(index: int, case_id: str | int, raw: dict[str, Any]) -> EvalRecord | None:
        answers = raw["answers"]
        if not isinstance(answers, list) or not isinstance(answers[0], str):
            raise BadField("answers", f"must be a list of strings, got {shown(answers)}")
        true = answers[0] if answers[0].strip() and answers[0].strip() != str(raw["alt"]).strip() else None
        request = make_request(issues, index, case_id, "", raw["src"], raw["subject"], raw["alt"], true)
        if request is None:
            return None
        rephrase = string(raw.get("rephrase") or None, "rephrase", optional=True)
        paraphrases = (Probe(rephrase, request.target_new, request.target_true),) if rephrase else ()
        neighborhood: tuple[Probe, ...] = ()
        loc = string(raw.get("loc") or None, "loc", optional=True)
        if loc is not None:
            if not isinstance(raw.get("loc_ans"), str) or not raw["loc_ans"].strip():
                raise BadField("loc_ans", "missing while loc is given")
            neighborhood = (Probe(loc + "?", raw["loc_ans"].strip()),)  # ROME keeps "nq question: "
        return EvalRecord(case_id=str(case_id), requests=(request,), paraphrases=paraphrases,
                          neighborhood=neighborhood, source=f"{path.name}:{index}")

    return each_record(path, issues, parse, fields=("subject", "src", "alt", "answers"))


datasets.register("zsre", filename="zsre_mend_eval.json", url=ZSRE_URL,
                  description="zsRE (MEND/ROME record format)")(load_zsre)
