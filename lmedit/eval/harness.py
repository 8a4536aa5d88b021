"""The evaluation loop: measure the unedited model, edit, measure again, undo — for any registered editor.

    result = evaluate(lm, "starter", "my_editor", limit=10, out_dir="runs/starter")
    result.summary["edited"]["score"]["mean"]      # ROME-style harmonic-mean score

Modes:
  single      per record: measure (unedited), edit, measure (edited), undo.
  batch       per chunk of `batch_size` records: measure all, one edit with all their requests, measure all, undo.
  sequential  edits one after another, never undone until the end; every `checkpoint_every` edits, ALL
              earlier edited records are re-measured, plus `n_drift` unrelated records (drift).
The unedited model is always measured first, with the same probes, and reported beside the edited one.
KL metrics need the unedited next-token distributions: single mode keeps them from its first
measurement; batch and sequential modes re-measure them by undoing the edits for a moment (undo is
bit-exact) rather than holding a 262k-wide distribution per prompt for every record.

The harness works through the `Edit` interface only (`apply`, `undo`, `applied`, `save`): it never
names or branches on a method. Outputs in `out_dir`: records.jsonl (one line per record, or per record
and checkpoint), summary.json, run.json (what was run; `resume` refuses a different run) and, in
sequential mode, edits/ (each edit, so `resume` re-applies instead of recomputing). Sequential runs also
record each edit's health (`eval/health.py`: update norm, ROME denominator, probe-text loss) as rows of
kind "health", flag disabling edits, and optionally refuse them (`refuse_disabling`).

Single and batch modes run their records (chunks) here one after another, or on Ray workers (`workers=N`,
`eval/workers.py`) with the same rows, in the same order, in the same files: only this process writes them.

Not handled: several processes writing one out_dir; resuming a batch mid-chunk (the chunk is redone).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmedit.config import check_ranges
from lmedit.editors import Edit, Editor, EditorConfig, load_edit
from lmedit.errors import ConfigError, LMEditError
from lmedit.eval.datasets import Dataset, DatasetError, load_dataset
from lmedit.eval.health import health_row, probe_loss
from lmedit.eval.measure import Measurement, check_record, measure, measure_dists
from lmedit.eval.metrics import MetricInputs, compute_metrics, drop_dists, metric_names
from lmedit.eval.records import EvalRecord
from lmedit.eval.summary import curves, summarize_rows
from lmedit.eval.text import Tfidf
from lmedit.models.load import as_lm
from lmedit.registry import editors
from lmedit.settings import resolve_editor

if TYPE_CHECKING:
    import pandas as pd

    from lmedit.models.load import LM
    from lmedit.parallel import WorkerPool

log = logging.getLogger(__name__)

Mode = Literal["single", "batch", "sequential"]
DRIFT_METRICS = ("efficacy_score", "rewrite_kl", "essence_drift", "neighborhood_score")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How to run an evaluation (method hyperparameters live in the editor's own config)."""

    mode: Mode = "single"
    batch_size: int = 10           # batch mode: records edited together
    checkpoint_every: int = 0      # sequential: re-measure every k edits; 0 picks ~10 checkpoints
    n_drift: int = 20              # sequential: records not edited, re-measured at checkpoints for drift
    generation_tokens: int = 16    # > 0: tokens generated from the edit prompt, paraphrases and generation prompts
                                   # (fluency, derailment, consistency); 0: no generation
    score_batch_size: int = 32     # sequences per forward when scoring
    n_bootstrap: int = 1000        # bootstrap resamples for the 95% intervals
    seed: int = 0                  # bootstrap seed
    strict: bool = False           # fail on the first invalid record instead of skipping and counting it
    save_edits: bool = True        # sequential: keep each edit in out_dir/edits for --resume
    disabling_rise: float = 0.1    # sequential: flag an edit raising the probe-text loss by more nats/token (see docs/editors.md)
    refuse_disabling: bool = False  # sequential: undo and skip flagged edits instead of keeping them

    def __post_init__(self) -> None:
        if self.mode not in ("single", "batch", "sequential"):
            raise ConfigError(f"EvalConfig.mode must be single, batch or sequential, got {self.mode!r}")
        check_ranges(self, at_least_one=("batch_size", "score_batch_size", "n_bootstrap"),
                     nonnegative=("checkpoint_every", "n_drift", "generation_tokens", "disabling_rise"))


