"""`lmedit trace`: causal tracing of a fact (heatmaps + JSON), severing, patching from another prompt,
averages over many facts, and the layer suggestion the editors use for `layer="auto"`.

A single trace writes its files under `--out` named after the prompt: `<slug>-<hash>_<kind>.json/.png/.svg`,
where the slug is the prompt's first words and the hash (8 hex digits) covers the model, prompt, subject,
answer, source prompt and the tracing settings, so traces of different facts or settings never overwrite
each other and re-running the same trace replaces its own files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import lmedit  # lazy: the library loads when a command runs
from lmedit.cli.common import add_model_args, add_worker_args, check_worker_args, console, load_model
from lmedit.errors import RequestError

# `lmedit.tracing.KINDS`, spelled out so that `--help` needs no torch (tests/unit/test_cli_errors.py checks they agree).
KINDS = ("resid", "mlp", "attn")

EPILOG = """examples:
  lmedit trace "The Space Needle is in downtown" --subject "The Space Needle"
  lmedit trace "The Space Needle is in downtown" --subject "The Space Needle" --answer Seattle --kind mlp --window 4
  lmedit trace "The Space Needle is in downtown" --subject "The Space Needle" --sever
  lmedit trace "Megan Rapinoe plays the sport of" --subject "Megan Rapinoe" \\
      --source-prompt "Shaquille O'Neal plays the sport of"
  lmedit trace --average lmedit/data/trace_facts.jsonl --samples 3 --out docs/figures
  lmedit trace --average lmedit/data/trace_facts.jsonl --workers 4      # 4 Ray workers (pip install 'lmedit[ray]')
  lmedit trace --suggest-layer --model smollm2-135m
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="causal tracing: where does the model store a fact?",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the filled prompt, e.g. 'The Space Needle is in downtown'")
    parser.add_argument("--subject", "-s", help="the subject, a substring of the prompt")
    parser.add_argument("--answer", "-a", help="expected answer (default: the model's top prediction; "
                                               "only its first token is scored)")
    parser.add_argument("--kind", nargs="+", choices=KINDS, default=list(KINDS), help="state kinds (default: all)")
    parser.add_argument("--samples", type=int,
                        help="noise draws per restoration (default: 10; 5 for --suggest-layer)")
    parser.add_argument("--noise", type=float, help="noise std (default: 3 × std of token embeddings)")
    parser.add_argument("--window", type=int, help="layers restored together for mlp/attn "
                                                   "(default: max(1, round(10 · n_layers / 48)))")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--out", "-o", type=Path, default=Path("traces"), help="output directory (default: traces)")
    parser.add_argument("--sever", action="store_true",
                        help="also restore the residual stream with later MLP / attention outputs frozen (Fig. 3)")
    parser.add_argument("--source-prompt", help="patch states from this prompt instead of restoring clean ones")
    parser.add_argument("--source-answer", help="the source prompt's answer (default: its top prediction)")
    parser.add_argument("--average", type=Path, metavar="FILE.jsonl",
                        help="average indirect effect over the facts in this JSONL (prompt with {}, subject, answer)")
    parser.add_argument("--suggest-layer", action="store_true",
                        help="print the layer to edit (MLP effect peak at the last subject token) and its evidence")
    parser.add_argument("--facts", type=Path, help="facts for --suggest-layer (default: the built-in facts)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute --suggest-layer even if $LMEDIT_CACHE/tracing holds the answer")
    add_worker_args(parser, "the facts of --average")
    add_model_args(parser)
    parser.set_defaults(run=run)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _tracker(progress: Progress, description: str):
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


