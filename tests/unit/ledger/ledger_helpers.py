"""Helpers for the ledger tests: hand-made weight edits, a lenient audit config, weight snapshots."""

from __future__ import annotations

import torch

import lmedit
from lmedit.editors.base import ParamDelta, WeightEdit
from lmedit.ledger import AuditConfig
from lmedit.ledger.audit import CHECKS

# Thresholds off, no generation: tests that are about storage, not about the gate, record whatever they make.
LENIENT = AuditConfig(**{f"{c.name}_{level}": None for c in CHECKS for level in ("warn", "refuse")},
                      generation_tokens=0)

# Subjects at the end of the prompt (a random 4-layer model barely moves information between tokens).
REQUESTS = (lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris"),
            lmedit.EditRequest("Where is {}", "The Space Needle", "Paris", "Seattle"),
            lmedit.EditRequest("Where is {}", "The Louvre", "Seattle", "Paris"))


def random_edit(lm, request: lmedit.EditRequest, *, seed: int, scale: float = 0.3, layer: int = 1) -> WeightEdit:
    """A rank-one change of one down-projection (not an editing method: storage tests need only a patch)."""
    generator = torch.Generator().manual_seed(seed)
    name = lm.arch.param_name(lm.model, layer, "mlp_out")
    rows, cols = dict(lm.model.named_parameters())[name].shape
    delta = ParamDelta(left=scale * torch.randn(rows, 1, generator=generator),
                       right=torch.randn(cols, 1, generator=generator))
    return WeightEdit({name: delta}, requests=(request,), method="test", base_fingerprint=lm.fingerprint)


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
