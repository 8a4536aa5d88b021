"""The edit ledger: a SQLite record per base model of every edit's request, method, patch and audits.

    ledger = lmedit.Ledger("ledgers/gemma")
    result = ledger.edit(lm, request, method="rome")      # audited; recorded unless the gate refuses
    ledger.revert(result.edit_id, lm)                      # base + remaining patches, rebuilt and re-audited
    audit_edit(lm, edit)                                   # the gate's checks on an edit outside any ledger

Modules: store (SQLite schema, WAL, transactions, patch files), ledger (`Ledger`), probes (audit probes
generated from a request), audit (the gate: checks, thresholds, verdicts), plots (a figure per audit),
export (patch files and plain HF model directories), replay (re-running requests on another model).
See docs/ledger.md for a walk-through with the CLI.
"""

from lmedit.ledger.audit import AuditConfig, AuditReport, audit_edit, audit_edits, audit_record
from lmedit.ledger.ledger import CommitResult, Ledger, RevertResult
from lmedit.ledger.replay import ReplayResult
from lmedit.ledger.store import LedgerError

__all__ = ["AuditConfig", "AuditReport", "CommitResult", "Ledger", "LedgerError", "ReplayResult", "RevertResult",
           "audit_edit", "audit_edits", "audit_record"]
