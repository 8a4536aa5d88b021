"""Arguments and helpers shared by subcommands (model choice, loading with a spinner).

Nothing here imports torch or the library at module level: `lmedit --help` builds every subcommand's
parser from these helpers and must answer at once. The library is imported inside the functions that
run a command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from lmedit.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from lmedit.models.load import LM

console = Console()

__all__ = ["DEFAULT_MODEL", "add_model_args", "console", "escape", "load_model", "progress_reporter", "quiet_transformers"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"built-in name, local HF directory or HF id (default: {DEFAULT_MODEL}; "
                             f"see `lmedit ls models`)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def quiet_transformers() -> None:
    """Turn off transformers' own progress bars (the CLI shows a spinner), which would clutter stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(args: argparse.Namespace) -> LM:
    import lmedit

    quiet_transformers()
    with console.status(f"loading {escape(str(args.model))} ..."):
        return lmedit.load(args.model, device=args.device)


@contextmanager
def progress_reporter() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display fed by (phase, done, total) callbacks, one bar per phase."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bars:
        tasks: dict[str, TaskID] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            bars.update(tasks[phase], completed=done, total=total)

        yield report
