"""`lmedit audit ID`: print an edit's audit report (the latest, or a fresh one) and draw its plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from lmedit.cli.common import console
from lmedit.cli.ledger_common import add_audit_args, add_ledger_arg, add_model_arg, describe, load_base, open_ledger, render_report

EPILOG = """examples:
  lmedit audit 1 --ledger ledgers/gemma                      # the latest stored report, and its plot
  lmedit audit 1 --ledger ledgers/gemma --rerun              # audit again in the ledger's current state
  lmedit audit 3 --ledger ledgers/gemma --rerun --audit-set neighborhood_refuse=0.9 --plot eiffel.png
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="an edit's hazard checks (efficacy, neighbours, Specificity+, drift...)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", type=int, help="edit id (`lmedit ledger list`)")
    add_ledger_arg(p)
    add_model_arg(p)
    add_audit_args(p)
    p.add_argument("--rerun", action="store_true",
                   help="measure again (applied edit: current state vs base model; reverted: as if re-applied)")
    p.add_argument("--plot", metavar="FILE", help="where to write the PNG (default: <ledger>/audits/edit-<id>.png)")
    p.add_argument("--probes", action="store_true", help="also list every probe's margin before and after")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmedit.errors import LMEditError
    from lmedit.ledger.plots import plot_report

    ledger = open_ledger(args)
    row = ledger.entry(args.id)
    if args.rerun:
        lm = load_base(args, ledger)
        with console.status(f"auditing edit {args.id} ..."):
            report = ledger.audit(args.id, lm)
    else:
        report = ledger.latest_report(args.id)
        if report is None:
            raise LMEditError(f"edit {args.id} has no stored audit; run `lmedit audit {args.id} --rerun`")
    console.print(f"[bold]edit {row.id}[/] ({escape(row.state)}): {escape(describe(row.requests))}")
    render_report(report, f"audit of edit {row.id}")
    if args.probes:
        for p in report.probes:
            console.print(f"  {p['group']:>17}  {p['before']:+7.2f} → {p['after']:+7.2f}  {p['prompt']} "
                          f"[{p['target']} vs {p['foil']}]", markup=False, highlight=False)
    path = Path(args.plot) if args.plot else ledger.path / "audits" / f"edit-{row.id}.png"
    plot_report(report, path, title=f"edit {row.id}: {describe(row.requests)} — {report.verdict}")
    console.print(f"plot written to {escape(str(path))}")
    return 0
