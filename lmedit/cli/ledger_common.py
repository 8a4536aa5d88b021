"""Helpers shared by the ledger commands (`lmedit ledger …`, `lmedit audit`, `lmedit export-model`, `lmedit edit --ledger`).

Parsers are built without importing the library (see `_common`); the ledger code is imported when a
command runs. Text from the ledger (requests, model names, paths) is escaped before rich renders it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from lmedit.cli.common import add_dtype_arg, console, quiet_transformers
from lmedit.defaults import DEFAULT_MODEL
from lmedit.types import describe_stored

if TYPE_CHECKING:
    from lmedit.editors import Edit
    from lmedit.ledger import AuditConfig, AuditReport, Ledger
    from lmedit.ledger.store import EditRow
    from lmedit.models.load import LM

DEFAULT_LEDGER = "lmedit-ledger"
LEVEL_STYLE = {"keep": "green", "warn": "yellow", "refuse": "bold red", "unaudited": "dim", None: "dim"}


def add_ledger_arg(parser: argparse.ArgumentParser, *, required_default: bool = True) -> None:
    """`--ledger PATH`. With `required_default` (ledger commands) the ledger must exist; without it
    (`lmedit edit --ledger`) the option is off by default and creates the ledger it names."""
    default = os.environ.get("LMEDIT_LEDGER", DEFAULT_LEDGER) if required_default else None
    parser.add_argument("--ledger", "-l", default=default, metavar="PATH",
                        help=f"ledger directory (default: $LMEDIT_LEDGER or ./{DEFAULT_LEDGER})" if required_default
                        else "record the edit in this ledger directory (audited first; refused edits are not kept)")
    parser.set_defaults(create_ledger=not required_default)


def add_audit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit-config", metavar="FILE", help="YAML file of audit thresholds (AuditConfig fields)")
    parser.add_argument("--audit-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one audit threshold, e.g. neighborhood_refuse=0.8 (null: never)")


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="the base model (default: the one the ledger was made with)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    add_dtype_arg(parser)


def audit_config(args: argparse.Namespace) -> AuditConfig:
    from lmedit.config import load_config
    from lmedit.ledger import AuditConfig

    return load_config(AuditConfig, getattr(args, "audit_config", None), getattr(args, "audit_set", None))


def open_ledger(args: argparse.Namespace) -> Ledger:
    """The ledger `--ledger` names; it must already exist unless the command creates ledgers.

    Raises:
        MissingFileError: no such directory (so a typo does not create an empty ledger).
        InputFileError: a directory that is not a ledger.
    """
    from lmedit.errors import InputFileError, MissingFileError
    from lmedit.ledger import Ledger
    from lmedit.ledger.store import DB_NAME, preflight

    path = Path(args.ledger).expanduser()
    preflight(path)  # a damaged ledger (patches but no usable ledger.sqlite) is refused with how to recover
    if not getattr(args, "create_ledger", False):
        if not path.exists():
            raise MissingFileError(f"ledger {path} does not exist (`lmedit edit --ledger {path} ...` creates one; "
                                   f"--ledger or $LMEDIT_LEDGER names it)")
        if path.is_dir() and not (path / DB_NAME).exists():
            raise InputFileError(f"{path} is not a ledger: it has no {DB_NAME}")
    return Ledger(path, audit_config=audit_config(args))


def load_base(args: argparse.Namespace, ledger: Ledger | None = None, model: str | None = None) -> LM:
    import lmedit

    name = model or getattr(args, "model", None) or (ledger.model if ledger else None) or DEFAULT_MODEL
    quiet_transformers()
    with console.status(f"loading {escape(str(name))} ..."):
        return lmedit.load(name, device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", None) or "float32")


def describe(requests: list[dict]) -> str:
    """One line per request: `subject: prompt → new (was old)` (plain text: escape it before rich renders it)."""
    return "\n".join(describe_stored(r) for r in requests)


def styled(level: str | None) -> str:
    return f"[{LEVEL_STYLE.get(level, '')}]{escape(level or 'n/a')}[/]"


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_report(report: AuditReport, title: str) -> None:
    from rich.table import Table

    table = Table(title=f"{escape(title)}: {styled(report.verdict)} "
                        f"(edited vs {escape(str(report.reference))}, {escape(str(report.model))})")
    for col in ("check", "edited", report.reference, "warn", "refuse", "level"):
        table.add_column(escape(str(col)))
    for check in report.checks.values():
        table.add_row(escape(check.name), fmt(check.value), fmt(check.reference), fmt(check.warn), fmt(check.refuse),
                      styled(check.level))
    console.print(table)


def render_rows(rows: list[EditRow], title: str) -> None:
    from rich.table import Table

    table = Table(title=escape(title))
    for col in ("id", "state", "verdict", "method", "kind", "request", "created"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r.id), escape(r.state), styled(r.verdict), escape(r.method), escape(r.kind),
                      escape(describe(r.requests)), escape(str(r.created)))
    console.print(table)


def render_reaudit(ledger: Ledger, reports: dict[int, AuditReport], title: str) -> None:
    from rich.table import Table

    table = Table(title=escape(title))
    for col in ("id", "request", "verdict", "holds", "efficacy", "paraphrase", "neighborhood", "warn/refuse checks"):
        table.add_column(col, overflow="fold")
    for edit_id, report in reports.items():
        c = report.checks
        table.add_row(str(edit_id), escape(describe(ledger.entry(edit_id).requests)), styled(report.verdict),
                      "yes" if report.holds else "[bold red]no[/]", fmt(c["efficacy"].value), fmt(c["paraphrase"].value),
                      fmt(c["neighborhood"].value), escape(", ".join(report.failing()) or "-"))
    console.print(table)


def record_edit(args: argparse.Namespace, ledger: Ledger, lm: LM, edit: Edit) -> bool:
    """`lmedit edit --ledger`: audit `edit` and record it unless refused. Returns whether it was recorded (applied)."""
    from lmedit.errors import RequestError

    neighbors = []
    for item in args.neighbor:
        prompt, sep, answer = item.rpartition("=")
        if not sep or not prompt.strip() or not answer.strip():
            raise RequestError(f"--neighbor takes PROMPT=ANSWER, got {item!r}")
        neighbors.append((prompt.strip(), answer.strip()))
    with console.status("auditing the edit ..."):
        commit = ledger.record(lm, edit, force=args.force, paraphrases=args.paraphrase, neighbors=neighbors)
    render_report(commit.report, "audit")
    if not commit.recorded:
        console.print(f"[bold red]refused by the audit gate[/] ({escape(', '.join(commit.report.failing('refuse')))}): "
                      f"not recorded, the model is unchanged; --force records it anyway")
        return False
    path = escape(str(ledger.path))
    console.print(f"recorded as edit {commit.edit_id} in {path} "
                  f"({len(ledger.applied_ids())} applied; `lmedit ledger list --ledger {path}`)")
    return True
