"""Knowledge neurons: integrated-gradients attribution over MLP neurons (Dai et al. 2021, "Knowledge Neurons in
Pretrained Transformers", arXiv:2104.08696, §3).

A "neuron" is one coordinate of an MLP's intermediate activation: `Site("mlp.key", layer)`, the input of
the down-projection W_out (d_mlp per layer). Its value vector is W_out's column for that coordinate.

Attribution (§3.1). For a prompt and a target token y (the first token of " target"), at the prompt's
last position, layer l's activation a_l (d_mlp) is scaled from 0 to its value and the gradient of
P(y | prompt) is integrated along the way:
    attr_l,i = a_l,i · ∫₀¹ ∂P(y | a_l ← α a_l)/∂a_l,i dα  ≈  a_l,i · (1/m) Σ_k ∂P(α_k a_l)/∂a_l,i
with the midpoint rule α_k = (k − ½)/m (the paper writes the right-endpoint sum α_k = k/m, m = 20; the
midpoint has error O(1/m²) instead of O(1/m)). Only layer l is scaled, the other layers keep their
natural activations, so by completeness Σ_i attr_l,i ≈ P(full) − P(layer l's activation zeroed).
Gemma 2/3 RMS-normalise the MLP output before the residual add, so P(α a_l) is constant for α above
~1e-3 and jumps at α = 0: the Riemann sum misses the jump (Σ_i attr_l,i ≈ 0 there, see
`completeness_gap`), and each neuron's attribution is its gradient × activation times Σ_k 1/(m α_k).
The ranking, which is all that selection uses, is still meaningful.

Speed. The scaled activation sits at the last position and the model is causal, so every earlier
position is identical in all scaled runs: the prompt minus its last token runs once into a key/value
cache, and each scaled run is a single-token forward on top of it. The m steps of several layers go
into the rows of one forward/backward (rows of layer l scale layer l only, so the rows stay independent
and one backward of Σ_rows P gives every row its own gradient); logits are computed at the last
position only.

Selection (§3.2 and the authors' code). Per prompt, neurons with attribution ≥ t × that prompt's largest
attribution (t = 0.2) are candidates; across prompts that express the same fact, neurons that are
candidates in at least a fraction p of the prompts (p = 0.7) are the fact's knowledge neurons. The
optional refining step drops neurons that are also knowledge neurons of more than a fraction (0.1 in the
authors' code) of other facts of the same relation: they express the relation, not the fact. The paper
says "more than p%"; the authors' code compares with ≥, as here (they differ only on exact ties).

Legend: `a` (d_mlp): MLP key at the prompt's last token; `attr`: (n_layers, d_mlp) attribution.

Not handled: attribution at positions other than the last one, multi-token targets (the first token is
scored, as the paper scores single-token objects), baselines other than zero activation.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from lmedit.errors import RequestError
from lmedit.hooks import capture, patch
from lmedit.tokens import prompt_ids, target_ids
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (done, total)
Neuron = tuple[int, int]  # (layer, index into d_mlp)


@dataclass
class NeuronAttribution:
    """Integrated-gradients attribution of one prompt's target token to every searched MLP neuron.

    Attributes:
        prompt: the filled prompt; target_id / target_token: the scored token (first of " target").
        scores: (n_layers, d_mlp) attribution; zero in layers that were not searched.
        activations: (n_layers, d_mlp) the neurons' activations at the prompt's last token.
        layers: the searched layers.
        prob: P(target token) with nothing changed.
        prob_zero: (n_layers,) P(target token) with that layer's activation at the last token zeroed
            (NaN for layers not searched). Completeness: scores[l].sum() ≈ prob − prob_zero[l].
        steps: Riemann steps m.
    """

    prompt: str
    target_id: int
    target_token: str
    scores: torch.Tensor
    activations: torch.Tensor
    layers: tuple[int, ...]
    prob: float
    prob_zero: torch.Tensor
    steps: int

    @property
    def completeness_gap(self) -> torch.Tensor:
        """(n_layers,) Σ_i attr_l,i − (prob − prob_zero[l]): the Riemann error of each searched layer."""
        return self.scores.sum(1) - (self.prob - self.prob_zero)

    def candidates(self, threshold: float) -> set[Neuron]:
        """Neurons with attribution ≥ threshold × this prompt's largest attribution (none if that is ≤ 0)."""
        return candidates(self.scores, threshold)


