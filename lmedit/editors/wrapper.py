"""`WrapperEdit`: the edit kind that wraps the model instead of changing its weights (SERAC, IKE).

How it reaches scoring and generation: `lmedit.editors.base`'s module docstring; which wrappers are applied:
`lm.edits` (`lmedit.models.applied.AppliedEdits.route`).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lmedit.editors._edit_files import WRAPPER_FORMAT, check_metadata, check_tensor_names, json_field, read_metadata, read_tensors
from lmedit.editors.base import Edit, _check_applicable, _save_envelope
from lmedit.errors import EditFileError, LMEditError

if TYPE_CHECKING:
    from lmedit.models.load import LM


class WrapperEdit(Edit):
    """An edit that wraps the model instead of changing its weights (SERAC, IKE).

    While applied, the text-level scoring functions route every prompt through `lm.edits.route`: each
    applied wrapper says, per prompt, whether the prompt is in its scope (with a score) and which text the
    frozen base model reads instead; the highest-scoring wrapper wins, prompts no wrapper claims reach the
    base model unchanged (bit-identical outputs). `undo()` takes the wrapper off the stack; the weights
    are never written, so undo is exact by construction.

    Subclasses implement `match`, `tensors` and `metadata` and name themselves for `load_edit`:
    `class SeracEdit(WrapperEdit, wrapper="serac")`; `from_saved` rebuilds one from a saved file.
    """

    kind: ClassVar[str] = "wrapper"
    wrapper: ClassVar[str] = ""
    _types: ClassVar[dict[str, type[WrapperEdit]]] = {}

    def __init_subclass__(cls, wrapper: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if wrapper:
            cls.wrapper = wrapper
            WrapperEdit._types[wrapper] = cls

    def __init__(self, *, base_fingerprint: str = "", method: str = "", config: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        # `requests` (the Edit record's field) is a property of each wrapper kind: its stored entries' requests.
        self.base_fingerprint = base_fingerprint
        self.method = method
        self.config: dict[str, Any] = dict(config or {})
        self.info: dict[str, Any] = dict(info or {})
        self._lm: LM | None = None

    @abstractmethod
    def match(self, prompts: Sequence[str]) -> list[tuple[float, str] | None]:
        """Per prompt: None when it is outside this edit's scope, else (score, text the base model reads instead)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything tensor-valued that `save` writes (and `from_saved` reads back)."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Everything else `save` writes, JSON-serialisable."""

    @classmethod
    @abstractmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> WrapperEdit:
        """Rebuild from `tensors()`/`metadata()`; `common` holds base_fingerprint, method, config and info."""

    @property
    def is_applied(self) -> bool:
        return self._lm is not None

    def apply(self, lm: LM, *, check_fingerprint: bool = True) -> WrapperEdit:
        """Put the wrapper in front of `lm` (the weights are not touched).

        Raises:
            LMEditError: already applied, or made for a model with other weights.
        """
        _check_applicable(self, lm, check_fingerprint)
        self._lm = lm
        lm.edits.push(self)
        return self

    def undo(self) -> None:
        """Take the wrapper off the model. Wrappers never write weights, so any order of undo is exact."""
        if self._lm is None:
            raise LMEditError("this edit is not applied")
        self._lm.edits.remove(self)
        self._lm = None

    def save(self, path: str | Path) -> Path:
        """Write tensors and metadata to one safetensors file, atomically.

        Raises:
            LMEditError: the edit has no `base_fingerprint`.
        """
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        return _save_envelope(self, path, WRAPPER_FORMAT, tensors,
                              {"wrapper": self.wrapper, "wrapper_meta": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path, *, label: str | None = None) -> WrapperEdit:
        """Read a wrapper edit written by `save`, as the subclass named in the file, checking everything on load.

        Args:
            path: the file.
            label: how error messages name the file (default: the path).

        Raises:
            MissingFileError: no file at `path`.
            EditFileError: not an lmedit wrapper edit (the checks of `WeightEdit.load`), its wrapper type is not
                registered (not imported), or its tensors and metadata are not what that type saves.
        """
        path = Path(path)
        where = label or str(path)
        meta = read_metadata(path, label)
        common = check_metadata(meta, WRAPPER_FORMAT, ("wrapper", "wrapper_meta"), where)
        wrapper_type = WrapperEdit._types.get(meta["wrapper"])
        if wrapper_type is None:
            raise EditFileError(f"{where} holds a {meta['wrapper']!r} wrapper edit, which no loaded module "
                                f"provides (known: {sorted(WrapperEdit._types)})")
        wrapper_meta = json_field(meta, "wrapper_meta", dict, where)
        tensors = read_tensors(path, label)
        check_tensor_names(tensors, where)
        common.update(base_fingerprint=meta["base_fingerprint"], method=meta["method"])
        try:
            return wrapper_type.from_saved(tensors, wrapper_meta, common)
        except LMEditError as exc:  # from_saved's own checks: add the file
            raise EditFileError(f"{where}: {exc}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # a check from_saved lacks
            raise EditFileError(f"{where}: the {meta['wrapper']!r} edit's tensors or metadata are not what it saves "
                                f"({type(exc).__name__}: {exc})") from None
