"""`AppliedEdits` (`lm.edits`): which edits are applied to a model, in order — the one place that knows.

Every edit kind registers here when applied and leaves when undone (`Edit.apply`/`Edit.undo` call `push` and
`remove`); everything that asks "what is on this model?" asks here:

    lm.edits.route(prompts)        # the text the base model reads, given the applied wrapper edits (SERAC ...)
    lm.edits.keys(param)           # the keys earlier weight edits fitted `param` to (AlphaEdit preserves them)
    lm.edits.after(edit)           # edits applied later (undo refuses while one of them changes the same weights)
    with lm.edits.suspended():     # the unedited model for the block; everything re-applied after, in order
        ...
    with lm.edits.muted(site):     # the adaptor edits at `site` serve nothing for the block (their caller does)
        ...
    lm.edits.ledger, lm.edits.labelled()   # which ledger rebuilt the model, and its edits with their ledger ids

One stack per model object (not per `LM` bundle), so two bundles wrapping the same transformers model see the
same applied edits. The stack holds edits only through what every `Edit` declares (`kind`, `apply`, `undo`,
`lift`/`settle` for a cheap `suspended`; weight edits' `deltas`, `keys` and `original`; wrapper edits' `match`;
adaptor edits, such as GRACE's codebook, serve themselves through a hook and ask `of_kind("adaptor")` which of
them are applied), so this module imports no editor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmedit.errors import LMEditError
from lmedit.models.params import read as read_param
from lmedit.models.params import write as write_params

if TYPE_CHECKING:
    from lmedit.editors.base import Edit
    from lmedit.models.load import LM
    from lmedit.types import Site


@dataclass
class _Entry:
    edit: Edit
    label: int | None = None  # the edit's id in `AppliedEdits.ledger` when a ledger applied it


class AppliedEdits:
    """The edits applied to one model, oldest first. Obtain it as `lm.edits`; edits push and remove themselves."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        # The ledger directory that last rebuilt this model from its base (None: no ledger has); the edits it
        # applied carry their ledger ids as labels.
        self.ledger: str | None = None
        self._muted: dict[Site, int] = {}  # site -> how many `muted` blocks hold it
        self._suspending = 0  # how many `suspended` blocks are open
        # Adaptor hooks' functions (with the state they prepared) kept from the undo to the re-apply of a
        # `suspended` block, by (adaptor type, site); emptied when the outermost block ends.
        self.parked: dict[tuple[str, Site], Any] = {}

    # ---- reading ---------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Edit]:
        return iter([e.edit for e in self._entries])

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, edit: object) -> bool:
        return any(e.edit is edit for e in self._entries)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{e.edit.kind}:{e.edit.method or '?'}" for e in self._entries)
        return f"AppliedEdits([{kinds}], ledger={self.ledger!r})"

    def of_kind(self, kind: str) -> list[Edit]:
        """The applied edits of one kind ("weight", "wrapper", "adaptor"), oldest first."""
        return [e.edit for e in self._entries if e.edit.kind == kind]

    def before(self, edit: Edit) -> list[Edit]:
        """The edits applied before `edit`, oldest first."""
        return [e.edit for e in self._entries[:self._index(edit)]]

    def after(self, edit: Edit) -> list[Edit]:
        """The edits applied after `edit`, oldest first."""
        return [e.edit for e in self._entries[self._index(edit) + 1:]]

    def labelled(self) -> list[tuple[int, Edit]]:
        """(ledger id, edit) for the edits the ledger `self.ledger` applied, oldest first."""
        return [(e.label, e.edit) for e in self._entries if e.label is not None]

    def unlabelled(self) -> list[Edit]:
        """The edits applied outside any ledger, oldest first."""
        return [e.edit for e in self._entries if e.label is None]

    def keys(self, param: str) -> torch.Tensor | None:
        """The keys the applied weight edits that changed `param` were fitted to, (d_in, m) float64; None if none."""
        found = [e.keys[param] for e in self.of_kind("weight") if param in getattr(e, "keys", {})]
        return torch.cat(found, 1).to(torch.float64) if found else None

    def route(self, prompts: Sequence[str]) -> list[str]:
        """The text the frozen base model reads for each prompt, given the applied wrapper edits.

        Each applied wrapper scores every prompt (`match`); the best-scoring claim wins and replaces the prompt.
        Unclaimed prompts (and all prompts when no wrapper is applied) come back unchanged, at no cost.
        """
        wrappers = self.of_kind("wrapper")
        if not wrappers:
            return list(prompts)
        best: list[tuple[float, str] | None] = [None] * len(prompts)
        for wrapper in wrappers:
            for i, claim in enumerate(wrapper.match(prompts)):  # type: ignore[attr-defined]
                if claim is not None and (best[i] is None or claim[0] > best[i][0]):  # type: ignore[index]
                    best[i] = claim
        return [p if b is None else b[1] for p, b in zip(prompts, best)]

    # ---- changing (through `Edit.apply`/`undo` and the ledger) ----------------------------------------

    def push(self, edit: Edit) -> None:
        """Record `edit` as applied last (called by `Edit.apply` once the edit is in place)."""
        if edit in self:
            raise LMEditError("this edit is already applied to this model")
        self._entries.append(_Entry(edit))

    def remove(self, edit: Edit) -> None:
        """Forget `edit` (called by `Edit.undo` once the model is restored)."""
        del self._entries[self._index(edit)]

    def label(self, edit: Edit, ledger_id: int) -> None:
        """Mark an applied `edit` as the ledger `self.ledger`'s edit `ledger_id`."""
        self._entries[self._index(edit)].label = ledger_id

    @contextmanager
    def suspended(self, edits: Sequence[Edit] | None = None, *, lm: LM) -> Iterator[None]:
        """Undo `edits` (default: every applied edit), newest first, for the block; re-apply them in order after,
        with their ledger labels, even when the block raises: the unedited model, briefly.

        When `edits` are the newest applied edits in the order applied (the default, and a sequential run's
        own edits), the block is cheap however many they are: each changed parameter's current value is saved
        and its oldest original written once, and after the block the saved values are written back (bit for
        bit what re-adding every delta in order gives) and the edits rejoin the stack without re-adding their
        deltas. If the block leaves edits applied, or changes those parameters, the edits are re-applied one by
        one instead. Other selections are undone and re-applied one by one (undo refusing as it does alone).
        """
        chosen = list(self) if edits is None else list(edits)
        labels = {id(e.edit): e.label for e in self._entries}
        self._suspending += 1
        try:
            put_back = self._lift(chosen, lm) if self._on_top(chosen) else self._undo(chosen, lm)
            try:
                yield
            finally:
                put_back()
                for edit in chosen:
                    if labels.get(id(edit)) is not None:
                        self.label(edit, labels[id(edit)])  # type: ignore[arg-type]
        finally:
            self._suspending -= 1
            if not self._suspending:
                self.parked.clear()

    def _on_top(self, chosen: Sequence[Edit]) -> bool:
        """Whether `chosen` are the newest applied edits, in the order they were applied."""
        if not chosen or len(chosen) > len(self._entries):
            return False
        return all(e.edit is c for e, c in zip(self._entries[len(self._entries) - len(chosen):], chosen))

    def _undo(self, chosen: Sequence[Edit], lm: LM) -> Callable[[], None]:
        """Undo `chosen` one by one, newest first; return what re-applies them in order."""
        for edit in reversed(chosen):
            edit.undo()

        def put_back() -> None:
            for edit in chosen:
                edit.apply(lm)
        return put_back

    def _lift(self, chosen: Sequence[Edit], lm: LM) -> Callable[[], None]:
        """Take the top edits `chosen` off at once (see `suspended`); return what puts them back."""
        base: dict[str, torch.Tensor] = {}  # parameter -> its value before the oldest chosen edit changed it
        for edit in chosen:
            for name in edit.deltas if edit.kind == "weight" else ():  # type: ignore[attr-defined]
                if name not in base:
                    base[name] = edit.original(name)  # type: ignore[attr-defined]
        lifted = [edit.lift() for edit in reversed(chosen)][::-1]  # newest first; weight edits write nothing
        edited = {name: read_param(lm.model, name).clone() for name in base}  # the values with the edits in
        write_params(lm.model, base)
        below = [e.edit for e in self._entries]

        def put_back() -> None:
            now = [e.edit for e in self._entries]
            untouched = (len(now) == len(below) and all(a is b for a, b in zip(now, below))
                         and all(torch.equal(read_param(lm.model, name), value) for name, value in base.items()))
            if not untouched:  # the block left edits applied or changed the weights: re-add every delta
                for edit in chosen:
                    edit.apply(lm)
                return
            write_params(lm.model, edited)
            for edit, originals in zip(chosen, lifted):
                edit.settle(lm, originals)
        return put_back

    @property
    def suspending(self) -> bool:
        """Whether a `suspended` block is open (its edits will be re-applied: an adaptor parks its hook's state)."""
        return self._suspending > 0

    def is_muted(self, site: Site) -> bool:
        """Whether a `muted` block holds `site` now (the adaptor hook there must then keep the module's output)."""
        return self._muted.get(site, 0) > 0

    @contextmanager
    def muted(self, site: Site) -> Iterator[None]:
        """The adaptor edits at `site` serve nothing for the block: their hook keeps the module's output as it is.

        For a caller that supplies the site's whole output itself, with the applied edits' contribution already
        in it (WISE's training computes it once, not at every step). Nothing is undone or re-applied; blocks nest.
        """
        self._muted[site] = self._muted.get(site, 0) + 1
        try:
            yield
        finally:
            self._muted[site] -= 1
            if not self._muted[site]:
                del self._muted[site]

    def _index(self, edit: Edit) -> int:
        for i, entry in enumerate(self._entries):
            if entry.edit is edit:
                return i
        raise LMEditError("this edit is not applied to this model")


_STACKS: weakref.WeakKeyDictionary[Any, AppliedEdits] = weakref.WeakKeyDictionary()


def applied_edits(model: torch.nn.Module) -> AppliedEdits:
    """The stack of `model` (a transformers model object), created empty on first use; gone with the model."""
    stack = _STACKS.get(model)
    if stack is None:
        stack = _STACKS[model] = AppliedEdits()
    return stack
