"""`lmedit` command: dispatches to one module per subcommand (lm-eval `_cli/` style).

Each subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. The CLI is a thin layer
over the public API (`lmedit.load`, `lmedit.edit`, `lmedit.trace`, ...): it parses, calls, renders.
Building the parser imports no torch (subcommand modules import the library inside `run`), so `--help`
and `--version` answer at once.

A user's mistake (an `LMEditError`: bad config, unknown method, missing file, unavailable device, ...)
prints one line `error: <message>` on stderr and exits with status 2; `--debug` shows the traceback
instead. Anything else is a bug in lmedit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module
from typing import NoReturn

from lmedit.errors import LMEditError

SUBCOMMANDS = ("models", "ls", "generate", "edit", "trace", "eval", "train", "ledger", "audit", "export_model",
               "neurons", "serve")
USAGE_ERROR = 2


def one_line(message: str) -> str:
    """A message on one line: lines joined with '; ' (or a space after a colon), surrounding space dropped."""
    out = ""
    for line in (part.strip() for part in str(message).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def print_error(message: str) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: ... (see `lmedit edit --help`)`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see `{self.prog} --help`)")
        self.exit(USAGE_ERROR)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmedit")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lmedit", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="locate, edit, evaluate and keep edits of what a language model knows",
                            epilog="`lmedit COMMAND --help` describes a command; `lmedit ls editors` lists the methods.")
    parser.add_argument("--version", action="version", version=f"lmedit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        import_module(f"lmedit.cli.{name}").add_parser(subparsers)
    _add_debug(subparsers)
    return parser


def _add_debug(subparsers: argparse._SubParsersAction) -> None:
    """`--debug` after the command too (`lmedit edit ... --debug`), on every subcommand and sub-subcommand.

    SUPPRESS as default: a subcommand's default would otherwise overwrite the top-level flag's value.
    """
    for sub in set(subparsers.choices.values()):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error instead of one line")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USAGE_ERROR)
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except LMEditError as exc:
        if args.debug:
            raise
        print_error(str(exc))
        return USAGE_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
