"""`lmedit` command: dispatches to one module per subcommand (lm-eval `_cli/` style).

Each subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. The CLI is a thin layer
over the public API (`lmedit.load`, `lmedit.edit`, `lmedit.trace`, ...): it parses, calls, renders.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from rich.console import Console
from rich.logging import RichHandler

from lmedit.errors import LMEditError

SUBCOMMANDS = ("models", "generate", "edit", "trace", "eval", "train", "ledger", "audit", "export_model", "neurons")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmedit", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        import_module(f"lmedit.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except (LMEditError, KeyError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc.args[0] if exc.args else exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
