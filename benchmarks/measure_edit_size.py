"""Size of shipped-settings edits: the largest relative update norm ‖Δ‖_F/‖W‖_F and the probe-text loss rise
(`lmedit.editors.safety.assess`) per weight editor, on the first starter facts. Prints JSON.

    python benchmarks/measure_edit_size.py --model gemma3-270m --methods ft,ft_l,kn,rome,memit,alphaedit
    python benchmarks/measure_edit_size.py --model gemma3-270m --methods ft --set lr=1.0   # a destructive setting

These are the numbers `lmedit/editors/safety.py`'s limits are set from (docs/editors.md, "Destructive settings"),
and the audit gate's probe-loss thresholds (`lmedit.ledger.audit.AuditConfig`, docs/ledger.md): the probe-text
loss is one function, `lmedit.eval.health.probe_loss`; `base_probe_loss` is the unedited model's.
"""

from __future__ import annotations

import argparse
import json
import time

import lmedit
from lmedit.config import to_dict
from lmedit.editors.safety import assess
from lmedit.eval import load_dataset
from lmedit.eval.health import probe_loss
from lmedit.settings import resolve_editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--methods", default="ft,ft_l,kn,rome,memit,alphaedit")
    parser.add_argument("--facts", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every method (YAML value)")
    args = parser.parse_args()
    import yaml

    lm = lmedit.load(args.model)
    requests = [r.requests[0] for r in load_dataset("starter").records[:args.facts]]
    out = {"model": args.model, "overrides": args.set, "base_probe_loss": probe_loss(lm), "methods": {}}
    for method in args.methods.split(","):
        editor, _ = resolve_editor(method, lm, None)
        config = {**to_dict(editor.config), **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
        rows = []
        for request in requests:
            start = time.perf_counter()
            found = assess(lmedit.edit(lm, request, method=method, config=config, apply=False), lm)
            rows.append({"subject": request.subject, "relative_norm": found.relative_norm,
                         "probe_rise": found.probe_rise, "destructive": found.destructive,
                         "seconds": round(time.perf_counter() - start, 1)})
        out["methods"][method] = {"max_relative_norm": max(r["relative_norm"] or 0.0 for r in rows),
                                  "max_probe_rise": max(r["probe_rise"] or 0.0 for r in rows), "edits": rows}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
