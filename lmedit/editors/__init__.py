"""Built-in editors, imported explicitly (one list, one place), and `edit()`, the public entry point.

Each editor module registers its class in `lmedit.registry.editors` under its own file name; `ft.py` also
registers `ft_l`, the same fine-tuning with its norm bound on by default.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmedit.config import from_dict, load_config
from lmedit.defaults import DEFAULT_METHOD  # the method used when none is named (named once there)
from lmedit.editors import alphaedit, ft, grace, ike, kn, lora, memit, mend, noop, rome, serac, wise  # noqa: F401  (each registers itself under its module name; ft also as ft_l and ft_m)
from lmedit.editors.adaptor import AdaptorEdit
from lmedit.editors.base import Edit, EditMeta, Editor, EditorConfig, ParamDelta, WeightEdit, load_edit
from lmedit.editors.wrapper import WrapperEdit
from lmedit.errors import RequestError
from lmedit.models.load import as_lm
from lmedit.registry import editors
from lmedit.types import EditDescriptor, EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_METHOD", "AdaptorEdit", "Edit", "EditMeta", "Editor", "EditorConfig", "ParamDelta", "WeightEdit", "WrapperEdit", "edit",
           "get_editor", "load_edit"]


def get_editor(method: str, config: EditorConfig | dict[str, Any] | str | Path | None = None,
               overrides: list[str] | None = None) -> Editor:
    """Instantiate the registered editor `method` with a config object, dict, or YAML path (+ key=value overrides)."""
    cls = editors.get(method)
    config_class = cls.config_class
    if isinstance(config, EditorConfig):
        if overrides:
            raise ValueError("overrides apply to a config file or dict, not to a config object")
        return cls(config)
    if isinstance(config, dict):
        merged = dict(config)
        for item in overrides or []:
            key, _, value = item.partition("=")
            merged[key] = value
        return cls(from_dict(config_class, merged))
    if config is not None:
        from lmedit.settings import config_path

        config = config_path(config)
    return cls(load_config(config_class, config, overrides))


def edit(lm: LM, requests: EditRequest | EditDescriptor | Sequence[EditRequest | EditDescriptor],
         method: str = DEFAULT_METHOD, *,
         config: EditorConfig | dict[str, Any] | str | Path | None = None, apply: bool = True,
         force: bool = False, overrides: Sequence[str] = ()) -> Edit:
    """Edit `lm` so that each request's prompt is completed by its `target_new`.

    Args:
        lm: the model bundle (its weights change only if `apply`).
        requests: one request or several (methods that take one at a time apply them in sequence);
            `EditDescriptor`s only for editors that accept them (`Editor.accepts_descriptors`).
        method: a registered editor name (`lmedit ls editors`).
        config: the editor's config object, a dict, or a YAML path; default: the settings lmedit ships for
            this model and method (`lmedit.settings`), else the method's defaults (with a logged warning).
        overrides: "key=value" settings on top of those, as the CLI's `--set`, e.g. ["quiet_factor=4"].
        apply: apply the edit before returning it (undo with `edit.undo()`).
        force: apply a weight edit even if it is far outside what shipped settings produce (relative
            update norm, loss on ordinary text: `lmedit.editors.safety`); otherwise that is refused.

    Returns:
        The `Edit`, applied when `apply` is True.

    Raises:
        DestructiveEditError: (with `apply`, without `force`) the edit is far outside what shipped settings
            produce; the weights are unchanged.
    """
    lm = as_lm(lm)  # a bare transformers model: an error that says how to wrap it
    if isinstance(requests, EditRequest | EditDescriptor):
        requests = [requests]
    elif not isinstance(requests, Iterable):  # 5, None: not a list of requests (a str is caught by check_requests)
        raise RequestError(f"edit requests must be an EditRequest, an EditDescriptor or a list of them, "
                           f"got {type(requests).__name__}")
    from lmedit.settings import describe, resolve_editor

    editor, _ = resolve_editor(method, lm, config, list(overrides))
    log.info("%s", describe(editor, lm))
    result = editor.edit(lm, list(requests))
    if apply:
        from lmedit.editors.safety import check_not_destructive

        check_not_destructive(result, lm, force=force)
        result.apply(lm)
    return result