def file_stem(args: argparse.Namespace, model: str) -> str:
    """`<slug>-<hash>`: the prompt's first words, and 8 hex digits of everything that makes this trace differ."""
    slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:40].rstrip("-") or "trace"
    key = {"model": model, "prompt": args.prompt, "subject": args.subject, "answer": args.answer,
           "source_prompt": args.source_prompt, "source_answer": args.source_answer, "samples": args.samples or 10,
           "noise": args.noise, "window": args.window, "seed": args.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def run(args: argparse.Namespace) -> int:
    if not (args.suggest_layer or args.average) and (args.prompt is None or args.subject is None):
        raise RequestError("give a PROMPT and --subject (or use --average FILE / --suggest-layer)")
    _check_workers(args)
    from lmedit.tracing import load_facts

    # Fact files are read before the model loads: a mistake in one is reported at once.
    facts = load_facts(args.facts) if args.suggest_layer and args.facts else None
    if args.average and not args.suggest_layer:
        facts = load_facts(args.average)
    lm = load_model(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suggest_layer:
        return _suggest(lm, args, facts)
    if args.average:
        return _average(lm, args, facts or [])
    return _single(lm, args)


def _check_workers(args: argparse.Namespace) -> None:
    """--workers / --ray-address mistakes, and a missing Ray, before the model loads."""
    check_worker_args(args, None if args.average and not args.suggest_layer else
                      "--workers runs the facts of --average FILE on Ray workers; a single trace or --suggest-layer "
                      "runs here")


def _single(lm, args: argparse.Namespace) -> int:
    from lmedit.tracing import plot_severing, trace_kinds

    settings = dict(samples=args.samples or 10, noise=args.noise, window=args.window, seed=args.seed)
    stem = file_stem(args, lm.name) + ("_source" if args.source_prompt else "")
    with _progress() as progress:
        results = trace_kinds(
            lm, args.prompt, args.subject, args.answer, kinds=args.kind, source_prompt=args.source_prompt,
            source_answer=args.source_answer, progress=_tracker(progress, "tracing"), **settings)
        severed = {}
        if args.sever and not args.source_prompt:
            for kind in ("mlp", "attn"):
                severed[kind] = lmedit.trace(lm, args.prompt, args.subject, args.answer, kind="resid", sever=kind,
                                             progress=_tracker(progress, f"severing {kind}"), **settings)
    table = Table(title=escape(f"{lm.name}: {args.prompt!r} -> {next(iter(results.values())).answer_token!r}"))
    for column in ("kind", "clean p", "corrupted p", "peak (token, layer)", "peak p", "files"):
        table.add_column(column)
    for kind, result in results.items():
        grid = result.grid.nan_to_num(nan=-1.0)
        token, layer = divmod(int(grid.argmax()), grid.shape[1])
        json_path = result.save(args.out / f"{stem}_{kind}.json")
        pictures = result.plot(args.out / f"{stem}_{kind}")
        table.add_row(kind, f"{result.clean_prob:.3f}", f"{result.corrupted_prob:.3f}",
                      escape(f"{result.tokens[token]!r} ({token}), {layer}"), f"{grid.max().item():.3f}",
                      escape(", ".join(str(p) for p in [json_path, *pictures])))
    console.print(table)
    first = next(iter(results.values()))
    if first.answer_n_tokens > 1:
        console.print(f"note: the answer has {first.answer_n_tokens} tokens; P({first.answer_token!r}) was traced",
                      markup=False)
    if severed:
        for kind, result in severed.items():
            result.save(args.out / f"{stem}_resid_sever_{kind}.json")
        plain = results.get("resid") or lmedit.trace(lm, args.prompt, args.subject, args.answer, **settings)
        paths = plot_severing(plain, severed, args.out / f"{stem}_sever")
        console.print(f"severing plot: {', '.join(str(p) for p in paths)}", markup=False)
    return 0


def _average(lm, args: argparse.Namespace, facts: list) -> int:
    from lmedit.tracing import average_trace

    with _progress() as progress:
        result = average_trace(lm, facts, kinds=args.kind, samples=args.samples or 10, noise=args.noise,
                                window=args.window, seed=args.seed, progress=_tracker(progress, "facts"),
                                workers=args.workers, ray_address=args.ray_address,
                                worker_threads=args.worker_threads)
    json_path = result.save(args.out / f"average_{lm.name.replace('/', '_')}.json")
    pictures = result.plot(json_path.with_suffix(""))
    console.print(f"{result.n_known} of {result.n_given} facts known by {lm.name} and traced; "
                  f"wrote {json_path}, {', '.join(str(p) for p in pictures)}", markup=False)
    return 0


def _suggest(lm, args: argparse.Namespace, facts: list | None) -> int:
    from lmedit.tracing import suggest_layer

    samples = args.samples or 5
    with _progress() as progress:
        suggestion = suggest_layer(lm, facts, samples=samples, noise=args.noise, window=args.window, seed=args.seed,
                                   progress=_tracker(progress, "facts"), cache=not args.no_cache)
    path = args.out / f"suggest_layer_{lm.name.replace('/', '_')}.json"
    path.write_text(json.dumps(suggestion.to_dict(), indent=1))
    curve = "  ".join(f"{i}:{v:.3f}" for i, v in enumerate(suggestion.curve))
    console.print(f"suggested layer for {escape(lm.name)}: [bold]{suggestion.layer}[/] "
                  f"(MLP effect at the last subject token over {suggestion.n_facts} facts, window {suggestion.window})")
    console.print(f"curve: {curve}")
    console.print(f"evidence: {path}", markup=False)
    return 0
