"""Editing metrics, each registered in `lmedit.registry.metrics` with its family and source.

Every metric is a function of one record measured before (`pre`) and after (`post`) editing:
`fn(MetricInputs) -> float | None` (None: the record has no probe for it). The unedited model's row
is the same function applied to (pre, pre), so both rows are computed identically.

Two families, kept apart in names and reports because they routinely get confused:
  probability     ROME/MEMIT (arXiv:2202.05262, 2210.07229): compare P(target) with P(foil) for whole
                  multi-token targets, P = exp(sum of the target tokens' log-probs). (ROME's code
                  normalises by length before comparing; we compare whole-target probabilities.)
  token_accuracy  EasyEdit (arXiv:2308.07269) / ROME's zsRE tables: teacher-forced fraction of target
                  tokens that are the argmax given the gold prefix.
plus KL metrics (distribution drift) and generation metrics (fluency, consistency).

Not handled: ROME's generation-based "reference score" with Wikipedia attribute snippets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean

from lmedit.eval.measure import Measurement, ProbeScores
from lmedit.eval.records import EvalRecord
from lmedit.eval.text import Tfidf, ngram_entropy
from lmedit.registry import metrics


@dataclass(frozen=True)
class MetricInputs:
    """What a metric sees: the record, its measurements before and after the edit, shared text statistics."""

    record: EvalRecord
    pre: Measurement
    post: Measurement
    tfidf: Tfidf | None = None


def _mean(values: list[float]) -> float | None:
    return fmean(values) if values else None


def _pairs(scores: ProbeScores) -> list[tuple[float, float]]:
    return [(t, f) for t, f in zip(scores.target_logprob, scores.foil_logprob) if f is not None]


def _score(scores: ProbeScores) -> float | None:
    """Fraction of probes where P(target) > P(foil)."""
    return _mean([float(t > f) for t, f in _pairs(scores)])


def _magnitude(scores: ProbeScores) -> float | None:
    """Mean P(target) - P(foil)."""
    return _mean([math.exp(t) - math.exp(f) for t, f in _pairs(scores)])


def _kl(x: MetricInputs, group: str) -> float | None:
    """Mean over prompts of KL(P_pre || P_post) of the next-token distribution, in nats."""
    if group not in x.pre.dists or group not in x.post.dists:
        return None
    pre, post = x.pre.dists[group], x.post.dists[group]  # (n_prompts, d_vocab) log-probs each
    kl = (pre.exp() * (pre - post)).sum(-1).clamp_min(0.0)  # clamp: float round-off around 0
    return float(kl.mean())


def _exact(scores: ProbeScores) -> list[float]:
    return [float(a == 1.0) for a in scores.target_accuracy]


_BUILTIN_ORDER: list[str] = []  # filled once at import: the column order of reports


def register(name: str, family: str, higher_is_better: bool, label: str):
    _BUILTIN_ORDER.append(name)
    return metrics.register(name, family=family, higher_is_better=higher_is_better, label=label)


# ---- probability family ------------------------------------------------------------------------

@register("efficacy_score", "probability", True, "ES")
def efficacy_score(x: MetricInputs) -> float | None:
    """Efficacy Score (ES): P(target_new) > P(target_true) on the edit prompt (ROME, arXiv:2202.05262 §3.3)."""
    return _score(x.post.scores["rewrite"])


@register("efficacy_magnitude", "probability", True, "EM")
def efficacy_magnitude(x: MetricInputs) -> float | None:
    """Efficacy Magnitude (EM): P(target_new) - P(target_true) on the edit prompt (ROME, arXiv:2202.05262)."""
    return _magnitude(x.post.scores["rewrite"])


@register("paraphrase_score", "probability", True, "PS")
def paraphrase_score(x: MetricInputs) -> float | None:
    """Paraphrase Score (PS, generalization): ES on paraphrases of the edit prompt (ROME, arXiv:2202.05262)."""
    return _score(x.post.scores["paraphrase"])


@register("paraphrase_magnitude", "probability", True, "PM")
def paraphrase_magnitude(x: MetricInputs) -> float | None:
    """Paraphrase Magnitude (PM): mean P(target_new) - P(target_true) on paraphrases (ROME, arXiv:2202.05262)."""
    return _magnitude(x.post.scores["paraphrase"])


@register("neighborhood_score", "probability", True, "NS")
def neighborhood_score(x: MetricInputs) -> float | None:
    """Neighborhood Score (NS, specificity): P(o) > P(o*) on prompts about other subjects sharing o (ROME)."""
    return _score(x.post.scores["neighborhood"])


@register("neighborhood_magnitude", "probability", True, "NM")
def neighborhood_magnitude(x: MetricInputs) -> float | None:
    """Neighborhood Magnitude (NM): mean P(o) - P(o*) on neighborhood prompts (ROME, arXiv:2202.05262)."""
    return _magnitude(x.post.scores["neighborhood"])


@register("specificity_plus_score", "probability", True, "NS+")
def specificity_plus_score(x: MetricInputs) -> float | None:
    """Specificity+ score (NS+): NS on neighborhood prompts prefixed by the edit prompt + target_new.

    CounterFact+ (Hoelscher-Obermaier et al. 2023, arXiv:2305.17553): "{edit prompt} {o*}. {neighbour
    prompt}". Edits that make o* "loud" (predicted after any mention of it) fail here but not on NS.
    """
    return _score(x.post.scores["neighborhood_plus"])


@register("specificity_plus_magnitude", "probability", True, "NM+")
def specificity_plus_magnitude(x: MetricInputs) -> float | None:
    """Specificity+ magnitude (NM+): NM on the prefixed neighborhood prompts (arXiv:2305.17553)."""
    return _magnitude(x.post.scores["neighborhood_plus"])


@register("implication_accuracy", "probability", True, "IA")
def implication_accuracy(x: MetricInputs) -> float | None:
    """Implication accuracy: P(implied object) > P(old implied object) on probes the edit implies.

    Symmetric ("A married to C" => "C married to A"), transitive ("X in city C" => "X in country(C)")
    and reverse-relation probes, from the dataset or derived for symmetric relations; the ripple-effect
    evaluation of RippleEdits (Cohen et al. 2023, arXiv:2307.12976) and MQuAKE single hops.
    """
    return _score(x.post.scores["implication"])


@register("multihop_accuracy", "probability", True, "MH")
def multihop_accuracy(x: MetricInputs) -> float | None:
    """MQuAKE multi-hop accuracy: 1 if any of the case's questions prefers the new answer (arXiv:2305.14795).

    Probability comparison of new_answer against answer after "Q: {question} A:", instead of the
    paper's generated answers.
    """
    pairs = _pairs(x.post.scores["multihop"])
    return float(any(t > f for t, f in pairs)) if pairs else None


# ---- KL (distribution drift) -------------------------------------------------------------------

@register("neighborhood_kl", "kl", False, "NKL")
def neighborhood_kl(x: MetricInputs) -> float | None:
    """Neighborhood KL (NKL): KL(P_unedited || P_edited) of the next token on neighborhood prompts (arXiv:2305.17553)."""
    return _kl(x, "neighborhood")


@register("rewrite_kl", "kl", False, "RKL")
def rewrite_kl(x: MetricInputs) -> float | None:
    """KL(P_unedited || P_edited) of the next token after the edit prompt itself.

    Large for an edited fact by design; for facts that were not edited (the sequential mode's drift set)
    it measures how far unrelated knowledge moved (cf. the NKL of arXiv:2305.17553).
    """
    return _kl(x, "rewrite")


@register("specificity_plus_kl", "kl", False, "NKL+")
def specificity_plus_kl(x: MetricInputs) -> float | None:
    """NKL on the Specificity+ prompts (CounterFact+, arXiv:2305.17553)."""
    return _kl(x, "neighborhood_plus")


@register("essence_drift", "kl", False, "ED")
def essence_drift(x: MetricInputs) -> float | None:
    """Essence drift: KL(P_unedited || P_edited) of the next token after "{subject} is a".

    ROME's essence-preservation prompt (arXiv:2202.05262 §3.1, the KL term of v*'s objective), used here as
    a measurement of how much the subject's general description moved.
    """
    return _kl(x, "essence")


# ---- token-accuracy family (EasyEdit / zsRE) ----------------------------------------------------

@register("efficacy_acc", "token_accuracy", True, "Rel.")
def efficacy_acc(x: MetricInputs) -> float | None:
    """Teacher-forced token accuracy of target_new on the edit prompt: EasyEdit's reliability (arXiv:2308.07269),
    ROME/MEMIT's zsRE "Efficacy" (arXiv:2202.05262 Table 1 zsRE)."""
    return _mean(x.post.scores["rewrite"].target_accuracy)


