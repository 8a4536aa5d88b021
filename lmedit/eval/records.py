"""What the harness evaluates: one `EvalRecord` per benchmark case, made of edit requests and probes.

A `Probe` is a filled prompt, the answer that should win and (optionally) the foil it is compared
with. Every dataset loader turns its own layout into these records, so metrics never look at dataset
layouts. Derived probes (the edit prompts themselves, Specificity+ prompts, essence prompts and
implications generated from symmetric relations) are computed here, once.

Not handled: probes with several acceptable answers (MQuAKE aliases are kept as metadata only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmedit.types import EditRequest

# Wikidata relations where "A r B" implies "B r A": spouse, shares border with, twinned city, sibling.
SYMMETRIC_RELATIONS = frozenset({"P26", "P47", "P190", "P3373"})


@dataclass(frozen=True)
class Probe:
    """A filled prompt whose continuation `target` should beat `foil` (when given).

    `kind` labels implication probes ("symmetric", "transitive", "reverse"); empty otherwise.
    """

    prompt: str
    target: str
    foil: str | None = None
    kind: str = ""


@dataclass(frozen=True)
class EvalRecord:
    """One benchmark case: the edits to make and the probes to measure before and after.

    Attributes:
        case_id: unique within a dataset (string form of the dataset's id).
        requests: the edits of this case (one for CounterFact/zsRE, several for MQuAKE).
        paraphrases: in-scope probes, target = target_new, foil = target_true.
        neighborhood: out-of-scope probes; target = the answer that must survive, foil = target_new
            (CounterFact) or None (zsRE's unrelated Natural Questions, token accuracy only).
        generation_prompts: prompts about the subject, continued freely for fluency/consistency.
        reference_texts: text about target_new, compared with the generations (consistency).
        implications: probes implied by the edit (dataset-given plus ones derived here).
        multihop: multi-hop questions whose answer should change with the edits (MQuAKE).
        relation: the dataset's relation id/name, when it has one.
        source: "file:index" of the record, for error messages.
    """

    case_id: str
    requests: tuple[EditRequest, ...]
    paraphrases: tuple[Probe, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    implications: tuple[Probe, ...] = ()
    multihop: tuple[Probe, ...] = ()
    relation: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def rewrite(self) -> tuple[Probe, ...]:
        """The edit prompts themselves: target_new against target_true."""
        return tuple(Probe(r.text, r.target_new, r.target_true) for r in self.requests)

    @property
    def neighborhood_plus(self) -> tuple[Probe, ...]:
        """Specificity+ probes (Hoelscher-Obermaier et al. 2023, arXiv:2305.17553).

        Each neighborhood prompt is prefixed with the edit stated as a fact:
        "{filled edit prompt} {target_new}. {neighborhood prompt}". Only probes with a foil qualify.
        """
        first = self.requests[0]
        prefix = f"{first.text} {first.target_new}. "
        return tuple(Probe(prefix + p.prompt, p.target, p.foil) for p in self.neighborhood if p.foil is not None)

    @property
    def essence_prompts(self) -> tuple[str, ...]:
        """ROME's essence prompt "{subject} is a", once per distinct subject."""
        subjects = dict.fromkeys(r.subject for r in self.requests)
        return tuple(f"{s} is a" for s in subjects)

    @property
    def all_implications(self) -> tuple[Probe, ...]:
        """Dataset implication probes, plus symmetric ones derived from the edit when none are given.

        For a symmetric relation, editing "A r B" to "A r C" implies "C r A"; the derived probe asks
        for A after C's prompt, against the old object B (the only alternative the record knows).
        """
        if self.implications or self.relation not in SYMMETRIC_RELATIONS:
            return self.implications
        derived = []
        for r in self.requests:
            if r.target_true is None:
                continue
            derived.append(Probe(r.prompt.format(r.target_new), r.subject, r.target_true, kind="symmetric"))
        return tuple(derived)

    def targets(self) -> list[str]:
        """Every string that will be scored as a continuation (used to validate tokenization)."""
        out = []
        groups = (self.rewrite, self.paraphrases, self.neighborhood, self.all_implications, self.multihop)
        for probes in groups:
            for p in probes:
                out.append(p.target)
                if p.foil is not None:
                    out.append(p.foil)
        return out
