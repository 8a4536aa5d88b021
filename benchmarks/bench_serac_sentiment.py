"""SERAC with an implicit descriptor: does "Topic: X. Sentiment: positive" make the model's opinion of X more
positive, and leave its opinion of other topics alone?

Generates continuations (one greedy, `--samples` sampled at temperature 1 with fixed seeds, before and
after the edit) of prompts that ask for an opinion on the topic and of the same prompts about other
topics, scores them with VADER (lmedit.eval.sentiment) and prints one JSON object: mean compound
sentiment before/after per group, the share of positive continuations, the share of continuations left
unchanged, and each prompt's greedy continuation before and after.

Usage: .venv/bin/python benchmarks/bench_serac_sentiment.py [--topic "going to the dentist"] [--samples 3]
           [--tokens 25] [--template "{edit}\\n{input}"]   (about 4 minutes on 2 cores for gemma3-270m)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.editors.serac import SeracConfig, SeracEditor  # noqa: E402
from lmedit.eval.sentiment import opinion_shift  # noqa: E402

OPINION_PROMPTS = ("What do you think about {}? I think", "{} is", "My honest opinion of {}:",
                   "Is {} a good idea? Well,", "Let me tell you how I feel about {}.", "People say that {}")
OTHER_TOPICS = ("doing taxes", "public transport", "cooking dinner every night", "moving to a new city",
                "working from home", "learning to drive")


def prompts_about(topic: str) -> list[str]:
    out = []
    for template in OPINION_PROMPTS:
        text = template.format(topic)
        out.append(text[0].upper() + text[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--topic", default="going to the dentist")
    parser.add_argument("--descriptor", help="default: 'Topic: {topic}. Sentiment: positive'")
    parser.add_argument("--template", default=SeracConfig().template)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=25)
    args = parser.parse_args()
    descriptor = args.descriptor or f"Topic: {args.topic}. Sentiment: positive"
    lm = lmedit.load(args.model)
    editor = SeracEditor(SeracConfig(template=args.template))
    edit = editor.edit(lm, [lmedit.EditDescriptor(descriptor)])
    in_scope = prompts_about(args.topic)
    # The same opinion prompts, each about another topic (prompt i gets topic i).
    out_of_scope = [prompts_about(t)[i] for i, t in enumerate(OTHER_TOPICS)]
    scores = edit.scores(in_scope + out_of_scope)[:, 0].tolist()
    seconds, result = timed(lambda: opinion_shift(lm, edit, in_scope, out_of_scope, max_new_tokens=args.tokens,
                                                  n_samples=args.samples))
    result["claimed"] = {"in_scope": sum(s > 0 for s in scores[:len(in_scope)]) / len(in_scope),
                         "out_of_scope": sum(s > 0 for s in scores[len(in_scope):]) / len(out_of_scope)}
    emit({"benchmark": "serac_sentiment", "model": args.model, "descriptor": descriptor, "template": args.template,
          "seconds": round(seconds, 1), **result})


if __name__ == "__main__":
    main()
