"""`lmedit ledger …`: list, show, revert, re-apply, export, import and replay the edits kept in a ledger."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich.markup import escape

from lmedit.cli.common import add_dtype_arg, console
from lmedit.cli.ledger_common import (add_audit_args, add_ledger_arg, add_model_arg, describe, fmt, load_base, open_ledger,
                                render_reaudit, render_report, render_rows, styled)

if TYPE_CHECKING:
    from lmedit.ledger import Ledger

EPILOG = """examples:
  lmedit edit --ledger ledgers/gemma --config configs/rome/gemma3-270m.yaml --prompt "{} is located in the city of" \\
      --subject "The Eiffel Tower" --target-new Rome --target-true Paris
  lmedit ledger list --ledger ledgers/gemma
  lmedit ledger show 2 --ledger ledgers/gemma
  lmedit ledger revert 2 --ledger ledgers/gemma          # rebuilt from the base, remaining edits re-audited
  lmedit ledger apply 2 --ledger ledgers/gemma           # bring a reverted edit back
  lmedit ledger apply --ledger ledgers/gemma --generate "The Eiffel Tower is located in the city of"
  lmedit ledger export --ledger ledgers/gemma --patch edits.lmpatch
  lmedit ledger import edits.lmpatch --ledger ledgers/gemma-copy
  lmedit ledger replay --ledger ledgers/gemma --onto smollm2-135m --into ledgers/smollm
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ledger", help="keep, revert, ship and replay edits (see docs/ledger.md)", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ledger_command", required=True, metavar="SUBCOMMAND")

    def command(name: str, help_text: str, run, *, model: bool = False, audit: bool = False):
        q = sub.add_parser(name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_ledger_arg(q)
        if model:
            add_model_arg(q)
        if audit:
            add_audit_args(q)
        q.set_defaults(run=run)
        return q

    command("list", "the recorded edits, in order", run_list).add_argument(
        "--state", choices=("applied", "reverted"), help="only edits in this state")
    command("show", "one edit: requests, method, patch, audits", run_show).add_argument(
        "id", type=int, help="edit id (`lmedit ledger list`)")
    q = command("revert", "revert one edit: rebuild base + the remaining patches, re-audit them", run_revert,
                model=True, audit=True)
    q.add_argument("id", type=int, help="edit id (`lmedit ledger list`)")
    q.add_argument("--no-audit", action="store_true", help="only mark it reverted (no model is loaded)")
    q = command("apply", "re-apply reverted edits (with IDs), or check that every applied patch applies", run_apply,
                model=True, audit=True)
    q.add_argument("ids", type=int, nargs="*", metavar="ID")
    q.add_argument("--generate", action="append", default=[], metavar="PROMPT",
                   help="continue this prompt with the edited model")
    q.add_argument("--max-new-tokens", type=int, default=12)
    command("export", "write the applied patches and the base hash to one file", run_export).add_argument(
        "--patch", required=True, metavar="FILE", help="the patch file to write")
    q = command("import", "add a patch file's edits (same base model only)", run_import, model=True)
    q.add_argument("file", help="a patch file from `lmedit ledger export`")
    q.set_defaults(create_ledger=True)  # importing into a new directory makes a copy of a ledger
    q = command("replay", "re-run the requests on another model and audit them", run_replay, audit=True)
    q.add_argument("--onto", required=True, metavar="MODEL", help="the other model (built-in name, directory, HF id)")
    q.add_argument("--into", metavar="PATH", help="ledger that receives the replayed edits (default: report only)")
    q.add_argument("--config-dir", metavar="DIR", help="where <method>/<model name>.yaml settings are looked up (default: the settings lmedit ships for the model)")
    q.add_argument("--force", action="store_true", help="record replayed edits even when the audit gate refuses them")
    q.add_argument("--device", default="cpu")
    add_dtype_arg(q)


def _require(ledger: Ledger) -> None:
    from lmedit.errors import LMEditError

    if ledger.base_fingerprint is None:
        raise LMEditError(f"the ledger {ledger.path} holds no edits yet (record one with `lmedit edit --ledger`)")


def run_list(args: argparse.Namespace) -> int:
    ledger = open_ledger(args)
    rows = ledger.entries(args.state)
    base = f"{ledger.model} (hash {ledger.base_fingerprint})" if ledger.base_fingerprint else "no base model yet"
    render_rows(rows, f"ledger {ledger.path}: {base}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    ledger = open_ledger(args)
    row = ledger.entry(args.id)
    console.print(f"[bold]edit {row.id}[/] " + escape(f"({row.state}, {row.kind} edit by {row.method}, source {row.source})"))
    console.print(describe(row.requests), markup=False, highlight=False)
    console.print(f"created {row.created}, updated {row.updated}; base {row.base_fingerprint}", markup=False)
    console.print(f"patch {ledger.store.patch_path(row.patch, row.id)} ({row.patch_bytes:,} bytes, sha256 {row.patch_sha256[:16]}…)",
                  markup=False)
    console.print(f"config {json.dumps(row.config)}", markup=False)
    info = {k: v for k, v in row.info.items() if k != "requests"}
    if info:
        console.print(f"info {json.dumps(info, default=str)}", markup=False)
    for reason, report in ledger.reports(row.id):
        console.print(f"  audit ({escape(str(reason))}, {escape(str(report.created))}): {styled(report.verdict)} "
                      f"{escape(', '.join(report.failing()))}")
    report = ledger.latest_report(row.id)
    if report is not None:
        render_report(report, f"latest audit of edit {row.id}")
    return 0


def run_revert(args: argparse.Namespace) -> int:
    ledger = open_ledger(args)
    _require(ledger)
    lm = None if args.no_audit else load_base(args, ledger)
    with console.status(f"reverting edit {args.id} ..."):
        result = ledger.revert(args.id, lm, audit=not args.no_audit)
    console.print(f"edit {args.id} reverted; {len(result.remaining)} edit(s) remain applied: {result.remaining}",
                  markup=False)
    if result.reports:
        render_reaudit(ledger, result.reports, "remaining edits re-audited against the base model")
    if result.broken:
        console.print(f"[bold red]no longer hold:[/] {escape(str(result.broken))}")
    elif lm is not None and result.remaining:
        console.print("every remaining edit still holds")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from lmedit.models.load import weights_fingerprint
    from lmedit.scoring import generate

    ledger = open_ledger(args)
    _require(ledger)
    lm = load_base(args, ledger)
    for edit_id in args.ids:
        with console.status(f"re-applying edit {edit_id} ..."):
            result = ledger.reapply(edit_id, lm)
        console.print(f"edit {edit_id} applied again")
        render_reaudit(ledger, result.reports, "applied edits re-audited against the base model")
    ids = ledger.apply(lm)
    console.print(f"{len(ids)} edit(s) {ids} apply to {lm.name} (base {ledger.base_fingerprint}); edited weights hash "
                  f"{weights_fingerprint(lm.model)}", markup=False)
    for prompt, text in zip(args.generate, generate(lm, args.generate, max_new_tokens=args.max_new_tokens)
                            if args.generate else []):
        console.print(f"[bold]{escape(prompt)}[/]{escape(text)}", highlight=False)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from lmedit.ledger.export import read_manifest

    ledger = open_ledger(args)
    path = ledger.export_patch(args.patch)
    manifest = read_manifest(path)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes): {len(manifest['edits'])} applied edit(s) of "
                  f"{manifest['model']} (base hash {manifest['base_fingerprint']})", markup=False)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from lmedit.ledger.export import read_manifest

    manifest = read_manifest(args.file)
    ledger = open_ledger(args)
    lm = load_base(args, ledger, args.model or ledger.model or manifest.get("model"))
    with console.status(f"importing {escape(str(args.file))} ..."):
        ids = ledger.import_patch(args.file, lm)
    skipped = len(manifest["edits"]) - len(ids)
    console.print(f"imported {len(ids)} edit(s) as {ids}" + (f" ({skipped} already in the ledger)" if skipped else "")
                  + f"; {len(ledger.applied_ids())} applied to {lm.name} (base {ledger.base_fingerprint}) in {ledger.path}",
                  markup=False)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from rich.table import Table

    ledger = open_ledger(args)
    _require(ledger)
    onto = load_base(args, None, args.onto)
    with console.status(f"replaying {len(ledger.applied_ids())} edit(s) onto {escape(onto.name)} ..."):
        result = ledger.replay(onto, into=args.into, config_dir=args.config_dir, force=args.force)
    table = Table(title=escape(f"replay of {ledger.path} ({ledger.model}) onto {onto.name}"
                               + (f", recorded in {result.into}" if result.into else "")))
    for col in ("id", "request", "settings", "result", "verdict", "efficacy", "paraphrase", "neighborhood",
                "new id", "why"):
        table.add_column(col, overflow="fold")
    for item in result.items:
        checks = item.report.checks if item.report else {}
        table.add_row(str(item.source_id), escape(describe(item.requests)), escape(str(item.settings)),
                      "[green]carried over[/]" if item.carried_over else "[bold red]failed[/]",
                      styled(item.report.verdict if item.report else None),
                      *(fmt(checks[name].value) if name in checks else "n/a"
                        for name in ("efficacy", "paraphrase", "neighborhood")),
                      str(item.new_id) if item.new_id is not None else "-", escape(item.message or "-"))
    console.print(table)
    console.print(f"{len(result.carried_over)} of {len(result.items)} edit(s) carried over to {onto.name}", markup=False)
    return 0

