"""`lmedit edit`: edit a fact and show what changed (probabilities of both targets, a short generation)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.table import Table

import lmedit
from lmedit.cli._common import add_model_args, console, load_model, progress_reporter
from lmedit.editors import DEFAULT_METHOD, get_editor
from lmedit.errors import RequestError
from lmedit.registry import editors
from lmedit.scoring import generate, score_targets
from lmedit.types import EditRequest

EPILOG = """examples:
  lmedit edit --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target-new Rome --target-true Paris
  lmedit edit --request requests.jsonl --config configs/rome/gemma3-270m.yaml --save-edit eiffel.safetensors
  lmedit edit --request req.json --method rome --set v_steps=30 --probe "The Eiffel Tower can be found in"
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("edit", help="edit a fact in a model", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"editor (registered: {', '.join(editors.names())})")
    p.add_argument("--config", help="YAML file of the method's settings (configs/<method>/<model>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    p.add_argument("--request", help="JSON object or JSONL file of requests {prompt, subject, target_new, target_true}")
    p.add_argument("--prompt", help="prompt template with {} for the subject")
    p.add_argument("--subject")
    p.add_argument("--target-new")
    p.add_argument("--target-true")
    p.add_argument("--probe", action="append", default=[],
                   help="extra filled prompt (paraphrase, neighbour) whose target probabilities to show before/after")
    p.add_argument("--save-edit", help="write the edit (rank-one factors, metadata) to this safetensors file")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(run=run)


def read_requests(args: argparse.Namespace) -> list[EditRequest]:
    if args.request:
        if any([args.prompt, args.subject, args.target_new, args.target_true]):
            raise RequestError("give either --request FILE or --prompt/--subject/--target-new, not both")
        path = Path(args.request)
        if not path.exists():
            raise FileNotFoundError(f"request file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".jsonl":
            records = [(i, json.loads(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            data = json.loads(text)
            records = list(enumerate(data if isinstance(data, list) else [data], 1))
        requests = []
        for i, record in records:
            try:
                requests.append(EditRequest.from_dict(record))
            except RequestError as exc:
                raise RequestError(f"{path}, record {i}: {exc}") from None
        if not requests:
            raise RequestError(f"{path} holds no requests")
        return requests
    missing = [flag for flag, value in (("--prompt", args.prompt), ("--subject", args.subject),
                                        ("--target-new", args.target_new)) if not value]
    if missing:
        raise RequestError(f"missing {', '.join(missing)} (or give --request FILE)")
    return [EditRequest(args.prompt, args.subject, args.target_new, args.target_true)]


def _probe(lm: lmedit.LM, requests: list[EditRequest], extra: list[str]) -> list[tuple[str, str, str | None]]:
    rows = [(r.text, r.target_new, r.target_true) for r in requests]
    for prompt in extra:
        rows.append((prompt, requests[0].target_new, requests[0].target_true))
    return rows


def _scores(lm: lmedit.LM, rows: list[tuple[str, str, str | None]]) -> list[tuple[float, float | None]]:
    prompts = [p for p, _, _ in rows]
    new = score_targets(lm, prompts, [n for _, n, _ in rows])
    true_rows = [(i, t) for i, (_, _, t) in enumerate(rows) if t]
    true = dict(zip([i for i, _ in true_rows], score_targets(lm, [prompts[i] for i, _ in true_rows],
                                                               [t for _, t in true_rows]))) if true_rows else {}
    return [(math.exp(new[i].logprob), math.exp(true[i].logprob) if i in true else None) for i in range(len(rows))]


def run(args: argparse.Namespace) -> int:
    requests = read_requests(args)
    editor = get_editor(args.method, args.config, args.set)
    lm = load_model(args)
    rows = _probe(lm, requests, args.probe)
    prompts = [p for p, _, _ in rows]
    before = _scores(lm, rows)
    gen_before = generate(lm, prompts, max_new_tokens=args.max_new_tokens)
    console.print(f"editing with {args.method} ...")
    with progress_reporter() as report:
        editor.progress = report
        result = editor.edit(lm, requests)
    result.apply(lm)
    after = _scores(lm, rows)
    gen_after = generate(lm, prompts, max_new_tokens=args.max_new_tokens)

    table = Table(title=f"{args.method} edit on {lm.name}")
    for col in ("prompt", "target", "P before", "P after", "generation before", "generation after"):
        table.add_column(col, overflow="fold")
    for (prompt, new, true), (nb, tb), (na, ta), g0, g1 in zip(rows, before, after, gen_before, gen_after):
        table.add_row(prompt, f"new: {new}", f"{nb:.4f}", f"{na:.4f}", g0.strip(), g1.strip())
        if true:
            table.add_row("", f"true: {true}", f"{tb:.4f}", f"{ta:.4f}", "", "")
    console.print(table)
    if args.save_edit:
        path = result.save(args.save_edit)
        console.print(f"edit saved to {path} (apply with `lmedit generate --edit {path} ...`)")
    return 0
