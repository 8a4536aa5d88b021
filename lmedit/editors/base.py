"""The editing interface: `Editor.edit(lm, requests) -> Edit`, and the reversible `Edit` kinds.

An edit is data: it can be applied to a model, undone bit-exactly, saved and loaded. Editors compute
an edit without touching the weights; `Edit.apply()` writes them only after every new value is finite,
so a failed edit leaves the model bit-identical. The harness, ledger, CLI and any front end handle
edit *kinds* and never name a method.

Kinds: `WeightEdit` here (per-parameter deltas, low-rank factors kept when the method produces them; what it
keeps for its undo: `lmedit.editors.originals`); `WrapperEdit` in `lmedit.editors.wrapper` (changes what the
model reads for some inputs, weights untouched); `AdaptorEdit` in `lmedit.editors.adaptor` (a persistent hook
that rewrites one layer's output for some inputs: GRACE's codebook). `load_edit` imports them when it reads one.

Which edits are applied is owned by the model bundle: `lm.edits` (`lmedit.models.applied.AppliedEdits`), which
`apply` pushes to and `undo` removes from, for every kind. Every edit declares what it is in one typed record,
`Edit.meta` (`EditMeta`: kind, method, requests, config, base fingerprint, info), and both kinds are saved in one
envelope (`_save_envelope`: safetensors tensors + that record as metadata, written atomically).

How a `WrapperEdit` reaches scoring and generation: the text-level scoring entry points (`lmedit.scoring`'s
`score_targets`, `next_token_logprobs`, `generate`, and the harness's `measure`) pass their prompts
through `lm.edits.route(prompts)`, which asks every applied wrapper whether each prompt is in its
scope and, if so, what text the frozen base model reads instead (SERAC: the retrieved edit in context).
With no wrapper applied it returns the prompts unchanged and costs nothing. Token-level calls
(`logits_at`, editors' own forwards, tracing) are not routed: they see the frozen base model.
"""

from __future__ import annotations

import functools
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import torch
from safetensors.torch import save

from lmedit.cache import atomic_write
from lmedit.config import check_ranges
from lmedit.editors._edit_files import (ADAPTOR_FORMAT, FORMAT_VERSION, WEIGHT_FORMAT, WRAPPER_FORMAT, check_metadata,
                                        json_field, read_metadata, read_tensors, saved_requests,
                                        weight_parts)
from lmedit.editors.originals import Chained, add, depth, digest, keep, rebuild
from lmedit.errors import EditFailedError, EditFileError, LMEditError, RequestError
from lmedit.models.params import read as read_param
from lmedit.models.params import write as write_params
from lmedit.tokens import check_requests_fit
from lmedit.types import EditDescriptor, EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EditorConfig:
    """Settings every editor shares."""

    seed: int = 0  # torch seed for anything random (prefix sampling, initialisations)

    def __post_init__(self) -> None:
        check_ranges(self)  # number fields hold numbers of their type; subclasses declare their ranges

    def prefix_tokens(self) -> int:
        """Most tokens the editor puts in front of a request's prompt (random context prefixes): 0 for none.

        The context-window check (`lmedit.tokens.check_requests_fit`) adds them to each request's length.
        """
        return 0


C = TypeVar("C", bound=EditorConfig)


class Editor(ABC, Generic[C]):
    """An editing method. Subclasses set `config_class` and implement `edit`; they register in `lmedit.registry.editors`.

    Each subclass's `edit` is wrapped (in `__init_subclass__`) so that, whoever calls it, requests that do not
    fit the model's context window are refused with a `RequestError` before the editor runs.
    """

    config_class: ClassVar[type[EditorConfig]] = EditorConfig
    # Whether `edit` also takes `EditDescriptor`s (input-output pairs, implicit descriptors), not only triplets.
    accepts_descriptors: ClassVar[bool] = False

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()  # type: ignore[assignment]
        # Long preparatory work (statistics, sampling) reports here as (phase, done, total); the CLI sets it.
        self.progress: Callable[[str, int, int], None] | None = None
        # Where the settings came from (shipped for a model, a file, defaults): set by `lmedit.settings`.
        self.settings_source: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every editor's own `edit` is wrapped by `_fits_context`: no editor writes the context-window check."""
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("edit")
        if method is not None and not getattr(method, "_fits_context", False):
            cls.edit = _fits_context(method)  # type: ignore[method-assign]

    def suggested_layer(self, lm: LM) -> int:
        """The layer causal tracing suggests for `lm` (cached per model), reporting progress while it traces."""
        from lmedit.tracing import suggest_layer

        report = self.progress
        log.warning("no layer configured for %s: choosing one by causal tracing (a few minutes once, then cached)",
                    lm.name)
        progress = (lambda done, total: report("choosing the layer by causal tracing", done, total)) if report else None
        return suggest_layer(lm, progress=progress).layer

    @abstractmethod
    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> Edit:
        """Compute an (unapplied) edit realising `requests`. Must leave `lm`'s weights unchanged."""


