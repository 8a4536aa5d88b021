"""SERAC's scope classifier: calibrated cosine threshold and trained head, held-out pair accuracies.

Training pairs: the first `--n-train` CounterFact train-split records (EasyEdit layout: the edit prompt
and one paraphrase in scope, one neighbourhood prompt out of scope) and zsRE train records 0-799;
held out: the first 500 CounterFact val-split records, zsRE records 800+, and the 20 ROME-layout
CounterFact samples (two paraphrases behind an unrelated sentence, ten neighbours each). For each
input view (whole input, last sentence) it reports the cosine threshold with the best balanced accuracy
on the training pairs (Specificity+ inputs left out of calibration: they are what is measured), and a
trained projection head, and their accuracies: in-scope inputs accepted; neighbours, Specificity+
inputs ("{edit}. {neighbour prompt}") and other edits' inputs rejected.

Usage: .venv/bin/python benchmarks/bench_serac_scope.py [--n-train 1000] [--save-head PATH --model gemma3-270m]
(about 3 minutes on 2 cores, almost all of it embedding ~9,000 sentences with all-MiniLM-L6-v2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, timed  # noqa: E402

from lmedit.config import to_dict  # noqa: E402
from lmedit.editors.serac.config import SeracConfig  # noqa: E402
from lmedit.editors.serac.scope import (MiniLMEncoder, ScopeHead, calibrate_threshold, examples_from_records,  # noqa: E402
                                        save_head, scope_accuracy, train_head)
from lmedit.eval import load_dataset  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder (counterfact/, zsre/)")
    parser.add_argument("--n-train", type=int, default=1000, help="CounterFact train records used")
    parser.add_argument("--save-head", help="also save the trained last-sentence head here (for --model)")
    parser.add_argument("--model", default="gemma3-270m", help="the model whose fingerprint a saved head carries")
    args = parser.parse_args()
    data = Path(args.data)
    cf = data / "counterfact" / "easyedit_format"
    rome = data / "counterfact" / "rome_format_samples"
    zsre = load_dataset("zsre", data / "zsre" / "zsre_mend_train-1k.json").records
    train = (examples_from_records(load_dataset("counterfact", cf / "counterfact-train.json").records[:args.n_train])
             + examples_from_records(zsre[:800]))
    tests = {
        "counterfact_val_500": examples_from_records(load_dataset("counterfact", cf / "counterfact-val.json").records[:500]),
        "zsre_heldout": examples_from_records(zsre[800:]),
        "counterfact_rome_20": examples_from_records(load_dataset("counterfact", rome / "most_orthogonal.json").records
                                                     + load_dataset("counterfact", rome / "least_orthogonal.json").records),
    }
    encoder = MiniLMEncoder()
    config = SeracConfig()
    results = {}
    seconds = {}
    for view in ("whole", "last_sentence"):
        seconds[f"calibrate_{view}"], threshold = timed(
            lambda: calibrate_threshold(encoder, train, view=view, include_prefixed=False))
        seconds[f"train_{view}"], head = timed(lambda: train_head(
            encoder, train, steps=config.train_steps, lr=config.train_lr, batch_edits=config.train_batch_edits,
            projection_dim=config.projection_dim, view=view, include_prefixed=config.train_prefixed_negatives))
        heads = {"cosine": ScopeHead.cosine(threshold, view), "trained": head}
        results[view] = {"threshold": round(threshold, 4)}
        for name, h in heads.items():
            results[view][name] = {test: {k: round(v, 4) if isinstance(v, float) else v
                                          for k, v in scope_accuracy(h, encoder, ex).items()}
                                   for test, ex in tests.items()}
        if args.save_head and view == "last_sentence":
            import lmedit

            lm = lmedit.load(args.model)
            save_head(head, args.save_head, encoder=encoder, base_fingerprint=lm.fingerprint, config=to_dict(config),
                      report=results[view]["trained"])
    emit({"benchmark": "serac_scope", "encoder": encoder.identity(), "n_train_examples": len(train),
          "n_test_examples": {k: len(v) for k, v in tests.items()}, "seconds": seconds, "results": results})


if __name__ == "__main__":
    main()
