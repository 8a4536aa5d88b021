"""`lmedit models`: the built-in models, whether their packages are installed and their weights cached."""

from __future__ import annotations

import argparse

from lmedit.cli.common import console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list built-in models and their cache state (same as `lmedit ls models`)",
                              epilog="example: lmedit models", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    from rich.markup import escape
    from rich.table import Table

    from lmedit.models.load import BUILTIN_MODELS, DEFAULT_MODEL, cache_dir, is_cached

    table = Table(title=f"built-in models (cache: {escape(str(cache_dir() / 'models'))})")
    for col in ("name", "description", "package", "cached"):
        table.add_column(col)
    for name, spec in BUILTIN_MODELS.items():
        installed = find_spec(spec.package) is not None
        state = "yes" if is_cached(name) else ("no (converted on first load)" if installed else f"missing: {spec.install}")
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), escape(spec.description),
                      spec.package if installed else "not installed", escape(state))
    console.print(table)
    console.print("Any local Hugging Face directory or HF model id (in the local HF cache) also works with --model.")
    return 0
