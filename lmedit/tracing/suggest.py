"""`suggest_layer`: the layer to edit from averaged MLP traces, with its on-disk cache (`lmedit.cache`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmedit.tracing.average import average_trace
from lmedit.tracing.engine import ProgressFn, embedding_noise
from lmedit.tracing.facts import Fact, builtin_facts
from lmedit.tracing.single import validate_window

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@dataclass
class LayerSuggestion:
    """The layer to edit and the evidence: the average MLP indirect effect at the last subject token per
    layer (window centre), with its 95% band, over `n_facts` facts.

    `fingerprint` (the model's `LM.fingerprint`), `facts_sha` (hash of the facts' content), `noise`,
    `window`, `samples` and `seed` are the settings it was computed with, which key its on-disk cache.
    """

    layer: int
    curve: list[float]
    band: list[float]
    n_facts: int
    window: int
    samples: int
    model: str = ""
    noise: float = 0.0
    seed: int = 0
    fingerprint: str = ""
    facts_sha: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SUGGESTION_VERSION = 1  # bump when suggest_layer's method changes: old cache entries are then ignored


def _facts_sha(facts: Sequence[Fact]) -> str:
    text = json.dumps([[f.prompt, f.subject, f.answer] for f in facts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _suggestion_path(root: Path, lm: LM, facts_sha: str, samples: int, noise: float, window: int,
                     seed: int) -> Path:
    settings = json.dumps({"version": SUGGESTION_VERSION, "facts": facts_sha, "samples": samples,
                           "noise": float(noise).hex(), "window": window, "seed": seed}, sort_keys=True)
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return root / lm.weights_hash / f"suggest_layer-{key}.json"


def _check_suggestion(payload: Any, lm: LM) -> str | None:
    """Why a cached layer suggestion cannot be used (None if it can): a `LayerSuggestion` of this model's shape."""
    from lmedit.cache import describe, is_finite_number, is_int

    if not isinstance(payload, dict) or set(payload) != set(LayerSuggestion.__dataclass_fields__):
        return f"the payload is {describe(payload)}, expected a LayerSuggestion's fields"
    if not is_int(payload["layer"], 0, lm.n_layers):
        return f"layer {payload['layer']!r} is not a layer of this {lm.n_layers}-layer model"
    for name in ("curve", "band"):
        values = payload[name]
        if not (isinstance(values, list) and len(values) == lm.n_layers and all(map(is_finite_number, values))):
            return f"{name} is not {lm.n_layers} finite numbers"
    return None


def suggest_layer(lm: LM, facts: Sequence[Fact] | None = None, *, samples: int = 5, noise: float | None = None,
                  window: int | None = None, seed: int = 0, progress: ProgressFn | None = None,
                  cache: bool | str | Path = True) -> LayerSuggestion:
    """The layer whose MLP restoration at the last subject token has the largest average indirect effect.

    What ROME's `layer=None` ("auto") uses. Only the last subject token is traced, so this costs about
    n_layers × samples short rows per fact: 1-3 minutes for the built-in facts on 2 CPU cores. The
    answer and its evidence curve are therefore cached on disk, as JSON, under
    `<cache>/<LM.weights_hash>/suggest_layer-<key>.json`, where the key hashes the facts' content and the
    settings (samples, resolved noise and window, seed); a later call with the same model, facts and
    settings reads that file. Like the covariance statistics, the cache is keyed by the weights the
    model was loaded with, so a call while an edit is applied in place returns the unedited model's answer.

    Args:
        lm: the model bundle.
        facts: the facts to average over; default `builtin_facts()` (those the model gets right are kept).
        samples: noise draws per restoration (5: averaging over facts smooths the rest).
        noise, window, seed: as in `trace`.
        progress: called as progress(facts done, facts total) (not called on a cache hit).
        cache: True for `lmedit.models.load.cache_dir() / "tracing"` ($LMEDIT_CACHE/tracing), a
            directory to use instead, or False to neither read nor write a cache.

    Returns:
        A `LayerSuggestion` with `layer` and the evidence curve.
    """
    facts = builtin_facts() if facts is None else list(facts)
    window = validate_window(lm, window)
    noise = embedding_noise(lm) if noise is None else noise
    facts_sha = _facts_sha(facts)
    path = None
    if cache is not False:
        from lmedit.cache import cache_root, read_json, write_json

        root = cache_root() / "tracing" if cache is True else Path(cache)
        path = _suggestion_path(root, lm, facts_sha, samples, noise, window, seed)
        provenance = {"kind": "suggest_layer", "version": SUGGESTION_VERSION, "model": lm.weights_hash,
                      "facts": facts_sha, "samples": samples, "noise": float(noise).hex(), "window": window, "seed": seed}
        stored = read_json(path, provenance, lambda payload: _check_suggestion(payload, lm))  # checked: lmedit.cache
        if stored is not None:
            suggestion = LayerSuggestion(**stored)
            log.info("suggested layer %d for %s, cached in %s", suggestion.layer, lm.name, path)
            return suggestion
    avg = average_trace(lm, facts, kinds=("mlp",), samples=samples, noise=noise, window=window, seed=seed,
                        buckets=("last subject",), progress=progress)
    curve, band = avg.mean["mlp"][0], avg.band["mlp"][0]
    layer = max(range(len(curve)), key=lambda i: curve[i])
    n = avg.n_known or avg.n_given
    log.info("suggested layer %d for %s (MLP effect %.3f at the last subject token, %d facts)",
             layer, lm.name, curve[layer], n)
    suggestion = LayerSuggestion(layer=layer, curve=curve, band=band, n_facts=n, window=avg.window, samples=samples,
                                 model=lm.name, noise=float(noise), seed=seed, fingerprint=lm.fingerprint,
                                 facts_sha=facts_sha)
    if path is not None:
        write_json(path, suggestion.to_dict(), provenance)
    return suggestion
