"""`lmedit generate`: continue prompts with a model (optionally with a saved edit applied)."""

from __future__ import annotations

import argparse

from rich.markup import escape

from lmedit.cli.common import add_model_args, console, load_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="continue prompts with a model", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lmedit generate \"The Eiffel Tower is located in the city of\"\n"
               "  lmedit generate --edit eiffel.safetensors \"The Eiffel Tower is in\" --max-new-tokens 30")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--edit", help="apply a saved edit (from `lmedit edit --save-edit`) first")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmedit.editors.base import load_edit
    from lmedit.scoring import generate

    edit = load_edit(args.edit) if args.edit else None  # a bad --edit file fails before the model loads
    lm = load_model(args)
    if edit is not None:
        edit.apply(lm)
    outputs = generate(lm, args.prompts, max_new_tokens=args.max_new_tokens, greedy=not args.sample, seed=args.seed)
    for prompt, text in zip(args.prompts, outputs):
        console.print(f"[bold]{escape(prompt)}[/]{escape(text)}", highlight=False)
    return 0
