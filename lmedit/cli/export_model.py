"""`lmedit export-model DIR`: write the base model plus a ledger's applied edits as a plain Hugging Face directory."""

from __future__ import annotations

import argparse

from rich.markup import escape

from lmedit.cli.common import console
from lmedit.cli.ledger_common import add_ledger_arg, add_model_arg, load_base, open_ledger

EPILOG = """examples:
  lmedit export-model gemma-edited/ --ledger ledgers/gemma
  python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('gemma-edited')"
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-model", help="write base + applied ledger edits as an HF model directory",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="output directory (must be empty or missing, unless --overwrite)")
    add_ledger_arg(p)
    add_model_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmedit.errors import LMEditError

    ledger = open_ledger(args)
    if ledger.base_fingerprint is None:
        raise LMEditError(f"the ledger {ledger.path} holds no edits to export")
    lm = load_base(args, ledger)
    with console.status(f"writing {escape(str(args.dir))} ..."):
        out = ledger.export_model(lm, args.dir, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    console.print(f"wrote {out} ({size / 1e6:,.1f} MB): {lm.name} + {len(ledger.applied_ids())} edit(s) "
                  f"{ledger.applied_ids()}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})",
                  markup=False)
    return 0
