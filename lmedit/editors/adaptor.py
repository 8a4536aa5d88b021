"""The adaptor edit kind: a persistent hook that rewrites one layer's output for the inputs it recognises.

An `AdaptorEdit` (kind "adaptor") is data (tensors, e.g. GRACE's codebook of keys, values and radii, or WISE's
side-memory increments) plus one rule, its type's `respond`. While applied, it is served by one
forward hook at its `site` (`lmedit.hooks.attach`), shared by every applied edit of the same adaptor type at that
site: the first one applied attaches the hook, the last one undone removes it. At every forward the hook hands
the module's input and output to `respond(state, inputs, output)`, where `state = prepare(edits)` is built from
all those applied edits (oldest first) and rebuilt only when that set changes (from the previous state, when an
edit was appended). So edits of one type at one site interact through `prepare` alone (GRACE: conflicting
codebook entries split their radii; WISE: edits of one side memory sum into it and set its router's threshold)
and never modify each other: undoing one restores the others exactly.

Why a kind of its own. A `WrapperEdit` decides per *prompt text* what the frozen model reads, and only
text-level scorers ask it (`lm.edits.route`); an adaptor decides per *position of every forward* from the
activations, so every forward sees it, as every forward sees a weight edit: editors' own forwards, tracing,
teacher-forced scoring, generation with a key/value cache. It is not a `WeightEdit` either: the weights are
never written, so undo is exact by construction, in any order. `base.py` holds the other two kinds; this one
lives here because `base.py` is at the project's 600-line limit (`load_edit` imports it when it reads one).

Which edits are applied is `lm.edits` (`lmedit.models.applied`), as for every kind; nothing is kept on the
model object besides the hook. Saved in the one envelope of every kind (`_save_envelope`: safetensors tensors
+ metadata, written atomically) with format `ADAPTOR_FORMAT`, the adaptor type's name, its site and its own
metadata; `AdaptorEdit.load` (and `load_edit`) checks everything before an edit exists.

Not handled: adaptors at a module's input (`mlp.key`); one edit serving several sites; writing an adaptor into
plain weights (a codebook is a lookup, not a weight change: `Ledger.export_model` refuses it).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lmedit.editors._edit_files import ADAPTOR_FORMAT, check_metadata, check_tensor_names, json_field, read_metadata, \
    read_tensors
from lmedit.editors.base import Edit, _check_applicable, _save_envelope
from lmedit.errors import ConfigError, EditFileError, LMEditError
from lmedit.hooks import AdaptorFn, attach
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from lmedit.models.applied import AppliedEdits
    from lmedit.models.load import LM


class AdaptorEdit(Edit):
    """A reversible edit served by a persistent hook at one site; the weights are never written.

    Subclasses name themselves for `load_edit` (`class GraceEdit(AdaptorEdit, adaptor="grace")`), carry
    `requests`, and implement `check` (can this edit serve that model?), `prepare`/`respond` (the hook's rule,
    over every applied edit of the type at the site), and `tensors`/`metadata`/`from_saved` (saving).

    Attributes:
        site: where the hook rewrites the output, e.g. `Site("mlp.out", 5)`.
    """

    kind: ClassVar[str] = "adaptor"
    adaptor: ClassVar[str] = ""
    byte_tensors: ClassVar[tuple[str, ...]] = ()  # tensors of `tensors()` saved as uint8 (packed bits), not float
    _types: ClassVar[dict[str, type[AdaptorEdit]]] = {}

    def __init_subclass__(cls, adaptor: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if adaptor:
            cls.adaptor = adaptor
            AdaptorEdit._types[adaptor] = cls

    def __init__(self, *, site: Site, requests: Sequence[EditRequest] = (), base_fingerprint: str = "",
                 method: str = "", config: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> None:
        self.site = site
        self._requests = tuple(requests)
        self.base_fingerprint = base_fingerprint
        self.method = method
        self.config: dict[str, Any] = dict(config or {})
        self.info: dict[str, Any] = dict(info or {})
        self._lm: LM | None = None
        # The hook and its function (which holds the prepared state), held by the oldest applied edit of this type
        # at this site.
        self._hook: tuple[RemovableHandle, AdaptorFn] | None = None

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return self._requests

    @abstractmethod
    def check(self, lm: LM) -> None:
        """Raise `LMEditError` when this edit cannot serve `lm` (site outside the model, shapes, non-finite values)."""

    def site_layer(self, lm: LM) -> int:
        """The site's block, refused (`LMEditError`) when `lm` has no such block; for `check`."""
        layer = self.site.layer
        if layer is None or not 0 <= layer < lm.n_layers:
            raise LMEditError(f"this {self.adaptor} edit is at layer {layer}; {lm.name!r} has layers "
                              f"0..{lm.n_layers - 1}")
        return layer

    @classmethod
    @abstractmethod
    def prepare(cls, edits: Sequence[AdaptorEdit], previous: tuple[Sequence[AdaptorEdit], Any] | None = None) -> Any:
        """What the hook needs to serve `edits` (every applied edit of this type at one site, oldest first).

        `previous` is (the edits of the state prepared before, that state): a type may extend it when those edits
        are a prefix of `edits` (an edit appended, as in sequential editing) instead of starting over, as long as
        the result is the same."""

    @classmethod
    @abstractmethod
    def respond(cls, state: Any, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The module's new output given its input (None: keep it, bit for bit), under `state` from `prepare`."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything tensor-valued that `save` writes (and `from_saved` reads back)."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Everything else `save` writes, JSON-serialisable."""

    @classmethod
    @abstractmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> AdaptorEdit:
        """Rebuild from `tensors()`/`metadata()`; `common` holds site, base_fingerprint, method, config and info."""

    @property
    def is_applied(self) -> bool:
        return self._lm is not None

    def peers(self, lm: LM) -> list[AdaptorEdit]:
        """The applied edits on `lm` of this adaptor type at this site, oldest first (with this one, when applied)."""
        return served(lm.edits, self.adaptor, self.site)

    def apply(self, lm: LM, *, check_fingerprint: bool = True) -> AdaptorEdit:
        """Put the edit on `lm`: the first edit of its type at its site attaches the hook that serves them all.

        Raises:
            LMEditError: already applied, made for a model with other weights, or `check` refuses it; the
                model is then unchanged (no edit pushed, no hook attached).
        """
        _check_applicable(self, lm, check_fingerprint)
        self.check(lm)
        first = not self.peers(lm)
        lm.edits.push(self)
        self._lm = lm
        if first:
            try:
                # Inside `lm.edits.suspended` the function parked by the undo reattaches with its prepared state.
                serve = lm.edits.parked.pop((self.adaptor, self.site), None) or _server(lm.edits, type(self), self.site)
                self._hook = (attach(lm, self.site, serve), serve)
            except BaseException:
                lm.edits.remove(self)
                self._lm = None
                raise
        return self

    def undo(self) -> None:
        """Take the edit off the model; the hook goes with the last edit it serves. Exact in any order."""
        if self._lm is None:
            raise LMEditError("this edit is not applied")
        lm, hook = self._lm, self._hook
        lm.edits.remove(self)
        self._lm, self._hook = None, None
        if hook is not None:
            heirs = self.peers(lm)
            if heirs:
                heirs[0]._hook = hook
            else:
                hook[0].remove()
                if lm.edits.suspending:  # re-applied at the block's end: keep the state it has prepared
                    lm.edits.parked[(self.adaptor, self.site)] = hook[1]

    def save(self, path: str | Path) -> Path:
        """Write tensors and metadata to one safetensors file, atomically.

        Raises:
            LMEditError: the edit has no `base_fingerprint`.
        """
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        site = json.dumps({"kind": self.site.kind, "layer": self.site.layer})
        return _save_envelope(self, path, ADAPTOR_FORMAT, tensors,
                              {"adaptor": self.adaptor, "site": site, "adaptor_meta": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path, *, label: str | None = None) -> AdaptorEdit:
        """Read an adaptor edit written by `save`, as the subclass named in the file, checking everything on load.

        Raises:
            MissingFileError: no file at `path`.
            EditFileError: not an lmedit adaptor edit (the checks of `WeightEdit.load`), its adaptor type is not
                registered (not imported), its site is malformed, or its tensors and metadata are not what that
                type saves.
        """
        path = Path(path)
        where = label or str(path)
        meta = read_metadata(path, label)
        common = check_metadata(meta, ADAPTOR_FORMAT, ("adaptor", "site", "adaptor_meta"), where)
        adaptor_type = AdaptorEdit._types.get(meta["adaptor"])
        if adaptor_type is None:
            raise EditFileError(f"{where} holds a {meta['adaptor']!r} adaptor edit, which no loaded module "
                                f"provides (known: {sorted(AdaptorEdit._types)})")
        raw_site = json_field(meta, "site", dict, where)
        layer = raw_site.get("layer")
        try:
            if isinstance(layer, bool) or not isinstance(layer, int | None):
                raise ValueError(f"layer {layer!r} is not an integer")
            site = Site(raw_site.get("kind"), layer)  # type: ignore[arg-type]
        except ValueError as exc:
            raise EditFileError(f"{where}: metadata 'site' {raw_site!r} is not a site ({exc})") from None
        adaptor_meta = json_field(meta, "adaptor_meta", dict, where)
        tensors = read_tensors(path, label, adaptor_type.byte_tensors)
        check_tensor_names(tensors, where)
        common.update(site=site, base_fingerprint=meta["base_fingerprint"], method=meta["method"])
        try:
            return adaptor_type.from_saved(tensors, adaptor_meta, common)
        except LMEditError as exc:  # from_saved's own checks: add the file
            raise EditFileError(f"{where}: {exc}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # a check from_saved lacks
            raise EditFileError(f"{where}: the {meta['adaptor']!r} edit's tensors or metadata are not what it saves "
                                f"({type(exc).__name__}: {exc})") from None


def served(stack: AppliedEdits, adaptor: str, site: Site) -> list[AdaptorEdit]:
    """The applied edits of adaptor type `adaptor` at `site` in `stack`, oldest first (the ones one hook serves)."""
    return [e for e in stack.of_kind("adaptor") if isinstance(e, AdaptorEdit) and e.adaptor == adaptor and e.site == site]


def _server(stack: AppliedEdits, cls: type[AdaptorEdit], site: Site) -> AdaptorFn:
    """The hook's function: `cls.respond` under the state of the edits applied now, rebuilt when they change."""
    built: list[Any] = [(), None]  # the edits the state was prepared for, and the state

    def serve(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        if stack.is_muted(site):
            return None
        edits = tuple(served(stack, cls.adaptor, site))
        if not edits:
            return None
        if len(edits) != len(built[0]) or any(a is not b for a, b in zip(edits, built[0])):
            built[:] = [edits, cls.prepare(edits, (built[0], built[1]) if built[0] else None)]
        return cls.respond(built[1], inputs, output)

    return serve


# `layer: null` for the adaptor editors (GRACE, WISE): the block at this fraction of the depth (gemma3-270m's 15 of
# 0..17, the best layer of both editors' sweeps; configs/grace/ and configs/wise/).
DEPTH = 0.88


class LayerAtDepth:
    """`layer_for` of an editor whose config has `layer` (None: the block at `DEPTH` of the depth)."""

    layer_rule: ClassVar[str] = f"layer at {DEPTH:g} of the depth"  # what `layer: null` means (settings.describe)

    def layer_for(self, lm: LM) -> int:
        layer = self.config.layer  # type: ignore[attr-defined]
        if layer is None:
            return round(DEPTH * (lm.n_layers - 1))
        if layer >= lm.n_layers:
            raise ConfigError(f"{type(self.config).__name__}.layer={layer} is out of range: {lm.name!r} has "  # type: ignore[attr-defined]
                              f"{lm.n_layers} layers (0..{lm.n_layers - 1})")
        return layer
