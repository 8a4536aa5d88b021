"""The web app's one model and what has been done to it: trace, edit, undo, save, record, compare, and
the ledger's list, audits, revert and exports. Gradio-free; the pages in `app.py` call these methods.

Only lmedit's public API is called (`lmedit.edit/score/generate`, `lmedit.tracing.trace_kinds`, `lmedit.Ledger`,
`lmedit.ledger.audit_record/audit_edit/audit_edits`, `lmedit.ledger.plots.plot_report`,
`lmedit.settings.method_settings`, the editor registry), and no method is named: the methods are the registry's.

The model's state is always the base model, plus the applied edits of the open ledger (when one is open
and was made on this model), plus at most one *pending* edit: the last edit made in the Edit tab and
not recorded. A new edit, a comparison or any ledger action first undoes the pending edit (`Edit.undo`
restores the weights bit for bit), so the ledger only ever sees its own edits on the model. `state()`
says which state the model is in; the page shows it.

One job at a time: the app's queue runs one model job at once, and every method here also holds
`lock`, so a client of the HTTP API cannot run two either.

Not handled: several models, or several users' separate edits (everyone shares the one model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmedit
from lmedit.errors import RequestError
from lmedit.web import inputs
from lmedit.web.tables import CompareResult, ProbeLine, peak_layer, shown_probes

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _quiet(phase: str, done: int, total: int) -> None:
    return None


@dataclass
class LastEdit:
    """The Edit tab's last edit: what was asked, the `Edit`, its probes, and where it went."""

    request: Any
    method: str
    edit: Any
    record: Any                     # the audit record (probes) built before the edit
    lines: list[ProbeLine]
    paraphrases: list[str]
    neighbors: list[tuple[str, str]]
    seconds: float
    number: int = 0                 # 1 for the app's first edit, 2 for the next, ... (the page names it)
    made_on: tuple[str, list[int]] | None = None  # the open ledger and its applied edits the edit was made on
    recorded_id: int | None = None
    audit: Any = None               # the Edit tab's audit (against made_on), reused by the ledger's gate


@dataclass
class TraceOutcome:
    results: dict[str, Any]
    layer: int | None
    images: dict[str, Path]
    files: list[Path]
    seconds: float


@dataclass
class CompareOutcome:
    results: list[CompareResult]
    reference: dict[str, float | None] | None  # the model before the edits
    chart: Path | None
    notes: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].rstrip("-") or "x"


