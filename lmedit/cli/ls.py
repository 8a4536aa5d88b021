"""`lmedit ls editors|datasets|models`: what is registered (editing methods, benchmark datasets) and built in."""

from __future__ import annotations

import argparse
import inspect

from lmedit.cli.common import console

WHAT = ("editors", "datasets", "models")

EPILOG = """examples:
  lmedit ls editors      # registered editing methods (--method), with plugins from the lmedit.editors entry points
  lmedit ls datasets     # registered benchmark datasets (--dataset) and where their default file comes from
  lmedit ls models       # built-in models (--model), same as `lmedit models`
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ls", help="list registered editors, datasets or built-in models", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=WHAT, help="what to list")
    p.set_defaults(run=run)


def summary(obj: object) -> str:
    """The first line of an object's docstring (its paper, for editors), or ''."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def run(args: argparse.Namespace) -> int:
    if args.what == "models":
        from lmedit.cli import models

        return models.run(args)
    return _editors() if args.what == "editors" else _datasets()


def _editors() -> int:
    from rich.markup import escape
    from rich.table import Table

    from lmedit.editors import DEFAULT_METHOD
    from lmedit.registry import editors

    table = Table(title="registered editors (--method)")
    for col in ("name", "method", "descriptors", "trainable"):
        table.add_column(col, overflow="fold")
    for name in editors.names():
        cls = editors.get(name)
        trainable = callable(getattr(cls, "fit", None))  # the `Trainable` protocol
        table.add_row(escape(name) + (" (default)" if name == DEFAULT_METHOD else ""), escape(summary(cls)),
                      "yes" if getattr(cls, "accepts_descriptors", False) else "no",
                      "yes (`lmedit train`)" if trainable else "no")
    console.print(table)
    console.print("descriptors: accepts `lmedit edit --descriptor` (edits that are not a subject-relation-object triplet)")
    return 0


def _datasets() -> int:
    from rich.markup import escape
    from rich.table import Table

    from lmedit.registry import datasets

    table = Table(title="registered datasets (--dataset)")
    for col in ("name", "description", "default file"):
        table.add_column(col, overflow="fold")
    for name in datasets.names():
        meta = datasets.meta(name)
        if meta.get("default_path") is not None:
            source = "shipped with lmedit"
        else:
            where = [f"$LMEDIT_DATA/{meta['filename']}"] if meta.get("filename") else []
            where += [meta["url"]] if meta.get("url") else []
            source = " or the cache, else ".join(where) if len(where) > 1 else (where[0] if where else "none: pass --data FILE")
        table.add_row(escape(name), escape(meta.get("description") or summary(datasets.get(name))), escape(source))
    console.print(table)
    return 0