@register("paraphrase_acc", "token_accuracy", True, "Gen.")
def paraphrase_acc(x: MetricInputs) -> float | None:
    """Teacher-forced token accuracy of target_new on paraphrases: EasyEdit's generalization, zsRE "Paraphrase"."""
    return _mean(x.post.scores["paraphrase"].target_accuracy)


@register("neighborhood_acc", "token_accuracy", True, "Spec.")
def neighborhood_acc(x: MetricInputs) -> float | None:
    """Teacher-forced token accuracy of the neighborhood answer: zsRE "Specificity" (ROME's zsRE evaluation)."""
    return _mean(x.post.scores["neighborhood"].target_accuracy)


@register("locality", "token_accuracy", True, "Loc.")
def locality(x: MetricInputs) -> float | None:
    """EasyEdit locality (arXiv:2308.07269): fraction of neighborhood target positions whose argmax token is
    unchanged by the edit (teacher-forced on the neighborhood answer)."""
    pre, post = x.pre.scores["neighborhood"].target_argmax, x.post.scores["neighborhood"].target_argmax
    same = [a == b for p, q in zip(pre, post) for a, b in zip(p, q)]
    return _mean([float(s) for s in same])


@register("edit_success", "token_accuracy", True, "ESucc")
def edit_success(x: MetricInputs) -> float | None:
    """Edit success (Mitchell et al. 2021, MEND, arXiv:2110.11309): fraction of in-scope inputs (edit prompt
    and paraphrases) whose whole target_new is the teacher-forced argmax."""
    return _mean(_exact(x.post.scores["rewrite"]) + _exact(x.post.scores["paraphrase"]))


