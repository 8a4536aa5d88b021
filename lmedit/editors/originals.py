"""What a `WeightEdit` keeps for its bit-exact undo: the values it replaced, without a full copy per edit.

Each of a thousand sequential edits of one matrix replaces the value the edit before it produced. Keeping a copy
per edit costs the matrix's size every time: AlphaEdit on gemma3-270m changes four 640×2,048 float32 matrices,
21 MB per edit, 21 GB over 1,000 edits, more than a 24 GB machine holds beside the model. So an applied edit
keeps a copy of a parameter's old value only when

- no applied edit below it changes that parameter (the first of its chain),
- the old value is not exactly what the edit below produced (something else wrote the weights in between:
  checked by digest), or
- it is the `KEEP_EVERY`-th edit of its chain since the last copy;

otherwise it keeps a `Chained` record holding the old value's digest. Undo rebuilds that value by re-adding, from
the nearest copy below, the deltas of the edits in between exactly as `apply` added them (`add`: the same float64
sum, rounded once to the parameter's dtype), checks it against the digest, and only then writes anything. A value
that does not rebuild exactly (an edit's deltas changed in place after it was applied) is refused with
`LMEditError`, the weights untouched. Memory per parameter chain: one copy per `KEEP_EVERY` edits. An undo re-adds
at most `KEEP_EVERY - 1` deltas, and the edits below keep the values rebuilt on the way until the parameter is next
written, so undoing a whole run newest first re-adds each delta once, and a trial apply and undo followed by the
real apply (the destructive-edit check) keeps nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmedit.editors.base import ParamDelta

KEEP_EVERY = 16  # in a chain of edits of one parameter, every 16th keeps a full copy of the value it replaced


@dataclass(frozen=True)
class Chained:
    """An old value not copied: the value the edit below produced, `depth` edits above the nearest copy."""

    digest: bytes
    depth: int


def digest(value: torch.Tensor) -> bytes:
    """The SHA-256 digest of `value`'s dtype, shape and bytes (equal digests: bit-identical values)."""
    data = value.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def add(value: torch.Tensor, delta: ParamDelta, dtype: torch.dtype) -> torch.Tensor:
    """`value + delta`, summed in float64 and rounded once to `dtype`: the one way an edit's delta is added."""
    return (value.to(torch.float64) + delta.full(torch.float64, value.device)).to(dtype)


def depth(kept: torch.Tensor | Chained) -> int:
    """How many edits above the nearest copy a kept old value is (0: it is a copy)."""
    return kept.depth if isinstance(kept, Chained) else 0


def keep(current: torch.Tensor, below: tuple[bytes, int] | None) -> torch.Tensor | Chained:
    """What an edit keeps of `current`, the value it replaces: a `Chained` record when the applied edit below on
    the parameter wrote exactly `current` (`below`: the digest and chain depth of what it wrote) and the chain
    is shorter than `KEEP_EVERY`, else a copy."""
    if below is not None and below[1] + 1 < KEEP_EVERY and digest(current) == below[0]:
        return Chained(below[0], below[1] + 1)
    return current.clone()


def rebuild(kept: Chained, chain: list[tuple[torch.Tensor | Chained, ParamDelta]]) -> list[torch.Tensor] | None:
    """The old values along `chain` (what each applied edit below on the parameter kept, with its delta, newest
    first, down to one holding a copy), re-added from that copy and each checked against its digest: the value
    `kept` stands for, then the one each `Chained` entry of `chain` stands for, newest first. None on a mismatch."""
    if not chain or not isinstance(chain[-1][0], torch.Tensor):
        return None
    value, values = chain[-1][0], []
    for i in reversed(range(len(chain))):  # oldest first: chain[i]'s delta gives what the edit above it replaced
        value = add(value, chain[i][1], value.dtype)
        if digest(value) != (kept if i == 0 else chain[i - 1][0]).digest:  # type: ignore[union-attr]
            return None
        values.append(value)
    return values[::-1]
