"""lmedit: locate, edit, evaluate and keep edits of what a pretrained language model knows.

Public API (the CLI and any front end use only this):
    lm = lmedit.load("gemma3-270m")                    # or lmedit.LM.from_hf(model, tokenizer): yours, as loaded
    request = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    edit = lmedit.edit(lm, [request], method="rome")   # applied; edit.undo() restores the weights
    ledger = lmedit.Ledger("ledgers/gemma")             # keep, audit, revert, ship and replay edits
    lmedit.generate(lm, request.text), lmedit.score(lm, request.text, ["Rome", "Paris"])  # what it says now

The names below are imported on first use (PEP 562), so `import lmedit.errors` or the CLI's `--help`
does not pay for torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmedit.editors import Edit, WeightEdit, WrapperEdit, edit, load_edit
    from lmedit.eval import evaluate
    from lmedit.inference import TargetScore, generate, score
    from lmedit.ledger import Ledger
    from lmedit.models.load import LM, load
    from lmedit.tracing import TraceResult, suggest_layer, trace
    from lmedit.types import EditDescriptor, EditRequest, Site

# public name -> the module that defines it
_EXPORTS = {
    "Edit": "lmedit.editors", "WeightEdit": "lmedit.editors", "WrapperEdit": "lmedit.editors",
    "edit": "lmedit.editors", "load_edit": "lmedit.editors",
    "evaluate": "lmedit.eval",
    "TargetScore": "lmedit.inference", "generate": "lmedit.inference", "score": "lmedit.inference",
    "Ledger": "lmedit.ledger",
    "LM": "lmedit.models.load", "load": "lmedit.models.load",
    "TraceResult": "lmedit.tracing", "suggest_layer": "lmedit.tracing", "trace": "lmedit.tracing",
    "EditDescriptor": "lmedit.types", "EditRequest": "lmedit.types", "Site": "lmedit.types",
}

__all__ = ["LM", "Edit", "EditDescriptor", "EditRequest", "Ledger", "Site", "TargetScore", "TraceResult", "WeightEdit",
           "WrapperEdit", "edit", "evaluate", "generate", "load", "load_edit", "score", "suggest_layer", "trace"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage such as `lmedit.eval`) the first time it is read."""
    module = _EXPORTS.get(name)
    if module is None:
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            return import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
