"""MEMIT on one large batch: efficacy, paraphrase and neighbourhood scores as λ (mom2_weight) varies.

The target values are optimised once for the batch (`MemitEditor.optimize_targets`, the expensive part,
independent of λ); each λ then makes the edit from them (`MemitEditor.edit_from_targets`), applies it,
scores the CounterFact probes with the evaluation harness's `measure` and metrics, and undoes it.
The edit for a given λ is exactly what `lmedit eval --method memit --mode batch` makes with that
`--set mom2_weight=λ`. KL metrics are left out (they need the full harness).

Usage: .venv/bin/python benchmarks/sweep_memit_lambda.py [--limit 1000] [--lambdas 500,150,50]
       [--config memit/gemma3-270m.yaml] [--out sweep.json]
       [--targets targets.safetensors]
Run it alone: two torch processes on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, peak_rss_mb  # noqa: E402

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import lmedit  # noqa: E402
from lmedit.config import to_dict  # noqa: E402
from lmedit.editors import get_editor  # noqa: E402
from lmedit.editors.steps.mass import Targets  # noqa: E402
from lmedit.eval.datasets import load_dataset  # noqa: E402
from lmedit.eval.measure import measure  # noqa: E402
from lmedit.eval.metrics import MetricInputs, compute_metrics  # noqa: E402
from lmedit.eval.text import Tfidf  # noqa: E402
from lmedit.settings import shipped_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit_format" / "counterfact-edit.json"
SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score", "specificity_plus_score")


def _log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _mean_scores(records, pre, post) -> dict[str, float]:
    tfidf = Tfidf()
    rows = [compute_metrics(MetricInputs(r, a, b, tfidf)) for r, a, b in zip(records, pre, post, strict=True)]
    out = {}
    for name in SCORES:
        vals = [row[name] for row in rows if row.get(name) is not None]
        out[name] = round(sum(vals) / len(vals), 4) if vals else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--config", default=str(shipped_path("memit", "gemma3-270m")))
    ap.add_argument("--data", default=str(CF))
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--lambdas", default="500,150,50")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--targets", help="safetensors file keeping the optimised targets between runs (reused when the "
                                      "model, config, data and limit match)")
    args = ap.parse_args()
    t0 = time.time()
    lm = lmedit.load(args.model)
    records = load_dataset("counterfact", args.data, limit=args.limit).records
    requests = [r.requests[0] for r in records]
    editor = get_editor("memit", args.config)
    editor.progress = lambda stage, i, n: _log(t0, f"{stage} {i}/{n}") if stage == "target values" else None
    cfg = editor.config
    pre = measure(lm, records, keep_dists=False)
    _log(t0, f"unedited measured ({len(records)} records)")
    tz = time.time()
    key = json.dumps({"fingerprint": lm.fingerprint, "config": to_dict(cfg), "data": str(Path(args.data).resolve()),
                      "limit": args.limit}, sort_keys=True, default=str)
    saved = Path(args.targets) if args.targets else None
    reuse = saved is not None and saved.exists() and safe_open(str(saved), "pt").metadata().get("key") == key
    if reuse:
        targets = Targets(safe_open(str(saved), "pt").metadata()["mode"], load_file(str(saved))["z"], [])
        _log(t0, f"targets read from {saved}")
    else:
        targets = editor.optimize_targets(lm, requests)
        if saved is not None:
            tmp = saved.with_suffix(".tmp")
            save_file({"z": targets.z.contiguous()}, str(tmp), metadata={"key": key, "mode": targets.mode})
            tmp.replace(saved)
    result = {"model": args.model, "n_requests": len(requests), "layers": list(editor.layers_for(lm)),
              "config": to_dict(cfg), "target_seconds": round(time.time() - tz, 1),
              "targets_from": "file" if reuse else "optimised", "unedited": _mean_scores(records, pre, pre), "runs": []}
    for lam in (float(x) for x in args.lambdas.split(",")):
        ts = time.time()
        edit = type(editor)(replace(cfg, mom2_weight=lam), cache=editor.cache).edit_from_targets(lm, requests, targets)
        solve_s = time.time() - ts
        with edit.applied(lm):
            post = measure(lm, records, keep_dists=False)
        run = {"mom2_weight": lam, "spread_solve_seconds": round(solve_s, 1), "update_norm": round(edit.info["update_norm"], 3),
               **_mean_scores(records, pre, post)}
        result["runs"].append(run)
        _log(t0, json.dumps(run))
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