class Session:
    """The one model the app serves, its ledger and its pending edit.

    Args:
        lm: the loaded model (`lmedit.load`).
        out_dir: where traces, saved edits, patches and exported models are written (served for download).
        ledger: the ledger directory edits are recorded in (opened now if it exists; created on the first
            recorded edit otherwise); None for no ledger until one is opened in the Ledger tab.
        max_new_tokens: tokens generated per probe in the Edit tab's table.
        audit_config: the audit gate's thresholds (`lmedit.ledger.AuditConfig`; default its defaults).
    """

    def __init__(self, lm: Any, *, out_dir: str | Path, ledger: str | Path | None = None,
                 max_new_tokens: int = 16, audit_config: Any = None) -> None:
        self.lm = lm
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_new_tokens = max_new_tokens
        self.audit_config = audit_config or lmedit.ledger.AuditConfig()
        self.lock = threading.RLock()
        self.ledger_path: Path | None = None
        self.ledger: Any = None
        self.pending: Any = None
        self.last: LastEdit | None = None
        self.edits_made = 0
        self.startup_note = ""
        if ledger is not None:
            try:
                self.startup_note = self.open_ledger(str(ledger))
            except lmedit.errors.LMEditError as exc:
                self.startup_note = f"ledger {ledger} not opened: {exc}"
                log.warning("%s", self.startup_note)

    # ---- what the page shows first ----------------------------------------------------------------

    def methods(self) -> list[str]:
        """The registered editors (`lmedit ls editors`), plugins included."""
        return lmedit.registry.editors.names()

    def default_method(self) -> str:
        return lmedit.defaults.DEFAULT_METHOD

    def settings(self, method: str) -> tuple[str, str]:
        """The settings box for `method`: YAML of every config field (shipped for this model, else the
        method's defaults) and the line saying where they come from."""
        name = inputs.method(method, self.methods())
        values, source = lmedit.settings.method_settings(name, self.lm)
        return inputs.settings_text(values), source

    def shown(self, path: str | Path) -> str:
        """A path as the page shows it: relative to the server's working directory when it is inside it."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    def state(self) -> str:
        """One line: which edits are on the model now."""
        parts = [f"{self.lm.name}: base model"]
        if self.ledger is not None:
            n = len(self.ledger.applied_ids())
            parts.append(f"{n} applied edit{'s' if n != 1 else ''} of the ledger {self.ledger.path}")
        elif self.ledger_path is not None:
            parts.append(f"no edits yet in the ledger {self.ledger_path}")
        if self.pending is not None and self.last is not None:
            r = self.last.request
            parts.append(f"1 unrecorded {self.last.method} edit ({r.subject}: {r.target_new})")
        return " + ".join(parts)

    # ---- model state ------------------------------------------------------------------------------

    def _drop_pending(self) -> str:
        """Undo the pending edit (bit for bit); returns a note for the page, '' when there was none."""
        if self.pending is None:
            return ""
        if self.pending.is_applied:
            self.pending.undo()
        self.pending = None
        return "the previous unrecorded edit was undone first"

    def _ledger_state(self) -> tuple[str, list[int]]:
        """The open ledger and its applied edits: what the model is, besides the base and a pending edit."""
        if self.ledger is None:
            return "", []
        return str(self.ledger.path), self.ledger.applied_ids()

    def _model_state_is(self, state: tuple[str, list[int]] | None) -> bool:
        """Whether the model (besides a pending edit) is in `state`, a `_ledger_state()`: the same applied edits
        of the same ledger, or none at all (the base model, whichever ledger is open)."""
        if state is None:
            return False
        path, applied = self._ledger_state()
        return applied == state[1] and (path == state[0] or not applied)

    def _sync_ledger(self) -> None:
        """Base + the open ledger's applied edits (a no-op when the model is in that state already)."""
        if self.ledger is not None:
            self.ledger.apply(self.lm)

    def _measure(self, lines: Sequence[ProbeLine], *,
                 generate: bool = True) -> list[tuple[tuple[float | None, float | None], str]]:
        """P(target), P(foil) and (with `generate`) a greedy continuation for each probe, on the model as it is
        now. The same lines in the same order give the same batches, hence bit-identical numbers on the same
        weights."""
        prompts = [line.prompt for line in lines]
        targets = lmedit.score(self.lm, prompts, [line.target for line in lines])
        foils = {i: line.foil for i, line in enumerate(lines) if line.foil is not None}
        foil_scores = dict(zip(foils, lmedit.score(self.lm, [prompts[i] for i in foils], list(foils.values())))) \
            if foils else {}
        texts = lmedit.generate(self.lm, prompts, max_new_tokens=self.max_new_tokens) if generate else [""] * len(lines)
        out = []
        for i, (t, text) in enumerate(zip(targets, texts)):
            f = foil_scores.get(i)
            out.append(((_p(t), _p(f) if f is not None else None), text))
        return out

    # ---- trace ------------------------------------------------------------------------------------

    def trace(self, query: inputs.TraceQuery, progress: Progress = _quiet) -> TraceOutcome:
        """The three heatmaps (hidden state, MLP, attention) of a fact, with the suggested layer marked."""
        with self.lock:
            start = time.perf_counter()
            results = lmedit.tracing.trace_kinds(
                self.lm, query.prompt, query.subject, query.answer, samples=query.samples,
                progress=lambda done, total: progress("tracing", done, total))
            seconds = time.perf_counter() - start
            state = self.state()
        layer = peak_layer(results["mlp"]) if "mlp" in results else None
        key = json.dumps([self.lm.weights_hash, state, query.prompt, query.subject, query.answer, query.samples])
        stem = f"{_slug(query.prompt)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        folder = self.out_dir / "traces"
        images, files = {}, []
        for kind, result in results.items():
            files.append(result.save(folder / f"{stem}_{kind}.json"))
            png, svg = result.plot(folder / f"{stem}_{kind}", mark_layer=layer)
            images[kind] = png
            files.append(png)
        return TraceOutcome(results, layer, images, files, seconds)

    # ---- edit -------------------------------------------------------------------------------------

    def edit(self, request: Any, method: str, settings: dict[str, Any], *, paraphrases: Sequence[str] = (),
             neighbors: Sequence[tuple[str, str]] = (), progress: Progress = _quiet) -> tuple[LastEdit, str]:
        """Make an edit: probes measured before, the edit applied, the same probes after.

        Returns:
            The `LastEdit` (now pending: applied, not recorded) and a note for the page ('' when none).
        """
        name = inputs.method(method, self.methods())
        with self.lock:
            note = self._drop_pending()
            self._sync_ledger()
            progress("probes before the edit", 0, 3)
            record = lmedit.ledger.audit_record(self.lm, request, paraphrases=paraphrases, neighbors=neighbors,
                                                config=self.audit_config)
            lines = shown_probes(record, paraphrases, neighbors)
            before = self._measure(lines)
            progress(f"editing with {name}", 1, 3)
            start = time.perf_counter()
            made = lmedit.edit(self.lm, request, name, config=settings)  # applied; refused edits change nothing
            seconds = time.perf_counter() - start
            self.pending = made
            progress("probes after the edit", 2, 3)
            after = self._measure(lines)
            lines = [ProbeLine(line.group, line.prompt, line.target, line.foil, b[0], a[0], b[1], a[1])
                     for line, b, a in zip(lines, before, after)]
            self.edits_made += 1
            self.last = LastEdit(request, name, made, record, lines, list(paraphrases), list(neighbors), seconds,
                                 self.edits_made, self._ledger_state())
            return self.last, note

    def audit_last(self, *, record: bool = False) -> tuple[Any, int | None, bool]:
        """Audit the pending edit against the model without it; with `record`, through the ledger's gate.

        Returns:
            (report, the ledger id when recorded, whether the gate refused it).
        """
        with self.lock:
            last = self._pending_last("audit")
            if record:
                return self._record(last)
            report = lmedit.ledger.audit_edit(self.lm, last.edit, records=[last.record], config=self.audit_config)
            if self._model_state_is(last.made_on):
                last.audit = report  # the same two states the gate would measure when this edit is recorded
            return report, None, False

    def record_last(self) -> tuple[Any, int | None, bool]:
        """Record the last edit in the ledger, pending or undone (audited by the gate, which applies it again
        if it keeps it), as long as the ledger's applied edits are still the ones it was made on."""
        with self.lock:
            last = self.last
            if last is None or last.recorded_id is not None or self.pending is not None:
                return self._record(self._pending_last("record"))
            if self._ledger_state() != last.made_on:
                raise RequestError("the model's ledger edits changed since the last edit was made (an edit recorded "
                                   "or reverted, another ledger opened): make the edit again")
            self._sync_ledger()
            return self._record(last)

    def _pending_last(self, what: str) -> LastEdit:
        last = self.last
        if last is None or self.pending is None:
            if last is not None and last.recorded_id is not None:
                raise RequestError(f"the last edit is recorded in the ledger as edit {last.recorded_id}; "
                                   f"nothing to {what} (revert it in the Ledger tab)")
            raise RequestError(f"nothing to {what}: make an edit first (the last one was undone or replaced)"
                               if last is not None else f"nothing to {what}: make an edit first")
        return last

    def _record(self, last: LastEdit) -> tuple[Any, int | None, bool]:
        ledger = self._ledger_for_writing()
        if last.edit.is_applied:
            last.edit.undo()  # the gate audits the edit against the ledger's state, and applies it if kept
        self.pending = None  # kept by the gate: the ledger's edit; refused (or failed): undone
        # The Edit tab's audit measured the same states (the ledger's, unchanged since the edit was made, and
        # it plus the edit) on the same probes with the same thresholds: the gate takes it instead of measuring again.
        audited = last.audit if self._model_state_is(last.made_on) else None
        commit = ledger.record(self.lm, last.edit, paraphrases=last.paraphrases, neighbors=last.neighbors,
                               audited=audited)
        if commit.recorded:
            last.recorded_id = commit.edit_id
            return commit.report, commit.edit_id, False
        return commit.report, None, True

    def undo(self) -> tuple[ProbeLine, float | None]:
        """Undo the pending edit (the weights are restored bit for bit). Returns the edit prompt's probe
        (P before and after the edit) and P(new target) measured now."""
        with self.lock:
            last = self._pending_last("undo")
            self._drop_pending()
            now = self._measure(last.lines, generate=False)[0][0][0]  # the batch "before" was measured in
            return last.lines[0], now

    def save_last(self) -> Path:
        """Write the last edit (pending, undone or recorded) to a safetensors file under out_dir/edits."""
        with self.lock:
            if self.last is None:
                raise RequestError("nothing to save: make an edit first")
            r = self.last.request
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = self.out_dir / "edits" / f"{self.last.method}-{_slug(r.subject)}-{_slug(r.target_new)}-{stamp}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            return Path(self.last.edit.save(path))

    # ---- compare ----------------------------------------------------------------------------------

    def compare(self, request: Any, methods: Sequence[str], *, paraphrases: Sequence[str] = (),
                neighbors: Sequence[tuple[str, str]] = (), progress: Progress = _quiet) -> CompareOutcome:
        """One request, several methods (each with the settings lmedit ships for this model): each edit is
        made, then all are audited against the model without them (measured once), none left applied. A
        method that fails gets a row saying why."""
        chosen = inputs.methods(list(methods), self.methods())
        with self.lock:
            notes = [n for n in [self._drop_pending()] if n]
            self._sync_ledger()
            progress("probes", 0, len(chosen) + 1)
            record = lmedit.ledger.audit_record(self.lm, request, paraphrases=paraphrases, neighbors=neighbors,
                                                config=self.audit_config)
            made: dict[str, tuple[Any, float, str]] = {}
            failed: dict[str, str] = {}
            for i, name in enumerate(chosen):
                progress(f"editing with {name}", i, len(chosen) + 1)
                try:
                    _, source = lmedit.settings.method_settings(name, self.lm)
                    start = time.perf_counter()
                    edit = lmedit.edit(self.lm, request, name, apply=False)
                    made[name] = (edit, time.perf_counter() - start, source)
                except lmedit.errors.LMEditError as exc:
                    failed[name] = f"failed: {exc}"
            progress("auditing the edits", len(chosen), len(chosen) + 1)
            reports = lmedit.ledger.audit_edits(self.lm, [e for e, _, _ in made.values()], [record],
                                                config=self.audit_config) if made else []
            by_name = dict(zip(made, reports))
            reference = reports[0].metrics["reference"] if reports else None
            results = [CompareResult(name, None, None, None, failed[name]) if name in failed else
                       CompareResult(name, by_name[name].metrics["edited"], made[name][1], by_name[name].verdict,
                                     made[name][2]) for name in chosen]
        chart = None
        if any(r.metrics is not None for r in results):
            from lmedit.web.charts import compare_chart

            stamp = time.strftime("%Y%m%d-%H%M%S")
            chart = compare_chart(results, reference, self.out_dir / "compare" / f"{_slug(request.subject)}-{stamp}.png",
                                  title=f"{request.text} → {request.target_new} ({self.lm.name})")
        return CompareOutcome(results, reference, chart, notes)

    # ---- ledger -----------------------------------------------------------------------------------

    def open_ledger(self, path: str) -> str:
        """Make `path` the ledger the app records in and lists; its applied edits go onto the model.

        Raises:
            LedgerError: a damaged ledger, or one made on another model (the model is left at its base).
        """
        target = Path(inputs.ledger_path(path)).expanduser()
        with self.lock:
            self._drop_pending()
            if self.ledger is not None:
                self.ledger.detach(self.lm)
                self.ledger.close()
            self.ledger, self.ledger_path = None, target
            if not target.exists():
                return f"no ledger at {target} yet: the first recorded edit creates it"
            ledger = lmedit.Ledger(target, audit_config=self.audit_config)
            try:
                applied = ledger.apply(self.lm)
            except BaseException:
                ledger.close()
                self.ledger_path = None
                raise
            self.ledger = ledger
            return f"opened {target}: {len(applied)} applied edit(s) now on the model"

    def _ledger_for_writing(self) -> Any:
        if self.ledger is None:
            if self.ledger_path is None:
                raise RequestError("no ledger is open: open one in the Ledger tab (a new directory is created)")
            self.ledger = lmedit.Ledger(self.ledger_path, audit_config=self.audit_config)
        return self.ledger

    def _open(self) -> Any:
        if self.ledger is None:
            where = f" ({self.ledger_path} has no edits yet)" if self.ledger_path is not None else ""
            raise RequestError(f"no ledger is open{where}: record an edit, or open a ledger directory")
        return self.ledger

    def ledger_rows(self) -> list[Any]:
        with self.lock:
            return self._open().entries() if self.ledger is not None else []

    def ledger_ids(self) -> list[int]:
        return [r.id for r in self.ledger_rows()]

    def ledger_audit(self, edit_id: Any) -> tuple[Any, Any, Path | None]:
        """An edit's row, its latest audit and the audit's plot (None when it was never audited)."""
        from lmedit.ledger.plots import plot_report
        from lmedit.web.tables import request_text

        with self.lock:
            ledger = self._open()
            number = inputs.edit_id(edit_id, self.ledger_ids())
            row, report = ledger.entry(number), ledger.latest_report(number)
            if report is None:
                return row, None, None
            path = self.out_dir / "audits" / f"{_slug(str(ledger.path))}-edit-{number}-{len(ledger.reports(number))}.png"
            plot_report(report, path, title=f"edit {number}: {request_text(row.requests)} — {report.verdict}")
            return row, report, path

    def revert(self, edit_id: Any) -> Any:
        """Revert one edit: the model is rebuilt as base + the remaining applied edits, which are re-audited."""
        with self.lock:
            ledger = self._open()
            number = inputs.edit_id(edit_id, self.ledger_ids())
            self._drop_pending()
            return ledger.revert(number, self.lm)

    def export_patch(self) -> Path:
        """The ledger's applied edits as one patch file (`lmedit ledger import` reads it)."""
        with self.lock:
            ledger = self._open()
            stamp = time.strftime("%Y%m%d-%H%M%S")
            return Path(ledger.export_patch(self.out_dir / "patches" / f"{_slug(ledger.path.name)}-{stamp}.lmpatch"))

    def export_model(self, name: Any) -> Path:
        """Base + the ledger's applied edits as a plain Hugging Face directory under out_dir/models/NAME."""
        target = self.out_dir / "models" / inputs.export_name(name)
        with self.lock:
            ledger = self._open()
            self._drop_pending()
            return Path(ledger.export_model(self.lm, target))


def _p(score: Any) -> float:
    """A `TargetScore` as the probability of the whole target."""
    import math

    return math.exp(score.logprob)
