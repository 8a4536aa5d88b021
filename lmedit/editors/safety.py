"""Edits far outside what any method's shipped settings produce are flagged before they are applied.

A finite but destructive setting (FT `lr=1e3`, a clamp of 1e30, a hand-written edit file) gives an "edit"
that changes the weights by as much as they are worth and wrecks ordinary text. Two cheap measurements of
a weight edit say so before it lands:

- **relative update norm**: the largest ‖Δ‖_F / ‖W‖_F over the parameters it changes;
- **probe-text loss rise**: the mean next-token loss (nats) of a fixed sentence of ordinary English
  (`lmedit.eval.health.PROBE_TEXT`) with the edit applied, minus without (the edit is applied, the text
  scored, the edit undone: bit-exact).

The limits sit 4–10× above the largest values the shipped settings of the weight editors (FT, FT-L, KN,
ROME, MEMIT, AlphaEdit) gave on the first three starter facts on both built-in models (docs/editors.md,
"Destructive settings"). Adaptor edits (GRACE's codebook, which rewrites a layer's output wherever an entry
matches) get the probe-text check only: they change no weight, but a radius that matches every position
wrecks ordinary text as surely as a huge update. Wrapper edits (SERAC, IKE) change what the model reads,
only for inputs in their scope, and are not assessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmedit.editors.base import Edit, WeightEdit
from lmedit.errors import LMEditError
from lmedit.models.load import LM
from lmedit.models.params import read

MAX_RELATIVE_NORM = 1.0   # ‖Δ‖/‖W‖; shipped settings: at most 0.26 on 3 starter facts (ROME, smollm2-135m)
MAX_PROBE_RISE = 0.5      # nats; shipped settings: at most 0.06 on 3 starter facts, 0.20 on 5 (KN, gemma3-270m)


class DestructiveEditError(LMEditError):
    """An edit whose size or damage to ordinary text is far outside what shipped settings produce; the
    weights are unchanged. Apply it anyway with `force=True` (`--force` on the command line)."""


@dataclass(frozen=True)
class Assessment:
    """What `assess` measured; `reasons` is empty when the edit is within the limits."""

    relative_norm: float | None
    probe_rise: float | None
    reasons: tuple[str, ...]

    @property
    def destructive(self) -> bool:
        return bool(self.reasons)


def relative_norms(edit: WeightEdit, lm: LM) -> dict[str, float]:
    """‖Δ‖_F / ‖W‖_F for each parameter the edit changes (low-rank factors never multiplied out)."""
    params = dict(lm.model.named_parameters())
    out = {}
    for name, delta in edit.deltas.items():
        if delta.dense is not None:
            size = float(delta.dense.double().norm())
        else:  # ‖L Rᵀ‖_F² = tr((LᵀL)(RᵀR))
            assert delta.left is not None and delta.right is not None
            L, R = delta.left.double(), delta.right.double()
            size = math.sqrt(max(float(((L.T @ L) * (R.T @ R)).sum()), 0.0))
        weight = float(read(lm.model, name).double().norm()) if name in params else 0.0
        out[name] = size / weight if weight > 0 else math.inf
    return out


def assess(edit: Edit, lm: LM) -> Assessment:
    """Measure an unapplied edit against the limits; the model is left exactly as it was."""
    if edit.is_applied or edit.kind not in ("weight", "adaptor"):
        return Assessment(None, None, ())
    from lmedit.eval.health import probe_loss

    worst_name, worst = "", None
    if isinstance(edit, WeightEdit):
        worst_name, worst = max(relative_norms(edit, lm).items(), key=lambda kv: kv[1], default=("", 0.0))
    reasons = []
    if worst is not None and not worst <= MAX_RELATIVE_NORM:
        reasons.append(f"it changes {worst_name} by {worst:.3g}× its own size (shipped settings stay under "
                       f"{MAX_RELATIVE_NORM:g}×)")
    before = probe_loss(lm)
    if isinstance(edit, WeightEdit):
        edit.apply(lm, check_fingerprint=False, trial=True)  # undone below: keep a copy, no rebuild
    else:
        edit.apply(lm, check_fingerprint=False)  # type: ignore[call-arg]  (adaptor edits take it)
    try:
        rise = probe_loss(lm) - before
    finally:
        edit.undo()
    if not rise <= MAX_PROBE_RISE:
        reasons.append(f"it raises the loss on ordinary text by {rise:.3g} nats (shipped settings: under "
                       f"{MAX_PROBE_RISE:g})")
    return Assessment(worst, rise, tuple(reasons))


def check_not_destructive(edit: Edit, lm: LM, *, force: bool = False) -> Assessment:
    """`assess`, raising `DestructiveEditError` for a destructive edit unless `force`."""
    found = assess(edit, lm)
    if found.destructive and not force:
        raise DestructiveEditError(
            f"refusing to apply this {edit.method or 'weight'} edit: {'; and '.join(found.reasons)}; check the "
            f"settings (the shipped ones: lmedit/configs/<method>/<model>.yaml), or apply it anyway with "
            f"force=True (--force)")
    return found
