"""Sentiment of generated text, offline, for edits that change an opinion rather than a fact.

The scorer is VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis
of Social Media Text", ICWSM), from the PyPI package `vaderSentiment`: a 7,500-word valence lexicon
plus rules for negation, intensifiers, "but" and punctuation, shipped in a 126 kB wheel with no model
weights. It is deterministic and fast, which a before/after comparison over many generations needs; it
reads words, not meaning, so it measures the tone of the words a model uses. Its `compound` score is in
[-1, 1] (positive > 0.05, negative < -0.05 by the authors' convention).

`opinion_shift` is the ConvSent-style measurement (Mitchell et al. 2022, arXiv:2206.06520, §4): mean
sentiment of continuations of prompts about the edited topic and of prompts about other topics, before
and after an edit, with the unchanged generations counted.

Not handled: sarcasm, domain-specific polarity, languages other than English.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmedit.errors import LMEditError

if TYPE_CHECKING:
    from lmedit.editors.base import Edit
    from lmedit.models.load import LM

VADER_INSTALL = "pip install vaderSentiment"


class SentimentScorer:
    """VADER compound sentiment in [-1, 1] per text.

    Raises:
        LMEditError: the package `vaderSentiment` is not installed.
    """

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise LMEditError(f"sentiment scoring needs the package vaderSentiment: run `{VADER_INSTALL}`") from None
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]


@dataclass(frozen=True)
class Generations:
    """Continuations of each prompt: the greedy one first, then `n_samples` sampled ones."""

    prompts: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]  # per prompt


def _generate(lm: LM, prompts: Sequence[str], max_new_tokens: int, n_samples: int, temperature: float,
              seed: int) -> Generations:
    from lmedit.scoring import generate

    greedy = generate(lm, prompts, max_new_tokens=max_new_tokens, greedy=True)
    sampled = [generate(lm, prompts, max_new_tokens=max_new_tokens, greedy=False, temperature=temperature,
                        seed=seed + i) for i in range(n_samples)]
    texts = tuple((g, *(s[k] for s in sampled)) for k, g in enumerate(greedy))
    return Generations(tuple(prompts), texts)


def opinion_shift(lm: LM, edit: Edit, in_scope: Sequence[str], out_of_scope: Sequence[str], *,
                  max_new_tokens: int = 30, n_samples: int = 4, temperature: float = 1.0, seed: int = 0,
                  scorer: SentimentScorer | None = None) -> dict[str, Any]:
    """Mean sentiment of continuations before and after `edit`, on prompts in and out of its scope.

    Args:
        lm: the model (the edit is applied for the "after" generations and undone afterwards).
        edit: an unapplied edit.
        in_scope: prompts about the edited topic; out_of_scope: prompts about other topics.
        max_new_tokens: length of each continuation.
        n_samples: sampled continuations per prompt (temperature `temperature`, seeds seed..seed+n-1),
            besides the greedy one. Before and after use the same seeds.
        scorer: the sentiment scorer (default: VADER).

    Returns:
        {"in_scope"/"out_of_scope": {"before", "after" (mean compound), "greedy_before", "greedy_after",
        "n", "unchanged" (fraction of continuations identical before and after)}, "examples": [...]}.
    """
    scorer = scorer or SentimentScorer()
    out: dict[str, Any] = {"max_new_tokens": max_new_tokens, "n_samples": n_samples, "temperature": temperature}
    examples = []
    for group, prompts in (("in_scope", in_scope), ("out_of_scope", out_of_scope)):
        before = _generate(lm, prompts, max_new_tokens, n_samples, temperature, seed)
        with edit.applied(lm):
            after = _generate(lm, prompts, max_new_tokens, n_samples, temperature, seed)
        b = [scorer(t) for t in before.texts]
        a = [scorer(t) for t in after.texts]
        flat_b, flat_a = [x for row in b for x in row], [x for row in a for x in row]
        pairs = [(x, y) for tb, ta in zip(before.texts, after.texts) for x, y in zip(tb, ta)]
        out[group] = {
            "before": sum(flat_b) / len(flat_b), "after": sum(flat_a) / len(flat_a),
            "greedy_before": sum(row[0] for row in b) / len(b), "greedy_after": sum(row[0] for row in a) / len(a),
            "positive_before": sum(x > 0.05 for x in flat_b) / len(flat_b),
            "positive_after": sum(x > 0.05 for x in flat_a) / len(flat_a),
            "n": len(flat_b), "unchanged": sum(x == y for x, y in pairs) / len(pairs)}
        for prompt, tb, ta, sb, sa in zip(prompts, before.texts, after.texts, b, a):
            examples.append({"group": group, "prompt": prompt, "greedy_before": tb[0], "greedy_after": ta[0],
                             "sentiment_before": sb, "sentiment_after": sa})
    out["examples"] = examples
    return out