def _fits_context(method: Callable[..., Edit]) -> Callable[..., Edit]:
    """`method` (an editor's `edit`) preceded by the context-window check of its requests, in tokens and
    before any forward (`lmedit.tokens.check_requests_fit`, with the config's `prefix_tokens()`)."""

    @functools.wraps(method)
    def edit(self: Editor, lm: LM, requests: Sequence[EditRequest]) -> Edit:
        if not isinstance(requests, EditRequest | EditDescriptor | Sequence):
            requests = list(requests)  # a generator: read once here, handed on as a list
        if hasattr(lm, "model") and hasattr(lm, "tokenizer"):  # else the editor's own checks say what is wrong
            items = [requests] if isinstance(requests, EditRequest | EditDescriptor) else requests
            prefix = getattr(self.config, "prefix_tokens", lambda: 0)()
            check_requests_fit(lm, items, prefix_tokens=prefix)
        return method(self, lm, requests)

    edit._fits_context = True  # type: ignore[attr-defined]
    return edit


@dataclass(frozen=True)
class TrainEvent:
    """Progress of an editor's training (for progress bars): `step` of `total`, with current metrics by name."""

    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainable(Protocol):
    """An editor with a learned part, trained by `lmedit train METHOD` (MEND's editor network, SERAC's scope head).

    `fit(lm, train, held_out=..., **options)` trains on edit records (`held_out`: records to validate on) and
    returns a JSON-friendly summary. Options an editor may take: `out_dir` (checkpoints), `resume`,
    `exclude` (record sets whose subjects must not be trained on), `progress` (called with `TrainEvent`s).
    """

    def fit(self, lm: LM, train: Sequence[Any], *, held_out: Sequence[Any] = (), **options: Any) -> dict[str, Any]: ...


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
            out = self.left.to(device=device, dtype=torch.float64) @ self.right.to(device=device, dtype=torch.float64).T
        return out.to(dtype=dtype or out.dtype, device=device)


@dataclass(frozen=True)
class EditMeta:
    """What an edit is, for records (ledger rows, saved files, reports); nothing branches on `method`.

    Attributes:
        kind: "weight", "wrapper" or "adaptor".
        method: registry name of the editor that produced it.
        requests: the requests (or descriptors) it realises.
        config: the editor's settings as a plain dict.
        base_fingerprint: `LM.fingerprint` of the model it was computed on ("" before it is known).
        info: method diagnostics (losses, norms, chosen layer...), JSON-serialisable.
    """

    kind: str
    method: str
    requests: tuple[EditRequest | EditDescriptor, ...]
    config: dict[str, Any]
    base_fingerprint: str
    info: dict[str, Any]


