"""`Ledger`: keep, audit, revert, ship and replay the edits made to one base model.

    ledger = lmedit.Ledger("ledgers/gemma")                 # a directory; created on first use
    lm = lmedit.load("gemma3-270m")
    result = ledger.edit(lm, request, method="rome", config="configs/rome/gemma3-270m.yaml")
    result.report.verdict                                    # keep / warn / refuse (refused: not recorded)
    ledger.revert(result.edit_id, lm)                        # lm = base + the remaining patches, re-audited
    ledger.export_patch("edits.lmpatch"); ledger.export_model(lm, "gemma-edited/")

The model's state is always *rebuilt*: the ledger's edits currently on the model are undone (each `Edit`
restores its saved originals bit for bit), the base is checked, and the applied patches are applied
again in id order. So after any operation the weights are bit-identical to the base model plus the
applied patches, with no floating-point drift from subtracting deltas. The ledger works with edits
through the `Edit` interface only (`apply`, `undo`, `save`, `lmedit.editors.load_edit`, `kind`): weight
and wrapper edits alike; reverting a wrapper edit is its `undo()` (its memory entry goes away).

The base is checked when a model is first attached: the ledger's base hash must name the model's
checkpoint (`LM.is_checkpoint`: its dtype-independent `LM.fingerprint`, or for a ledger begun before
fingerprints were dtype-independent its exact `LM.weights_hash`), the weights must be the ones the model
was loaded with (`weights_fingerprint` equals `LM.weights_hash`), and every parameter a recorded edit touches
must hash (sha256, all bits) to the value recorded when it was first touched. That last check makes a
ledger dtype-specific: its patches rebuild the base bit for bit in the dtype it was begun in.

Not handled: edits recorded against different base models in one ledger (one ledger per base model).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmedit.config import to_dict
from lmedit.editors import Edit, EditorConfig, WeightEdit, load_edit
from lmedit.ledger.audit import AuditConfig, AuditReport, audit_record, edit_states, run_audit, unaudited_report
from lmedit.ledger.probes import build_record, record_from_dict, record_to_dict
from lmedit.ledger.store import (EditRow, LedgerError, Store, file_sha256, new_patch_name, now, test_pause)
from lmedit.models.load import weights_fingerprint
from lmedit.models.params import read
from lmedit.settings import resolve_editor
from lmedit.types import EditRequest, request_from_dict

if TYPE_CHECKING:
    from lmedit.eval.records import EvalRecord
    from lmedit.ledger.replay import ReplayResult
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

@dataclass
class CommitResult:
    """What `Ledger.record`/`Ledger.edit` did: the new edit's id (None when refused) and its audit."""

    edit_id: int | None
    report: AuditReport
    edit: Edit

    @property
    def recorded(self) -> bool:
        return self.edit_id is not None


@dataclass
class RevertResult:
    """What `Ledger.revert` did: the remaining applied edits and their re-audits (empty without a model)."""

    edit_id: int
    remaining: list[int]
    reports: dict[int, AuditReport]

    @property
    def broken(self) -> list[int]:
        """Remaining edits that no longer hold (their efficacy check is at the refuse level)."""
        return [i for i, r in self.reports.items() if not r.holds]


def param_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _deltas(edit: Edit) -> dict[str, Any]:
    """Parameter name -> delta for edits that change weights; {} for other kinds."""
    return dict(edit.deltas) if isinstance(edit, WeightEdit) else {}


