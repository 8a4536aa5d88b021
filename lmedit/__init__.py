"""lmedit: locate, edit, evaluate and keep edits of what a pretrained language model knows.

Public API (the CLI and web app use only this):
    lm = lmedit.load("gemma3-270m")
    request = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    edit = lmedit.edit(lm, [request], method="rome")   # applied; edit.undo() restores the weights
    ledger = lmedit.Ledger("ledgers/gemma")             # keep, audit, revert, ship and replay edits
"""

from lmedit.editors import Edit, WeightEdit, WrapperEdit, edit, load_edit
from lmedit.eval import evaluate
from lmedit.ledger import Ledger
from lmedit.models.load import LM, load
from lmedit.tracing import TraceResult, suggest_layer, trace
from lmedit.types import EditDescriptor, EditRequest, Site

__all__ = ["LM", "Edit", "EditDescriptor", "EditRequest", "Ledger", "Site", "TraceResult", "WeightEdit", "WrapperEdit", "edit", "evaluate", "load", "load_edit",
           "suggest_layer", "trace"]
__version__ = "0.1.0"
