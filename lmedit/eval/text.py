"""Text statistics for generation metrics: ROME's weighted n-gram entropy and a numpy TF-IDF.

Words are `\\w+` runs and single punctuation marks, lowercased for TF-IDF (ROME uses nltk's
word_tokenize for entropy and sklearn's TfidfVectorizer for consistency; this is a dependency-free
equivalent, so absolute values can differ slightly from ROME's tables).

Not handled: ROME's Wikipedia IDF file (`idf.npy`); `Tfidf.fit` learns IDF from the texts given.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Tokenize into words and punctuation marks (case preserved)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the mean of weight_n * entropy (bits) of its n-gram frequencies.

    With the defaults this is (2/3 * H_2 + 4/3 * H_3) / 2, as in ROME's `compute_n_gram_entropy`
    (Meng et al. 2022, arXiv:2202.05262, App. generation metrics). Repetitive text scores low.
    A text with fewer than n words contributes entropy 0 for that n.
    """
    tokens = words(text)
    values = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = 0.0
        if total:
            freqs = np.array(list(counts.values()), dtype=np.float64) / total
            entropy = float(-(freqs * np.log2(freqs)).sum())
        values.append(weight * entropy)
    return float(np.mean(values))


class Tfidf:
    """TF-IDF vectors and cosine similarity, fitted on a list of documents (numpy only).

    idf(w) = ln((1 + N) / (1 + df(w))) + 1 (sklearn's smoothed IDF); words never seen in the fitted
    documents get the largest IDF, ln(1 + N) + 1. Vectors are L2-normalised raw-count TF times IDF.
    """

    def __init__(self) -> None:
        self.n_docs = 0
        self.df: Counter[str] = Counter()

    def fit(self, documents: Iterable[str]) -> Tfidf:
        for doc in documents:
            self.n_docs += 1
            self.df.update(set(w.lower() for w in words(doc)))
        return self

    def idf(self, word: str) -> float:
        return math.log((1 + self.n_docs) / (1 + self.df.get(word, 0))) + 1.0

    def vector(self, text: str, vocab: dict[str, int]) -> np.ndarray:
        v = np.zeros(len(vocab))
        for word, count in Counter(w.lower() for w in words(text)).items():
            v[vocab[word]] = count * self.idf(word)
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def cosine(self, a: str, b: str) -> float:
        """Cosine similarity of the TF-IDF vectors of `a` and `b` (0 when either has no words)."""
        vocab: dict[str, int] = {}
        for w in words(a.lower()) + words(b.lower()):
            vocab.setdefault(w, len(vocab))
        if not vocab:
            return 0.0
        return float(self.vector(a, vocab) @ self.vector(b, vocab))