@dataclass(frozen=True)
class ProgressEvent:
    """Passed to the `progress` callback after each unit of work."""

    stage: str           # "unedited", "edit", "checkpoint"
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None  # None until one unit is done


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class EvalResult:
    """What `evaluate` returns: the summary, every per-record row and where they were written."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    out_dir: Path | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_pandas(self) -> pd.DataFrame:
        """The per-record rows as a DataFrame: one row per record (per record and checkpoint in sequential
        mode), one column per scalar field, nested fields as dotted names (`edited.efficacy_score`).

        Vectors such as ROME's `v_star`, loss curves and generated texts are left out (rules:
        `lmedit.eval.frame`); `rows` keeps everything.

        Raises:
            MissingDependencyError: pandas is not installed (`pip install pandas`).
        """
        from lmedit.eval.frame import rows_to_frame

        return rows_to_frame(self.rows)


class _Progress:
    def __init__(self, callback: ProgressFn | None, total: int, stage: str) -> None:
        self.callback, self.total, self.stage = callback, total, stage
        self.done = 0
        self.start = time.perf_counter()

    def step(self, n: int = 1, stage: str | None = None) -> None:
        self.done += n
        self.stage = stage or self.stage
        if self.callback is None:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        self.callback(ProgressEvent(self.stage, self.done, self.total, elapsed, eta))


class _Writer:
    """Appends rows to records.jsonl (flushed per line, so an interruption loses at most one line)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.path = out_dir / "records.jsonl" if out_dir else None

    def rewrite(self, rows: Sequence[dict[str, Any]]) -> None:
        """Replace the file's rows (on resume: drop rows of a chunk or checkpoint that did not finish)."""
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=str) + "\n")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an existing records.jsonl; a truncated last line (interrupted write) is dropped and rewritten."""
    if not path.exists():
        return []
    rows, good_lines = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            good_lines.append(line)
        except json.JSONDecodeError:
            log.warning("dropping an unreadable line of %s (interrupted write)", path)
    path.write_text("".join(line + "\n" for line in good_lines), encoding="utf-8")
    return rows


def _metrics(record: EvalRecord, pre: Measurement, post: Measurement, tfidf: Tfidf) -> dict[str, dict[str, Any]]:
    unedited = compute_metrics(MetricInputs(record, pre, pre, tfidf))
    edited = compute_metrics(MetricInputs(record, pre, post, tfidf))
    return {"unedited": unedited, "edited": edited}


def _row(record: EvalRecord, pre: Measurement, post: Measurement, tfidf: Tfidf, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": record.case_id, **extra, **_metrics(record, pre, post, tfidf)}
    if post.generations:
        row["generations"] = {"unedited": list(pre.generations), "edited": list(post.generations)}
    drop_dists(pre)
    drop_dists(post)
    return row


def _resolve_editor(lm: LM, method: str | Editor,
                    editor_config: EditorConfig | dict[str, Any] | str | Path | None) -> tuple[Editor, str]:
    if isinstance(method, Editor):
        # Label the run with the editor's registry key when it has one (found by class, not by name).
        name = editors.name_of(method) or type(method).__name__
        return method, name
    editor, _ = resolve_editor(method, lm, editor_config)
    return editor, method


def _resolve_dataset(dataset: str | Dataset | Sequence[EvalRecord], data_path: str | Path | None, strict: bool) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, str):
        return load_dataset(dataset, data_path, strict=strict)
    return Dataset(name="records", source="<memory>", records=list(dataset))


def evaluate(lm: LM, dataset: str | Dataset | Sequence[EvalRecord], method: str | Editor, *,
             data_path: str | Path | None = None, limit: int | None = None,
             editor_config: EditorConfig | dict[str, Any] | str | Path | None = None,
             config: EvalConfig | None = None, out_dir: str | Path | None = None, resume: bool = False,
             progress: ProgressFn | None = None, workers: int | WorkerPool = 0, ray_address: str | None = None,
             worker_threads: int = 1, **overrides: Any) -> EvalResult:
    """Evaluate an editing method on a dataset, beside the unedited model.

    Args:
        lm: the model; its weights are restored when this returns (also on errors).
        dataset: a registered dataset name (with `data_path`), a loaded `Dataset`, or `EvalRecord`s.
        method: a registered editor name, or an `Editor` instance.
        data_path: file or URL for a dataset given by name (default: its packaged/cached file).
        limit: evaluate only the first `limit` valid records.
        editor_config: the editor's config (object, dict or YAML path); default: the settings lmedit ships
            for this model and method (`lmedit.settings`), else the method's defaults.
        config: an `EvalConfig`; keyword `overrides` (e.g. `mode="sequential"`) replace its fields.
        out_dir: write records.jsonl, summary.json and run.json here (None: keep in memory only).
        resume: continue an interrupted run in `out_dir`, skipping finished records/checkpoints.
        progress: called with a `ProgressEvent` after each unit of work (the CLI draws a bar from it).
        workers: > 0: run the records (batch mode: the chunks) on this many Ray actors (`lmedit.parallel`;
            `pip install 'lmedit[ray]'`), each loading the model again by `lm.name`; or a running
            `lmedit.parallel.WorkerPool` for `lm`, to share its actors between runs. The rows, files and
            summary are the same as without. A record whose worker dies twice is skipped as "worker_died".
            Not for sequential mode, where each edit depends on the ones before. The editor must be a
            registered one (workers rebuild it from its name and settings).
        ray_address: the Ray cluster to join (default: start a local instance, shut down afterwards).
        worker_threads: torch threads (and Ray CPUs) per worker.

    Returns:
        `EvalResult` with the summary (means, 95% intervals, harmonic-mean score, skipped counts) and rows.

    Raises:
        DatasetError: invalid records in strict mode, or a dataset file that cannot be read.
        LMEditError: `out_dir` holds a different run, or results without `resume`; `workers` in sequential mode.
        MissingDependencyError: `workers` without Ray installed.
        NotAnLMError: `lm` is a bare transformers model (wrap it with `lmedit.LM.from_hf`).
    """
    lm = as_lm(lm)
    config = config or EvalConfig()
    if overrides:
        config = EvalConfig(**{**asdict(config), **overrides})
    if workers:
        from lmedit.eval.workers import check_parallel

        check_parallel(config, workers, worker_threads)
    editor, method_name = _resolve_editor(lm, method, editor_config)
    data = _resolve_dataset(dataset, data_path, config.strict)
    skipped: list[dict[str, Any]] = [{"reason": "invalid_record", **i.to_dict()} for i in data.issues]

    records: list[EvalRecord] = []
    pool = list(data.records)
    usable_pool: list[EvalRecord] = []
    for record in pool:
        problem = check_record(lm, record)
        if problem is not None:
            field_name, message = problem
            text = f"{data.source}: {record.source or 'record'} (case_id {record.case_id}): field {field_name!r}: {message}"
            if config.strict:
                raise DatasetError(text)
            log.warning("skipping %s", text)
            skipped.append({"reason": "invalid_record", "file": data.source, "case_id": record.case_id,
                            "field": field_name, "message": message})
            continue
        usable_pool.append(record)
        if limit is None or len(records) < limit:
            records.append(record)
        elif config.mode != "sequential" or len(usable_pool) >= len(records) + config.n_drift:
            break
    drift = usable_pool[len(records):len(records) + config.n_drift] if config.mode == "sequential" else []
    if not records:
        raise DatasetError(f"no valid records to evaluate in {data.source} ({len(skipped)} skipped)")

    run = {"method": method_name, "dataset": data.name, "source": data.source, "mode": config.mode,
           "model": lm.name, "model_fingerprint": lm.fingerprint, "limit": limit, "n_records": len(records),
           "batch_size": config.batch_size if config.mode == "batch" else None,
           "checkpoint_every": config.checkpoint_every if config.mode == "sequential" else None,
           "generation_tokens": config.generation_tokens,
           "editor_config": asdict(editor.config) if hasattr(editor.config, "__dataclass_fields__") else None,
           "settings": getattr(editor, "settings_source", "")}
    out = Path(out_dir) if out_dir is not None else None
    previous: list[dict[str, Any]] = []
    if out is not None:
        previous = _prepare_out(out, run, resume)
    tfidf = Tfidf().fit(t for r in records + drift for t in r.reference_texts if r.reference_texts)
    writer = _Writer(out)
    started = time.perf_counter()
    if config.mode == "sequential":
        rows = _run_sequential(lm, editor, records, drift, config, tfidf, writer, previous, skipped, out, progress)
    else:
        parallel = dict(workers=workers, threads=worker_threads, address=ray_address) if workers else None
        rows = _run_units(lm, editor, records, drift, config, tfidf, writer, previous, skipped, out, progress,
                          parallel=parallel)
    summary = summarize(rows, run=run, skipped=skipped, n_boot=config.n_bootstrap, seed=config.seed)
    summary["elapsed_s"] = time.perf_counter() - started
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        (out / "skipped.jsonl").write_text("".join(json.dumps(s, default=str) + "\n" for s in skipped), encoding="utf-8")
    return EvalResult(summary=summary, rows=rows, out_dir=out, skipped=skipped)


def _prepare_out(out: Path, run: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    run_file, rows_file = out / "run.json", out / "records.jsonl"
    if rows_file.exists() and rows_file.stat().st_size and not resume:
        raise LMEditError(f"{out} already holds results; pass resume=True (--resume) to continue, or another out_dir")
    if resume and run_file.exists():
        before = json.loads(run_file.read_text(encoding="utf-8"))
        # Growing --limit extends a single/batch run (records are a prefix); sequential checkpoints depend on it.
        free = {"editor_config", "settings"} | ({"limit", "n_records"} if run["mode"] != "sequential" else set())
        differ = [k for k in run if k not in free and before.get(k) != run[k]]
        if before.get("editor_config") != json.loads(json.dumps(run["editor_config"], default=str)):
            differ.append("editor_config")
        if differ:
            raise LMEditError(f"cannot resume in {out}: the run differs in {differ} "
                              f"(was {[before.get(k) for k in differ]}, now {[run.get(k) for k in differ]})")
    run_file.write_text(json.dumps(run, indent=2, default=str), encoding="utf-8")
    return _read_rows(rows_file) if resume else []


def _make_edit(lm: LM, editor: Editor, record: EvalRecord, skipped: list[dict[str, Any]]) -> tuple[Edit | None, float]:
    start = time.perf_counter()
    try:
        edit = editor.edit(lm, list(record.requests))
    except LMEditError as exc:
        log.warning("edit failed for case %s: %s", record.case_id, exc)
        skipped.append({"reason": "edit_failed", "case_id": record.case_id, "message": str(exc)})
        return None, time.perf_counter() - start
    if not edit.base_fingerprint:
        edit.base_fingerprint = lm.fingerprint  # made on `lm`: a saved copy (save_edits) must name its model
    return edit, time.perf_counter() - start


def _edit_info(edit: Edit) -> dict[str, Any]:
    return dict(edit.info)


def _single_unit(lm: LM, editor: Editor, unit: Sequence[EvalRecord], config: EvalConfig,
                 tfidf: Tfidf) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One record of single mode: measure, edit, measure with the edit applied, undo. Returns (rows, skipped)."""
    (record,) = unit
    skipped: list[dict[str, Any]] = []
    pre = measure(lm, [record], generation_tokens=config.generation_tokens, batch_size=config.score_batch_size)[0]
    edit, seconds = _make_edit(lm, editor, record, skipped)
    if edit is None:
        return [], skipped
    try:
        with edit.applied(lm):
            post = measure(lm, [record], generation_tokens=config.generation_tokens,
                           batch_size=config.score_batch_size)[0]
    except LMEditError as exc:  # e.g. the edit would make weights non-finite: the model is untouched
        return [], [{"reason": "edit_failed", "case_id": record.case_id, "message": str(exc)}]
    return [_row(record, pre, post, tfidf, mode="single", n_edits=1, edit_seconds=seconds,
                 edit_info=_edit_info(edit))], skipped


