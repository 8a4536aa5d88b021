"""WISE's side memories and router (`lmedit.editors.wise` trains the edits): the `WiseEdit` kind, how the applied
edits at one layer become side memories, and how each row of a forward is routed to one of them or to the main memory.

Side memories (the paper's WISE-Retrieve, arXiv:2405.14768 §3 and its code's `retrieve`): an edit belongs to one
side memory (`WiseEdit.memory`, an id). The editor puts a new edit into the memory of the newest applied WISE edit at
its layer while that memory holds fewer than `memory_size` applied edits (the paper's `save_freq`), training it on
top of that memory's state; otherwise the edit starts a new memory. A memory's ΔW is the sum of its applied edits'
ΔW (each the increment its training added, zero outside its random mask), summed oldest first; its threshold is
ε = min over its applied edits of act_ratio × the least Δ_act = ‖k · ΔWᵀ‖ at their subject keys k, recomputed from
the memory's ΔW now (the paper's code keeps the activations of training time). So the cost of a forward grows with
the number of memories, not of edits, and an edit's stored increment is sparse: its support as packed bits and
the values on it (1.2 MB for a 640 × 2048 down-projection at ρ = 0.2, against 5.2 MB dense).

Routing, per row and causally: at each position every memory's Δ_act is compared with its ε; from a row's first
position where a memory fires, the row reads that memory: the output becomes the main output + a · ΔW_mᵀ, summed
over the memories that have fired in the row so far (the paper's code reads the one most activated memory; with
memories of one edit each, made apart, the sum keeps each edit working where two fire). One product a · ΔW_mᵀ per
memory serves both the gate and the output. Rows and positions that never fire are bit for bit the unedited
model's.

Applying and undoing never modify another edit: a memory's ΔW and ε are recomputed from the edits applied now.
When an edit is appended to the applied set (sequential editing), `prepare` extends the previous state instead of
rebuilding it, with the same result bit for bit (the same sums in the same order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmedit.editors._edit_files import saved_requests
from lmedit.editors.adaptor import AdaptorEdit
from lmedit.errors import EditFileError, LMEditError
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def mask_seed(seed: int, requests: Sequence[EditRequest]) -> int:
    """The seed of a new memory's random masks, from the editor's seed and the memory's first requests."""
    text = json.dumps([seed, [r.to_dict() for r in requests]], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def memory_id(seed: int) -> str:
    """A new memory's id, from its mask seed (the same edit made twice gets the same id: see `build_memories`)."""
    return f"{seed:016x}"


def edit_mask(shape: Sequence[int], ratio: float, seed: int, shard: int = 0) -> torch.Tensor:
    """The random subset of side-memory entries a shard trains: (d_out, d_in) bool, each entry True with
    probability `ratio`, drawn from the memory's `seed` (`mask_seed`) and the shard."""
    digest = int.from_bytes(hashlib.sha256(json.dumps([seed, shard]).encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(digest)) < ratio


def ties_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ties-merge (Yadav et al. 2023, arXiv:2306.01708; sign election and disjoint mean, no trimming) of deltas of
    one shape: per entry, the mean of the deltas whose sign agrees with the sign of their sum (0 where none does).
    One delta is returned as it is."""
    if len(deltas) == 1:
        return deltas[0]
    total = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d in deltas:
        total += d
    elected = total.sign()
    agreeing = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for d in deltas:
        agree = (d.sign() == elected) & (d != 0)
        agreeing += torch.where(agree, d, 0.0)
        count += agree
    return agreeing / count.clamp(min=1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's entries, flattened, as uint8 bytes (8 per byte, least significant first)."""
    flat = mask.reshape(-1).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.reshape(-1, 8).to(torch.uint8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`pack_bits`' inverse: the bool tensor of `shape`."""
    n = 1
    for s in shape:
        n *= s
    bits = (packed.cpu()[:, None] & _BITS).ne(0).reshape(-1)
    if bits.numel() < n or bool(bits[n:].any()):
        raise LMEditError(f"{packed.numel()} bytes of support do not hold a {tuple(shape)} mask")
    return bits[:n].reshape(tuple(shape))


@dataclass(frozen=True)
class Memory:
    """One side memory as the hook serves it."""

    id: str                             # its edits' `memory`
    instance: int                       # which memory of that id (the same edit made twice, both applied: 0, 1)
    delta: torch.Tensor                 # (d_out, d_in) float32: the sum of its applied edits' increments
    threshold: float                    # ε
    members: tuple[WiseEdit, ...]       # its applied edits, oldest first


@dataclass(frozen=True)
class SideMemories:
    """The applied WISE edits at one layer, as side memories in the order they were started."""

    memories: tuple[Memory, ...]


def delta_act(keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The activation indicator Δ_act = ‖a · ΔWᵀ‖ of layer inputs `keys` (…, d_in) under `delta` -> (…)."""
    return (keys.to(delta.device) @ delta.T).norm(dim=-1)


def memory_threshold(delta: torch.Tensor, members: Sequence[WiseEdit]) -> float:
    """ε of a memory with ΔW `delta`: min over `members` of act_ratio × the least Δ_act at their subject keys."""
    return min(m.act_ratio * float(delta_act(m.subject_keys, delta).min()) for m in members)


def _memory_keys(edits: Sequence[WiseEdit], newest: dict[str, int]) -> list[tuple[str, int]]:
    """The (id, instance) of the memory each of `edits` belongs to: a founder starts a new instance of its id, any
    other edit joins the newest instance (or starts one when none is applied). `newest` (id -> its newest instance
    so far) is updated."""
    keys = []
    for e in edits:
        if e.founder or e.memory not in newest:
            newest[e.memory] = newest.get(e.memory, -1) + 1
        keys.append((e.memory, newest[e.memory]))
    return keys


def build_memories(edits: Sequence[WiseEdit], previous: SideMemories | None = None,
                   previous_edits: Sequence[WiseEdit] = ()) -> SideMemories:
    """The side memories of `edits` (oldest first). An edit that started its memory (`founder`) starts one here,
    even when an applied edit already started a memory of the same id (the same edit made twice: two memories);
    any other edit joins the newest memory of its id, or starts one when none is applied.

    When `previous_edits` is a prefix of `edits`, the memories of `previous` are extended by the new edits instead
    of summed again (same sums, same order, same result)."""
    prefix = previous is not None and len(previous_edits) <= len(edits) and all(
        a is b for a, b in zip(previous_edits, edits))
    groups: dict[tuple[str, int], list[Any]] = {}  # (id, instance) -> [delta, members, threshold]
    if prefix and previous is not None:
        for m in previous.memories:
            groups[(m.id, m.instance)] = [m.delta, list(m.members), m.threshold]
    newest: dict[str, int] = {}
    for memory_id, instance in groups:
        newest[memory_id] = max(instance, newest.get(memory_id, -1))
    touched: set[tuple[str, int]] = set()
    added = edits[len(previous_edits) if prefix else 0:]
    for e, key in zip(added, _memory_keys(added, newest)):
        group = groups.setdefault(key, [None, [], 0.0])
        delta = e.delta.float()
        group[0] = delta.clone() if group[0] is None else group[0] + delta
        group[1].append(e)
        touched.add(key)
    memories = []
    for key, (delta, members, threshold) in groups.items():
        if key in touched:
            threshold = memory_threshold(delta, members)
        memories.append(Memory(key[0], key[1], delta, threshold, tuple(members)))
    return SideMemories(tuple(memories))


def newest_memory(edits: Sequence[WiseEdit]) -> list[WiseEdit]:
    """The edits of the memory the newest of `edits` belongs to (as `build_memories` groups them), oldest first."""
    keys = _memory_keys(edits, {})
    return [e for e, key in zip(edits, keys) if key == keys[-1]] if keys else []


def side_output(state: SideMemories, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """The layer's output under the router (module docstring); None when no memory fires anywhere.

    Args:
        state: the side memories.
        inputs: (batch, pos, d_in) the layer's input a.
        output: (batch, pos, d_out) the main memory's output.
    """
    result = None
    for memory in state.memories:
        if not memory.threshold > 0:
            continue
        side = inputs.float() @ memory.delta.to(inputs.device).T  # (batch, pos, d_out); gradients flow via `inputs`
        with torch.no_grad():
            fired = side.detach().norm(dim=-1) > memory.threshold  # (batch, pos): Δ_act from the same product
            if not bool(fired.any()):
                continue
            routed = fired.to(torch.int8).cummax(dim=-1).values.bool()  # from a row's first firing position on
        base = output if result is None else result
        result = torch.where(routed[..., None], base + side.to(output.dtype), base)
    return result


class WiseEdit(AdaptorEdit, adaptor="wise"):
    """A WISE edit at `site` = Site("mlp.out", layer): the increment it trained into its side memory, sparse.

    Attributes:
        memory: the id of the side memory it belongs to.
        support: (d_out, d_in) bool, where its increment may be non-zero; `values` the increment there.
        subject_keys: (n, d_in) the layer's input at each request's last subject token (for the memory's ε).
        quiet_keys: (m, d_in) its inputs the memory was taught to leave alone (its templates with stand-in
            subjects, its prompts before the subject), for the later edits of its memory.
        act_ratio: its share in ε (the paper's 0.88).
        mask_seed: its memory's mask seed (`edit_mask`), which a next edit of the memory trains under.
        founder: it started its memory (False: it was trained on top of the memory's earlier edits).
    """

    byte_tensors = ("support",)

    def __init__(self, requests: Sequence[EditRequest], delta: torch.Tensor, subject_keys: torch.Tensor,
                 quiet_keys: torch.Tensor, *,
                 site: Site, memory: str, act_ratio: float, mask_seed: int, founder: bool = True,
                 **common: Any) -> None:
        super().__init__(site=site, requests=requests, **common)
        if site.kind != "mlp.out":
            raise LMEditError(f"a WISE edit sits at an mlp.out site, got {site}")
        if not requests or delta.ndim != 2 or any(k.ndim != 2 or k.shape[1] != delta.shape[1]
                                                   for k in (subject_keys, quiet_keys)):
            raise LMEditError(f"a WISE edit needs requests, a 2-D delta and subject and quiet keys as wide as its "
                              f"input: {len(requests)} requests, delta {tuple(delta.shape)}, keys "
                              f"{tuple(subject_keys.shape)} and {tuple(quiet_keys.shape)}")
        if not 0 < act_ratio < 1:
            raise LMEditError(f"a WISE edit's act_ratio must be in (0, 1), got {act_ratio}")
        self.shape = tuple(delta.shape)
        self.support = delta != 0
        self.values = delta[self.support].float()
        self.subject_keys, self.quiet_keys = subject_keys.float(), quiet_keys.float()
        self.memory, self.act_ratio, self.mask_seed, self.founder = memory, float(act_ratio), int(mask_seed), founder
        # The increment and keys never change once made: `threshold` and `check`'s tests of them run once, not at
        # every apply (an evaluation suspends and re-applies hundreds of edits per chunk of records).
        self._threshold: float | None = None
        self._sound = False

    @property
    def delta(self) -> torch.Tensor:
        """(d_out, d_in) float32: the increment, dense."""
        dense = torch.zeros(self.shape, dtype=torch.float32, device=self.values.device)
        dense[self.support.to(self.values.device)] = self.values
        return dense

    @property
    def threshold(self) -> float:
        """ε of this edit alone (its memory's ε when it is the memory's only edit)."""
        if self._threshold is None:
            self._threshold = memory_threshold(self.delta, [self])
        return self._threshold

    def activations(self, keys: torch.Tensor) -> torch.Tensor:
        """Δ_act = ‖a·ΔWᵀ‖ of this edit's increment alone for layer inputs `keys` (…, d_mlp) -> (…)."""
        return delta_act(keys.float(), self.delta)

    def check(self, lm: LM) -> None:
        """Refuse a model the side memory does not fit (layer, shape, NaN/inf); move it to its device."""
        layer = self.site_layer(lm)
        shape = tuple(lm.arch.weight(lm.model, layer, "mlp_out").shape)
        if self.shape != shape:
            raise LMEditError(f"this WISE edit's side memory is {self.shape}; layer {layer} of {lm.name!r} has a "
                              f"{shape} down-projection")
        if not self._sound:
            if not all(bool(torch.isfinite(t).all()) for t in (self.values, self.subject_keys, self.quiet_keys)):
                raise LMEditError("this WISE edit holds NaN or infinite values; the model is unchanged")
            if not self.threshold > 0:
                raise LMEditError("this WISE edit does not fire on its own subject (threshold 0); the model is "
                                  "unchanged")
            self._sound = True
        self.values, self.subject_keys = self.values.to(lm.device), self.subject_keys.to(lm.device)
        self.quiet_keys = self.quiet_keys.to(lm.device)
        self.support = self.support.to(lm.device)

    @classmethod
    def prepare(cls, edits: Sequence[AdaptorEdit], previous: tuple[Sequence[AdaptorEdit], Any] | None = None
                ) -> SideMemories:
        mine = [e for e in edits if isinstance(e, WiseEdit)]
        if previous is None:
            return build_memories(mine)
        old = [e for e in previous[0] if isinstance(e, WiseEdit)]
        return build_memories(mine, previous[1], old)

    @classmethod
    def respond(cls, state: SideMemories, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        return side_output(state, inputs, output)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"support": pack_bits(self.support), "values": self.values, "subject_keys": self.subject_keys,
                "quiet_keys": self.quiet_keys}

    def metadata(self) -> dict[str, Any]:
        return {"requests": [r.to_dict() for r in self.requests], "shape": list(self.shape), "memory": self.memory,
                "act_ratio": self.act_ratio, "mask_seed": self.mask_seed, "founder": self.founder}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> WiseEdit:
        """Rebuild a saved edit after checking its tensors and metadata (`EditFileError` names what is wrong)."""
        if set(tensors) != {"support", "values", "subject_keys", "quiet_keys"}:
            raise EditFileError(f"tensors {sorted(tensors)}; a WISE edit has exactly 'support', 'values', "
                                "'subject_keys' and 'quiet_keys'")
        requests = saved_requests(metadata.get("requests"), nonempty=True)
        shape = metadata.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise EditFileError(f"metadata 'shape' must be two positive integers, got {shape!r}")
        if not (isinstance(metadata.get("memory"), str) and isinstance(metadata.get("mask_seed"), int)
                and isinstance(metadata.get("founder"), bool)):
            raise EditFileError("metadata 'memory' (a string), 'mask_seed' (an integer) and 'founder' (true/false) "
                                "are required")
        support = unpack_bits(tensors["support"], shape)
        values = tensors["values"]
        if values.shape != (int(support.sum()),):
            raise EditFileError(f"tensor 'values' holds {values.numel()} numbers for a support of {int(support.sum())}")
        delta = torch.zeros(shape, dtype=torch.float32)
        delta[support] = values.float()
        if bool((delta[support] == 0).any()):
            raise EditFileError("tensor 'values' holds zeros inside the support")
        act_ratio = metadata.get("act_ratio")
        if not isinstance(act_ratio, int | float) or not 0 < act_ratio < 1:
            raise EditFileError(f"metadata 'act_ratio' must be in (0, 1), got {act_ratio!r}")
        return cls(requests, delta, tensors["subject_keys"], tensors["quiet_keys"], memory=metadata["memory"], act_ratio=float(act_ratio),
                   mask_seed=metadata["mask_seed"], founder=metadata["founder"], **common)