class Edit(ABC):
    """A reversible change to a model. `apply(lm)`, `undo()`, `with edit.applied(lm): ...`, `save()`/`load()`.

    Every edit carries `method`, `requests`, `config`, `base_fingerprint` and `info` (see `EditMeta`, which
    `meta` returns as one record).
    """

    kind: ClassVar[str]
    method: str
    requests: tuple[EditRequest | EditDescriptor, ...]
    config: dict[str, Any]
    base_fingerprint: str
    info: dict[str, Any]

    @property
    def meta(self) -> EditMeta:
        """This edit's metadata as one typed record."""
        return EditMeta(kind=self.kind, method=self.method, requests=tuple(self.requests), config=dict(self.config),
                        base_fingerprint=self.base_fingerprint, info=dict(self.info))

    @abstractmethod
    def apply(self, lm: LM) -> Edit: ...

    @abstractmethod
    def undo(self) -> None: ...

    @property
    @abstractmethod
    def is_applied(self) -> bool: ...

    def lift(self) -> dict[str, Any]:
        """Take this edit off for an `lm.edits.suspended` block; returns what `settle` needs to put it back.

        An edit that writes no weights is simply undone and returns nothing. A `WeightEdit` leaves the stack
        without writing (the block writes each parameter's oldest original once, then writes back the values
        it saved, instead of undoing and re-adding every delta in turn) and returns what it keeps of the old
        values."""
        self.undo()
        return {}

    def settle(self, lm: LM, originals: dict[str, Any]) -> None:
        """Put a lifted edit back on `lm` (`originals` from `lift`); the weights already hold its values."""
        self.apply(lm)

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
    """Deltas added to named parameters. Undo restores the original values, bit for bit (kept as a copy, or for
    a run of edits of one parameter rebuilt from the edits below and checked by digest: `lmedit.editors.originals`).

    Precision: `apply` adds each delta to the parameter in float64 and rounds the sum once to the parameter's
    dtype. The deltas themselves are float32 (float64 maths, stored as float32), whatever the dtype of the
    model they were computed on, and the base fingerprint names the checkpoint, not its dtype
    (`LM.fingerprint`): an edit saved from the float32 model applies to a bfloat16 or float16 copy of the same
    checkpoint (W_bf16 + Δ, rounded once to bfloat16) and vice versa. The edited weights then differ from the
    ones the edit was fitted on by that copy's rounding (up to 2⁻⁹ relative in bfloat16), so the fitted
    equation (ROME: W' k = v*) holds to that precision. Undo is bit-exact in every dtype.

    Attributes:
        deltas: parameter name (as in `model.named_parameters()`) -> its `ParamDelta`.
        requests: the edit requests this realises.
        method: registry name of the editor that produced it (for records only: nothing branches on it).
        config: the editor config as a plain dict.
        base_fingerprint: `LM.fingerprint` of the model it was computed on; applying it elsewhere is refused.
        info: method diagnostics (losses, norms, chosen layer...), JSON-serialisable.
        keys: parameter name -> the input keys the change was fitted to, (d_in, n) canonical; optional. Later
            edits that must preserve earlier ones (AlphaEdit, arXiv:2410.02355) read them off the applied edits.
    """

    kind: ClassVar[str] = "weight"
    deltas: dict[str, ParamDelta]
    requests: tuple[EditRequest, ...] = ()
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    base_fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    # While applied: per parameter, the value it replaced (a copy, or a `Chained` record: `lmedit.editors.originals`)
    # and (digest, chain depth) of the value it wrote, which the next edit of the parameter checks.
    _originals: dict[str, torch.Tensor | Chained] = field(default_factory=dict, repr=False)
    _wrote: dict[str, tuple[bytes, int]] = field(default_factory=dict, repr=False)
    # Values rebuilt on the way by an undo above (this edit's old values), until the parameter is next written.
    _rebuilt: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _lm: LM | None = field(default=None, repr=False)

    @property
    def is_applied(self) -> bool:
        return self._lm is not None

    def apply(self, lm: LM, *, check_fingerprint: bool = True, trial: bool = False) -> WeightEdit:
        """Add the deltas to `lm`'s parameters. All-or-nothing: on any error the weights are unchanged.

        `trial=True` for an edit that will be undone straight away (a check, an editor's own intermediate step):
        it keeps a copy of the old values instead of chaining them, so its undo writes the copy rather than
        rebuilding the value from the edits below (`lmedit.editors.originals`).

        Raises:
            LMEditError: already applied, fingerprint or shape mismatch, unknown parameter.
            EditFailedError: a new value would be NaN/inf.
        """
        _check_applicable(self, lm, check_fingerprint)
        params = dict(lm.model.named_parameters())
        new_values: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            if name not in params:
                raise LMEditError(f"edit touches parameter {name!r}, which {lm.name!r} does not have")
            p = params[name]
            if tuple(p.shape) != delta.shape:
                raise LMEditError(f"edit for {name!r} has shape {delta.shape}, parameter has {tuple(p.shape)}")
            current = read_param(lm.model, name)  # where it lives (accelerate may have offloaded it)
            new = add(current, delta, p.dtype)
            if not torch.isfinite(new).all():
                raise EditFailedError(f"edit would make {name!r} non-finite; the model is unchanged")
            new_values[name] = new
        below = {name: e for e in lm.edits.of_kind("weight") for name in getattr(e, "deltas", {})}  # the newest
        originals = {name: keep(read_param(lm.model, name),
                                None if trial else getattr(below.get(name), "_wrote", {}).get(name))
                     for name in new_values}
        wrote_now = {name: (digest(value), depth(originals[name])) for name, value in new_values.items()}
        for edit in lm.edits.of_kind("weight"):  # values rebuilt by an earlier undo: let them go (memory)
            for name in new_values:
                getattr(edit, "_rebuilt", {}).pop(name, None)
        write_params(lm.model, new_values)
        self._originals, self._wrote, self._rebuilt = originals, wrote_now, {}
        self._lm = lm
        lm.edits.push(self)
        return self

    def original(self, name: str) -> torch.Tensor:
        """The value parameter `name` had before this applied edit, bit for bit (rebuilt from the applied edits
        below when this edit kept no copy: `lmedit.editors.originals`).

        Raises:
            LMEditError: not applied, or the value does not rebuild exactly (an edit's deltas changed in place).
        """
        if self._lm is None:
            raise LMEditError("this edit is not applied")
        kept = self._originals[name]
        if isinstance(kept, torch.Tensor):
            return kept
        if name in self._rebuilt:
            return self._rebuilt[name]
        chain: list[WeightEdit] = []  # the edits below on this parameter, newest first, down to one with a value
        for edit in reversed(self._lm.edits.before(self)):
            if isinstance(edit, WeightEdit) and name in edit._originals:
                chain.append(edit)
                if isinstance(edit._originals[name], torch.Tensor) or name in edit._rebuilt:
                    break
        pairs = [(e._originals[name], e.deltas[name]) for e in chain]
        if chain and name in chain[-1]._rebuilt:
            pairs[-1] = (chain[-1]._rebuilt[name], pairs[-1][1])
        values = rebuild(kept, pairs)
        if values is not None:
            # The edits below keep the values rebuilt on the way until the parameter is next written, so undoing
            # them next (as in undoing a whole run, newest first) costs a write each, not another rebuild; a
            # trial apply and undo (the destructive-edit check) followed by an apply leaves nothing behind.
            for edit, value in zip(chain[:-1], values[1:]):
                edit._rebuilt[name] = value
            return values[0]
        raise LMEditError(f"the value of {name!r} before this edit does not rebuild exactly from the edits applied "
                          "below it (were their deltas changed after applying?); nothing was written")

    def undo(self) -> None:
        """Restore the original values. Refused while a later applied edit touches the same parameters."""
        if self._lm is None:
            raise LMEditError("this edit is not applied")
        later = self._lm.edits.after(self)
        clash = [e for e in later if isinstance(e, WeightEdit) and set(e.deltas) & set(self.deltas)]
        if clash:
            raise LMEditError(f"{len(clash)} edit(s) applied after this one change the same parameters; undo them first")
        write_params(self._lm.model, {name: self.original(name) for name in self._originals})
        self._lm.edits.remove(self)
        self._originals, self._wrote, self._rebuilt = {}, {}, {}
        self._lm = None

    def lift(self) -> dict[str, Any]:
        """Leave the stack without writing the weights; return what it keeps of the old values (`Edit.lift`)."""
        if self._lm is None:
            raise LMEditError("this edit is not applied")
        kept, self._originals = self._originals, {}
        self._lm.edits.remove(self)
        self._lm = None
        return kept

    def settle(self, lm: LM, originals: dict[str, Any]) -> None:
        """Rejoin `lm`'s stack with what `lift` returned; the weights already hold this edit's values."""
        self._originals = dict(originals)
        self._lm = lm
        lm.edits.push(self)

    def save(self, path: str | Path) -> Path:
        """Write the deltas (factors when low-rank) and metadata to one safetensors file, atomically.

        Raises:
            LMEditError: the edit has no `base_fingerprint` (a saved edit must name the model it belongs to).
        """
        path = Path(path)
        _check_savable(self)
        tensors: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            parts = {"dense": delta.dense} if delta.dense is not None else {"left": delta.left, "right": delta.right}
            for part, tensor in parts.items():
                assert tensor is not None
                tensors[f"{name}::{part}"] = tensor.detach().contiguous().cpu()
        for name, keys in self.keys.items():
            tensors[f"{name}::keys"] = keys.detach().contiguous().cpu()
        return _save_envelope(self, path, WEIGHT_FORMAT, tensors,
                              {"requests": json.dumps([r.to_dict() for r in self.requests])})

    @classmethod
    def load(cls, path: str | Path, *, label: str | None = None) -> WeightEdit:
        """Read an edit written by `save`, checking everything on load (see `lmedit.editors._edit_files`).

        Args:
            path: the file.
            label: how error messages name the file (default: the path).

        Raises:
            MissingFileError: no file at `path`.
            EditFileError: not an lmedit weight edit: not safetensors or truncated, unknown format or version,
                missing metadata or base fingerprint, malformed JSON, tensor names, factor shapes, dtypes or
                non-finite values.
        """
        path = Path(path)
        where = label or str(path)
        meta = read_metadata(path, label)
        common = check_metadata(meta, WEIGHT_FORMAT, ("requests",), where)
        requests = saved_requests(json_field(meta, "requests", list, where), where)
        parts, keys = weight_parts(read_tensors(path, label), where)
        deltas = {name: ParamDelta(**p) for name, p in parts.items()}
        return cls(deltas=deltas, requests=tuple(requests), method=meta["method"], config=common["config"],
                   base_fingerprint=meta["base_fingerprint"], info=common["info"], keys=keys)