@register("drawdown", "token_accuracy", False, "DD")
def drawdown(x: MetricInputs) -> float | None:
    """Drawdown (MEND, arXiv:2110.11309): exact-match accuracy on out-of-scope (neighborhood) inputs before
    the edit minus after it."""
    pre, post = _exact(x.pre.scores["neighborhood"]), _exact(x.post.scores["neighborhood"])
    return fmean(pre) - fmean(post) if pre else None


# ---- generation family --------------------------------------------------------------------------

@register("fluency", "generation", True, "GE")
def fluency(x: MetricInputs) -> float | None:
    """Generation entropy (GE): ROME's weighted bi/tri-gram entropy of the generations (arXiv:2202.05262 §3.3)."""
    return _mean([ngram_entropy(t) for t in x.post.generations]) if x.post.generations else None


@register("derailment", "generation", False, "DR")
def derailment(x: MetricInputs) -> float | None:
    """Derailment (lmedit's own metric): the largest probability the model puts, at one generated step, on tokens a text model
    must never emit (image/audio markers, padding, `<unusedN>`; suppressed in the text itself), in the record's
    worst generation. The unedited Gemma 3 270M already puts 0.04-0.17 there at phrase ends (docs/editors.md)."""
    return max(x.post.never_text) if x.post.never_text else None


@register("consistency", "generation", True, "RS")
def consistency(x: MetricInputs) -> float | None:
    """Reference score (RS): TF-IDF cosine between the generations about the subject and reference text about
    target_new (ROME, arXiv:2202.05262 §3.3; IDF fitted on the run's reference texts, see lmedit.eval.text)."""
    if not x.post.generations or not x.record.reference_texts:
        return None
    tfidf = x.tfidf or Tfidf().fit(x.record.reference_texts)
    return tfidf.cosine(" ".join(x.post.generations), " ".join(x.record.reference_texts))


def metric_names() -> list[str]:
    """Registered metrics, in registration order grouped by family (the column order of reports)."""
    order = ("probability", "kl", "token_accuracy", "generation")
    names = metrics.names()
    rank = {name: i for i, name in enumerate(_BUILTIN_ORDER)}

    def key(name: str) -> tuple[int, int, str]:
        family = metrics.meta(name).get("family")
        return (order.index(family) if family in order else len(order), rank.get(name, len(rank)), name)

    return sorted(names, key=key)


def compute_metrics(x: MetricInputs) -> dict[str, float | None]:
    """Every registered metric on one record."""
    return {name: metrics.get(name)(x) for name in metric_names()}


def drop_dists(m: Measurement) -> None:
    """Free the (large) next-token distributions once the KL metrics are computed."""
    m.dists = {}


__all__ = ["MetricInputs", "compute_metrics", "drop_dists", "metric_names"]