def _validate_layers(lm: LM, layers: Iterable[int] | None) -> tuple[int, ...]:
    n = lm.n_layers
    chosen = tuple(range(n)) if layers is None else tuple(sorted(set(int(x) for x in layers)))
    if not chosen:
        raise RequestError("no layers to search")
    bad = [x for x in chosen if not 0 <= x < n]
    if bad:
        raise RequestError(f"layers {bad} are out of range: the model has {n} layers (0..{n - 1})")
    return chosen


def _target_id(lm: LM, target: str | int | None, ids: list[int], cache: DynamicCache | None) -> int:
    if isinstance(target, int):
        return target
    if target is not None:
        return target_ids(lm, target)[0]
    # No target: the model's own top prediction.
    last = torch.tensor([ids[-1:]], device=lm.device)
    site = Site("final_norm")
    with torch.no_grad(), capture(lm, [site], stop_after=site) as acts:
        lm.model(input_ids=last, cache=copy.deepcopy(cache), use_cache=cache is not None)
    return int(lm.arch.logits_from_final(lm.model, acts[site][0, -1:]).argmax(-1))


def attribute(lm: LM, prompt: str, target: str | int | None = None, *, steps: int = 20,
              layers: Iterable[int] | None = None, max_rows: int = 128,
              progress: ProgressFn | None = None) -> NeuronAttribution:
    """Integrated gradients of P(target's first token | prompt) for every MLP neuron at the last token.

    Args:
        lm: the model bundle (weights are not changed).
        prompt: the filled prompt (no `{}`).
        target: the answer text (its first token is scored), a token id, or None for the model's top-1 token.
        steps: Riemann steps m per layer (paper: 20).
        layers: layers to search (default: all).
        max_rows: rows (steps × layers) per forward/backward; at least one layer's steps run together.
        progress: called with (passes done, total passes).

    Returns:
        A `NeuronAttribution`.

    Raises:
        RequestError: the prompt is empty, bad steps or layers (a `ValueError`).
    """
    if steps < 1:
        raise RequestError(f"steps must be >= 1, got {steps}")
    chosen = _validate_layers(lm, layers)
    ids = prompt_ids(lm, prompt)
    if not ids:
        raise RequestError(f"prompt {prompt!r} tokenizes to no tokens")
    n_layers, d_mlp, dev = lm.n_layers, lm.arch.d_mlp(lm.model), lm.device

    # The prompt minus its last token, once: every scaled run shares it.
    prefix = None
    if len(ids) > 1:
        prefix = DynamicCache(config=lm.model.config)
        with torch.no_grad(), patch(lm, {}, stop_after=Site("resid_out", n_layers - 1)):
            lm.model(input_ids=torch.tensor([ids[:-1]], device=dev), cache=prefix, use_cache=True)
    target_id = _target_id(lm, target, ids, prefix)
    target_token = lm.tokenizer.decode([target_id])

    def run_last(rows: int, fns: dict) -> torch.Tensor:
        """P(target) at the last token for `rows` copies of the prompt, with `fns` patched -> (rows,)."""
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(rows)
        final = Site("final_norm")
        with capture(lm, [final], stop_after=final, detach=False) as acts, patch(lm, fns):
            lm.model(input_ids=torch.tensor([ids[-1:]] * rows, device=dev), cache=cache, use_cache=cache is not None)
        logits = lm.arch.logits_from_final(lm.model, acts[final][:, -1]).float()  # (rows, d_vocab)
        return torch.exp(logits[:, target_id] - torch.logsumexp(logits, dim=-1))

    key_sites = [Site("mlp.key", layer) for layer in range(n_layers)]
    with torch.no_grad(), capture(lm, key_sites) as keys:
        prob = float(run_last(1, {})[0])
    activations = torch.stack([keys[s][0, -1] for s in key_sites]).float()  # (n_layers, d_mlp)

    per_pass = max(1, max_rows // (steps + 1))
    chunks = [chosen[i:i + per_pass] for i in range(0, len(chosen), per_pass)]
    scores = torch.zeros(n_layers, d_mlp)
    prob_zero = torch.full((n_layers,), math.nan)
    alphas = ((torch.arange(steps, device=dev, dtype=torch.float32) + 0.5) / steps)[:, None]  # (steps, 1)
    width = steps + 1  # rows per layer: the m scaled points, then one zeroed row (for P at zero activation)
    for done, chunk in enumerate(chunks, 1):
        points: dict[int, torch.Tensor] = {}
        fns = {}
        for j, layer in enumerate(chunk):
            base = activations[layer].to(dev)
            points[layer] = (alphas * base).requires_grad_(True)  # (steps, d_mlp), leaves of the gradient

            def scale(act: torch.Tensor, site: Site, _j: int = j) -> torch.Tensor:
                assert site.layer is not None
                out = act.clone()
                scaled = torch.cat([points[site.layer], torch.zeros_like(points[site.layer][:1])])
                out[_j * width:(_j + 1) * width, -1] = scaled.to(act.dtype)
                return out

            fns[Site("mlp.key", layer)] = scale
        with torch.enable_grad():
            probs = run_last(len(chunk) * width, fns)  # (rows,)
            probs.sum().backward()
        for j, layer in enumerate(chunk):
            grad = points[layer].grad  # (steps, d_mlp)
            assert grad is not None
            scores[layer] = activations[layer].cpu() * grad.float().mean(0).cpu()
            prob_zero[layer] = float(probs[j * width + steps].detach())
        if progress is not None:
            progress(done, len(chunks))
    return NeuronAttribution(prompt=prompt, target_id=target_id, target_token=target_token, scores=scores,
                             activations=activations.cpu(), layers=chosen, prob=prob, prob_zero=prob_zero,
                             steps=steps)


# --------------------------------------------------------------------------------------------------
# selection


def candidates(scores: torch.Tensor, threshold: float) -> set[Neuron]:
    """Neurons whose attribution is ≥ `threshold` × the matrix's largest attribution (none if that is ≤ 0).

    Args:
        scores: (n_layers, d_mlp) attribution of one prompt.
        threshold: t in (0, 1] (paper: 0.2).
    """
    if not 0.0 < threshold <= 1.0:
        raise RequestError(f"threshold must be in (0, 1], got {threshold}")
    top = float(scores.max())
    if not top > 0:
        return set()
    layer, index = torch.nonzero(scores >= threshold * top, as_tuple=True)
    return set(zip(layer.tolist(), index.tolist()))


def shared(per_prompt: Sequence[set[Neuron]], share: float) -> set[Neuron]:
    """Neurons that are in at least a fraction `share` of the prompts' candidate sets (paper: 0.7).

    Raises:
        RequestError: (a `ValueError`) no prompts, or `share` outside (0, 1].
    """
    if not per_prompt:
        raise RequestError("no prompts to share neurons between")
    if not 0.0 < share <= 1.0:
        raise RequestError(f"share must be in (0, 1], got {share}")
    counts = Counter(n for neurons in per_prompt for n in neurons)
    need = share * len(per_prompt) - 1e-9  # 0.7 × 10 is 7.000000000000001 in floating point
    return {n for n, c in counts.items() if c >= need}


def refine(neurons: set[Neuron], others: Sequence[set[Neuron]], max_share: float = 0.1) -> set[Neuron]:
    """Drop neurons that are also knowledge neurons of more than a fraction `max_share` of other facts.

    The paper's refining step: facts of the same relation share neurons that express the relation rather
    than the fact (the authors' code drops neurons found in more than 10% of a relation's facts).

    Args:
        neurons: one fact's knowledge neurons.
        others: the knowledge neurons of other facts of the same relation.
        max_share: a neuron in more than this fraction of `others` is dropped.
    """
    if not 0.0 <= max_share < 1.0:
        raise RequestError(f"max_share must be in [0, 1), got {max_share}")
    if not others:
        return set(neurons)
    counts = Counter(n for other in others for n in other if n in neurons)
    return {n for n in neurons if counts[n] <= max_share * len(others) + 1e-9}


@dataclass
class KnowledgeNeurons:
    """The knowledge neurons of one fact, found over several prompts that express it.

    Attributes:
        attributions: one `NeuronAttribution` per prompt.
        neurons: the selected (layer, index) pairs, strongest mean attribution first.
        threshold / share: the selection settings used.
        subject / target: descriptive metadata (the subject is not used by the attribution).
        fallback: True when no neuron passed the thresholds and the top-k by mean attribution were taken.
    """

    attributions: list[NeuronAttribution]
    neurons: list[Neuron]
    threshold: float
    share: float
    subject: str | None = None
    target: str | None = None
    fallback: bool = False
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor:
        """(n_layers, d_mlp) attribution averaged over the prompts."""
        return torch.stack([a.scores for a in self.attributions]).mean(0)

    @property
    def activations(self) -> torch.Tensor:
        """(n_layers, d_mlp) activations at the last token averaged over the prompts."""
        return torch.stack([a.activations for a in self.attributions]).mean(0)

    def counts(self) -> Counter:
        """How many prompts had each neuron among their candidates."""
        return Counter(n for a in self.attributions for n in a.candidates(self.threshold))

    def table(self, neurons: Sequence[Neuron] | None = None) -> list[dict[str, Any]]:
        """One row per neuron (default: the selected ones): layer, index, mean score, prompts sharing it,
        mean activation."""
        scores, acts, counts = self.scores, self.activations, self.counts()
        return [{"layer": layer, "index": index, "score": float(scores[layer, index]),
                 "prompts": counts.get((layer, index), 0), "activation": float(acts[layer, index])}
                for layer, index in (self.neurons if neurons is None else neurons)]

    def top(self, k: int) -> list[Neuron]:
        """The k neurons with the largest mean attribution."""
        flat = self.scores.flatten()
        d_mlp = self.scores.shape[1]
        idx = flat.topk(min(k, flat.numel())).indices.tolist()
        return [(i // d_mlp, i % d_mlp) for i in idx]

    def to_dict(self) -> dict[str, Any]:
        first = self.attributions[0]
        return {
            "model": self.model, "subject": self.subject, "target": self.target,
            "target_token": first.target_token, "target_id": first.target_id, "steps": first.steps,
            "layers": list(first.layers), "threshold": self.threshold, "share": self.share,
            "fallback": self.fallback, "neurons": self.table(),
            "prompts": [{"prompt": a.prompt, "prob": a.prob,
                         "prob_zero": [None if math.isnan(v) else v for v in a.prob_zero.tolist()],
                         "candidates": sorted(map(list, a.candidates(self.threshold)))}
                        for a in self.attributions],
            "scores": self.scores.tolist(),
            **self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON (the mean attribution matrix included)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: per-layer largest and total positive attribution, the selected neurons marked."""
        return plot_neurons(self, path)


def find_knowledge_neurons(lm: LM, prompts: Sequence[str], target: str | int | None = None, *,
                           steps: int = 20, threshold: float = 0.2, share: float = 0.7,
                           layers: Iterable[int] | None = None, max_neurons: int | None = None,
                           fallback_top_k: int = 0, subject: str | None = None, max_rows: int = 128,
                           progress: ProgressFn | None = None) -> KnowledgeNeurons:
    """Attribute every prompt, then keep the neurons that pass `threshold` in at least `share` of them.

    Args:
        lm: the model bundle.
        prompts: filled prompts expressing the same fact (the prompt, its paraphrases, prefixed copies).
        target: the answer (its first token is scored), a token id, or None for the first prompt's
            top-1 token (then used for every prompt).
        steps, layers, max_rows: as in `attribute`.
        threshold: per-prompt t (paper: 0.2); share: fraction p of prompts (paper: 0.7).
        max_neurons: keep at most this many, strongest mean attribution first (None: all).
        fallback_top_k: when no neuron passes, take this many by mean attribution (0: return none).
        subject: recorded as metadata.
        progress: called with (forward/backward passes done, total).

    Returns:
        `KnowledgeNeurons`; `neurons` may be empty when nothing passes and `fallback_top_k` is 0.
    """
    if not prompts:
        raise RequestError("give at least one prompt")
    if max_neurons is not None and max_neurons < 1:
        raise RequestError(f"max_neurons must be >= 1 or None, got {max_neurons}")
    candidates(torch.ones(1, 1), threshold)  # validates threshold before any work
    shared([set()], share)
    per_prompt_passes = math.ceil(len(_validate_layers(lm, layers)) / max(1, max_rows // (steps + 1)))
    total = per_prompt_passes * len(prompts)
    attributions: list[NeuronAttribution] = []
    target_key: str | int | None = target
    for p, prompt in enumerate(prompts):
        report = None if progress is None else (lambda d, _t, _p=p: progress(_p * per_prompt_passes + d, total))
        attribution = attribute(lm, prompt, target_key, steps=steps, layers=layers, max_rows=max_rows,
                                progress=report)
        target_key = attribution.target_id  # one token for every prompt, also when it was the top-1
        attributions.append(attribution)
    result = KnowledgeNeurons(attributions=attributions, neurons=[], threshold=threshold, share=share,
                              subject=subject, target=target if isinstance(target, str) else None,
                              model=lm.name)
    found = shared([a.candidates(threshold) for a in attributions], share)
    scores = result.scores
    ranked = sorted(found, key=lambda n: -float(scores[n]))
    if not ranked and fallback_top_k > 0:
        ranked = [n for n in result.top(fallback_top_k) if float(scores[n]) > 0]
        result.fallback = True
    result.neurons = ranked[:max_neurons] if max_neurons is not None else ranked
    log.info("knowledge neurons for %r: %d of %d passing in %d prompt(s)%s", attributions[0].target_token,
             len(result.neurons), len(found), len(prompts), " (fallback top-k)" if result.fallback else "")
    return result


# --------------------------------------------------------------------------------------------------
# plot (matplotlib's Agg canvas directly: no pyplot global state, no display needed)


def plot_neurons(result: KnowledgeNeurons, path: str | Path, top: int = 200) -> Path:
    """Two panels over layers: bars of the largest and the total positive mean attribution per layer; a strip
    of the `top` strongest neurons (dots) with the selected knowledge neurons circled in red.

    Returns:
        The written PNG path (`path` with suffix .png).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = result.scores.numpy()  # (n_layers, d_mlp)
    n_layers = scores.shape[0]
    x = np.arange(n_layers)
    fig = Figure(figsize=(max(6.0, 0.4 * n_layers + 2), 6.0))
    FigureCanvasAgg(fig)
    upper, lower = fig.subplots(2, 1, sharex=True)
    upper.bar(x - 0.2, scores.max(1).clip(min=0), width=0.4, label="largest (left axis)", color="#4c72b0")
    total = upper.twinx()  # the layer sums are an order of magnitude larger than any one neuron
    total.bar(x + 0.2, scores.clip(min=0).sum(1), width=0.4, label="sum of positive (right axis)", color="#dd8452")
    upper.set_ylabel("largest neuron attribution")
    total.set_ylabel("sum of positive attribution")
    for axis in (upper, total):  # headroom for the legend, drawn on the twin because it lies on top
        axis.set_ylim(0, 1.35 * max(axis.get_ylim()[1], 1e-12))
    total.legend(handles=[*upper.get_legend_handles_labels()[0], *total.get_legend_handles_labels()[0]], fontsize=8,
                 loc="upper left")
    target = result.attributions[0].target_token
    upper.set_title(f"integrated-gradients attribution of P({target.strip()!r}) over "
                    f"{len(result.attributions)} prompt(s)", fontsize=9)
    strongest = result.top(top)
    lower.scatter([n[0] for n in strongest], [float(scores[n]) for n in strongest], s=8, color="#888888",
                  label=f"top {len(strongest)} neurons")
    if result.neurons:
        lower.scatter([n[0] for n in result.neurons], [float(scores[n]) for n in result.neurons], s=60,
                      facecolors="none", edgecolors="red", linewidths=1.5,
                      label=f"knowledge neurons ({len(result.neurons)}{', fallback' if result.fallback else ''})")
        for layer, index in result.neurons[:10]:
            lower.annotate(str(index), (layer, float(scores[layer, index])), fontsize=7,
                           xytext=(4, 2), textcoords="offset points")
    lower.set_xlabel("layer")
    lower.set_ylabel("neuron attribution")
    lower.set_xticks(x[:: max(1, n_layers // 20)])
    lower.legend(fontsize=8)
    fig.text(0.01, 0.0, f"t = {result.threshold}, p = {result.share}, P = {result.attributions[0].prob:.3f} "
             f"(first prompt)", fontsize=7)
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
