"""Any editor on the starter facts: efficacy, paraphrase and neighbourhood counts over a grid of settings.

Each fact is edited alone with the method's settings (`--base` YAML or the shipped config for the model, then
each grid point's overrides), the edit applied, the record's probes scored with the evaluation harness's
`measure`, and the edit undone (`benchmarks/_common.starter_counts` says what counts). The shipped configs'
headers quote its output.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_starter.py --method ft_m --model gemma3-270m
           --grid lr=1e-4,5e-4 --grid 'layers=[3],[5]' [--set steps=25] [--cases capital-0,...]
A grid value list is split on commas outside brackets; values are YAML (`[3]`, `1e-4`, `null`).
Run it alone: two torch processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import STARTER_CASES, add_counts, emit, peak_rss_mb, starter_counts  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

import lmedit  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.settings import resolve_editor  # noqa: E402


def _value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _values(text: str) -> list:
    return [_value(v) for v in re.split(r",(?![^\[]*\])", text)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--base", default=None, help="YAML settings to start from (default: the shipped ones)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a swept setting")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fixed override")
    ap.add_argument("--cases", default=STARTER_CASES)
    args = ap.parse_args()

    lm = lmedit.load(args.model)
    by_id = {r.case_id: r for r in load_dataset("starter").records}
    records = [by_id[c] for c in args.cases.split(",")]
    fixed = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    grid = [(k, _values(v)) for k, v in (g.split("=", 1) for g in args.grid)]
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    unedited: dict[str, list[int]] = {}
    for record in records:
        add_counts(unedited, starter_counts(lm, [record]))
    result = {"method": args.method, "model": args.model, "cases": [r.case_id for r in records], "fixed": fixed,
              "threads": torch.get_num_threads(), "unedited": {k: f"{a}/{b}" for k, (a, b) in unedited.items()},
              "settings": []}
    for point in itertools.product(*[values for _, values in grid]):
        overrides = {**fixed, **{k: v for (k, _), v in zip(grid, point)}}
        editor, _ = resolve_editor(args.method, lm, args.base, [f"{k}={yaml.safe_dump(v).strip().removesuffix('...').strip()}"
                                                             for k, v in overrides.items()] or None)
        total: dict[str, list[int]] = {}
        seconds = 0.0
        for record in records:
            start = time.perf_counter()
            edit = editor.edit(lm, list(record.requests))
            seconds += time.perf_counter() - start
            with edit.applied(lm):
                add_counts(total, starter_counts(lm, [record]))
        row = {**{k: v for (k, _), v in zip(grid, point)}, **{k: f"{a}/{b}" for k, (a, b) in total.items()},
               "edit_seconds_mean": round(seconds / len(records), 2)}
        print(row, file=sys.stderr, flush=True)
        result["settings"].append(row)
    assert all(torch.equal(snapshot[k], v) for k, v in lm.model.state_dict().items()), "weights changed"
    result["peak_rss_mb"] = round(peak_rss_mb())
    emit(result)


if __name__ == "__main__":
    main()