def _check_savable(edit: Edit) -> None:
    """Refuse to write an edit that names no model: loading it would be refused (it could apply anywhere)."""
    if not isinstance(edit.base_fingerprint, str) or not edit.base_fingerprint.strip():
        raise LMEditError(f"this {edit.kind} edit (method {edit.method!r}) has no base_fingerprint, so a saved copy "
                          "could not say which model it belongs to; set edit.base_fingerprint = lm.fingerprint of "
                          "the model it was made on before saving")


def _check_applicable(edit: Edit, lm: LM, check_fingerprint: bool) -> None:
    """Refuse to apply an edit twice, or to a model whose weights differ from the ones it was made on."""
    if edit.is_applied:
        raise LMEditError("this edit is already applied; undo() it first")
    if check_fingerprint and edit.base_fingerprint and not _is_checkpoint(lm, edit.base_fingerprint):
        raise LMEditError(
            f"this edit was made on a model with fingerprint {edit.base_fingerprint}, but {lm.name!r} has "
            f"{lm.fingerprint}; replay the requests on this model instead")


def _is_checkpoint(lm: LM, fingerprint: str) -> bool:
    """Whether `fingerprint` names `lm`'s checkpoint in any dtype (`LM.is_checkpoint`; a bundle-like test double
    without it is compared by `fingerprint` alone)."""
    is_checkpoint = getattr(lm, "is_checkpoint", None)
    return is_checkpoint(fingerprint) if is_checkpoint is not None else fingerprint == lm.fingerprint


