"""The audit's probes for one edit request, generated from the request itself (an `EvalRecord`).

For a request "{} is located in the city of" / "The Eiffel Tower" -> "Rome" (was "Paris"):
  rewrite          the edit prompt: P(Rome) against P(Paris)
  paraphrase       the starter set's paraphrases of this exact fact, the user's, and the edit prompt behind
                   two fixed context prefixes (ROME's generalisation prompts are "{random prefix}. {rephrasing}")
  neighborhood     other subjects of the same prompt template from the starter set (their known answers
                   against "Rome"), a few fixed well-known facts about other things, and the user's:
                   each answer must still beat "Rome"
  neighborhood+    the same prompts prefixed by the edit stated as a fact ("... Paris Rome. The Louvre is
                   located in the city of"): Specificity+ (Hoelscher-Obermaier et al. 2023, arXiv:2305.17553)
                   catches "loud" edits that make "Rome" likely after any mention of it
  implication      the starter set's implications of this exact edit (transitive, reverse), and a symmetric
                   probe ("{target_new} r {subject}") when the starter set marks the template's relation symmetric
  essence          "{subject} is a" (KL of the next token, ROME's essence prompt)
  generation       fixed prompts and "{subject} is", continued greedily (fluency)
When the request has no target_true, the unedited model's greedy answer stands in as the foil.

Not handled: paraphrases written by a model or a thesaurus (only fixed context prefixes are generated);
transitive and reverse implications of edits outside the starter set (they need world knowledge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from lmedit.eval.records import EvalRecord, Probe
from lmedit.scoring import generate
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

# Facts both built-in models complete correctly, from unrelated relations: an edit must not move them.
GENERIC_NEIGHBORS: tuple[tuple[str, str], ...] = (
    ("The capital of Japan is the city of", "Tokyo"),
    ("The official language of Germany is", "German"),
    ("The opposite of up is", "down"),
    ("Michael Jordan plays the sport of", "basketball"),
    ("The Statue of Liberty is located in the city of", "New York"),
)
CONTEXT_PREFIXES: tuple[str, ...] = ("In a few words: ", "Here is a fact. ")
GENERATION_PROMPTS: tuple[str, ...] = ("The weather today is", "Once upon a time,")
MAX_STARTER_NEIGHBORS = 5


@lru_cache(maxsize=1)
def _starter() -> tuple[EvalRecord, ...]:
    from lmedit.eval.datasets import load_dataset

    return tuple(load_dataset("starter").records)


def _norm(text: str | None) -> str:
    return (text or "").strip().lower()


def derive_foil(lm: LM, request: EditRequest) -> str | None:
    """The unedited model's answer to the edit prompt (first word of a greedy continuation), as a foil."""
    text = generate(lm, [request.text], max_new_tokens=4)[0].strip()
    word = text.split()[0].strip(".,;:!?\"'()") if text.split() else ""
    return word if word and _norm(word) != _norm(request.target_new) else None


def build_record(request: EditRequest, *, foil: str | None = None, paraphrases: Sequence[str] = (),
                 neighbors: Sequence[tuple[str, str]] = (), generic_neighbors: bool = True,
                 context_paraphrases: bool = True, case_id: str = "") -> EvalRecord:
    """The audit record of `request` (see the module docstring).

    Args:
        request: the edit request.
        foil: the old answer when `request.target_true` is None (see `derive_foil`).
        paraphrases: extra filled prompts that should now be answered with target_new.
        neighbors: extra (filled prompt, answer) pairs whose answer must survive the edit.
        generic_neighbors: add the fixed well-known facts of `GENERIC_NEIGHBORS`.
        context_paraphrases: add the edit prompt behind `CONTEXT_PREFIXES`.
    """
    old = request.target_true or foil
    new = request.target_new
    text = request.text
    starter = _starter()
    same_fact = [r for r in starter if r.requests[0].prompt == request.prompt
                 and _norm(r.requests[0].subject) == _norm(request.subject)]
    same_template = [r for r in starter if r.requests[0].prompt == request.prompt and r not in same_fact]

    para = [p.prompt for r in same_fact for p in r.paraphrases] + list(paraphrases)
    if context_paraphrases:
        para += [prefix + text for prefix in CONTEXT_PREFIXES]

    pairs: list[tuple[str, str]] = []
    for r in same_template:  # other subjects of the same relation, with the answers the starter set knows
        first = r.requests[0]
        if first.target_true and len(pairs) < MAX_STARTER_NEIGHBORS:
            pairs.append((first.text, first.target_true))
    if generic_neighbors:
        pairs += [(p, t) for p, t in GENERIC_NEIGHBORS if p != text]
    pairs += list(neighbors)
    seen: set[str] = set()
    neighborhood = []
    for prompt, answer in pairs:
        # A neighbour about the edited subject is in scope; one whose answer is target_new compares nothing.
        if prompt in seen or _norm(request.subject) in _norm(prompt) or _norm(answer) == _norm(new):
            continue
        seen.add(prompt)
        neighborhood.append(Probe(prompt, answer, new))

    implications: list[Probe] = []
    for r in same_fact:
        if _norm(r.requests[0].target_new) == _norm(new):
            implications += list(r.implications)
    symmetric = any(p.kind == "symmetric" for r in same_template + same_fact for p in r.implications)
    if symmetric and old and not any(p.kind == "symmetric" for p in implications):
        implications.append(Probe(request.prompt.format(new), request.subject, old, kind="symmetric"))

    relation = (same_fact or same_template)[0].relation if (same_fact or same_template) else None
    audited = EditRequest(request.prompt, request.subject, new, old)
    return EvalRecord(
        case_id=case_id or f"{request.subject} -> {new}", requests=(audited,),
        paraphrases=tuple(Probe(p, new, old) for p in dict.fromkeys(para)),
        neighborhood=tuple(neighborhood),
        generation_prompts=GENERATION_PROMPTS + (f"{request.subject} is",),
        implications=tuple(implications), relation=relation, source="ledger audit")


def record_to_dict(record: EvalRecord) -> dict[str, Any]:
    """A JSON-friendly form of an audit record (stored with the edit, so re-audits use the same probes)."""
    return {"case_id": record.case_id, "requests": [r.to_dict() for r in record.requests],
            "paraphrases": [asdict(p) for p in record.paraphrases],
            "neighborhood": [asdict(p) for p in record.neighborhood],
            "generation_prompts": list(record.generation_prompts),
            "implications": [asdict(p) for p in record.implications], "relation": record.relation}


def record_from_dict(data: dict[str, Any]) -> EvalRecord:
    def probes(key: str) -> tuple[Probe, ...]:
        return tuple(Probe(**p) for p in data.get(key, []))

    return EvalRecord(case_id=data["case_id"], requests=tuple(EditRequest.from_dict(r) for r in data["requests"]),
                      paraphrases=probes("paraphrases"), neighborhood=probes("neighborhood"),
                      generation_prompts=tuple(data.get("generation_prompts", ())),
                      implications=probes("implications"), relation=data.get("relation"), source="ledger audit")