def _plan_single(records: Sequence[EvalRecord], previous: list[dict[str, Any]],
                 config: EvalConfig) -> tuple[list[dict[str, Any]], list[list[EvalRecord]]]:
    """Rows kept from an earlier run, and the units still to run (one record each)."""
    rows = [r for r in previous if r.get("mode") == "single"]
    done = {r["case_id"] for r in rows}
    return rows, [[r] for r in records if r.case_id not in done]


def _post_with_kl(lm: LM, records: Sequence[EvalRecord], pres: Sequence[Measurement], edits: Sequence[Edit],
                  config: EvalConfig, tfidf: Tfidf, chunk: int = 8, **extra: Any) -> list[dict[str, Any]]:
    """Measure `records` with `edits` applied, fetch their unedited distributions by suspending the edits, and
    return metric rows. Works in chunks so only `chunk` records' distributions are held at a time."""
    rows = []
    for start in range(0, len(records), chunk):
        part = list(records[start:start + chunk])
        posts = measure(lm, part, generation_tokens=config.generation_tokens, batch_size=config.score_batch_size)
        with lm.edits.suspended(edits, lm=lm):
            pre_dists = measure_dists(lm, part, batch_size=config.score_batch_size)
        for record, pre, post, dists in zip(part, pres[start:start + chunk], posts, pre_dists):
            pre = Measurement(scores=pre.scores, dists=dists, generations=pre.generations, never_text=pre.never_text)
            rows.append(_row(record, pre, post, tfidf, **extra))
    return rows


