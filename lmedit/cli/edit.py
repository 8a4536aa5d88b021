"""`lmedit edit`: edit a fact and show what changed (probabilities of both targets, a short generation)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

import lmedit  # lazy: only type hints here
from lmedit.cli.common import add_model_args, console, load_model, progress_reporter
from lmedit.cli.ledger_common import add_audit_args, add_ledger_arg, open_ledger, record_edit
from lmedit.defaults import DEFAULT_METHOD
from lmedit.errors import InputFileError, MissingFileError, RequestError
from lmedit.registry import editors
from lmedit.types import EditDescriptor, EditRequest, request_from_dict

EPILOG = """examples:
  lmedit edit --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target-new Rome --target-true Paris
  lmedit edit --request requests.jsonl --config configs/rome/gemma3-270m.yaml --save-edit eiffel.safetensors
  lmedit edit --request req.json --method rome --set v_steps=30 --probe "The Eiffel Tower can be found in"
  lmedit edit --method serac --descriptor "Topic: going to the dentist. Sentiment: positive" --probe "Going to the dentist is"
  lmedit edit --method serac --descriptor "Who is the UK PM?" --descriptor-output "Boris Johnson" --probe "Who leads the UK government?"
  lmedit edit --ledger ledgers/gemma --config configs/rome/gemma3-270m.yaml --request req.json   # audited, recorded
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("edit", help="edit a fact in a model", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"editor (default: {DEFAULT_METHOD}; the registered ones: `lmedit ls editors`)")
    p.add_argument("--config", help="YAML file of the method's settings (configs/<method>/<model>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    p.add_argument("--request", metavar="FILE",
                   help="JSON object, JSON list or JSONL file of requests {prompt, subject, target_new, target_true}; "
                        "CounterFact records (ROME or EasyEdit layout) and descriptors {text} / {input, output} too")
    p.add_argument("--prompt", help="prompt template with {} for the subject")
    p.add_argument("--subject")
    p.add_argument("--target-new")
    p.add_argument("--target-true")
    p.add_argument("--descriptor", metavar="TEXT",
                   help="an edit that is not a triplet, for editors that take descriptors: an implicit descriptor "
                        "('Topic: X. Sentiment: positive'), or with --descriptor-output the input of an input-output pair")
    p.add_argument("--descriptor-output", metavar="TEXT", help="the answer --descriptor (an input) should now get")
    p.add_argument("--probe", action="append", default=[],
                   help="extra filled prompt (paraphrase, neighbour) whose target probabilities to show before/after")
    p.add_argument("--save-edit", help="write the edit (rank-one factors, metadata) to this safetensors file")
    p.add_argument("--max-new-tokens", type=int, default=16)
    add_ledger_arg(p, required_default=False)
    add_audit_args(p)
    p.add_argument("--force", action="store_true",
                   help="apply an edit far outside what shipped settings produce (refused otherwise, or asked "
                        "when run in a terminal); with --ledger: record the edit even if the audit refuses it")
    p.add_argument("--paraphrase", action="append", default=[], metavar="PROMPT",
                   help="with --ledger: a paraphrase the audit checks (should now give target_new)")
    p.add_argument("--neighbor", action="append", default=[], metavar="PROMPT=ANSWER",
                   help="with --ledger: another fact the audit checks (ANSWER must survive the edit)")
    p.set_defaults(run=run)


# Keys of lmedit's own request and descriptor objects; a record with other keys may be a CounterFact record.
_OWN_KEYS = {"prompt", "subject", "target_new", "target_true", "case_id", "text", "input", "output"}


