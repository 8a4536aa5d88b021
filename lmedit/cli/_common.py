"""Arguments and helpers shared by subcommands (model choice, loading with a spinner)."""

from __future__ import annotations

import argparse

from rich.console import Console

import lmedit
from lmedit.models.load import DEFAULT_MODEL, LM

console = Console()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"built-in name, local HF directory or HF id (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def load_model(args: argparse.Namespace) -> LM:
    with console.status(f"loading {args.model} ..."):
        return lmedit.load(args.model, device=args.device)
