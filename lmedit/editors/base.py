"""The editing interface: `Editor.edit(lm, requests) -> Edit`, and the reversible `Edit` kinds.

An edit is data: it can be applied to a model, undone bit-exactly, saved and loaded. Editors compute
an edit without touching the weights; `Edit.apply()` writes them only after every new value is finite,
so a failed edit leaves the model bit-identical. The harness, ledger, CLI and web app handle edit
*kinds* and never name a method.

Kinds implemented here: `WeightEdit` (per-parameter deltas, low-rank factors kept when the method
produces them). `WrapperEdit` and `PromptEdit` arrive with the editors that need them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file

from lmedit.errors import EditFailedError, LMEditError
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class EditorConfig:
    """Settings every editor shares."""

    seed: int = 0  # torch seed for anything random (prefix sampling, initialisations)


C = TypeVar("C", bound=EditorConfig)


class Editor(ABC, Generic[C]):
    """An editing method. Subclasses set `config_class` and implement `edit`; they register in `lmedit.registry.editors`."""

    config_class: ClassVar[type[EditorConfig]] = EditorConfig

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()  # type: ignore[assignment]
        # Long preparatory work (statistics, sampling) reports here as (phase, done, total); the CLI sets it.
        self.progress: Callable[[str, int, int], None] | None = None

    @abstractmethod
    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> Edit:
        """Compute an (unapplied) edit realising `requests`. Must leave `lm`'s weights unchanged."""


