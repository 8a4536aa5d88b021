"""`lmedit eval`: evaluate editing methods on a dataset beside the unedited model; write JSONL, summary, report, plots."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import lmedit  # lazy: the library loads when a command runs
from lmedit.cli.common import add_model_args, add_worker_args, check_worker_args, console, load_model
from lmedit.errors import LMEditError

if TYPE_CHECKING:
    from lmedit.eval import ProgressEvent

EPILOG = """examples:
  lmedit eval --method rome --dataset counterfact --data counterfact-edit.json --limit 100
  lmedit eval --method rome --method noop --dataset starter --limit 20 --generation 40
  lmedit eval --method rome --dataset starter --mode sequential --limit 50 --checkpoint-every 10 --out runs/seq
  lmedit eval --method memit --config configs/memit/gemma3-270m.yaml --dataset counterfact --mode batch --batch-size 1000 --limit 1000
  lmedit eval --method rome --dataset counterfact --limit 100 --out runs/cf --resume
  lmedit eval --method rome --dataset counterfact --limit 400 --workers 4      # 4 Ray workers (pip install 'lmedit[ray]')
  lmedit eval --method rome --dataset counterfact --limit 400 --workers 16 --ray-address auto   # a running cluster
  lmedit eval --report-only runs/cf/rome-single runs/cf/noop-single --out runs/cf
