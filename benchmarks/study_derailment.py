"""Where does an edited model put probability on never-text tokens (image markers, <unusedN>, ...)?

For the README's Eiffel Tower → Rome edit on the default model, edited at several layers with the shipped
ROME settings otherwise: greedy generations from the edit prompt, a paraphrase, a neighbour and two
subject prompts, with, per generated step, the probability of the never-text tokens (before they are
suppressed) and which of them got it. Prints one JSON object (docs/editors.md, "Derailed generations").

Usage: .venv/bin/python benchmarks/study_derailment.py [--layers 2 4 6] [--tokens 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit  # noqa: E402

import torch  # noqa: E402

import lmedit  # noqa: E402
from lmedit.scoring import NeverTextGuard, routed  # noqa: E402
from lmedit.settings import resolve_editor  # noqa: E402

PROMPTS = {"edit": "The Eiffel Tower is located in the city of",
           "paraphrase": "The Eiffel Tower can be found in the city of",
           "neighbour": "The Louvre is located in the city of",
           "subject": "The Eiffel Tower is",
           "subject, other relation": "The Eiffel Tower was built by"}
REQUEST = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


class _Recorder(NeverTextGuard):
    """Also keeps, per step, the three never-text tokens with the most probability."""

    def __init__(self, ids, vocab):
        super().__init__(ids, vocab)
        self.top: list[list[list[tuple[int, float]]]] = []

    def __call__(self, input_ids, scores):
        index = torch.tensor(self.ids)
        probs = torch.softmax(scores.float(), -1).index_select(1, index)
        values, where = probs.topk(3, dim=1)
        self.top.append([[(self.ids[w], v) for w, v in zip(ws.tolist(), vs.tolist())] for ws, vs in zip(where, values)])
        return super().__call__(input_ids, scores)


def run(lm, tokens: int) -> dict:
    prompts = routed(lm, list(PROMPTS.values()))
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    rec = _Recorder(lm.never_text_ids, lm.model.get_output_embeddings().weight.shape[0])
    from transformers import LogitsProcessorList
    out = lm.model.generate(**enc, max_new_tokens=tokens, do_sample=False, top_p=None, top_k=None,
                            pad_token_id=lm.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([rec]))
    new = out[:, enc["input_ids"].shape[1]:]
    masses = torch.stack(rec.masses, 1)
    result = {}
    for r, label in enumerate(PROMPTS):
        step = int(masses[r].argmax())
        result[label] = {
            "text": lm.tokenizer.decode(new[r], skip_special_tokens=True),
            "mean_mass": round(float(masses[r].mean()), 4), "max_mass": round(float(masses[r].max()), 4),
            "max_step": step, "after": lm.tokenizer.decode(new[r][:step], skip_special_tokens=True),
            "top_tokens_at_max": [(lm.tokenizer.convert_ids_to_tokens(i), round(p, 4)) for i, p in rec.top[step][r]],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    lm = lmedit.load("gemma3-270m")
    out = {"benchmark": "study_derailment", "model": lm.name, "unedited": run(lm, args.tokens), "edited": {}}
    for layer in args.layers:
        editor, _ = resolve_editor("rome", lm, None, [f"layer={layer}"])
        edit = editor.edit(lm, [REQUEST])
        with edit.applied(lm):
            out["edited"][f"layer {layer}"] = run(lm, args.tokens)
    emit(out)


if __name__ == "__main__":
    main()
