"""Knowledge-neuron editing (Dai et al. 2021, "Knowledge Neurons in Pretrained Transformers", arXiv:2104.08696, §5).

Finds the fact's knowledge neurons with integrated gradients (`lmedit/neurons.py`) for the current
answer, then moves each neuron's value vector v (its column of the MLP down-projection W_out) from the
old answer's direction toward the new one:
    v ← v + s · ‖v‖ · (λ2 · ê(target_new) − λ1 · ê(target_true)),     ê(x) = u_x / ‖u_x‖,
with λ1 = 1 and λ2 = 8 by default (the paper's update setting). Choices this module makes, and why:
  * e = the unembedding row u_x of the target's first token (lm_head's weight): writing u_x into the
    residual stream is what raises x's logit. The paper's BERT ties its output layer to the word
    embeddings, so this is the paper's e there; for untied models (GPT-J, Llama) the input embedding
    would be the wrong one. Gemma's √d_model embedding scale is applied in the forward, not stored in the
    weight, so it does not enter u_x.
  * ê is normalised and scaled to the column's norm ‖v‖, as in the authors' code (λ_i = ‖v‖/‖e‖ · λ):
    value columns and embedding rows live on unrelated scales, and a fixed λ would mean something else in
    every model and layer.
  * s = the sign of the neuron's mean activation over the prompts. BERT's GELU neurons that matter are
    positive; the gated MLPs of Llama/Gemma have signed activations, and a neuron with a negative
    activation writes −v, so without s the edit would push toward the old answer.
  * target_true missing: the neurons are found for the model's own top-1 next token, and only the
    λ2 term is added.
The final norm's per-channel gain and Gemma's post-MLP RMSNorm are ignored, as the paper ignores BERT's
layer norms: the edit is a direction in the residual stream.

Prompts: the request's prompt, plus `n_prefixes` copies under short model-generated prefixes
("{prefix}. {prompt}", ROME's context templates, `editors/steps/value.py`) standing in for the paper's
generated paraphrases (`EditRequest` carries no paraphrases). Several requests in one edit are located
on the unedited model and their column shifts summed.

Refining (the paper's step against false positives; the authors' code drops neurons found for more
than 10% of a relation's facts): a request's neurons are dropped when they are also candidates of more
than `refine_share` of (a) the other requests of this edit with the same prompt template and (b) the
first `refine_facts` built-in facts (`lmedit/data/trace_facts.jsonl`, other relations: their shared
neurons express "an answer comes next", not this fact). Then at most `max_neurons` are edited,
strongest mean attribution first (the authors tune p so that a fact has 2-5 neurons).

The delta of each edited layer is stored as rank-2 factors per request: [ê_new, ê_old] (d_model, 2)
times per-neuron coefficients (d_mlp, 2).

Not handled: multi-token targets beyond their first token (the paper edits single-token objects);
requests whose old and new answers share their first token (refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.cache import describe, is_int, read_json, write_json
from lmedit.config import check_ranges, to_dict
from lmedit.editors.steps.value import context_prefixes, prefix_token_bound
from lmedit.editors.base import Editor, EditorConfig, ParamDelta, WeightEdit, check_requests
from lmedit.errors import ConfigError, EditFailedError
from lmedit.neurons import KnowledgeNeurons, Neuron, attribute, find_knowledge_neurons, refine
from lmedit.registry import editors
from lmedit.stats import StatsCache
from lmedit.tokens import target_ids
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class KnConfig(EditorConfig):
    steps: int = 20                    # Riemann steps m of integrated gradients (paper: 20)
    threshold: float = 0.2             # per prompt, keep attribution ≥ t × the prompt's max (paper: 0.2)
    share: float = 0.7                 # keep neurons found in ≥ this fraction of the prompts (paper: 0.7)
    refine_share: float = 0.1          # refining: drop neurons found in > this fraction of other facts (code: 0.1)
    refine_facts: int = 0              # other facts to refine against: this many built-in facts (0: none)
    lambda_erase: float = 1.0          # λ1, weight of −ê(target_true) (paper: 1)
    lambda_add: float = 8.0            # λ2, weight of +ê(target_new) (paper: 8)
    max_neurons: int = 20              # edit at most this many, strongest first (authors tune p for 2-5 a fact)
    fallback_top_k: int = 0            # no neuron passes: edit the top-k by attribution (0: fail instead)
    layers: tuple[int, ...] = ()       # layers to search; () = all
    n_prefixes: int = 4                # prompts = the prompt + this many model-generated 5-token prefixes

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=("steps", "max_neurons"), positive=("lambda_add",),
                     nonnegative=("lambda_erase", "refine_facts", "fallback_top_k", "n_prefixes"),
                     intervals={"threshold": "(0, 1]", "share": "(0, 1]", "refine_share": "[0, 1)"},
                     layers=("layers",))

    def prefix_tokens(self) -> int:
        return prefix_token_bound(((5, self.n_prefixes),))


def _check_neuron_sets(payload: object, n_facts: int, n_layers: int, d_mlp: int) -> str | None:
    """Why cached contrast neuron sets cannot be used (None if they can): one list of [layer, index] per fact."""
    if not (isinstance(payload, list) and len(payload) == n_facts and all(isinstance(s, list) for s in payload)):
        return f"the payload is {describe(payload)}, expected {n_facts} lists of [layer, index] pairs"
    for i, neurons in enumerate(payload):
        if not all(isinstance(n, list) and len(n) == 2 and is_int(n[0], 0, n_layers) and is_int(n[1], 0, d_mlp)
                   for n in neurons):
            return f"set {i} holds an entry that is not a [layer < {n_layers}, index < {d_mlp}] pair"
    return None


def _unit_unembedding(lm: LM, token: int) -> torch.Tensor:
    """ê: the unembedding row of `token`, normalised -> (d_model,) float64."""
    unembed, _ = lm.arch.module_for(lm.model, Site("logits"))
    row = unembed.weight[token].detach().to(torch.float64)  # lm_head is (d_vocab, d_model) in every family
    return row / row.norm()


@editors.register("kn")
class KnEditor(Editor[KnConfig]):
    """Knowledge-neuron editing (arXiv:2104.08696): shift the fact's neurons' value vectors toward target_new."""

    config_class = KnConfig

    def __init__(self, config: KnConfig | None = None, *, cache: StatsCache | None = None) -> None:
        super().__init__(config)
        self.cache = cache if cache is not None else StatsCache()  # sampled prefixes, contrast facts' neurons

    def _report(self, phase: str, index: int, total: int):
        if self.progress is None:
            return None
        progress = self.progress
        return lambda done, n: progress(phase, index * n + done, total * n)

    def prompts_for(self, lm: LM, request: EditRequest) -> list[str]:
        """The filled prompts whose shared neurons are the fact's: the prompt and its prefixed copies."""
        prefixes = [""]
        if self.config.n_prefixes:
            prefixes = context_prefixes(lm, ((5, self.config.n_prefixes),), seed=self.config.seed, cache=self.cache)
        return [prefix + request.text for prefix in prefixes]

    def locate(self, lm: LM, request: EditRequest, index: int = 0, total: int = 1) -> KnowledgeNeurons:
        """All neurons passing the thresholds for `request`'s current answer (target_true, else the model's
        top-1 token), before refining and the `max_neurons` cap."""
        c = self.config
        return find_knowledge_neurons(lm, self.prompts_for(lm, request), request.target_true, steps=c.steps,
                                      threshold=c.threshold, share=c.share, layers=c.layers or None,
                                      subject=request.subject, progress=self._report("attributing", index, total))

    def contrast_sets(self, lm: LM) -> list[set[Neuron]]:
        """Candidate neurons of the first `refine_facts` built-in facts (`lmedit/data/trace_facts.jsonl`), one
        prompt each, cached on disk per model and settings."""
        from lmedit.tracing import builtin_facts

        c = self.config
        facts = builtin_facts()[:c.refine_facts]
        layers = "-".join(map(str, c.layers)) or "all"
        digest = hashlib.sha256(json.dumps([[f.text, f.answer] for f in facts]).encode()).hexdigest()[:8]
        path = (self.cache.root / lm.weights_hash /
                f"kn-contrast-n{len(facts)}-{digest}-m{c.steps}-t{c.threshold}-l{layers}.json")
        provenance = {"kind": "kn_contrast", "model": lm.weights_hash, "facts": digest, "n_facts": len(facts),
                      "steps": c.steps, "threshold": c.threshold, "layers": list(c.layers)}
        shape = (len(facts), lm.n_layers, lm.arch.d_mlp(lm.model))
        stored = read_json(path, provenance, lambda payload: _check_neuron_sets(payload, *shape))
        if stored is not None:
            return [{tuple(n) for n in neurons} for neurons in stored]  # type: ignore[misc]
        sets = []
        for i, fact in enumerate(facts):
            attribution = attribute(lm, fact.text, fact.answer, steps=c.steps, layers=c.layers or None,
                                    progress=self._report("contrast facts", i, len(facts)))
            sets.append(attribution.candidates(c.threshold))
        write_json(path, [sorted(map(list, s)) for s in sets], provenance)
        return sets

    def select(self, kn: KnowledgeNeurons, others: Sequence[set[Neuron]]) -> tuple[list[Neuron], list[Neuron], bool]:
        """Refine `kn`'s neurons against `others`, fall back to the top-k if none is left, cap at `max_neurons`.

        Returns:
            (neurons to edit, strongest first; neurons dropped by refining; whether the fallback was used).
        """
        c = self.config
        passing = set(kn.neurons)
        kept = refine(passing, others, c.refine_share)
        dropped = sorted(passing - kept, key=lambda n: -float(kn.scores[n]))
        fallback = False
        if not kept and c.fallback_top_k:  # the strongest neurons by mean attribution, except refined-out ones
            ranked = [n for n in kn.top(c.fallback_top_k + len(dropped))
                      if n not in dropped and float(kn.scores[n]) > 0]
            kept = set(ranked[:c.fallback_top_k])
            fallback = True
        ordered = sorted(kept, key=lambda n: -float(kn.scores[n]))
        return ordered[:c.max_neurons], dropped, fallback

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Find each request's knowledge neurons and shift their value vectors; returns an unapplied edit.

        Raises:
            EditFailedError: no neuron passes the thresholds and refining (and `fallback_top_k` is 0), or
                target_new and target_true start with the same token. The model is unchanged.
        """
        requests = check_requests(requests)
        c = self.config
        bad = [layer for layer in c.layers if layer >= lm.n_layers]
        if bad:
            raise ConfigError(f"KnConfig.layers {bad} are out of range: the model has {lm.n_layers} layers")
        torch.manual_seed(c.seed)
        new_ids, old_ids = [], []
        for r in requests:
            new = target_ids(lm, r.target_new)[0]
            old = target_ids(lm, r.target_true)[0] if r.target_true is not None else None
            if new == old:
                raise EditFailedError(
                    f"{r.target_new!r} and {r.target_true!r} start with the same token "
                    f"{lm.tokenizer.decode([new])!r}: knowledge-neuron editing moves first-token directions only")
            new_ids.append(new)
            old_ids.append(old)
        found = [self.locate(lm, r, i, len(requests)) for i, r in enumerate(requests)]
        contrast = self.contrast_sets(lm) if c.refine_facts else []
        chosen = []
        for i, r in enumerate(requests):
            # The paper refines against other facts of the same relation: here the built-in contrast facts and
            # the other requests of this edit that share the prompt template.
            same_relation = [set(found[j].neurons) for j, o in enumerate(requests) if j != i and o.prompt == r.prompt]
            chosen.append(self.select(found[i], [*contrast, *same_relation]))
        empty = [r.subject for r, (neurons, _, _) in zip(requests, chosen) if not neurons]
        if empty:
            raise EditFailedError(
                f"no knowledge neuron passed threshold={c.threshold} in share={c.share} of the prompts and refining "
                f"(refine_share={c.refine_share}) for {empty}; lower them or set fallback_top_k; "
                "the model is unchanged")

        # Per layer: canonical Δ (d_model, d_mlp) = Σ_requests [ê_new, ê_old] @ coefficients.T
        lefts: dict[int, list[torch.Tensor]] = {}
        rights: dict[int, list[torch.Tensor]] = {}
        infos = []
        for request, kn, (neurons, dropped, fallback), new_id, old_id in zip(requests, found, chosen, new_ids, old_ids):
            e_new = _unit_unembedding(lm, new_id)
            e_old = _unit_unembedding(lm, old_id) if old_id is not None else torch.zeros_like(e_new)
            acts = kn.activations
            for layer in sorted({layer for layer, _ in neurons}):
                W = lm.arch.weight_value(lm.model, layer, "mlp_out").detach().to(torch.float64)  # (d_model, d_mlp)
                coef = torch.zeros(W.shape[1], 2, dtype=torch.float64)  # (d_mlp, 2): weights of ê_new, ê_old
                for index in sorted(i for l_, i in neurons if l_ == layer):
                    sign = 1.0 if float(acts[layer, index]) >= 0 else -1.0
                    scale = sign * float(W[:, index].norm())
                    coef[index, 0] = scale * c.lambda_add
                    coef[index, 1] = -scale * c.lambda_erase
                lefts.setdefault(layer, []).append(torch.stack([e_new, e_old], 1))  # (d_model, 2)
                rights.setdefault(layer, []).append(coef)
            infos.append({"subject": request.subject, "target_new": request.target_new,
                          "scored_token": kn.attributions[0].target_token, "n_prompts": len(kn.attributions),
                          "prob": [a.prob for a in kn.attributions], "fallback": fallback,
                          "neurons": [[r["layer"], r["index"], r["score"]] for r in kn.table(neurons)],
                          "dropped_by_refining": [list(n) for n in dropped]})
            log.info("KN %s -> %s: %d neurons in layers %s (%d dropped by refining)", request.subject,
                     request.target_new, len(neurons), sorted({layer for layer, _ in neurons}), len(dropped))

        deltas = {}
        for layer in sorted(lefts):
            left = torch.cat(lefts[layer], 1).to(torch.float32)
            right = torch.cat(rights[layer], 1).to(torch.float32)
            if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                raise EditFailedError(f"knowledge-neuron edit is non-finite at layer {layer}; the model is unchanged")
            p_left, p_right = lm.arch.factors_to_param_layout(left, right)
            deltas[lm.arch.param_name(lm.model, layer, "mlp_out")] = ParamDelta(left=p_left, right=p_right)
        return WeightEdit(deltas=deltas, requests=requests, method="kn", config=to_dict(self.config),
                          base_fingerprint=lm.fingerprint, info={"requests": infos})