def _batch_unit(lm: LM, editor: Editor, chunk: Sequence[EvalRecord], config: EvalConfig,
                tfidf: Tfidf) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One chunk of batch mode: measure all, one edit with all their requests, measure all, undo."""
    pres = measure(lm, chunk, keep_dists=False, generation_tokens=config.generation_tokens,
                   batch_size=config.score_batch_size)
    start = time.perf_counter()
    try:
        edit = editor.edit(lm, [q for r in chunk for q in r.requests])
        edit.apply(lm)
    except LMEditError as exc:
        return [], [{"reason": "edit_failed", "case_id": r.case_id, "message": str(exc)} for r in chunk]
    seconds = time.perf_counter() - start
    try:
        return _post_with_kl(lm, chunk, pres, [edit], config, tfidf, mode="batch", n_edits=len(chunk),
                             edit_seconds=seconds, edit_info=_edit_info(edit)), []
    finally:
        edit.undo()


def _plan_batch(records: Sequence[EvalRecord], previous: list[dict[str, Any]],
                config: EvalConfig) -> tuple[list[dict[str, Any]], list[list[EvalRecord]]]:
    """Rows of chunks an earlier run finished, and the chunks still to run (a chunk cut short is redone)."""
    rows = [r for r in previous if r.get("mode") == "batch"]
    done = {r["case_id"] for r in rows}
    chunks = [list(records[i:i + config.batch_size]) for i in range(0, len(records), config.batch_size)]
    todo = [c for c in chunks if not all(r.case_id in done for r in c)]
    finished = {r.case_id for c in chunks if all(x.case_id in done for x in c) for r in c}
    return [r for r in rows if r["case_id"] in finished], todo


_UNITS = {"single": (_plan_single, _single_unit), "batch": (_plan_batch, _batch_unit)}


def _run_units(lm, editor, records, drift, config, tfidf, writer, previous, skipped, out, progress, *,
               parallel: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Single and batch modes: independent units (a record, a chunk), run here one after another or on Ray
    workers (`parallel`: workers, threads, address); either way rows are appended in the order of the units."""
    plan, work = _UNITS[config.mode]
    rows, units = plan(records, previous, config)
    writer.rewrite(rows)
    bar = _Progress(progress, sum(len(u) for u in units), "edit")

    def keep(new: list[dict[str, Any]], failed: list[dict[str, Any]]) -> None:
        skipped.extend(failed)
        for row in new:
            writer.write(row)
        rows.extend(new)

    if not parallel:
        for unit in units:
            keep(*work(lm, editor, unit, config, tfidf))
            bar.step(len(unit))
        return rows
    from lmedit.eval.workers import run_on_workers

    for outcome in run_on_workers(lm, editor, units, config, tfidf, on_done=lambda unit: bar.step(len(unit)),
                                  **parallel):
        keep(*outcome)
    return rows


