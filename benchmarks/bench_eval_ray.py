"""Evaluation on Ray workers: records per minute of `lmedit eval --workers N` for N = 1 and 2, and Ray's start-up cost.

For each N it starts a local Ray instance with N workers (one torch thread each, as `lmedit eval --workers N`
does), and reports the start-up cost (Ray starting, and the workers loading the model: until every worker
has answered once), then the single-mode evaluation of the records on those workers: wall seconds and
records per minute (start-up excluded, and with it: what one `lmedit eval --workers N` command pays).
The rows of every run are checked equal to the first run's (timings aside): the workers do not change results.

The editor's key statistics (ROME, MEMIT) are cached under $LMEDIT_CACHE: the script first evaluates one
record here, without Ray, so that no worker computes them (with a cold cache every worker would).

Usage: .venv/bin/python benchmarks/bench_eval_ray.py [--method rome] [--model gemma3-270m] [--limit 40]
           [--workers 1 2] [--worker-threads 1] [--serial]
The default data is tests/data/counterfact/easyedit-train-40.json (40 CounterFact records, EasyEdit layout:
one paraphrase and one neighbour each). A tiny model directory works as --model for a quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.eval import EvalConfig, load_dataset  # noqa: E402
from lmedit.parallel import WorkerPool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "counterfact" / "easyedit-train-40.json"
TIMING = {"edit_seconds"}


class Ping:
    """A task that only answers (its worker's peak RSS, MiB): one answer per worker waits for every model to load."""

    def setup(self, lm) -> None:
        pass

    def run(self, lm, unit: int) -> float:
        return peak_rss_mb()

    def labels(self, unit: int) -> list[str]:
        return [str(unit)]


def untimed(rows: list[dict]) -> str:
    return json.dumps([{k: v for k, v in r.items() if k not in TIMING} for r in rows], sort_keys=True, default=str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rome")
    parser.add_argument("--config", help="the method's YAML config (default: the shipped settings for the model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--model", default="gemma3-270m", help="built-in name or model directory")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--generation", type=int, default=16, help="tokens per generation (lmedit eval's default)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--serial", action="store_true", help="also time the run without Ray (torch's own threads)")
    args = parser.parse_args()

    from lmedit.settings import resolve_editor

    lm = lmedit.load(args.model)
    data = load_dataset(args.dataset, args.data)
    editor, _ = resolve_editor(args.method, lm, args.config, args.set or None)
    config = EvalConfig(generation_tokens=args.generation)
    warm_s, _ = timed(lambda: lmedit.evaluate(lm, data, editor, limit=1, config=config))  # fills the stats cache

    def evaluate(workers) -> tuple[float, lmedit.eval.EvalResult]:
        with tempfile.TemporaryDirectory() as tmp:
            return timed(lambda: lmedit.evaluate(lm, data, editor, limit=args.limit, config=config, out_dir=tmp,
                                                 workers=workers))

    results, reference = [], None
    if args.serial:
        wall, result = evaluate(0)
        reference = untimed(result.rows)
        results.append({"workers": 0, "torch_threads": torch.get_num_threads(), "records": len(result.rows),
                        "eval_s": round(wall, 2), "records_per_minute": round(60 * len(result.rows) / wall, 2)})
    for n in args.workers:
        pool = WorkerPool(lm, workers=n, threads=args.worker_threads)
        ray_s, _ = timed(pool.__enter__)
        try:
            ready_s, _ = timed(lambda: list(pool.map(Ping(), list(range(n)))))
            wall, result = evaluate(pool)
            worker_rss = [round(rss, 1) for _, rss in pool.map(Ping(), list(range(n)))]
        finally:
            stop_s, _ = timed(lambda: pool.__exit__(None, None, None))
        rows = untimed(result.rows)
        reference = reference or rows
        records = len(result.rows)
        startup = ray_s + ready_s
        results.append({"workers": n, "torch_threads_per_worker": args.worker_threads, "records": records,
                        "ray_init_s": round(ray_s, 2), "workers_ready_s": round(ready_s, 2),
                        "startup_s": round(startup, 2), "eval_s": round(wall, 2),
                        "records_per_minute": round(60 * records / wall, 2),
                        "records_per_minute_with_startup": round(60 * records / (wall + startup + stop_s), 2),
                        "ray_shutdown_s": round(stop_s, 2), "worker_peak_rss_mb": worker_rss,
                        "same_rows_as_first_run": rows == reference,
                        "skipped": result.summary["skipped"]["by_reason"]})
    emit({"benchmark": "eval_ray", "method": args.method, "settings": editor.settings_source, "overrides": args.set,
          "model": args.model, "dataset": args.dataset, "data": data.source, "limit": args.limit,
          "generation_tokens": args.generation, "warmup_one_record_s": round(warm_s, 2), "cpus": os.cpu_count(),
          "results": results, "peak_rss_mb_driver": round(peak_rss_mb(), 1)})


if __name__ == "__main__":
    main()