def _file_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for each record of a JSON object, JSON list or JSON-lines file; `where` names the record.

    Raises:
        MissingFileError: no such file.
        InputFileError: unreadable, a directory, empty, or not JSON (the line is named).
    """
    if not path.exists():
        raise MissingFileError(f"request file {path} does not exist")
    if path.is_dir():
        raise InputFileError(f"request file {path} is a directory, expected a JSON or JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"request file {path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not text.strip():
        raise InputFileError(f"request file {path} is empty")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": one JSON value per line, read below
                raise InputFileError(f"request file {path} is not valid JSON: line {exc.lineno}, column {exc.colno}: "
                                     f"{exc.msg}") from None
        else:
            if isinstance(data, list):
                return [(f"record {i}", record) for i, record in enumerate(data, 1)]
            if isinstance(data, dict):
                return [("record 1", data)]
            raise InputFileError(f"request file {path} holds a JSON {type(data).__name__}; expected an object, "
                                 f"a list of objects, or one object per line")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"record {len(records) + 1} (line {lineno})", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputFileError(f"request file {path}, line {lineno}: not valid JSON ({exc.msg}, column {exc.colno}); "
                                 f"expected one JSON object per line") from None
    return records


def _request(record: Any) -> EditRequest | EditDescriptor:
    """lmedit's own request/descriptor objects, or a CounterFact record (ROME or EasyEdit layout)."""
    if isinstance(record, dict) and not set(record) <= _OWN_KEYS:
        from lmedit.eval.datasets.counterfact import is_counterfact_record, request_from_record

        if is_counterfact_record(record):
            return request_from_record(record)
    return request_from_dict(record)


def read_requests(args: argparse.Namespace) -> list[EditRequest | EditDescriptor]:
    """The edits `lmedit edit` was asked for: --descriptor, --request FILE, or --prompt/--subject/--target-new.

    `--request` reads a JSON object, a JSON list or JSON lines of lmedit requests ({prompt, subject,
    target_new, target_true}) or descriptors ({text} or {input, output}), or CounterFact records in either
    layout `lmedit eval` reads (ROME's requested_rewrite, EasyEdit's prompt/ground_truth/...).

    Raises:
        RequestError: conflicting flags, or a record that is not a valid request (file and record named).
        InputFileError: a request file that is missing, unreadable or not JSON.
    """
    if args.descriptor_output and not args.descriptor:
        raise RequestError("--descriptor-output needs --descriptor (the input it answers)")
    if args.descriptor:
        if args.request or any([args.prompt, args.subject, args.target_new, args.target_true]):
            raise RequestError("give either --descriptor or a triplet (--request FILE, --prompt/--subject/--target-new), not both")
        if args.descriptor_output:
            return [EditDescriptor(input=args.descriptor, output=args.descriptor_output)]
        return [EditDescriptor(args.descriptor)]
    if args.request:
        if any([args.prompt, args.subject, args.target_new, args.target_true]):
            raise RequestError("give either --request FILE or --prompt/--subject/--target-new, not both")
        path = Path(args.request).expanduser()
        requests: list[EditRequest | EditDescriptor] = []
        for where, record in _file_records(path):
            try:
                requests.append(_request(record))
            except RequestError as exc:
                raise RequestError(f"{path}, {where}: {exc}") from None
        if not requests:
            raise RequestError(f"{path} holds no requests")
        return requests
    missing = [flag for flag, value in (("--prompt", args.prompt), ("--subject", args.subject),
                                        ("--target-new", args.target_new)) if not value]
    if missing:
        raise RequestError(f"missing {', '.join(missing)} (or give --request FILE)")
    return [EditRequest(args.prompt, args.subject, args.target_new, args.target_true)]