def _run_sequential(lm, editor, records, drift, config, tfidf, writer, previous, skipped, out, progress) -> list[dict[str, Any]]:
    every = config.checkpoint_every or max(1, len(records) // 10)
    checkpoints = sorted({k for k in range(every, len(records) + 1, every)} | {len(records)})
    rows = [r for r in previous if r.get("mode") == "sequential"]
    finished = {int(r["n_edits"]) for r in rows if r.get("kind") == "checkpoint_done"}
    # Health rows are recomputed on resume (the saved edits are re-applied and re-checked); the edits' times
    # come from them.
    seconds: dict[str, float] = {r["case_id"]: r["edit_seconds"] for r in rows
                                 if r.get("kind") == "health" and r.get("edit_seconds") is not None}
    rows = [r for r in rows if int(r["n_edits"]) in finished and r.get("kind") != "health"]
    writer.rewrite(rows)
    remaining = [k for k in checkpoints if k not in finished]
    total = len(records) + len(drift) + len(records) + sum(k + len(drift) for k in remaining)
    bar = _Progress(progress, total, "unedited")

    # The unedited model first: every record and the drift set, once (scores only; KL re-measures later).
    pres: dict[str, Measurement] = {}
    everything = list(records) + list(drift)
    for start in range(0, len(everything), 16):
        part = everything[start:start + 16]
        for record, m in zip(part, measure(lm, part, keep_dists=False, generation_tokens=config.generation_tokens,
                                           batch_size=config.score_batch_size)):
            pres[record.case_id] = m
        bar.step(len(part), "unedited")

    edits_dir = out / "edits" if out is not None and config.save_edits else None
    if edits_dir is not None:
        edits_dir.mkdir(exist_ok=True)
    applied: list[Edit] = []
    edited: list[EvalRecord] = []
    base_loss = loss = probe_loss(lm)
    try:
        for i, record in enumerate(records):
            saved = edits_dir / f"{i:05d}.safetensors" if edits_dir is not None else None
            if saved is not None and saved.exists():
                edit: Edit | None = load_edit(saved)
            else:
                edit, seconds[record.case_id] = _make_edit(lm, editor, record, skipped)
                if edit is not None and saved is not None:
                    edit.save(saved)
            if edit is not None:
                try:
                    edit.apply(lm)
                except LMEditError as exc:
                    skipped.append({"reason": "edit_failed", "case_id": record.case_id, "message": str(exc)})
                    edit = None
            if edit is not None:
                after = probe_loss(lm)
                health = health_row(edit, loss, after, base_loss, config.disabling_rise)
                refused = health["flagged"] and config.refuse_disabling
                # The edit's time here too (None for a saved edit replayed on resume): a run stopped before its
                # next checkpoint keeps it.
                row = {"case_id": record.case_id, "mode": "sequential", "kind": "health", "n_edits": i + 1,
                       "kept": not refused, "edit_seconds": seconds.get(record.case_id), **health}
                writer.write(row)
                rows.append(row)
                if health["flagged"]:
                    log.warning("edit %d (case %s) raised the probe loss by %.2f nats/token%s", i + 1,
                                record.case_id, health["probe_loss_rise"], "; refused" if refused else "")
                if refused:
                    edit.undo()
                    skipped.append({"reason": "disabling", "case_id": record.case_id,
                                    "message": f"probe loss rose by {health['probe_loss_rise']:.2f}"})
                else:
                    applied.append(edit)
                    edited.append(record)
                    loss = after
            bar.step(1, "edit")
            n = i + 1
            if n not in remaining:
                continue
            new = _post_with_kl(lm, edited, [pres[r.case_id] for r in edited], applied, config, tfidf,
                                mode="sequential", kind="edited", n_edits=n)
            for row in new:
                row["edit_seconds"] = seconds.get(row["case_id"])
            new += _post_with_kl(lm, drift, [pres[r.case_id] for r in drift], applied, config, tfidf,
                                 mode="sequential", kind="drift", n_edits=n)
            new.append({"case_id": None, "mode": "sequential", "kind": "checkpoint_done", "n_edits": n,
                        "n_applied": len(applied)})
            for row in new:
                writer.write(row)
            rows += new
            bar.step(len(edited) + len(drift), "checkpoint")
    finally:
        for e in reversed(applied):
            e.undo()
    return rows


def summarize(rows: Sequence[dict[str, Any]], *, run: dict[str, Any], skipped: Sequence[dict[str, Any]],
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The summary written to summary.json (see docs/evaluation.md for its fields)."""
    names = metric_names()
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    summary: dict[str, Any] = {"run": run, "metrics": {n: _metric_meta(n) for n in names},
                               "skipped": {"count": len(skipped), "by_reason": reasons, "items": list(skipped[:100])}}
    if run["mode"] == "sequential":
        last = max((int(r["n_edits"]) for r in rows if r.get("kind") == "edited"), default=0)
        final = [r for r in rows if r.get("kind") == "edited" and int(r["n_edits"]) == last]
        summary["n_records"] = len(final)
        summary.update(summarize_rows(final, names, n_boot=n_boot, seed=seed))
        summary["curves"] = curves(rows, names, kind="edited", n_boot=n_boot, seed=seed)
        summary["drift_curves"] = curves(rows, DRIFT_METRICS, kind="drift", n_boot=n_boot, seed=seed)
        health = [{k: r.get(k) for k in ("n_edits", "case_id", "update_norm", "denominator", "probe_loss",
                                         "probe_loss_rise", "flagged", "kept", "edit_seconds")} for r in rows if r.get("kind") == "health"]
        summary["health"] = {"edits": health, "flagged": sum(1 for h in health if h["flagged"]),
                             "max_probe_loss_rise": max((h["probe_loss_rise"] for h in health), default=None)}
    else:
        summary["n_records"] = len(rows)
        summary.update(summarize_rows(rows, names, n_boot=n_boot, seed=seed))
        secs = [r["edit_seconds"] / r["n_edits"] for r in rows if r.get("edit_seconds") is not None]
        summary["edit_seconds_mean"] = sum(secs) / len(secs) if secs else None
    return summary


def _metric_meta(name: str) -> dict[str, Any]:
    from lmedit.registry import metrics

    meta = metrics.meta(name)
    doc = (metrics.get(name).__doc__ or "").strip().splitlines()
    return {"family": meta.get("family"), "higher_is_better": meta.get("higher_is_better"),
            "label": meta.get("label", name), "doc": doc[0] if doc else ""}