def _save_envelope(edit: Edit, path: str | Path, fmt: str, tensors: dict[str, torch.Tensor],
                   extra: dict[str, str]) -> Path:
    """Write `tensors` and `edit`'s metadata record (plus `extra` fields) to one safetensors file, atomically:
    the one save format of every edit kind (read back by `lmedit.editors._edit_files`)."""
    path = Path(path)
    _check_savable(edit)
    meta = {"format": fmt, "version": str(FORMAT_VERSION), "method": edit.method, "config": json.dumps(edit.config),
            "base_fingerprint": edit.base_fingerprint, "info": json.dumps(edit.info, default=str), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)  # a user's directory: their umask, not the cache's 0700
    atomic_write(path, save(tensors, metadata=meta))
    return path


def load_edit(path: str | Path, *, label: str | None = None) -> Edit:
    """Load any saved edit kind from `path` (dispatching on the kind recorded in the file), checking it on load.

    Args:
        path: the file.
        label: how error messages name the file (default: the path; a ledger import names the patch member).

    Raises:
        MissingFileError: no file at `path`.
        EditFileError: the file is not an lmedit edit, or fails a check of its kind's `load`.
    """
    from lmedit.editors.adaptor import AdaptorEdit  # here: those modules build on this one
    from lmedit.editors.wrapper import WrapperEdit

    path = Path(path)
    fmt = read_metadata(path, label).get("format")
    loaders: dict[str, Callable[..., Edit]] = {WEIGHT_FORMAT: WeightEdit.load, WRAPPER_FORMAT: WrapperEdit.load,
                                               ADAPTOR_FORMAT: AdaptorEdit.load}
    if fmt not in loaders:
        raise EditFileError(f"{label or path} is not an lmedit edit (format={fmt!r}; known: {sorted(loaders)})")
    return loaders[fmt](path, label=label)


def check_requests(requests: Sequence[EditRequest | EditDescriptor]) -> tuple[EditRequest, ...]:
    """The requests of a triplet editor, checked: non-empty, all `EditRequest`s.

    Raises:
        RequestError: no requests, or an `EditDescriptor` (which only descriptor editors accept).
        LMEditError: anything else that is not an `EditRequest`.
    """
    if not requests:
        raise LMEditError("no edit requests given")
    descriptors = [r for r in requests if isinstance(r, EditDescriptor)]
    if descriptors:
        from lmedit.registry import editors

        able = [n for n in editors.names() if getattr(editors.get(n), "accepts_descriptors", False)]
        raise RequestError(
            f"this editor edits (prompt, subject, target) triplets and cannot take the edit descriptor "
            f"{descriptors[0].statement!r}; use an editor that accepts descriptors ({', '.join(able) or 'none registered'})")
    bad = [r for r in requests if not isinstance(r, EditRequest)]
    if bad:
        raise LMEditError(f"edit requests must be EditRequest objects, got {type(bad[0]).__name__}")
    return tuple(requests)  # type: ignore[arg-type]
