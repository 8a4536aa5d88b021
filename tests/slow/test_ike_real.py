"""IKE on the real default model (all-MiniLM-L6-v2 retrieval, shipped settings configs/ike/gemma3-270m.yaml).

Checks what the tiny models cannot: the new fact and its retrieved demonstrations in context flip
gemma3-270m's preference between Rome and Paris on the edit prompt and a paraphrase (lmedit.score); with
`scope: similar` a neighbouring prompt is left to the base model and keeps its answer bit for bit (with the
shipped `scope: all` the 270M model carries "Rome" over to neighbours: docs/editors.md, IKE); the weights
never change and undo restores the outputs exactly.
"""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.editors.ike import IkeEdit

EIFFEL = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PARAPHRASE = "The Eiffel Tower stands in the city of"
NEIGHBOUR = "The Louvre is located in the city of"


def _best(lm, prompt: str) -> str:
    scores = lmedit.score(lm, prompt, ["Rome", "Paris"])
    return ["Rome", "Paris"][max(range(2), key=lambda i: scores[i].logprob)]


@pytest.mark.slow
def test_ike_edit_flips_the_edit_prompt_and_a_scoped_edit_keeps_a_neighbour(gemma):
    snapshot = {k: v.clone() for k, v in gemma.model.state_dict().items()}
    assert [_best(gemma, p) for p in (EIFFEL.text, PARAPHRASE, NEIGHBOUR)] == ["Paris"] * 3
    before = lmedit.score(gemma, [EIFFEL.text, NEIGHBOUR], ["Rome", "Paris"])
    edit = lmedit.edit(gemma, EIFFEL, method="ike")  # shipped settings (scope: all), applied
    try:
        assert isinstance(edit, IkeEdit) and edit.entries[0].demonstrations  # k > 0 demonstrations retrieved
        assert gemma.edits.route([NEIGHBOUR])[0].endswith("Prompt: " + NEIGHBOUR)  # scope all: read in context too
        assert _best(gemma, EIFFEL.text) == "Rome" and _best(gemma, PARAPHRASE) == "Rome"
    finally:
        edit.undo()
    scoped = lmedit.edit(gemma, EIFFEL, method="ike", config={"encoder": "minilm", "k": 4, "scope": "similar"})
    try:
        assert _best(gemma, EIFFEL.text) == "Rome" and _best(gemma, PARAPHRASE) == "Rome"
        assert gemma.edits.route([NEIGHBOUR]) == [NEIGHBOUR]  # cosine 0.47 < 0.56: the base model answers
        assert _best(gemma, NEIGHBOUR) == "Paris"
    finally:
        scoped.undo()
    assert all(torch.equal(v, gemma.model.state_dict()[k]) for k, v in snapshot.items())
    after = lmedit.score(gemma, [EIFFEL.text, NEIGHBOUR], ["Rome", "Paris"])
    assert [s.logprob for s in after] == [s.logprob for s in before]
