"""Never-text tokens: never generated, their probability measured (the `derailment` metric and audit check)."""

from __future__ import annotations

import torch

from lmedit.models.vocab import never_text_ids
from lmedit.scoring import generate, generate_detailed
from lmedit.testing import tiny_tokenizer


def test_never_text_ids_are_the_special_tokens_but_eos():
    tok = tiny_tokenizer()
    ids = never_text_ids(tok)
    assert tok.eos_token_id not in ids
    assert {tok.pad_token_id, tok.bos_token_id} <= set(ids)


def test_generation_skips_never_text_tokens_and_reports_their_probability(constructed_lm):
    lm, z = constructed_lm
    pad = lm.tokenizer.pad_token_id
    model = lm.model
    with torch.no_grad():  # the model now wants <pad> (a never-text token) everywhere, with P ≈ 1
        model.get_output_embeddings().weight[pad, 0] = z.max() + 30
    made = generate_detailed(lm, ["The Eiffel Tower is", "Rome is"], max_new_tokens=5)
    for g in made:
        assert g.never_text_max > 0.99 and g.never_text_mass > 0.99
    ids = lm.tokenizer(made[0].text)["input_ids"]
    assert pad not in ids and len(made[0].text) > 0
    # with the pull removed, almost nothing goes there
    with torch.no_grad():
        for i in lm.never_text_ids:
            model.get_output_embeddings().weight[i, 0] = z.min() - 30
    assert all(g.never_text_max < 1e-6 for g in generate_detailed(lm, ["Rome is"], max_new_tokens=5))
    assert generate(lm, ["Rome is"], max_new_tokens=5)[0] == generate_detailed(lm, ["Rome is"], max_new_tokens=5)[0].text
