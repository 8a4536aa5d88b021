"""`lmedit train METHOD`: train an editor's learned part on an edit dataset (progress, checkpoints, resume, curve)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import lmedit  # lazy: the library loads when a command runs
from lmedit.cli.common import add_model_args, console, load_model
from lmedit.errors import LMEditError

if TYPE_CHECKING:
    from lmedit.editors.base import TrainEvent

EPILOG = """examples:
  lmedit train mend --model gemma3-270m --config configs/mend/gemma3-270m.yaml --dataset counterfact \\
      --data counterfact-train.json --out runs/mend-gemma3-270m
  lmedit train mend --model gemma3-270m --config configs/mend/gemma3-270m.yaml --dataset counterfact \\
      --data counterfact-train.json --out runs/mend-gemma3-270m --resume
  lmedit train mend --model smollm2-135m --dataset zsre --data zsre_mend_train-1k.json \\
      --out runs/mend-smollm2 --steps 500 --set lr=3e-4 --device cuda
  lmedit train serac --model gemma3-270m --dataset counterfact \\
      --data counterfact-train.json --out runs/serac-gemma3-270m
then edit or evaluate with the trained network (the command prints the setting to use):
  lmedit eval --method mend --set checkpoint=runs/mend-gemma3-270m --dataset starter
  lmedit eval --method serac --set scope_path=runs/serac-gemma3-270m/scope.safetensors --dataset starter
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an editor's learned part (MEND's editor network, SERAC's scope head)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", help="editor to train (the trainable ones: `lmedit ls editors`)")
    add_model_args(p)
    p.set_defaults(device="auto")  # training uses a GPU when there is one
    p.add_argument("--dataset", default="counterfact", help="registered dataset of training edits (default: counterfact)")
    p.add_argument("--data", help="dataset file (for CounterFact: the train split, disjoint from the evaluation split)")
    p.add_argument("--limit", type=int, help="train on the first N valid records only")
    p.add_argument("--val-dataset", help="registered dataset to validate on (default: records held out of --data)")
    p.add_argument("--val-data", help="file of the validation dataset")
    p.add_argument("--exclude", action="append", default=[], metavar="DATASET[=FILE]",
                   help="drop training records whose subject occurs in this dataset (default: the starter set)")
    p.add_argument("--out", required=True, help="output directory: checkpoints, trained weights, curve.json/png")
    p.add_argument("--steps", type=int, help="total training steps (overrides the config's `steps` or `train_steps`)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--config", help="YAML file of the method's settings (configs/<method>/<model>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    p.set_defaults(run=run)


def _exclusions(specs: list[str]) -> list:
    records = []
    for spec in specs or ["starter"]:
        name, _, path = spec.partition("=")
        records.extend(lmedit.eval.load_dataset(name, path or None).records)
    return records


def _steps_field(method: str) -> str:
    """The config field `--steps` sets: `steps` (MEND) or `train_steps` (SERAC)."""
    from lmedit.registry import editors

    names = {f.name for f in dataclasses.fields(editors.get(method).config_class)}
    for name in ("steps", "train_steps"):
        if name in names:
            return name
    raise LMEditError(f"--steps: {method} has no step count setting (`lmedit train {method} --help`, --set KEY=VALUE)")


# `Trainable.fit` options the command passes, and the flag that sets each.
FIT_OPTIONS = {"out_dir": "--out", "exclude": "--exclude", "resume": "--resume", "progress": None}


def _fit_options(editor: Any, method: str, given: set[str]) -> set[str]:
    """The `FIT_OPTIONS` the editor's `fit` accepts; an option the user asked for (`given`) that it does not
    accept is an error (raised before anything loads)."""
    params = inspect.signature(editor.fit).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(FIT_OPTIONS)
    refused = sorted(FIT_OPTIONS[k] or k for k in given if k not in params)
    if refused:
        raise LMEditError(f"{method} training does not take {', '.join(refused)}")
    return {k for k in FIT_OPTIONS if k in params}


def run(args: argparse.Namespace) -> int:
    from lmedit.editors import get_editor
    from lmedit.editors.base import Trainable

    overrides = list(args.set) + ([f"{_steps_field(args.method)}={args.steps}"] if args.steps is not None else [])
    editor = get_editor(args.method, args.config, overrides)
    if not isinstance(editor, Trainable):
        raise LMEditError(f"{args.method!r} has nothing to train (the trainable editors: `lmedit ls editors`)")
    given = {"out_dir"} | ({"resume"} if args.resume else set()) | ({"exclude"} if args.exclude else set())
    accepted = _fit_options(editor, args.method, given)
    train = lmedit.eval.load_dataset(args.dataset, args.data, limit=args.limit)
    held_out = lmedit.eval.load_dataset(args.val_dataset, args.val_data).records if args.val_dataset else []
    exclude = _exclusions(args.exclude)
    lm = load_model(args)
    console.print(f"training {args.method} for {lm.name} ({lm.device}) on {len(train.records)} {train.name} records "
                  f"-> {args.out}", markup=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                  console=console, transient=False) as bar:
        task = bar.add_task(args.method, total=None, metrics="")

        def on_step(event: TrainEvent) -> None:
            shown = "  ".join(f"{k} {v:.3g}" for k, v in event.metrics.items() if not math.isnan(v))
            bar.update(task, completed=event.step, total=event.total, metrics=shown)

        options = dict(out_dir=args.out, exclude=exclude, resume=args.resume, progress=on_step)
        summary = editor.fit(lm, train.records, held_out=held_out, **{k: v for k, v in options.items() if k in accepted})
    _print_summary(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    curve = f"   curve: {summary['curve']}" if summary.get("curve") else ""
    console.print(f"trained network: {summary.get('network', out)}{curve}", markup=False)
    console.print(f"use it: lmedit eval --method {args.method} --set {summary.get('setting', f'checkpoint={out}')} "
                  f"--dataset starter", markup=False)
    return 0


def _print_summary(summary: dict) -> None:
    first, last = summary.get("initial") or {}, summary.get("final") or {}
    if not last:
        return
    table = Table(title=f"validation, step 0 → step {summary.get('steps')}")
    table.add_column("metric")
    table.add_column("start")
    table.add_column("end")
    for key in last:
        if isinstance(last[key], int | float):
            table.add_row(escape(key), f"{first.get(key, float('nan')):.4g}", f"{last[key]:.4g}")
    console.print(table)