class Ledger:
    """The edits of one base model: SQLite rows (WAL) plus patch files, in one directory.

    Args:
        path: the ledger directory (created when missing).
        audit_config: thresholds of the audit gate (default `AuditConfig()`).
    """

    def __init__(self, path: str | Path, *, audit_config: AuditConfig | None = None) -> None:
        self.store = Store(path)
        self.path = self.store.root
        self.audit_config = audit_config or AuditConfig()

    def __repr__(self) -> str:
        n = len(self.entries("applied"))
        return f"Ledger({str(self.path)!r}, model={self.model!r}, base={self.base_fingerprint}, {n} applied)"

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -----------------------------------------------------------------------------------

    @property
    def base_fingerprint(self) -> str | None:
        """`LM.fingerprint` of the base model (None until the first edit is recorded)."""
        return self.store.meta("base_fingerprint")

    @property
    def model(self) -> str | None:
        """The name or path the base model was loaded by (None until the first edit is recorded)."""
        return self.store.meta("model")

    def entries(self, state: str | None = None) -> list[EditRow]:
        """Recorded edits in id (= application) order; `state` "applied" or "reverted" filters."""
        return self.store.rows(state)

    def entry(self, edit_id: int) -> EditRow:
        return self.store.row(edit_id)

    def applied_ids(self) -> list[int]:
        return [r.id for r in self.store.rows("applied")]

    def reports(self, edit_id: int) -> list[tuple[str, AuditReport]]:
        """Every audit of an edit, oldest first, as (reason, report)."""
        return [(a["reason"], AuditReport.from_dict(a["report"])) for a in self.store.audits(edit_id)]

    def latest_report(self, edit_id: int) -> AuditReport | None:
        reports = self.reports(edit_id)
        return reports[-1][1] if reports else None

    def records(self, edit_id: int) -> list[EvalRecord]:
        """The audit probes stored with an edit (the same probes at every re-audit)."""
        row = self.entry(edit_id)
        if row.probes:
            return [record_from_dict(p) for p in row.probes]
        requests = [request_from_dict(r) for r in row.requests]
        return [build_record(r, generic_neighbors=self.audit_config.generic_neighbors,
                             context_paraphrases=self.audit_config.context_paraphrases)
                for r in requests if isinstance(r, EditRequest)]

    def load_edit(self, edit_id: int) -> Edit:
        """A fresh (unapplied) `Edit` from the patch file, after checking the file's sha256."""
        row = self.entry(edit_id)
        path = self.store.patch_path(row.patch, edit_id)
        if not path.exists():
            raise LedgerError(f"the patch of edit {edit_id} is missing ({path})")
        if file_sha256(path) != row.patch_sha256:
            raise LedgerError(f"the patch of edit {edit_id} ({path}) changed on disk: its sha256 differs from the "
                              "recorded one; refusing to apply it")
        return load_edit(path)

    # ---- model state ------------------------------------------------------------------------------

    def apply(self, lm: LM) -> list[int]:
        """Make `lm` the base model plus every applied edit, in order. Returns their ids.

        Raises:
            LedgerError: the model is not this ledger's base model (hash mismatch), or a patch is damaged.
        """
        ids = self.applied_ids()
        self._ensure(lm, ids)
        return ids

    def detach(self, lm: LM) -> None:
        """Undo the ledger's edits on `lm`: the base model again, bit for bit."""
        self._ensure(lm, [])

    def _ensure(self, lm: LM, ids: Sequence[int]) -> None:
        """Put `lm` in the state base + `ids` (in order), rebuilding from the base unless it is there already.

        Which ledger edits are on the model is read from the model's stack (`lm.edits`: the ledger that rebuilt
        it and its edits' ledger ids), never kept here, so a second `Ledger` object on the same directory agrees.
        """
        stack = lm.edits
        if stack.ledger == str(self.path) and [i for i, _ in stack.labelled()] == list(ids):
            return
        self._to_base(lm)
        stack.ledger = str(self.path)
        try:
            for edit_id in ids:
                edit = self.load_edit(edit_id)
                edit.apply(lm)
                stack.label(edit, edit_id)
        except Exception:
            self._to_base(lm)
            raise

    def _to_base(self, lm: LM) -> None:
        """Undo this ledger's (or another ledger's) edits on `lm`, newest first; check the base on first sight."""
        stack = lm.edits
        for _, edit in reversed(stack.labelled()):
            edit.undo()
        if stack.ledger == str(self.path):
            return  # undo restored the bits this ledger already checked
        stack.ledger = None
        self.check_base(lm)

    def check_base(self, lm: LM) -> None:
        """Refuse a model whose weights are not this ledger's base model.

        Raises:
            LedgerError: edits applied outside the ledger, a different weights hash, or a touched parameter
                whose bits differ from the base recorded when it was first edited.
        """
        foreign = lm.edits.unlabelled()
        if foreign:
            raise LedgerError(f"{lm.name!r} has {len(foreign)} edit(s) applied outside this ledger; undo them first")
        base = self.base_fingerprint
        if base is None:
            return
        if not lm.is_checkpoint(base):
            raise LedgerError(
                f"model hash mismatch: the ledger {self.path} holds edits of a base model with hash {base} "
                f"({self.model}), but {lm.name!r} has hash {lm.fingerprint}; load that model, or replay the requests "
                f"onto this one with `lmedit ledger replay --onto {lm.name}`")
        actual = weights_fingerprint(lm.model)
        if actual != lm.weights_hash:
            raise LedgerError(
                f"model hash mismatch: {lm.name!r}'s weights changed since it was loaded (weights hash "
                f"{lm.weights_hash}, now {actual}) outside its edits; load the base model again")
        params = dict(lm.model.named_parameters())
        for name, expected in self.store.base_params().items():
            if name not in params:
                raise LedgerError(f"{lm.name!r} has no parameter {name!r}, which edits in {self.path} change")
            if str(params[name].dtype) != expected["dtype"]:
                raise LedgerError(
                    f"{lm.name!r}'s {name} is {params[name].dtype}, but the ledger {self.path} rebuilds its base in "
                    f"{expected['dtype']}, bit for bit: load the model in that dtype (a saved edit, unlike a "
                    f"ledger, applies to any dtype: `lmedit ledger export` then apply the patches' edits)")
            if param_sha256(read(lm.model, name)) != expected["sha256"]:
                raise LedgerError(f"{lm.name!r}'s {name} differs from the base value recorded in {self.path} "
                                  f"(same sampled hash {base}, different bits); refusing to apply patches to it")

    # ---- recording --------------------------------------------------------------------------------

    def edit(self, lm: LM, requests: EditRequest | Sequence[EditRequest], method: str | None = None, *,
             config: EditorConfig | dict[str, Any] | str | Path | None = None, force: bool = False,
             paraphrases: Sequence[str] = (), neighbors: Sequence[tuple[str, str]] = ()) -> CommitResult:
        """Edit `lm` (on top of the ledger's applied edits), audit the edit and record it unless refused.

        Args:
            lm: the base model (its weights become base + applied edits, plus this one when recorded).
            requests: the fact(s) to edit.
            method: a registered editor (default: lmedit's default method); config: its settings.
            force: record even when the audit gate refuses.
            paraphrases, neighbors: extra audit probes (see `lmedit.ledger.probes.build_record`).

        Returns:
            `CommitResult`: `edit_id` is None when the gate refused (the model is then left without the edit).
        """
        from lmedit.editors import DEFAULT_METHOD

        requests = [requests] if isinstance(requests, EditRequest) else list(requests)
        self._ensure(lm, self.applied_ids())
        editor, _ = resolve_editor(method or DEFAULT_METHOD, lm, config)
        made = editor.edit(lm, requests)
        return self.record(lm, made, force=force, paraphrases=paraphrases, neighbors=neighbors)

    def record(self, lm: LM, edit: Edit, *, force: bool = False, paraphrases: Sequence[str] = (),
               neighbors: Sequence[tuple[str, str]] = (), source: str = "edit",
               audited: AuditReport | None = None) -> CommitResult:
        """Audit an unapplied `edit` made on `lm` in the ledger's current state, and record it unless refused.

        The audit compares the ledger's current state (reference) with it plus `edit`. A refused edit is
        undone and not recorded (unless `force`); a recorded one stays applied on `lm`.

        `audited`: the report of `audit_edit(lm, edit, ..., config=self.audit_config)` with the same
        paraphrases and neighbours, made while `lm` was in the ledger's current state (the web app audits
        an edit before the user records it). The gate then takes its verdict instead of measuring the same
        two states again; the caller vouches for the state, the report's model hash is checked.
        """
        if edit.is_applied:
            raise LedgerError("record() takes an unapplied edit (the audit applies it itself)")
        base = self.base_fingerprint
        made_on = edit.base_fingerprint or lm.fingerprint
        if base is not None and made_on != base and lm.is_checkpoint(made_on) and lm.is_checkpoint(base):
            made_on = base  # a ledger begun before fingerprints were dtype-independent names the same model by its hash
        if made_on != edit.base_fingerprint:
            edit.base_fingerprint = made_on  # made on `lm`: its patch file must name the model (checked on load)
        if base is not None and made_on != base:
            raise LedgerError(f"this edit was made on a model with hash {made_on}, but the ledger {self.path} is for "
                              f"base {base} ({self.model}); replay its requests instead")
        self._ensure(lm, self.applied_ids())
        if base is None and weights_fingerprint(lm.model) != lm.weights_hash:
            raise LedgerError(f"{lm.name!r}'s weights changed since it was loaded (edits applied outside a ledger?); "
                              "start a ledger from the unedited model")
        params = dict(lm.model.named_parameters())
        known = self.store.base_params()
        # Parameters no recorded edit touches yet still hold their base values now: hash them before the edit.
        new_params = {name: (tuple(params[name].shape), str(params[name].dtype),
                             param_sha256(read(lm.model, name)))
                      for name in _deltas(edit) if name not in known and name in params}
        # Triplet requests are audited; edit descriptors (free-text edits of wrapper methods) have no probes.
        records = [audit_record(lm, r, paraphrases=paraphrases, neighbors=neighbors, config=self.audit_config)
                   for r in edit.requests if isinstance(r, EditRequest)]
        without, with_edit = edit_states(edit, lm)

        if records and audited is not None:
            if audited.fingerprint != lm.fingerprint:
                raise LedgerError("the audit passed to record() was made on another model; record without it")
            if any(self.audit_config.thresholds(c.name) != (c.warn, c.refuse) for c in audited.checks.values()):
                raise LedgerError("the audit passed to record() used other thresholds than this ledger's audit "
                                  "config; record without it")
            report = replace(audited, reference="previous state")
            with_edit()
        elif records:
            report = run_audit(lm, {0: records}, to_reference=without, to_edited=with_edit, config=self.audit_config,
                               reference="previous state")[0]
        else:
            log.warning("the edit has no (prompt, subject, target) requests: recorded without an audit")
            report = unaudited_report(lm, self.audit_config)
            with_edit()
        if report.verdict == "refuse" and not force:
            edit.undo()
            log.warning("audit refused the edit (%s); not recorded", ", ".join(report.failing("refuse")))
            return CommitResult(None, report, edit)
        try:
            edit_id = self._commit(lm, edit, report, records, new_params, source)
        except BaseException:
            edit.undo()
            raise
        lm.edits.label(edit, edit_id)
        return CommitResult(edit_id, report, edit)

    def _commit(self, lm: LM, edit: Edit, report: AuditReport, records: Sequence[EvalRecord],
                new_params: dict[str, tuple[tuple[int, ...], str, str]], source: str,
                reason: str = "commit") -> int:
        """Write the patch file, then its row; the row is committed last (see `store` on crashes)."""
        meta = edit.meta
        config = to_dict(meta.config) if isinstance(meta.config, EditorConfig) else meta.config
        base = meta.base_fingerprint or lm.fingerprint
        name = new_patch_name()
        with self.store.write():
            self.store.set_base(base, lm.name)
            path = self.store.begin_patch(name)  # a marker first: a killed write's file is known to be one
            edit.save(path)  # writes a temporary file and renames it into place
            test_pause("patch_saved")
            edit_id = self.store.insert_edit(
                name, kind=meta.kind, method=meta.method, config=config, requests=[r.to_dict() for r in meta.requests],
                base_fingerprint=base, verdict=report.verdict, probes=[record_to_dict(r) for r in records],
                info=meta.info, source=source, new_params=new_params)
            self.store.add_audit(edit_id, reason, report.verdict, report.to_dict())
            test_pause("row_inserted")
        self.store.end_patch(name)
        return edit_id

    def _store_reports(self, reports: dict[int, AuditReport], reason: str) -> None:
        with self.store.write():
            for edit_id, report in reports.items():
                self.store.add_audit(edit_id, reason, report.verdict, report.to_dict())

    # ---- revert, re-apply, audit --------------------------------------------------------------------

    def _set_state(self, edit_id: int, old: str, new: str) -> None:
        with self.store.write() as db:
            changed = db.execute("UPDATE edits SET state = ?, updated = ? WHERE id = ? AND state = ?",
                                 (new, now(), edit_id, old)).rowcount
        if changed != 1:
            raise LedgerError(f"edit {edit_id} is {self.entry(edit_id).state}, not {old}")

    def revert(self, edit_id: int, lm: LM | None = None, *, audit: bool = True) -> RevertResult:
        """Revert one edit among many: `lm` is rebuilt as base + the remaining applied patches, in order.

        Args:
            edit_id: the edit to revert (it stays in the ledger, state "reverted"; `reapply` brings it back).
            lm: the base model; without it only the ledger's record changes (nothing is re-audited).
            audit: re-audit the remaining edits against the base model (`RevertResult.broken` lists
                those that no longer hold).
        """
        row = self.entry(edit_id)
        if row.state != "applied":
            raise LedgerError(f"edit {edit_id} is already reverted")
        remaining = [i for i in self.applied_ids() if i != edit_id]
        if lm is not None:
            self._ensure(lm, remaining)
        self._set_state(edit_id, "applied", "reverted")
        reports = self.reaudit(lm, remaining, reason=f"revert {edit_id}") if lm is not None and audit else {}
        return RevertResult(edit_id, remaining, reports)

    def reapply(self, edit_id: int, lm: LM | None = None, *, audit: bool = True) -> RevertResult:
        """Bring a reverted edit back (at its original place in the order) and re-audit every applied edit."""
        if self.entry(edit_id).state != "reverted":
            raise LedgerError(f"edit {edit_id} is already applied")
        ids = sorted(self.applied_ids() + [edit_id])
        if lm is not None:
            self._ensure(lm, ids)
        self._set_state(edit_id, "reverted", "applied")
        reports = self.reaudit(lm, ids, reason=f"reapply {edit_id}") if lm is not None and audit else {}
        return RevertResult(edit_id, ids, reports)

    def reaudit(self, lm: LM, ids: Sequence[int] | None = None, *, reason: str = "audit") -> dict[int, AuditReport]:
        """Audit applied edits in the ledger's current state against the base model, and store the reports."""
        applied = self.applied_ids()
        ids = applied if ids is None else list(ids)
        if not ids:
            return {}
        records = {i: self.records(i) for i in ids}
        records = {i: r for i, r in records.items() if r}  # edits without triplet requests cannot be audited
        if not records:
            return {}
        reports = run_audit(lm, records, to_reference=lambda: self._ensure(lm, []),
                            to_edited=lambda: self._ensure(lm, applied), config=self.audit_config,
                            reference="base model")
        self._store_reports(reports, reason)
        return reports

    def audit(self, edit_id: int, lm: LM) -> AuditReport:
        """Audit one edit now. Applied: the current state against the base model. Reverted: the current
        state with this edit added on top against the current state (would it hold if re-applied?)."""
        row = self.entry(edit_id)
        if not self.records(edit_id):
            raise LedgerError(f"edit {edit_id} has no (prompt, subject, target) requests: nothing to probe")
        if row.state == "applied":
            return self.reaudit(lm, [edit_id], reason="audit")[edit_id]
        self._ensure(lm, self.applied_ids())
        edit = self.load_edit(edit_id)

        without, with_edit = edit_states(edit, lm)

        try:
            report = run_audit(lm, {edit_id: self.records(edit_id)}, to_reference=without, to_edited=with_edit,
                               config=self.audit_config, reference="previous state")[edit_id]
        finally:
            if edit.is_applied:
                edit.undo()
        self._store_reports({edit_id: report}, "audit (reverted edit)")
        return report

    # ---- shipping and replay (implemented in export.py and replay.py) --------------------------------

    def export_patch(self, file: str | Path) -> Path:
        """Write the applied patches, their requests and audits and the base hash to one file."""
        from lmedit.ledger.export import export_patch

        return export_patch(self, file)

    def import_patch(self, file: str | Path, lm: LM | None = None) -> list[int]:
        """Add the edits of a patch file (from `export_patch`) to this ledger; refuses another base model."""
        from lmedit.ledger.export import import_patch

        return import_patch(self, file, lm)

    def export_model(self, lm: LM, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write base + applied edits as a plain Hugging Face directory (safetensors, config, tokenizer)."""
        from lmedit.ledger.export import export_model

        return export_model(self, lm, out_dir, overwrite=overwrite)

    def replay(self, onto: LM, *, into: str | Path | Ledger | None = None, config_dir: str | Path | None = None,
               force: bool = False) -> ReplayResult:
        """Re-run each applied edit's requests on another model (see `lmedit.ledger.replay.replay`)."""
        from lmedit.ledger.replay import replay

        return replay(self, onto, into=into, config_dir=config_dir, force=force)

