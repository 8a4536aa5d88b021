"""The web app's pages (Gradio Blocks): Trace, Edit, Compare and Ledger, over one `Session`.

    session = Session(lmedit.load("gemma3-270m"), out_dir="lmedit-web", ledger="lmedit-ledger")
    demo = launch(session, host="127.0.0.1", port=7860)    # `lmedit serve` does this, then waits
    demo.block_thread()

Every handler here only parses the page's values (`inputs`), calls the session, and renders its result
(`tables`, `charts`). A request the library refuses shows its `LMEditError` message in the tab's status
line (`error: ...`); anything else shows one line too, and its traceback goes to the server's log only.
Model jobs share one queue slot (`concurrency_id="model"`, limit 1): a second job waits, and Gradio
shows its place in the queue on the outputs it will fill.

Not handled: authentication (the app binds to 127.0.0.1 unless `--host` says otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from lmedit.web import inputs
from lmedit.web.session import Session
from lmedit.web.tables import (AUDIT_HEADERS, BEFORE_AFTER_HEADERS, COMPARE_HEADERS, LEDGER_HEADERS, audit_checks,
                               before_after, compare_table, error_status, ledger_table, moved, prob, reaudit_table,
                               status, table, trace_summary, verdict)

log = logging.getLogger(__name__)

MODEL_JOBS = "model"  # the concurrency id every event that uses the model shares (one at a time)
CSS = """
.lmedit-status { padding: 6px 10px; border-radius: 6px; margin: 2px 0; }
.lmedit-ok { background: #e8f5e9; color: #1b5e20; }
.lmedit-note { background: #fff8e1; color: #6d4c00; }
.lmedit-error { background: #fdecea; color: #b00020; font-weight: 600; }
"""
# System fonts only: the app works offline, so nothing is fetched from a font service.
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
EXAMPLE = dict(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris")
TRACE_EXAMPLE = dict(prompt="The Space Needle is in downtown", subject="The Space Needle")


def _failed(exc: BaseException) -> str:
    """The status line for an exception; a bug's traceback goes to the log, never to the page."""
    from lmedit.errors import LMEditError

    if not isinstance(exc, LMEditError):
        log.error("web request failed", exc_info=exc)
    return error_status(exc)


def _reporter(progress: gr.Progress) -> Callable[[str, int, int], None]:
    def report(phase: str, done: int, total: int) -> None:
        progress((done, total) if total else None, desc=phase)

    return report


def _text(label: str, elem_id: str, value: str = "", limit: int = inputs.MAX_PROMPT_CHARS, **kw: Any) -> gr.Textbox:
    return gr.Textbox(label=label, value=value, elem_id=elem_id, max_length=limit, **kw)


def _request_fields(prefix: str) -> list[gr.Textbox]:
    with gr.Row():
        return [_text("prompt ({} marks the subject)", f"{prefix}-prompt", EXAMPLE["prompt"], scale=3),
                _text("subject", f"{prefix}-subject", EXAMPLE["subject"], inputs.MAX_SUBJECT_CHARS),
                _text("new target", f"{prefix}-new", EXAMPLE["target_new"], inputs.MAX_TARGET_CHARS),
                _text("true target (optional)", f"{prefix}-true", EXAMPLE["target_true"], inputs.MAX_TARGET_CHARS)]


def _probe_fields(prefix: str) -> list[gr.Textbox]:
    limit = inputs.MAX_PROBE_LINES * (inputs.MAX_PROMPT_CHARS + inputs.MAX_TARGET_CHARS + 4)
    with gr.Row():
        return [_text(f"extra paraphrases (one per line, at most {inputs.MAX_PROBE_LINES})", f"{prefix}-paraphrases",
                      limit=limit, lines=2),
                _text("extra neighbours (PROMPT = ANSWER per line; ANSWER must survive)", f"{prefix}-neighbours",
                      limit=limit, lines=2)]


def build(session: Session) -> gr.Blocks:
    """The four tabs over `session` (not launched)."""
    methods, default = session.methods(), session.default_method()
    first_settings, first_source = session.settings(default)
    ledger_shown = str(session.ledger_path or "lmedit-ledger")

    with gr.Blocks(title=f"lmedit · {session.lm.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## lmedit · {session.lm.name}\nLocate a fact, edit it, compare methods, keep the edits.")
        state_line = gr.HTML(status("note", session.state()), elem_id="model-state")
        with gr.Tabs():
            # ---- Trace ------------------------------------------------------------------------------
            with gr.Tab("Trace", id="trace"):
                with gr.Row():
                    t_prompt = _text("prompt (filled in)", "trace-prompt", TRACE_EXAMPLE["prompt"], scale=3)
                    t_subject = _text("subject", "trace-subject", TRACE_EXAMPLE["subject"], inputs.MAX_SUBJECT_CHARS)
                    t_answer = _text("answer (optional: the model's top prediction)", "trace-answer",
                                     limit=inputs.MAX_TARGET_CHARS)
                    t_samples = gr.Slider(1, inputs.MAX_TRACE_SAMPLES, value=10, step=1, label="noise samples",
                                          elem_id="trace-samples")
                t_button = gr.Button("Trace", variant="primary", elem_id="trace-button")
                t_status = gr.HTML(elem_id="trace-status")
                with gr.Row():
                    t_images = [gr.Image(label=label, type="filepath", interactive=False, elem_id=f"trace-{kind}",
                                         buttons=["download", "fullscreen"], show_label=False)
                                for kind, label in (("resid", "hidden state"), ("mlp", "MLP"), ("attn", "attention"))]
                t_files = gr.File(label="download (JSON and PNG)", file_count="multiple", interactive=False,
                                  elem_id="trace-files")

            # ---- Edit -------------------------------------------------------------------------------
            with gr.Tab("Edit", id="edit"):
                e_request = _request_fields("edit")
                e_method = gr.Radio(methods, value=default, label="method (every registered editor)",
                                    elem_id="edit-method")
                e_source = gr.HTML(status("note", f"settings: {first_source}"), elem_id="edit-settings-source")
                e_settings = gr.Textbox(first_settings, label="settings (YAML; shipped for this model where lmedit "
                                        "has them; edit freely)", lines=8, max_lines=30,
                                        max_length=inputs.MAX_SETTINGS_CHARS, elem_id="edit-settings")
                e_probes = _probe_fields("edit")
                e_record = gr.Checkbox(False, label="record in the ledger (audited by its gate; refused edits are "
                                       "not kept)", elem_id="edit-record")
                with gr.Row():
                    e_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    e_undo = gr.Button("Undo", elem_id="edit-undo")
                    e_save = gr.Button("Save edit", elem_id="edit-save")
                    e_keep = gr.Button("Record last edit in ledger", elem_id="edit-record-button")
                e_status = gr.HTML(elem_id="edit-status")
                e_table = gr.Dataframe(table(BEFORE_AFTER_HEADERS, []), label="before / after", interactive=False,
                                       wrap=True, max_height=1400, elem_id="edit-table",
                                       column_widths=["11%", "25%", "12%", "7%", "7%", "19%", "19%"])
                e_verdict = gr.HTML(elem_id="edit-verdict")
                e_checks = gr.Dataframe(table(AUDIT_HEADERS, []), label="audit checks", interactive=False, max_height=800,
                                        elem_id="edit-checks")
                e_file = gr.File(label="saved edit", interactive=False, visible=False, elem_id="edit-file")

            # ---- Compare ----------------------------------------------------------------------------
            with gr.Tab("Compare", id="compare"):
                c_request = _request_fields("compare")
                c_probes = _probe_fields("compare")
                c_methods = gr.CheckboxGroup(methods, value=[default], elem_id="compare-methods",
                                             label=f"methods (at most {inputs.MAX_COMPARE_METHODS}; each with the "
                                                   "settings lmedit ships for this model)")
                c_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                c_status = gr.HTML(elem_id="compare-status")
                c_table = gr.Dataframe(table(COMPARE_HEADERS, []), label="per method", interactive=False, wrap=True,
                                       elem_id="compare-table",
                                       column_widths=["12%", *["8%"] * 5, "7%", "6%", "35%"])
                c_chart = gr.Image(label="chart", type="filepath", interactive=False, elem_id="compare-chart")

            # ---- Ledger -----------------------------------------------------------------------------
            with gr.Tab("Ledger", id="ledger"):
                with gr.Row():
                    l_path = _text("ledger directory (on the server)", "ledger-path", ledger_shown,
                                   inputs.MAX_PATH_CHARS, scale=3)
                    l_open = gr.Button("Open", elem_id="ledger-open")
                    l_refresh = gr.Button("Refresh", elem_id="ledger-refresh")
                l_status = gr.HTML(status("note", session.startup_note) if session.startup_note else "",
                                   elem_id="ledger-status")
                l_table = gr.Dataframe(table(LEDGER_HEADERS, []), label="edits", interactive=False, wrap=True,
                                       elem_id="ledger-table")
                with gr.Row():
                    l_id = gr.Number(label="edit id", precision=0, minimum=1, elem_id="ledger-id")
                    l_show = gr.Button("Show audit", elem_id="ledger-show")
                    l_revert = gr.Button("Revert", variant="stop", elem_id="ledger-revert")
                    l_patch = gr.Button("Export patch", elem_id="ledger-patch")
                    l_name = _text("model directory name (under the app's output directory)", "ledger-export-name",
                                   "edited-model", 64)
                    l_model = gr.Button("Export model", elem_id="ledger-export-model")
                l_checks = gr.Dataframe(table(AUDIT_HEADERS, []), label="audit", interactive=False, wrap=True,
                                        elem_id="ledger-checks")
                l_plot = gr.Image(label="audit plot", type="filepath", interactive=False, elem_id="ledger-plot")
                l_file = gr.File(label="patch file", interactive=False, elem_id="ledger-file")

        def state() -> str:
            return status("note", session.state())

        # ---- handlers -------------------------------------------------------------------------------
        def on_trace(prompt, subject, answer, samples, progress=gr.Progress()):
            try:
                out = session.trace(inputs.trace_query(prompt, subject, answer, samples), _reporter(progress))
            except Exception as exc:  # noqa: BLE001  (shown on the page, never raised into Gradio)
                return _failed(exc), None, None, None, None
            return (trace_summary(out.results, out.layer, out.seconds),
                    *(str(out.images.get(k)) if k in out.images else None for k in ("resid", "mlp", "attn")),
                    [str(p) for p in out.files])

        def on_method(method):
            try:
                text, source = session.settings(method)
            except Exception as exc:  # noqa: BLE001
                return gr.update(), _failed(exc)
            return text, status("note", f"settings: {source}")

        def on_edit(prompt, subject, new, true, method, settings, paraphrases, neighbours, record,
                    progress=gr.Progress()) -> Iterator[tuple]:
            empty = table(AUDIT_HEADERS, [])
            try:
                request = inputs.edit_request(prompt, subject, new, true)
                values = inputs.settings(settings)
                last, note = session.edit(request, method, values, paraphrases=inputs.paraphrases(paraphrases),
                                          neighbors=inputs.neighbors(neighbours), progress=_reporter(progress))
            except Exception as exc:  # noqa: BLE001
                yield _failed(exc), gr.update(), "", empty, state()
                return
            done = f"edit {last.number} ({last.method}) applied in {last.seconds:.1f} s; {moved(last.lines)}" + \
                (f"; {note}" if note else "")
            yield (status("ok", done), before_after(last.lines),
                   status("note", "recording through the ledger's audit gate ..." if record else "auditing the edit ..."),
                   empty, state())
            try:
                report, recorded, refused = session.audit_last(record=bool(record))
            except Exception as exc:  # noqa: BLE001
                yield status("ok", done), gr.update(), _failed(exc), empty, state()
                return
            yield status("ok", done), gr.update(), verdict(report, recorded, refused), audit_checks(report), state()

        def on_undo():
            try:
                line, now = session.undo()
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), state()
            same = "the same as before the edit" if now == line.before[0] else "NOT the same as before the edit"
            return status("ok", f"undone; P({line.target}) on the edit prompt: before the edit {prob(line.before[0])}, "
                                f"with it {prob(line.after[0])}, now {prob(now)} ({same}: Edit.undo restores the "
                                f"weights bit for bit)"), state()

        def on_save():
            try:
                path = session.save_last()
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), gr.update()
            return (status("ok", f"edit saved to {session.shown(path)} (`lmedit generate --edit FILE` applies it)"),
                    gr.update(value=str(path), visible=True))

        def on_keep():
            try:
                report, recorded, refused = session.record_last()
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), gr.update(), gr.update(), state()
            text = f"recorded as edit {recorded}" if recorded else "refused by the audit gate: not recorded"
            return status("ok" if recorded else "refuse", text), verdict(report, recorded, refused), \
                audit_checks(report), state()

        def on_compare(prompt, subject, new, true, paraphrases, neighbours, chosen, progress=gr.Progress()):
            try:
                request = inputs.edit_request(prompt, subject, new, true)
                out = session.compare(request, chosen or [], paraphrases=inputs.paraphrases(paraphrases),
                                      neighbors=inputs.neighbors(neighbours), progress=_reporter(progress))
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), gr.update(), None, state()
            failed = [r.method for r in out.results if r.metrics is None]
            text = f"compared {len(out.results)} method(s) on {request.text} → {request.target_new}"
            text += f"; failed: {', '.join(failed)} (see the table)" if failed else ""
            text += "".join(f"; {n}" for n in out.notes)
            return (status("note" if failed else "ok", text), compare_table(out.results, out.reference),
                    str(out.chart) if out.chart else None, state())

        def ledger_view() -> dict:
            return ledger_table(session.ledger_rows())

        def on_open(path):
            try:
                note = session.open_ledger(path)
                return status("ok", note), ledger_view(), state()
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), table(LEDGER_HEADERS, []), state()

        def on_refresh():
            try:
                if session.ledger is None:
                    where = session.startup_note or (f"no edits yet in {session.ledger_path}" if session.ledger_path
                                                     else "no ledger open: open a directory (created on the first record)")
                    return status("note", where), table(LEDGER_HEADERS, [])
                return status("ok", f"{len(session.ledger_rows())} edit(s) in {session.ledger.path}"), ledger_view()
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), gr.update()

        def on_show(edit_id):
            try:
                row, report, plot = session.ledger_audit(edit_id)
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), gr.update(), None
            if report is None:
                return status("note", f"edit {row.id} has no stored audit"), table(AUDIT_HEADERS, []), None
            return verdict(report), audit_checks(report), str(plot)

        def on_revert(edit_id):
            try:
                result = session.revert(edit_id)
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), gr.update(), gr.update(), state()
            text = f"reverted edit {result.edit_id}; the model is the base + {len(result.remaining)} remaining edit(s)"
            if result.reports:
                text += ", re-audited" + (f": no longer holding: {', '.join(map(str, result.broken))}" if result.broken
                                          else ": all still hold")
            return status("ok", text), ledger_view(), reaudit_table(result.reports), state()

        def on_patch():
            try:
                path = session.export_patch()
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), None
            return status("ok", f"patch written to {session.shown(path)} (`lmedit ledger import` reads it)"), str(path)

        def on_model(name):
            try:
                path = session.export_model(name)
            except Exception as exc:  # noqa: BLE001
                return _failed(exc), state()
            return status("ok", f"model written to {session.shown(path)} (plain transformers loads it)"), state()

        model = dict(concurrency_id=MODEL_JOBS, concurrency_limit=1)
        t_button.click(on_trace, [t_prompt, t_subject, t_answer, t_samples], [t_status, *t_images, t_files], **model)
        e_method.change(on_method, [e_method], [e_settings, e_source])
        e_button.click(on_edit, [*e_request, e_method, e_settings, *e_probes, e_record],
                       [e_status, e_table, e_verdict, e_checks, state_line], **model)
        e_undo.click(on_undo, None, [e_status, state_line], **model)
        e_save.click(on_save, None, [e_status, e_file], **model)
        e_keep.click(on_keep, None, [e_status, e_verdict, e_checks, state_line], **model)
        c_button.click(on_compare, [*c_request, *c_probes, c_methods], [c_status, c_table, c_chart, state_line], **model)
        l_open.click(on_open, [l_path], [l_status, l_table, state_line], **model)
        l_refresh.click(on_refresh, None, [l_status, l_table], **model)
        l_show.click(on_show, [l_id], [l_status, l_checks, l_plot], **model)
        l_revert.click(on_revert, [l_id], [l_status, l_table, l_checks, state_line], **model)
        l_patch.click(on_patch, None, [l_status, l_file], **model)
        l_model.click(on_model, [l_name], [l_status, state_line], **model)
        demo.load(on_refresh, None, [l_status, l_table], **model)
    return demo


def launch(session: Session, host: str = "127.0.0.1", port: int = 7860) -> gr.Blocks:
    """Build the app, start serving it (in a background thread) and return it; `demo.block_thread()` waits."""
    demo = build(session)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=False,
                allowed_paths=[str(session.out_dir)], ssr_mode=False, theme=gr.themes.Default(**THEME_FONTS),
                css=CSS, footer_links=["api", "settings"])
    return demo
