"""Key statistics: cost per 10k tokens, and what the corpus and its size do to ROME's edit quality.

For each corpus setting, computes C at the edited layer (timed, into a scratch cache), then runs ROME
on a fixed set of facts the default model knows and scores each edit with whole-target log-probs:
efficacy (edit prompt prefers target_new), paraphrase (a rephrasing prefers it), neighbourhood (a
different subject sharing the true object still prefers target_true). This is the evidence for the
default corpus in RomeConfig / lmedit/configs/rome/*.yaml.

Usage: .venv/bin/python benchmarks/bench_stats.py [--model gemma3-270m] [--settings sampled:5000,docstrings:20000,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402
from lmedit.editors import get_editor  # noqa: E402
from lmedit.scoring import score_targets  # noqa: E402
from lmedit.settings import shipped_path  # noqa: E402
from lmedit.stats import CorpusSpec, StatsCache, corpus_sequences, key_second_moment  # noqa: E402
from lmedit.types import EditRequest  # noqa: E402

# (request, paraphrase, neighbour prompt): neighbours share the true object with a different subject, except
# Japan's, which keeps the subject and asks another relation (kept so the measured numbers stay comparable).
FACTS = [
    (EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
     "The Eiffel Tower can be found in the city of", "The Louvre is located in the city of"),
    (EditRequest("{} plays the sport of", "Michael Jordan", "soccer", "basketball"),
     "Michael Jordan is a professional", "Kobe Bryant plays the sport of"),
    (EditRequest("The mother tongue of {} is", "Emmanuel Macron", "Japanese", "French"),
     "Emmanuel Macron grew up speaking", "The mother tongue of Victor Hugo is"),
    (EditRequest("{} is a product of", "iPhone", "Toyota", "Apple"),
     "The iPhone is made by", "macOS is a product of"),
    (EditRequest("The capital of {} is", "Japan", "Berlin", "Tokyo"),
     "Japan's capital city is", "The largest city in Japan is"),
    (EditRequest("{} was written by", "Hamlet", "Charles Dickens", "William Shakespeare"),
     "The author of Hamlet is", "Macbeth was written by"),
]


def quality(lm, editor) -> dict:
    eff = para = neigh = 0
    margins = []
    for request, paraphrase, neighbour in FACTS:
        edit = editor.edit(lm, [request])
        prompts = [request.text, paraphrase, neighbour]
        with edit.applied(lm):
            s = score_targets(lm, prompts * 2, [request.target_new] * 3 + [request.target_true] * 3)
        m = [s[i].logprob - s[i + 3].logprob for i in range(3)]
        margins.append([round(x, 2) for x in m])
        eff += m[0] > 0
        para += m[1] > 0
        neigh += m[2] < 0
    n = len(FACTS)
    return {"efficacy": eff / n, "paraphrase": para / n, "neighborhood": neigh / n, "margins": margins}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--settings", default="docstrings:5000,docstrings:20000,docstrings:60000,sampled:5000,sampled:20000")
    args = parser.parse_args()
    lm = lmedit.load(args.model)
    config = shipped_path("rome", args.model)
    base = get_editor("rome", config)
    layer = args.layer if args.layer is not None else base.layer_for(lm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = StatsCache(tmp)
        for setting in args.settings.split(","):
            source, n = setting.split(":")
            spec = CorpusSpec(source=source, n_tokens=int(n))
            corpus_s, _ = timed(lambda: corpus_sequences(lm, spec, cache))
            stats_s, _ = timed(lambda: key_second_moment(lm, [layer], spec, cache=cache))
            editor = get_editor("rome", config, [f"corpus={source}", f"corpus_tokens={n}", f"layer={layer}"])
            editor.cache = StatsCache(tmp)
            rows.append({"corpus": source, "n_tokens": int(n), "corpus_s": round(corpus_s, 1),
                         "stats_s": round(stats_s, 1), "stats_s_per_10k": round(stats_s / int(n) * 1e4, 2),
                         **quality(lm, editor)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results while the rest runs
    emit({"benchmark": "stats", "model": args.model, "layer": layer, "n_facts": len(FACTS), "settings": rows,
          "peak_rss_mb": round(peak_rss_mb())})


if __name__ == "__main__":
    main()