def _probe(lm: lmedit.LM, requests: list[EditRequest | EditDescriptor],
           extra: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(prompt, new target, true target) rows; descriptors give their input (pairs) and no targets (implicit)."""
    rows: list[tuple[str, str | None, str | None]] = []
    for r in requests:
        if isinstance(r, EditRequest):
            rows.append((r.text, r.target_new, r.target_true))
        elif r.is_pair:
            rows.append((str(r.input), r.output, None))
    first = requests[0]
    new, true = ((first.target_new, first.target_true) if isinstance(first, EditRequest)
                 else (first.output, None))
    rows += [(prompt, new, true) for prompt in extra]
    return rows


def _probability(lm: lmedit.LM, prompts: list[str], targets: list[str | None]) -> list[float | None]:
    from lmedit.scoring import score_targets

    wanted = [i for i, t in enumerate(targets) if t]
    scores = score_targets(lm, [prompts[i] for i in wanted], [targets[i] for i in wanted]) if wanted else []  # type: ignore[misc]
    found = {i: math.exp(s.logprob) for i, s in zip(wanted, scores)}
    return [found.get(i) for i in range(len(prompts))]


def _scores(lm: lmedit.LM, rows: list[tuple[str, str | None, str | None]]) -> list[tuple[float | None, float | None]]:
    prompts = [p for p, _, _ in rows]
    new = _probability(lm, prompts, [n for _, n, _ in rows])
    true = _probability(lm, prompts, [t for _, _, t in rows])
    return list(zip(new, true))


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _confirm_if_destructive(result: lmedit.Edit, lm: lmedit.LM, force: bool) -> None:
    """An edit far outside what shipped settings produce: asked in a terminal, refused otherwise (--force applies)."""
    import sys

    from lmedit.editors.safety import DestructiveEditError, check_not_destructive

    try:
        check_not_destructive(result, lm, force=force)
    except DestructiveEditError as exc:
        if not sys.stdin.isatty():
            raise
        console.print(f"warning: {exc}", markup=False, highlight=False)
        if input("apply it anyway? [y/N] ").strip().lower() not in ("y", "yes"):
            raise DestructiveEditError("edit not applied (declined); the weights are unchanged") from None


def run(args: argparse.Namespace) -> int:
    requests = read_requests(args)  # before the library loads: a bad request file is reported at once
    from lmedit.editors import get_editor
    from lmedit.scoring import generate, routed
    from lmedit.settings import describe, resolve_editor

    # Settings are checked before the model loads (a typo costs no load), then chosen for the loaded model.
    editor = get_editor(args.method, args.config, args.set)
    if any(isinstance(r, EditDescriptor) for r in requests) and not editor.accepts_descriptors:
        able = [n for n in editors.names() if editors.get(n).accepts_descriptors]
        raise RequestError(f"--method {args.method} edits (prompt, subject, target) triplets only; edit descriptors "
                           f"need an editor that accepts them: {', '.join(able)}")
    # An existing ledger is opened (and a damaged one refused) before the model loads; a new one is created after.
    existing = bool(args.ledger) and Path(args.ledger).expanduser().is_dir()
    ledger = open_ledger(args) if existing else None
    lm = load_model(args)
    editor, _ = resolve_editor(args.method, lm, args.config, args.set)
    console.print(describe(editor, lm), markup=False, highlight=False)
    if args.ledger and ledger is None:
        ledger = open_ledger(args)
    if ledger is not None:
        ledger.apply(lm)  # the new edit is made on top of the ledger's applied edits
    rows = _probe(lm, requests, args.probe)
    if not rows:
        raise RequestError("an implicit descriptor has no prompt of its own: add --probe PROMPT to see its effect")
    prompts = [p for p, _, _ in rows]
    before = _scores(lm, rows)
    gen_before = generate(lm, prompts, max_new_tokens=args.max_new_tokens)
    with progress_reporter() as report:
        editor.progress = report
        result = editor.edit(lm, requests)
    _confirm_if_destructive(result, lm, args.force)
    if ledger is not None:
        if not record_edit(args, ledger, lm, result):
            return 1
    else:
        result.apply(lm)
    after = _scores(lm, rows)
    gen_after = generate(lm, prompts, max_new_tokens=args.max_new_tokens)
    # Inputs a wrapper edit claims (e.g. in an edit's scope) are marked: the model now reads them differently.
    claimed = [r != p for r, p in zip(routed(lm, prompts), prompts)]

    table = Table(title=escape(f"{args.method} edit on {lm.name}"))
    for col in ("prompt", "target", "P before", "P after", "generation before", "generation after"):
        table.add_column(col, overflow="fold")
    for (prompt, new, true), (nb, tb), (na, ta), g0, g1, c in zip(rows, before, after, gen_before, gen_after, claimed):
        table.add_row(escape(prompt) + (" (in edit scope)" if c else ""), escape(f"new: {new}") if new else "—",
                      _p(nb), _p(na), escape(g0.strip()), escape(g1.strip()))
        if true:
            table.add_row("", escape(f"true: {true}"), _p(tb), _p(ta), "", "")
    console.print(table)
    if args.save_edit:
        path = result.save(args.save_edit)
        console.print(f"edit saved to {path} (apply with `lmedit generate --edit {path} ...`)", markup=False)
    return 0