@dataclass
class ParamDelta:
    """The change of one parameter, in the parameter's stored layout: `left @ right.T` (low rank) or `dense`."""

    left: torch.Tensor | None = None   # (rows, rank)
    right: torch.Tensor | None = None  # (cols, rank)
    dense: torch.Tensor | None = None  # (rows, cols)

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise ValueError("ParamDelta needs either dense or both left and right factors")

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.left is not None and self.right is not None
        return (self.left.shape[0], self.right.shape[0])

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[1]

    def full(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        if self.dense is not None:
            out = self.dense
        else:
            assert self.left is not None and self.right is not None
            out = self.left.to(torch.float64) @ self.right.to(torch.float64).T
        return out.to(dtype=dtype or out.dtype, device=device)


class Edit(ABC):
    """A reversible change to a model. `apply(lm)`, `undo()`, `with edit.applied(lm): ...`, `save()`/`load()`."""

    kind: ClassVar[str]

    @abstractmethod
    def apply(self, lm: LM) -> Edit: ...

    @abstractmethod
    def undo(self) -> None: ...

    @property
    @abstractmethod
    def is_applied(self) -> bool: ...

    @contextmanager
    def applied(self, lm: LM) -> Iterator[Edit]:
        """Apply for the duration of the block, undo afterwards (even on exceptions)."""
        self.apply(lm)
        try:
            yield self
        finally:
            self.undo()

    @abstractmethod
    def save(self, path: str | Path) -> Path: ...


@dataclass(eq=False)
class WeightEdit(Edit):
    """Deltas added to named parameters. Undo restores the saved original values, bit for bit.

    Attributes:
        deltas: parameter name (as in `model.named_parameters()`) -> its `ParamDelta`.
        requests: the edit requests this realises.
        method: registry name of the editor that produced it (for records only: nothing branches on it).
        config: the editor config as a plain dict.
        base_fingerprint: `LM.fingerprint` of the model it was computed on; applying it elsewhere is refused.
        info: method diagnostics (losses, norms, chosen layer...), JSON-serialisable.
    """

    kind: ClassVar[str] = "weight"
    deltas: dict[str, ParamDelta]
    requests: tuple[EditRequest, ...] = ()
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    base_fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _lm: LM | None = field(default=None, repr=False)

    @property
    def is_applied(self) -> bool:
        return self._lm is not None

    def apply(self, lm: LM, *, check_fingerprint: bool = True) -> WeightEdit:
        """Add the deltas to `lm`'s parameters. All-or-nothing: on any error the weights are unchanged.

        Raises:
            LMEditError: already applied, fingerprint or shape mismatch, unknown parameter.
            EditFailedError: a new value would be NaN/inf.
        """
        if self._lm is not None:
            raise LMEditError("this edit is already applied; undo() it first")
        if check_fingerprint and self.base_fingerprint and self.base_fingerprint != lm.fingerprint:
            raise LMEditError(
                f"this edit was made on a model with fingerprint {self.base_fingerprint}, but {lm.name!r} has "
                f"{lm.fingerprint}; replay the requests on this model instead of applying the deltas")
        params = dict(lm.model.named_parameters())
        new_values: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            if name not in params:
                raise LMEditError(f"edit touches parameter {name!r}, which {lm.name!r} does not have")
            p = params[name]
            if tuple(p.shape) != delta.shape:
                raise LMEditError(f"edit for {name!r} has shape {delta.shape}, parameter has {tuple(p.shape)}")
            new = (p.data.to(torch.float64) + delta.full(torch.float64, p.device)).to(p.dtype)
            if not torch.isfinite(new).all():
                raise EditFailedError(f"edit would make {name!r} non-finite; the model is unchanged")
            new_values[name] = new
        with torch.no_grad():
            for name, new in new_values.items():
                self._originals[name] = params[name].data.clone()
                params[name].data.copy_(new)
        self._lm = lm
        _stack(lm).append(self)
        return self

    def undo(self) -> None:
        """Restore the original values. Refused while a later applied edit touches the same parameters."""
        if self._lm is None:
            raise LMEditError("this edit is not applied")
        stack = _stack(self._lm)
        later = stack[stack.index(self) + 1:]
        clash = [e for e in later if set(getattr(e, "deltas", {})) & set(self.deltas)]
        if clash:
            raise LMEditError(f"{len(clash)} edit(s) applied after this one change the same parameters; undo them first")
        params = dict(self._lm.model.named_parameters())
        with torch.no_grad():
            for name, original in self._originals.items():
                params[name].data.copy_(original)
        stack.remove(self)
        self._originals = {}
        self._lm = None

    def save(self, path: str | Path) -> Path:
        """Write the deltas (factors when low-rank) and metadata to one safetensors file, atomically."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            parts = {"dense": delta.dense} if delta.dense is not None else {"left": delta.left, "right": delta.right}
            for part, tensor in parts.items():
                assert tensor is not None
                tensors[f"{name}::{part}"] = tensor.detach().contiguous().cpu()
        meta = {
            "format": "lmedit.weight_edit", "version": str(FORMAT_VERSION), "method": self.method,
            "requests": json.dumps([r.to_dict() for r in self.requests]), "config": json.dumps(self.config),
            "base_fingerprint": self.base_fingerprint, "info": json.dumps(self.info, default=str),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        """Read an edit written by `save`. Raises LMEditError for files that are not lmedit weight edits."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no edit file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "lmedit.weight_edit":
            raise LMEditError(f"{path} is not an lmedit weight edit (format={meta.get('format')!r})")
        tensors = load_file(str(path))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition("::")
            parts.setdefault(name, {})[part] = tensor
        deltas = {name: ParamDelta(**p) for name, p in parts.items()}
        requests = tuple(EditRequest.from_dict(r) for r in json.loads(meta["requests"]))
        return cls(deltas=deltas, requests=requests, method=meta["method"], config=json.loads(meta["config"]),
                   base_fingerprint=meta["base_fingerprint"], info=json.loads(meta["info"]))


def _stack(lm: LM) -> list[Edit]:
    """The edits currently applied to `lm`, oldest first (kept on the model object itself)."""
    stack = getattr(lm.model, "_lmedit_applied", None)
    if stack is None:
        stack = []
        lm.model._lmedit_applied = stack  # type: ignore[attr-defined]
    return stack


def load_edit(path: str | Path) -> Edit:
    """Load any saved edit kind from `path`."""
    return WeightEdit.load(path)


def check_requests(requests: Sequence[EditRequest]) -> tuple[EditRequest, ...]:
    if not requests:
        raise LMEditError("no edit requests given")
    bad = [r for r in requests if not isinstance(r, EditRequest)]
    if bad:
        raise LMEditError(f"edit requests must be EditRequest objects, got {type(bad[0]).__name__}")
    return tuple(requests)