"""

HEADLINE = ("efficacy_score", "paraphrase_score", "neighborhood_score", "specificity_plus_score", "neighborhood_kl",
            "efficacy_acc", "fluency")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate editing methods on a benchmark", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", action="append", default=[],
                   help="editor to evaluate; repeat to compare (registered: `lmedit ls editors`)")
    p.add_argument("--dataset", default="starter",
                   help="registered dataset (default: starter; the registered ones: `lmedit ls datasets`)")
    p.add_argument("--data", help="dataset file or URL (default: the dataset's packaged or cached file)")
    p.add_argument("--limit", type=int, help="evaluate the first N valid records")
    p.add_argument("--mode", choices=("single", "batch", "sequential"), default="single")
    p.add_argument("--batch-size", type=int, default=10, help="batch mode: records edited together")
    p.add_argument("--checkpoint-every", type=int, default=0, help="sequential: re-measure every K edits (0: ~10 checkpoints)")
    p.add_argument("--n-drift", type=int, default=20, help="sequential: unrelated records measured for drift")
    p.add_argument("--disabling-rise", type=float, default=0.1, metavar="NATS",
                   help="sequential: flag an edit that raises the probe-text loss by more than NATS per token")
    p.add_argument("--refuse-disabling", action="store_true", help="sequential: undo and skip flagged edits")
    p.add_argument("--generation", type=int, default=16, metavar="TOKENS",
                   help="tokens generated from each edit prompt, paraphrase and generation prompt for fluency, "
                        "derailment and consistency (default 16; 0: off)")
    p.add_argument("--config", help="YAML file of the method's settings (one --method only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one method config field")
    p.add_argument("--out", help="output directory (default: runs/eval-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first invalid dataset record instead of skipping it with a warning")
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR", help="earlier run directories to add to the report")
    p.add_argument("--report-only", nargs="+", metavar="RUN_DIR", help="only write a report from existing run directories")
    add_worker_args(p, "the records (batch mode: the batches)", "; not for sequential mode")
    p.set_defaults(run=run)


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _print_table(summaries: list[dict]) -> None:
    table = Table(title="mean [95% interval]")
    table.add_column("")
    table.add_column("Score")
    first = summaries[0]
    shown = [n for n in HEADLINE if any(s["edited"]["metrics"].get(n, {}).get("n") for s in summaries)]
    for name in shown:
        meta = first["metrics"][name]
        table.add_column(escape(f"{meta['label']} {'↑' if meta['higher_is_better'] else '↓'}"))

    def cell(stats: dict) -> str:
        return "–" if not stats or stats.get("mean") is None else f"{stats['mean']:.3f} [{stats['lo']:.2f}, {stats['hi']:.2f}]"

    rows = [("unedited", first["unedited"])] + [(s["run"]["method"], s["edited"]) for s in summaries]
    for label, state in rows:
        table.add_row(escape(str(label)), cell(state["score"]), *[cell(state["metrics"].get(n, {})) for n in shown])
    console.print(table)


def _load_dataset(args: argparse.Namespace) -> lmedit.eval.Dataset:
    """The dataset, read before any model loads; each skipped record is one `warning:` line on stderr."""
    from lmedit.eval.datasets import DatasetWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)  # printed below, without Python's source line
        dataset = lmedit.eval.load_dataset(args.dataset, args.data, strict=args.strict)
    shown = 10
    for issue in dataset.issues[:shown]:
        print(f"warning: skipping {issue}", file=sys.stderr)
    if len(dataset.issues) > shown:
        print(f"warning: skipping {len(dataset.issues) - shown} more invalid record(s) (each run's skipped.jsonl "
              "lists them all; --strict fails on the first)", file=sys.stderr)
    return dataset


def _check_workers(args: argparse.Namespace) -> None:
    """--workers / --ray-address mistakes, and a missing Ray, before the dataset or the model loads."""
    check_worker_args(args, None if args.mode != "sequential" else
                      "--workers cannot run --mode sequential: sequential edits depend on each other (each is made "
                      "on the model the earlier ones edited); use --mode single or batch, or no --workers")


def run(args: argparse.Namespace) -> int:
    from lmedit.eval import EvalConfig
    from lmedit.eval.report import write_report

    out = Path(args.out or f"runs/eval-{args.dataset}")
    if args.report_only:
        paths = write_report(args.report_only, out)
        console.print(f"report: {paths['markdown']}  {paths['html']}", markup=False)
        return 0
    if not args.method:
        raise LMEditError("give at least one --method (see `lmedit ls editors`)")
    if (args.config or args.set) and len(args.method) > 1:
        raise LMEditError("--config/--set apply to one --method; run the methods separately")
    _check_workers(args)
    config = EvalConfig(mode=args.mode, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                        n_drift=args.n_drift, generation_tokens=args.generation, strict=args.strict,
                        disabling_rise=args.disabling_rise, refuse_disabling=args.refuse_disabling)
    dataset = _load_dataset(args)  # a bad file fails before the model loads
    lm = load_model(args)
    with _workers(args, lm) as workers:
        run_dirs, summaries = _evaluate(args, lm, dataset, config, out, workers)
    _print_table(summaries)
    paths = write_report(run_dirs + [Path(p) for p in args.compare], out)
    console.print(f"records: {', '.join(str(d / 'records.jsonl') for d in run_dirs)}", markup=False)
    console.print(f"report:  {paths['markdown']}  {paths['html']}  plots: {out / 'plots'}", markup=False)
    return 0


@contextmanager
def _workers(args: argparse.Namespace, lm: lmedit.LM) -> Iterator[int | lmedit.parallel.WorkerPool]:
    """With --workers: one pool of Ray workers for every --method (each worker loads the model once); else 0."""
    if not args.workers:
        yield 0
        return
    from lmedit.parallel import WorkerPool

    with ExitStack() as stack:
        with console.status(f"starting Ray for {args.workers} worker(s) ..."):
            pool = stack.enter_context(WorkerPool(lm, workers=args.workers, threads=args.worker_threads,
                                                  address=args.ray_address))
        yield pool


def _evaluate(args: argparse.Namespace, lm: lmedit.LM, dataset: lmedit.eval.Dataset, config: lmedit.eval.EvalConfig,
              out: Path, workers: int | lmedit.parallel.WorkerPool) -> tuple[list[Path], list[dict]]:
    from lmedit.settings import describe, resolve_editor

    run_dirs, summaries = [], []
    for method in args.method:
        editor, _ = resolve_editor(method, lm, args.config, args.set or None)
        console.print(describe(editor, lm), markup=False, highlight=False)
        run_dir = out / f"{method}-{args.mode}"
        with _bar() as bar:
            task = bar.add_task(f"{method}", total=None)

            def on_progress(event: ProgressEvent, task=task, bar=bar, method=method) -> None:
                bar.update(task, completed=event.done, total=event.total, description=f"{method} {event.stage}")

            result = lmedit.evaluate(lm, dataset, editor, limit=args.limit, config=config, out_dir=run_dir,
                                     resume=args.resume, progress=on_progress, workers=workers)
        run_dirs.append(run_dir)
        summaries.append(result.summary)
        skipped = result.summary["skipped"]
        if skipped["count"]:
            console.print(f"{method}: skipped {skipped['count']} record(s): {skipped['by_reason']} (see {run_dir}/skipped.jsonl)",
                          markup=False)
    return run_dirs, summaries
