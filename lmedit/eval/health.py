"""Health checks along a stream of edits: is the model still a language model after this edit?

Gupta et al. 2024 ("Rebuilding ROME", arXiv:2403.07175) found that some single ROME edits disable the
model (generations collapse into repetition) and that such edits show a tiny ROME denominator
(C⁻¹k*)ᵀk and a huge update norm. After each edit of a sequence we record:
  update_norm        ‖Δ‖_F over every changed parameter (weight edits; from the low-rank factors when kept)
  denominator        the smallest (C⁻¹k*)ᵀk of the edit's requests, when the method reports one (ROME)
  probe_loss         mean next-token NLL of the model on a fixed, neutral probe text
and flag an edit as disabling when the probe loss rose by more than a threshold (nats per token) with it.

`probe_loss` is lmedit's one probe-text loss: the same function and text serve this health check, the
ledger's audit gate (`lmedit.ledger.audit`, its `probe_loss` check) and the destructive-edit check before
an edit is applied (`lmedit.editors.safety`). Those ask for the same model states one after another (the
state before an edit, then with it: checked for safety, then audited), so the last few values are kept per
model object, keyed by the text the model reads, the applied edits (`lm.edits`, by identity) and the
weights' fingerprint (`lmedit.models.load.weights_fingerprint`, which also catches changes made outside
`lm.edits`).

Not handled: generation-based collapse checks (fluency is measured by the evaluation's generation metrics).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch

from lmedit.editors.base import Edit, WeightEdit
from lmedit.models.load import weights_fingerprint
from lmedit.scoring import routed
from lmedit.tokens import context_length

if TYPE_CHECKING:
    from lmedit.models.load import LM

# Neutral encyclopaedic English, unrelated to any benchmark fact; the loss on it is a model-health signal.
PROBE_TEXT = (
    "A river is a natural stream of water that flows in a channel toward an ocean, a lake, or another river. "
    "Rivers carry rain and melted snow from high ground, and over thousands of years they shape valleys and "
    "plains. People have settled beside rivers since early times, because they provide water for drinking and "
    "farming, fish for food, and a way to travel and trade. Many large cities grew up where a river meets the "
    "sea or where it could be crossed easily."
)


@torch.no_grad()
def probe_loss(lm: LM, text: str = PROBE_TEXT) -> float:
    """Mean next-token negative log-likelihood (nats per token) of `text` under the model as it is now.

    Every token after the first is scored given all before it (the tokenizer's special tokens included,
    e.g. Gemma's <bos>), over the text's first tokens, as many as the model's context window takes. The
    model is read with its applied edits: weight edits are in the weights, and a wrapper edit that claims
    the text rewrites it (`lmedit.scoring.routed`), as for every text-level score.

    Args:
        lm: the model, edited or not.
        text: the probe text (default `PROBE_TEXT`; thresholds on this loss are calibrated on it).

    Returns:
        The loss in nats per token.
    """
    text = routed(lm, [text])[0]
    # The applied edits themselves are in the key (not their ids, which a later edit could reuse); the few
    # entries kept per model hold them alive.
    key = (text, tuple(lm.edits), weights_fingerprint(lm.model), lm.tokenizer)
    known = _LOSSES.setdefault(lm.model, [])
    for state, loss in known:
        if state[0] == key[0] and state[2] == key[2] and state[3] is key[3] and len(state[1]) == len(key[1]) \
                and all(a is b for a, b in zip(state[1], key[1])):
            return loss
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :context_length(lm)].to(lm.device)
    logits = lm.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    loss = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
    known.append((key, loss))
    del known[:-_KEPT]
    return loss


_KEPT = 4  # model states remembered per model (an audit or safety check compares two)
_LOSSES: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[tuple[Any, ...], float]]] = weakref.WeakKeyDictionary()


def update_norm(edit: Edit) -> float | None:
    """‖Δ‖_F over all parameters a weight edit changes (None for other edit kinds)."""
    if not isinstance(edit, WeightEdit):
        return None
    total = 0.0
    for delta in edit.deltas.values():
        if delta.dense is not None:
            total += float(delta.dense.double().pow(2).sum())
        else:  # ‖L Rᵀ‖_F² = tr((LᵀL)(RᵀR)), without forming the matrix
            assert delta.left is not None and delta.right is not None
            L, R = delta.left.double(), delta.right.double()
            total += float(((L.T @ L) * (R.T @ R)).sum())
    return math.sqrt(total)


def denominator(edit: Edit) -> float | None:
    """The smallest ROME denominator (C⁻¹k*)ᵀk reported in the edit's info, if any."""
    values = [r["denominator"] for r in edit.info.get("requests", [])
              if isinstance(r, dict) and r.get("denominator") is not None]
    return min(values) if values else None


def health_row(edit: Edit, loss_before: float, loss_after: float, base_loss: float, threshold: float) -> dict[str, Any]:
    """The health record of one edit in a sequence; `flagged` when it raised the probe loss by > threshold."""
    rise = loss_after - loss_before
    return {"update_norm": update_norm(edit), "denominator": denominator(edit), "probe_loss": loss_after,
            "probe_loss_rise": rise, "probe_loss_vs_base": loss_after - base_loss,
            "flagged": bool(not math.isfinite(loss_after) or rise > threshold)}
