"""`lmedit neurons`: knowledge neurons of a fact (integrated-gradients attribution over MLP neurons, Dai et al.
2021, arXiv:2104.08696): a table of the strongest neurons, the attribution as JSON and a plot by layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from lmedit.cli.common import add_model_args, console, load_model, progress_reporter
from lmedit.errors import RequestError

EPILOG = """examples:
  lmedit neurons "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" --target Paris
  lmedit neurons "{} is located in the city of" --subject "The Eiffel Tower" --target Paris \\
      --paraphrase "The Eiffel Tower stands in the city of" --paraphrase "You can visit {} in the city of"
  lmedit neurons "The capital of France is the city of" --subject France --target Paris --prefixes 4 \\
      --layers 8 9 10 11 --steps 40 --out runs/neurons-france
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("neurons", help="find the knowledge neurons of a fact (integrated gradients)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt, filled or with {} for the subject")
    p.add_argument("--subject", "-s", required=True, help="the subject (a substring of a filled prompt)")
    p.add_argument("--target", "-t", required=True, help="the answer whose first token's probability is attributed")
    p.add_argument("--paraphrase", action="append", default=[], metavar="PROMPT",
                   help="another prompt for the same fact (filled or with {}); repeat")
    p.add_argument("--prefixes", type=int, default=0, metavar="N",
                   help="also use the prompt under N short model-generated prefixes (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="Riemann steps of integrated gradients (default: 20)")
    p.add_argument("--threshold", type=float, default=0.2, help="per prompt: attribution ≥ t × max (default: 0.2)")
    p.add_argument("--share", type=float, default=0.7,
                   help="keep neurons found in ≥ this fraction of the prompts (default: 0.7)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to search (default: all)")
    p.add_argument("--max-neurons", type=int, help="keep at most this many knowledge neurons (default: all passing)")
    p.add_argument("--top", type=int, default=15, help="rows of the printed table (default: 15)")
    p.add_argument("--out", "-o", type=Path, default=Path("neurons"), help="output directory (default: neurons)")
    add_model_args(p)
    p.set_defaults(run=run)


def _fill(prompt: str, subject: str) -> str:
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise RequestError(f"prompt {prompt!r} has more than one '{{}}'")
        return prompt.format(subject)
    if subject not in prompt:
        raise RequestError(f"subject {subject!r} does not occur in the prompt {prompt!r} (or write {{}} for it)")
    return prompt


def run(args: argparse.Namespace) -> int:
    if not args.subject.strip():
        raise RequestError("--subject is empty")
    prompts = [_fill(p, args.subject) for p in [args.prompt, *args.paraphrase]]
    if args.prefixes < 0:
        raise RequestError(f"--prefixes must be >= 0, got {args.prefixes}")
    from lmedit.neurons import find_knowledge_neurons

    lm = load_model(args)
    if args.prefixes:
        from lmedit.editors.steps.value import context_prefixes
        from lmedit.stats import StatsCache

        with console.status("sampling prefixes ..."):
            prefixes = context_prefixes(lm, ((5, args.prefixes),), cache=StatsCache())[1:]
        prompts += [prefix + p for prefix in prefixes for p in prompts[:1]]
    with progress_reporter() as report:
        result = find_knowledge_neurons(
            lm, prompts, args.target, steps=args.steps, threshold=args.threshold, share=args.share,
            layers=args.layers, max_neurons=args.max_neurons, subject=args.subject,
            progress=lambda done, total: report(f"attributing {len(prompts)} prompt(s)", done, total))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = result.save(args.out / "neurons.json")
    png_path = result.plot(args.out / "neurons.png")

    selected = set(result.neurons)
    first = result.attributions[0]
    table = Table(title=escape(f"{lm.name}: P({first.target_token.strip()!r}) attributed over {len(prompts)} prompt(s)"))
    for column in ("rank", "layer", "neuron", "attribution", "prompts", "activation", "knowledge neuron"):
        table.add_column(column, justify="right" if column != "knowledge neuron" else "center")
    for rank, row in enumerate(result.table(result.top(args.top)), 1):
        table.add_row(str(rank), str(row["layer"]), str(row["index"]), f"{row['score']:.4f}",
                      f"{row['prompts']}/{len(prompts)}", f"{row['activation']:+.3f}",
                      "✓" if (row["layer"], row["index"]) in selected else "")
    console.print(table)
    probs = ", ".join(f"{a.prob:.3f}" for a in result.attributions)
    console.print(f"P({first.target_token.strip()!r}) per prompt: {probs}", markup=False)
    console.print(f"{len(result.neurons)} knowledge neuron(s) (t = {args.threshold}, p = {args.share}): "
                  + (", ".join(f"L{layer}.{index}" for layer, index in result.neurons) or "none"))
    console.print(f"wrote {json_path}, {png_path}", markup=False)
    return 0
