"""Metrics on hand-built measurements and on a model whose probabilities are set by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmedit.eval.measure import Measurement, ProbeScores, measure
from lmedit.eval.metrics import MetricInputs, compute_metrics, metric_names
from lmedit.eval.records import EvalRecord, Probe
from lmedit.eval.summary import bootstrap_mean, harmonic_mean, score_of
from lmedit.eval.text import Tfidf, ngram_entropy
from lmedit.registry import metrics
from lmedit.tokens import target_ids
from lmedit.types import EditRequest

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def scores(target, foil=None, acc=None, argmax=None) -> ProbeScores:
    n = len(target)
    return ProbeScores(target_logprob=list(target), foil_logprob=list(foil or [None] * n),
                       target_accuracy=list(acc or [0.0] * n), target_argmax=list(argmax or [()] * n))


def state(**groups) -> Measurement:
    base = {g: ProbeScores() for g in ("rewrite", "paraphrase", "neighborhood", "neighborhood_plus", "implication",
                                       "multihop")}
    base.update(groups)
    return Measurement(scores=base)


RECORD = EvalRecord("1", (REQ,), reference_texts=("Rome is the capital of Italy.",))


def test_every_metric_is_registered_with_a_family_and_a_cited_docstring():
    for name in metric_names():
        meta = metrics.meta(name)
        assert meta["family"] in ("probability", "kl", "token_accuracy", "generation"), name
        assert isinstance(meta["higher_is_better"], bool)
        doc = metrics.get(name).__doc__ or ""
        assert "arXiv" in doc or "ROME" in doc or "EasyEdit" in doc or "(lmedit's own metric)" in doc, \
            f"{name} cites no source"


def test_efficacy_paraphrase_neighborhood_scores_and_magnitudes():
    lp = math.log
    post = state(
        rewrite=scores([lp(0.6)], [lp(0.1)]),
        paraphrase=scores([lp(0.3), lp(0.05)], [lp(0.2), lp(0.1)]),
        neighborhood=scores([lp(0.5), lp(0.2), lp(0.4)], [lp(0.1), lp(0.3), lp(0.1)]),
    )
    m = compute_metrics(MetricInputs(RECORD, post, post))
    assert m["efficacy_score"] == 1.0
    assert m["efficacy_magnitude"] == pytest.approx(0.5)
    assert m["paraphrase_score"] == 0.5
    assert m["paraphrase_magnitude"] == pytest.approx(((0.3 - 0.2) + (0.05 - 0.1)) / 2)
    assert m["neighborhood_score"] == pytest.approx(2 / 3)
    assert m["neighborhood_magnitude"] == pytest.approx((0.4 - 0.1 + 0.3) / 3)
    assert m["specificity_plus_score"] is None  # no probes: not applicable rather than 0


def test_ties_do_not_count_as_success():
    post = state(rewrite=scores([-1.0], [-1.0]))
    assert compute_metrics(MetricInputs(RECORD, post, post))["efficacy_score"] == 0.0


def test_kl_metrics_from_known_distributions_and_zero_for_the_unedited_row():
    p = torch.tensor([[0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25]]).log()
    pre, post = state(), state()
    pre.dists = {"neighborhood": p, "essence": p}
    post.dists = {"neighborhood": q, "essence": p}
    m = compute_metrics(MetricInputs(RECORD, pre, post))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert m["neighborhood_kl"] == pytest.approx(expected)
    assert m["essence_drift"] == pytest.approx(0.0)
    assert compute_metrics(MetricInputs(RECORD, pre, pre))["neighborhood_kl"] == 0.0


def test_token_accuracy_family_edit_success_drawdown_locality():
    pre = state(neighborhood=scores([-1, -1], acc=[1.0, 1.0], argmax=[(5, 6), (7,)]))
    post = state(rewrite=scores([-1], acc=[1.0]), paraphrase=scores([-1, -1], acc=[0.5, 1.0]),
                 neighborhood=scores([-1, -1], acc=[0.5, 1.0], argmax=[(5, 9), (7,)]))
    m = compute_metrics(MetricInputs(RECORD, pre, post))
    assert m["efficacy_acc"] == 1.0
    assert m["paraphrase_acc"] == 0.75
    assert m["neighborhood_acc"] == 0.75
    assert m["edit_success"] == pytest.approx(2 / 3)   # exact matches among rewrite + paraphrases
    assert m["drawdown"] == pytest.approx(1.0 - 0.5)   # exact-match accuracy 1.0 before, 0.5 after
    assert m["locality"] == pytest.approx(2 / 3)       # 2 of 3 neighbour target positions keep their argmax


def test_implication_and_multihop():
    post = state(implication=scores([-1.0, -3.0], [-2.0, -2.0]), multihop=scores([-5.0, -1.0], [-2.0, -2.0]))
    m = compute_metrics(MetricInputs(RECORD, post, post))
    assert m["implication_accuracy"] == 0.5
    assert m["multihop_accuracy"] == 1.0  # any question right counts the case (MQuAKE)


def test_fluency_is_romes_weighted_ngram_entropy():
    text = "a b c d"  # 3 distinct bigrams, 2 distinct trigrams, all once
    assert ngram_entropy(text) == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * math.log2(2)) / 2)
    assert ngram_entropy("the the the the the the") == 0.0
    post = Measurement(scores=state().scores, generations=(text, "the the the the"))
    m = compute_metrics(MetricInputs(RECORD, post, post))
    assert m["fluency"] == pytest.approx(ngram_entropy(text) / 2)


def test_tfidf_cosine():
    tfidf = Tfidf().fit(["Rome is the capital of Italy.", "Paris is in France.", "Berlin is in Germany."])
    assert tfidf.cosine("Rome Italy", "Rome Italy") == pytest.approx(1.0)
    assert tfidf.cosine("Rome Italy", "Berlin Germany") == 0.0
    assert 0 < tfidf.cosine("Rome is old", "Rome is the capital of Italy.") < 1
    # rarer shared words weigh more than a word in every document
    assert tfidf.cosine("Rome", "Rome is") > tfidf.cosine("is", "Rome is")


def test_bootstrap_interval_and_harmonic_mean_score():
    const = bootstrap_mean([0.5] * 20)
    assert const == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 20}
    spread = bootstrap_mean(list(np.linspace(0, 1, 50)), seed=1)
    assert spread["lo"] < 0.5 < spread["hi"] and spread["mean"] == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0]) == 0.0
    rows = [{"edited": {"efficacy_score": 1.0, "paraphrase_score": 0.5, "neighborhood_score": 0.25}}] * 5
    assert score_of(rows, "edited")["mean"] == pytest.approx(3 / 7)


def test_measure_on_a_model_with_probabilities_set_by_construction(constructed_lm):
    lm, z = constructed_lm
    logp = torch.log_softmax(z, 0)
    record = EvalRecord("c", (REQ,), neighborhood=(Probe("The Louvre is located in the city of", "Paris", "Rome"),))
    m = measure(lm, [record])[0]
    new, true = target_ids(lm, "Rome"), target_ids(lm, "Paris")
    expected_new = float(sum(logp[t] for t in new))
    expected_true = float(sum(logp[t] for t in true))
    assert m.scores["rewrite"].target_logprob[0] == pytest.approx(expected_new, abs=1e-4)
    assert m.scores["rewrite"].foil_logprob[0] == pytest.approx(expected_true, abs=1e-4)
    best = int(z.argmax())
    assert m.scores["rewrite"].target_accuracy[0] == pytest.approx(sum(t == best for t in new) / len(new))
    assert m.scores["rewrite"].target_argmax[0] == (best,) * len(new)
    assert torch.allclose(m.dists["neighborhood"][0], logp, atol=1e-5)
    metric = compute_metrics(MetricInputs(record, m, m))
    assert metric["efficacy_score"] == float(expected_new > expected_true)
    assert metric["efficacy_magnitude"] == pytest.approx(math.exp(expected_new) - math.exp(expected_true), abs=1e-6)

    # Shift the constructed logits: the KL metrics must equal the analytic KL of the two softmaxes.
    z2 = z.clone()
    z2[best] += 3.0
    with torch.no_grad():
        lm.model.get_output_embeddings().weight[:, 0] = z2
    m2 = measure(lm, [record])[0]
    p, q = logp, torch.log_softmax(z2, 0)
    analytic = float((p.exp() * (p - q)).sum())
    after = compute_metrics(MetricInputs(record, m, m2))
    assert after["neighborhood_kl"] == pytest.approx(analytic, rel=1e-4)
    assert after["essence_drift"] == pytest.approx(analytic, rel=1e-4)
