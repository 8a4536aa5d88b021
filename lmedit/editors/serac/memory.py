"""SERAC's explicit edit memory and the wrapper edit that puts it in front of the model.

Mitchell et al. 2022, "Memory-Based Model Editing at Scale" (arXiv:2206.06520), §3: edits are kept as
they were given, in a memory; for each input the scope classifier finds the highest-scoring edit; if it
is in scope, a counterfactual model answers with that edit in view, otherwise the frozen base model
answers. Here the counterfactual model is the base model itself reading the edit in context
(`template`, default "New fact: {edit}.\\n{input}"; implicit descriptors use `descriptor_template`,
default "{edit}\\n{input}"): an in-scope input is replaced by the filled template, an out-of-scope input
reaches the base model as the same text, so its outputs are bit-identical (compared in the same batch:
a batch's padding and size change float rounding for any model).

A `SeracEdit` holds the entries of one `edit()` call; the model's memory is the union of the entries of
every applied `SeracEdit` (`lm.edits.route` picks the best claim across them), so undoing one edit, as
the ledger does to revert it, removes exactly its entries. `Memory` is the list/add/remove view.

Not handled: a separately trained counterfactual model (the paper fine-tunes a small seq2seq model).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmedit.editors.wrapper import WrapperEdit
from lmedit.editors.serac.config import ENCODERS
from lmedit.editors.serac.scope import INPUT_VIEWS, ScopeHead, SentenceEncoder, load_encoder
from lmedit.errors import EditFileError, LMEditError
from lmedit.types import EditDescriptor, EditRequest

if TYPE_CHECKING:
    from lmedit.editors.serac.editor import SeracEditor
    from lmedit.models.load import LM


@dataclass(frozen=True, eq=False)
class MemoryEntry:
    """One edit in memory: its statement (what the counterfactual model reads), the request it came from,
    and the statement's sentence embedding (the key the scope classifier compares inputs with)."""

    statement: str
    request: EditRequest | EditDescriptor
    key: torch.Tensor  # (dim,)

    @property
    def id(self) -> str:
        """A short stable id: a hash of the statement."""
        return hashlib.sha256(self.statement.encode()).hexdigest()[:10]

    def request_dict(self) -> dict[str, Any]:
        kind = "descriptor" if isinstance(self.request, EditDescriptor) else "request"
        return {"kind": kind, **self.request.to_dict()}


def _request_from(data: dict[str, Any]) -> EditRequest | EditDescriptor:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in ("request", "descriptor"):
        raise EditFileError(f"'kind' must be 'request' or 'descriptor', got {kind!r}")
    return EditDescriptor.from_dict(data) if kind == "descriptor" else EditRequest.from_dict(data)


_HEAD_TENSORS = {"keys", "head.log_scale", "head.bias"}  # and, for a trained head, "head.projection"


