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

__all__ = ["DEFAULT_MODEL", "add_dtype_arg", "add_model_args", "console", "escape", "add_worker_args", "check_worker_args", "load_model", "placement_args",
           "progress_reporter", "quiet_transformers"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # lmedit.models.load.DTYPES, named here without importing torch


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"built-in name, local HF directory or HF id (default: {DEFAULT_MODEL}; "
                             f"see `lmedit ls models`)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    add_dtype_arg(parser)
    parser.add_argument("--device-map", default=None, metavar="auto|JSON",
                        help="place blocks across GPUs, CPU and disk with accelerate instead of --device: 'auto', or "
                             'a JSON object of module name -> device, e.g. \'{"model.layers.0": "cuda:0", ...}\'')
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map auto: memory per device, e.g. 0=20GiB,cpu=60GiB")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --device-map: where accelerate keeps disk-offloaded weights it has to write")


def placement_args(args: argparse.Namespace) -> dict:
    """`lmedit.load`'s placement keywords from --device / --device-map / --max-memory / --offload-folder.

    Raises:
        DeviceError: a malformed --device-map or --max-memory, or --device together with --device-map.
    """
    import json

    from lmedit.errors import DeviceError

    device_map = getattr(args, "device_map", None)
    max_memory = getattr(args, "max_memory", None)
    folder = getattr(args, "offload_folder", None)
    if device_map is None:
        if max_memory is not None or folder is not None:
            raise DeviceError("--max-memory and --offload-folder go with --device-map")
        return {"device": args.device}
    if args.device != "cpu":
        raise DeviceError("give --device or --device-map, not both (--device-map places the blocks itself)")
    if device_map != "auto":
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise DeviceError(f"--device-map {device_map!r}: expected 'auto' or a JSON object ({exc.msg})") from None
        if not isinstance(device_map, dict) or not all(isinstance(v, str | int) for v in device_map.values()):
            raise DeviceError("--device-map: expected a JSON object of module name -> device (\"cuda:0\", \"cpu\", "
                              "\"disk\" or a GPU index)")
    memory = None
    if max_memory is not None:
        memory = {}
        for part in max_memory.split(","):
            key, sep, size = part.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise DeviceError(f"--max-memory {max_memory!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
            key = key.strip()
            memory[int(key) if key.isdigit() else key] = size.strip()
    return {"device_map": device_map, "max_memory": memory, "offload_folder": folder}


def add_worker_args(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    """--workers / --ray-address / --worker-threads: `what` runs on Ray workers (`lmedit.parallel`)."""
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help=f"run {what} on N Ray workers, each loading the model once; same results and files as "
                             f"without{note} (needs pip install 'lmedit[ray]')")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="with --workers: join this Ray cluster (e.g. auto, ray://host:10001) instead of starting "
                             "a local Ray instance")
    parser.add_argument("--worker-threads", type=int, default=1, metavar="T",
                        help="with --workers: torch threads per worker (default 1)")


def check_worker_args(args: argparse.Namespace, refuse: str | None = None) -> None:
    """--workers / --ray-address / --worker-threads mistakes, and a missing Ray, before anything loads.

    `refuse`: why this invocation cannot run on workers (None: it can); said only when --workers is given.
    """
    from lmedit.errors import LMEditError

    if args.workers < 0 or args.worker_threads < 1:
        raise LMEditError("--workers must be 0 or more and --worker-threads 1 or more")
    if not args.workers:
        if args.ray_address:
            raise LMEditError("--ray-address goes with --workers N (the number of Ray workers to run)")
        return
    if refuse:
        raise LMEditError(refuse)
    from lmedit.parallel import require_ray

    require_ray()


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, the parameter dtype a model is loaded in (checked when it loads: `lmedit.models.load.resolve_dtype`)."""
    parser.add_argument("--dtype", default="float32", metavar="{" + ",".join(DTYPE_NAMES) + "}",
                        help="parameter dtype to load the model in (default: float32); editing maths runs in "
                             "float32/float64 and is written back in this dtype")


def quiet_transformers() -> None:
    """Turn off transformers' own progress bars (the CLI shows a spinner), which would clutter stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(args: argparse.Namespace) -> LM:
    import lmedit

    quiet_transformers()
    with console.status(f"loading {escape(str(args.model))} ..."):
        return lmedit.load(args.model, dtype=getattr(args, "dtype", None) or "float32", **placement_args(args))


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
