"""Evaluation of edits: datasets, metrics (two families, labelled), the harness, reports and plots.

    import lmedit
    lm = lmedit.load("gemma3-270m")
    result = lmedit.evaluate(lm, "starter", method, limit=10, out_dir="runs/starter")  # method: `lmedit ls editors`
    result.summary["edited"]["metrics"]["efficacy_score"]   # {"mean", "lo", "hi", "n"}
    result.to_pandas()                                       # one row per record, scalar columns (needs pandas)

Definitions: docs/evaluation.md. Modules: `datasets/` (registry of loaders), `records` (EvalRecord,
Probe), `measure` (batched scoring), `metrics` (registered metrics), `summary` (bootstrap intervals,
harmonic-mean score), `harness` (single/batch/sequential loop), `workers` (single/batch modes on Ray
workers), `frame` (rows as a DataFrame), `report` and `plots`.
"""

from lmedit.eval.datasets import Dataset, DatasetError, load_dataset
from lmedit.eval.harness import EvalConfig, EvalResult, ProgressEvent, evaluate
from lmedit.eval.records import EvalRecord, Probe

__all__ = ["Dataset", "DatasetError", "EvalConfig", "EvalRecord", "EvalResult", "Probe", "ProgressEvent",
           "evaluate", "load_dataset"]