def _check_template(name: str, template: Any) -> None:
    """A saved template may only place {edit} and {input} (no attribute access, conversions or format specs)."""
    if not isinstance(template, str):
        raise EditFileError(f"metadata {name!r} must be a string, got {type(template).__name__}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise EditFileError(f"metadata {name!r} is not a template ({exc}): {template!r}") from None
    bad = [f for f, spec, conv in fields if f not in ("edit", "input") or spec or conv]
    if bad or "input" not in [f for f, _, _ in fields]:
        raise EditFileError(f"metadata {name!r} must contain {{input}} and may only use {{edit}} and {{input}}, "
                            f"got {template!r}")


def _check_saved(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """What `SeracEdit.save` writes: tensor names and shapes, entries, templates, encoder and view.

    Raises:
        EditFileError: naming the tensor or metadata field and what was expected.
    """
    names = set(tensors)
    if not _HEAD_TENSORS <= names or names - _HEAD_TENSORS - {"head.projection"}:
        raise EditFileError(f"tensors {sorted(names)}; a SERAC edit has {sorted(_HEAD_TENSORS)} and optionally "
                            "'head.projection'")
    keys = tensors["keys"]
    if keys.ndim != 2:
        raise EditFileError(f"tensor 'keys' has shape {tuple(keys.shape)}; expected (n_entries, dim)")
    for name in ("head.log_scale", "head.bias"):
        if tensors[name].numel() != 1:
            raise EditFileError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; expected one value")
    projection = tensors.get("head.projection")
    if projection is not None and (projection.ndim != 2 or projection.shape[0] != keys.shape[1]):
        raise EditFileError(f"tensor 'head.projection' has shape {tuple(projection.shape)}; expected "
                            f"({keys.shape[1]}, projection_dim) to match the keys")
    for name in ("template", "descriptor_template"):
        _check_template(name, metadata.get(name))
    if metadata.get("encoder") not in ENCODERS:
        raise EditFileError(f"metadata 'encoder' must be one of {ENCODERS}, got {metadata.get('encoder')!r}")
    if metadata.get("view") not in INPUT_VIEWS:
        raise EditFileError(f"metadata 'view' must be one of {INPUT_VIEWS}, got {metadata.get('view')!r}")
    entries = metadata.get("entries")
    if not isinstance(entries, list) or not entries:
        raise EditFileError(f"metadata 'entries' must be a non-empty list, got {type(entries).__name__}")
    if len(entries) != keys.shape[0]:
        raise EditFileError(f"metadata 'entries' has {len(entries)} entries but tensor 'keys' has {keys.shape[0]} rows")
    for i, item in enumerate(entries):
        if not isinstance(item, dict) or not isinstance(item.get("statement"), str) or not item["statement"].strip() \
                or not isinstance(item.get("request"), dict):
            raise EditFileError(f"metadata 'entries'[{i}] must be an object with a non-empty 'statement' string and a "
                                "'request' object")


class SeracEdit(WrapperEdit, wrapper="serac"):
    """The entries of one SERAC edit, the scope head they are matched with, and the counterfactual template.

    Attributes:
        entries: the memory entries this edit adds.
        head: the scope classifier's head (cosine threshold or trained projection).
        template: how an in-scope input is shown to the base model ({edit}, {input}).
        descriptor_template: the same for entries made from implicit descriptors.
        encoder_name: the sentence encoder the keys were made with (reloaded by name after `load`).
    """

    def __init__(self, entries: Sequence[MemoryEntry], head: ScopeHead, template: str, *,
                 descriptor_template: str | None = None, encoder: SentenceEncoder | None = None,
                 encoder_name: str = "", **common: Any) -> None:
        super().__init__(**common)
        if not entries:
            raise LMEditError("a SERAC edit needs at least one memory entry")
        self.entries = tuple(entries)
        self.head = head
        self.template = template
        self.descriptor_template = descriptor_template if descriptor_template is not None else template
        self.encoder_name = encoder.name if encoder is not None else encoder_name
        self._encoder = encoder

    @property
    def requests(self) -> tuple[EditRequest | EditDescriptor, ...]:
        return tuple(e.request for e in self.entries)

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_name)  # one per process, shared
        return self._encoder

    def scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """Scope logits (n_prompts, n_entries); > 0 means in scope."""
        keys = torch.stack([e.key for e in self.entries])  # (n_entries, dim)
        return self.head.logits(self.head.embed_inputs(self.encoder, prompts), keys)

    def match(self, prompts: Sequence[str]) -> list[tuple[float, str] | None]:
        if not prompts:
            return []
        with torch.no_grad():
            best, index = self.scores(prompts).max(dim=1)
        out: list[tuple[float, str] | None] = []
        for prompt, score, j in zip(prompts, best.tolist(), index.tolist()):
            out.append((score, self.counterfactual_input(self.entries[j], prompt)) if score > 0 else None)
        return out

    def counterfactual_input(self, entry: MemoryEntry, prompt: str) -> str:
        """What the base model reads for `prompt` when `entry` is retrieved."""
        if isinstance(entry.request, EditDescriptor) and not entry.request.is_pair:
            return self.descriptor_template.format(edit=entry.statement, input=prompt)
        return self.template.format(edit=entry.statement.rstrip("."), input=prompt)  # the template ends the sentence

    def without(self, entry_id: str) -> SeracEdit:
        """A new, unapplied edit with every entry except `entry_id`.

        Raises:
            LMEditError: no such entry, or it is the only one (undo the edit instead).
        """
        kept = [e for e in self.entries if e.id != entry_id]
        if len(kept) == len(self.entries):
            raise LMEditError(f"this edit has no memory entry {entry_id!r}; it has {[e.id for e in self.entries]}")
        if not kept:
            raise LMEditError(f"entry {entry_id!r} is this edit's only entry: undo the edit to remove it")
        return SeracEdit(kept, self.head, self.template, descriptor_template=self.descriptor_template,
                         encoder=self._encoder, encoder_name=self.encoder_name,
                         base_fingerprint=self.base_fingerprint, method=self.method, config=self.config, info=self.info)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": torch.stack([e.key for e in self.entries]), **self.head.tensors()}

    def metadata(self) -> dict[str, Any]:
        return {"template": self.template, "descriptor_template": self.descriptor_template,
                "encoder": self.encoder_name, "view": self.head.view,
                "entries": [{"statement": e.statement, "request": e.request_dict()} for e in self.entries]}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> SeracEdit:
        """Rebuild a saved edit after checking its tensors and metadata (`EditFileError` names the field)."""
        _check_saved(tensors, metadata)
        keys = tensors["keys"]
        entries = []
        for i, item in enumerate(metadata["entries"]):
            try:
                request = _request_from(item["request"])
            except LMEditError as exc:
                raise EditFileError(f"metadata 'entries'[{i}].request is not a valid request ({exc})") from None
            entries.append(MemoryEntry(item["statement"], request, keys[i]))
        return cls(entries, ScopeHead.from_tensors(tensors, metadata["view"]), metadata["template"],
                   descriptor_template=metadata["descriptor_template"], encoder_name=metadata["encoder"], **common)

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return f"SeracEdit({len(self.entries)} entries, {state}: {[e.statement for e in self.entries][:3]})"


class Memory:
    """SERAC's memory on one model: the entries of every applied `SeracEdit`, listed, added and removed.

        memory = Memory(lm, editor)
        memory.add(EditDescriptor("Topic: singing in the shower. Sentiment: positive"))
        memory.entries()          # [MemoryEntry(...), ...]
        memory.remove(entry.id)   # undoes the edit holding it (or re-applies it without that entry)
    """

    def __init__(self, lm: LM, editor: SeracEditor | None = None) -> None:
        self.lm = lm
        self.editor = editor

    def edits(self) -> list[SeracEdit]:
        return [e for e in self.lm.edits.of_kind("wrapper") if isinstance(e, SeracEdit)]

    def entries(self) -> list[MemoryEntry]:
        return [entry for edit in self.edits() for entry in edit.entries]

    def add(self, *requests: EditRequest | EditDescriptor) -> SeracEdit:
        """Edit with this memory's editor and apply: the new entries join the memory."""
        if self.editor is None:
            raise LMEditError("this Memory has no editor to make new entries with: Memory(lm, SeracEditor(...))")
        edit = self.editor.edit(self.lm, list(requests))
        return edit.apply(self.lm)  # type: ignore[return-value]

    def remove(self, entry_id: str) -> None:
        """Remove one entry: undo the edit holding it, re-applying the edit's other entries if it has more.

        Raises:
            LMEditError: no entry with this id in memory.
        """
        for edit in self.edits():
            if any(e.id == entry_id for e in edit.entries):
                rest = edit.without(entry_id) if len(edit.entries) > 1 else None
                edit.undo()
                if rest is not None:
                    rest.apply(self.lm)
                return
        raise LMEditError(f"no memory entry {entry_id!r}; entries: {[e.id for e in self.entries()]}")

    def __len__(self) -> int:
        return len(self.entries())
