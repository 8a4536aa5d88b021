"""Measuring records under the model's current weights: target log-probs, token accuracy, KL inputs, generations.

One `measure()` call scores every probe of a group of records in batched forwards. Each (prompt,
target) pair is one sequence; logits are computed only at the target positions (the unembedding of a
262k-word vocabulary dominates a small model's forward), and for KL groups the whole next-token
distribution at the first target position is kept from the same forward. Both metric families
(probability comparison and teacher-forced token accuracy) come out of these numbers.

Groups (see `probe_groups`): rewrite, paraphrase, neighborhood, neighborhood_plus, implication,
multihop; KL distributions for neighborhood, neighborhood_plus, rewrite and essence prompts.

Not handled: probes with several acceptable answers (only `target` and `foil` are scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmedit.errors import RequestError
from lmedit.eval.records import EvalRecord, Probe
from lmedit.scoring import generate_detailed, logits_at, routed, teacher_forced
from lmedit.tokens import subject_span, target_ids

if TYPE_CHECKING:
    from lmedit.models.load import LM

SCORE_GROUPS = ("rewrite", "paraphrase", "neighborhood", "neighborhood_plus", "implication", "multihop")
KL_GROUPS = ("rewrite", "neighborhood", "neighborhood_plus", "essence")


def probe_groups(record: EvalRecord) -> dict[str, tuple[Probe, ...]]:
    """The probes of each scored group of a record."""
    return {"rewrite": record.rewrite, "paraphrase": record.paraphrases, "neighborhood": record.neighborhood,
            "neighborhood_plus": record.neighborhood_plus, "implication": record.all_implications,
            "multihop": record.multihop}


@dataclass
class ProbeScores:
    """Per-probe numbers of one group, in probe order."""

    target_logprob: list[float] = field(default_factory=list)          # log P(target | prompt), summed over tokens
    foil_logprob: list[float | None] = field(default_factory=list)     # log P(foil | prompt), None without foil
    target_accuracy: list[float] = field(default_factory=list)         # teacher-forced token accuracy of target
    target_argmax: list[tuple[int, ...]] = field(default_factory=list)  # argmax ids at the target positions


@dataclass
class Measurement:
    """Everything measured about one record in one model state.

    `dists` holds next-token log-probabilities (n_prompts, d_vocab) per KL group; they are large and
    dropped once the KL metrics are computed. `generations` is empty unless generation was requested.
    """

    scores: dict[str, ProbeScores]
    dists: dict[str, torch.Tensor] = field(default_factory=dict)
    generations: tuple[str, ...] = ()
    never_text: tuple[float, ...] = ()  # per generation: the largest probability on never-text tokens at one step


@dataclass(frozen=True)
class _Item:
    record: int
    group: str
    prompt: str
    target: str | None   # None: only the next-token distribution after the prompt is wanted
    role: str            # "target", "foil" or "dist"
    keep_dist: bool


@dataclass(frozen=True)
class _Result:
    logprob: float
    accuracy: float
    argmax: tuple[int, ...]
    dist: torch.Tensor | None


@torch.no_grad()
def _forward(lm: LM, items: Sequence[_Item], batch_size: int) -> list[_Result]:
    """Score `items` in batches of `batch_size` teacher-forced rows (`scoring.teacher_forced`), keeping for chosen
    items the whole next-token distribution at the first target position, from the same forward."""
    out: list[_Result] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # Prompts as the base model reads them under the applied wrapper edits; a dist-only item (no target)
        # reads the position after its prompt.
        tf = teacher_forced(lm, routed(lm, [it.prompt for it in chunk]), [it.target for it in chunk])
        rows, positions, _ = tf.index(lm.device)
        logits = logits_at(lm, tf.padded(lm).model_inputs(), rows, positions)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n_positions, d_vocab)
        argmax = logp.argmax(-1).tolist()
        for it, (k, n) in zip(chunk, tf.spans):
            dist = logp[k].cpu().clone() if it.keep_dist else None
            if it.target is None:
                out.append(_Result(0.0, 0.0, (), dist))
                continue
            t = tf.gold[k:k + n]
            gold = torch.tensor(t, device=lm.device)
            token_lp = logp[k:k + n].gather(1, gold[:, None])[:, 0]
            hits = [a == g for a, g in zip(argmax[k:k + n], t)]
            out.append(_Result(token_lp.sum().item(), sum(hits) / n, tuple(argmax[k:k + n]), dist))
    return out


def measure(lm: LM, records: Sequence[EvalRecord], *, keep_dists: bool = True, generation_tokens: int = 0,
            batch_size: int = 32) -> list[Measurement]:
    """Measure `records` under `lm`'s current weights.

    Args:
        lm: the model, edited or not.
        records: the records to measure (their probes are batched together).
        keep_dists: keep next-token distributions of the KL groups (needed for KL metrics).
        generation_tokens: when > 0, greedily continue each generation prompt by this many tokens.
        batch_size: sequences per forward.

    Returns:
        One `Measurement` per record, in order.
    """
    items: list[_Item] = []
    for r, record in enumerate(records):
        for group, probes in probe_groups(record).items():
            want = keep_dists and group in KL_GROUPS
            for probe in probes:
                items.append(_Item(r, group, probe.prompt, probe.target, "target", want))
                if probe.foil is not None:
                    items.append(_Item(r, group, probe.prompt, probe.foil, "foil", False))
        if keep_dists:
            items += [_Item(r, "essence", p, None, "dist", True) for p in record.essence_prompts]
    results = _forward(lm, items, batch_size)
    out = [Measurement(scores={g: ProbeScores() for g in SCORE_GROUPS}) for _ in records]
    dists: list[dict[str, list[torch.Tensor]]] = [{} for _ in records]
    for it, res in zip(items, results):
        if res.dist is not None:
            dists[it.record].setdefault(it.group, []).append(res.dist)
        if it.role == "dist":
            continue
        scores = out[it.record].scores[it.group]
        if it.role == "target":
            scores.target_logprob.append(res.logprob)
            scores.target_accuracy.append(res.accuracy)
            scores.target_argmax.append(res.argmax)
            scores.foil_logprob.append(None)
        else:
            scores.foil_logprob[-1] = res.logprob  # the foil item directly follows its target item
    for m, d in zip(out, dists):
        m.dists = {g: torch.stack(v) for g, v in d.items()}
    if generation_tokens > 0:
        per_record = [generation_prompts(record) for record in records]
        prompts = [p for group in per_record for p in group]
        made = []
        for start in range(0, len(prompts), 16):
            made += generate_detailed(lm, prompts[start:start + 16], max_new_tokens=generation_tokens, greedy=True)
        k = 0
        for m, group in zip(out, per_record):
            m.generations = tuple(g.text for g in made[k:k + len(group)])
            m.never_text = tuple(g.never_text_max for g in made[k:k + len(group)])
            k += len(group)
    return out


def generation_prompts(record: EvalRecord) -> tuple[str, ...]:
    """What is generated from: the edit prompts and paraphrases (where an edit derails generation first,
    docs/editors.md), then the record's own generation prompts about the subject (CounterFact's)."""
    own = [r.text for r in record.requests] + [p.prompt for p in record.paraphrases]
    return tuple(dict.fromkeys(own + list(record.generation_prompts)))


def measure_dists(lm: LM, records: Sequence[EvalRecord], *, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Only the KL-group next-token distributions of `records` (used to re-measure the unedited model)."""
    items = []
    for r, record in enumerate(records):
        groups = probe_groups(record)
        for group in KL_GROUPS:
            prompts = record.essence_prompts if group == "essence" else [p.prompt for p in groups[group]]
            items += [_Item(r, group, p, None, "dist", True) for p in prompts]
    out: list[dict[str, list[torch.Tensor]]] = [{} for _ in records]
    for it, res in zip(items, _forward(lm, items, batch_size)):
        assert res.dist is not None
        out[it.record].setdefault(it.group, []).append(res.dist)
    return [{g: torch.stack(v) for g, v in d.items()} for d in out]


def check_record(lm: LM, record: EvalRecord) -> tuple[str, str] | None:
    """(field, message) when `record` cannot be measured with this tokenizer, else None.

    Catches targets that tokenize to nothing and subjects that cover no token of their prompt.
    """
    for j, request in enumerate(record.requests):
        try:
            subject_span(lm, request.prompt, request.subject)
        except RequestError as exc:
            return f"requests[{j}].subject", str(exc)
    for target in record.targets():
        try:
            target_ids(lm, target)
        except RequestError as exc:
            return "target", str(exc)
    return None
