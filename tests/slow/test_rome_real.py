"""ROME on the real built-in models (the issue's acceptance checks), and first contact from Python:
`lmedit.edit(lm, request)` without a config uses the shipped settings and generates clean text, while the damage
the edit does stays measurable (docs/editors.md, "Derailed generations"). The README's first command itself,
run as a new user would, is the first edit of tests/slow/test_ledger_real.py. Both gemma tests here share the
session's Eiffel Tower edit (tests/conftest.py). Slow: real weights on CPU."""

import re

import pytest
import torch

import lmedit
from lmedit.editors.base import WeightEdit
from lmedit.scoring import generate_detailed, score_targets
from lmedit.tokens import subject_span, target_ids

pytestmark = pytest.mark.slow
NEVER_TEXT = re.compile(r"<start_of_image>|<end_of_image>|\[multimodal\]|<unused\d+>|<pad>|<mask>")

EIFFEL = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PROMPTS = ["The Eiffel Tower is located in the city of",        # the edit prompt
           "The Eiffel Tower can be found in the city of",      # a paraphrase
           "The Louvre is located in the city of"]              # a neighbour: must keep Paris


def _margins(lm):
    """log P(Rome) − log P(Paris) per prompt."""
    s = score_targets(lm, PROMPTS * 2, ["Rome"] * 3 + ["Paris"] * 3)
    return [s[i].logprob - s[i + 3].logprob for i in range(3)]


@pytest.mark.parametrize("model_fixture", ["gemma", "smollm"])
def test_eiffel_tower_to_rome(model_fixture, request, tmp_path, capsys):
    lm = request.getfixturevalue(model_fixture)
    before = _margins(lm)
    assert all(m < 0 for m in before), f"the unedited model should prefer Paris everywhere: {before}"
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    # no config: the shipped settings for each model (gemma: the session's shared edit, made the same way)
    edit = (request.getfixturevalue("gemma_eiffel_edit") if model_fixture == "gemma"
            else lmedit.edit(lm, EIFFEL, apply=False))
    assert edit.config["layer"] == {"gemma": 2, "smollm": 3}[model_fixture]
    with edit.applied(lm):
        after = _margins(lm)
    with capsys.disabled():
        print(f"\n{lm.name}: log P(Rome) - log P(Paris) before {before} after {after}")
    assert after[0] > 0, "edit prompt: P(Rome) > P(Paris)"
    assert after[1] > 0, "paraphrase: P(Rome) > P(Paris)"
    assert after[2] < 0, "neighbour (the Louvre) still prefers Paris"
    assert all(torch.equal(snapshot[k], v) for k, v in lm.model.state_dict().items()), "undo is bit-exact"
    # save/load round trip reproduces the edited model's outputs exactly
    loaded = WeightEdit.load(edit.save(tmp_path / "eiffel.safetensors"))
    with loaded.applied(lm):
        assert _margins(lm) == after


def test_subject_lookup_on_real_tokenizers(gemma, smollm):
    for lm in (gemma, smollm):
        for template, subject in [("{} is located in the city of", "The Eiffel Tower"),
                                  ("The mother tongue of {} is", "Danielle Darrieux"),
                                  ("{} plays", "Messi"), ("In {}, people speak", "Brazil")]:
            text = template.format(subject)
            span = subject_span(lm, template, subject)
            ids = lm.tokenizer(text)["input_ids"]
            decoded = lm.tokenizer.decode(ids[span.first:span.last + 1]).strip()
            assert decoded == subject, (lm.name, decoded, subject)
            rest = lm.tokenizer.decode(ids[span.last + 1:])
            assert text.endswith(rest) and subject not in rest
        assert len(target_ids(lm, "Rome")) == 1


@pytest.mark.parametrize("quiet", [0.0, 4.0])
@pytest.mark.parametrize("model_fixture,layer", [("gemma", 2), ("smollm", 4)])
def test_delta_only_passes_give_the_full_forward_answer(model_fixture, layer, quiet, request):
    """v* from the δ-only passes (`SplitForward`) equals the full-forward v* to 1e-5 on the real models, with
    the quiet option too (its long texts and the prompts packed into shared lanes)."""
    from lmedit.editors.steps.value import ValueOptions, optimize_value

    lm = request.getfixturevalue(model_fixture)
    prefixes = ["", "Yesterday I walked to the market. ", "The weather was cold. "]
    options = ValueOptions(steps=5, clamp_norm_factor=1.0, quiet_factor=quiet, quiet_prompts=3)
    full = optimize_value(lm, layer, EIFFEL, prefixes, options, full_passes=True, with_keys=True)
    split = optimize_value(lm, layer, EIFFEL, prefixes, options, with_keys=True)
    assert split.steps == full.steps
    assert ((split.v_star - full.v_star).norm() / full.v_star.norm()).item() < 1e-5
    assert ((split.keys - full.keys).norm() / full.keys.norm()).item() < 1e-5


def test_python_edit_without_config_uses_the_shipped_settings_and_generates_clean_text(gemma, gemma_eiffel_edit):
    prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower can be found in the city of",
               "The Louvre is located in the city of"]
    before = generate_detailed(gemma, prompts, max_new_tokens=16)
    edit = gemma_eiffel_edit.apply(gemma)  # lmedit.edit(gemma, request) with no config: the session's shared edit
    try:
        assert edit.config["layer"] == 2 and edit.config["clamp_norm_factor"] == 1.0
        after = generate_detailed(gemma, prompts, max_new_tokens=16)
    finally:
        edit.undo()
    assert all(g.text.strip().startswith("Rome") for g in after[:2]) and after[2].text.strip().startswith("Paris")
    assert not any(NEVER_TEXT.search(g.text) for g in before + after)
    # the damage stays visible: the paraphrase's never-text probability rises (measured 0.14 -> 0.48)
    assert after[1].never_text_max > before[1].never_text_max + 0.1
    assert abs(after[2].never_text_max - before[2].never_text_max) < 0.05  # the neighbour is untouched


def test_quiet_rome_keeps_the_edit_and_stops_it_leaking_into_a_neighbour(gemma):
    # CounterFact case 4397 (records 2001-2100, where the quiet settings were chosen): the plain edit makes the
    # stated fact "loud" (after "Higashikagawa is located in the country of Russia.", Sony moves to Russia);
    # measured with the shipped settings: P(Japan) − P(Russia) on that Specificity+ probe −0.08 plain, +0.53 quiet.
    request = lmedit.EditRequest("{} is located in the country of", "Higashikagawa", "Russia", "Japan")
    probe = "Higashikagawa is located in the country of Russia. Sony is located in"

    def margins(edit: WeightEdit) -> tuple[float, float]:
        with edit.applied(gemma):
            new, true = score_targets(gemma, [request.text, request.text], ["Russia", "Japan"])
            loud_new, loud_true = score_targets(gemma, [probe, probe], ["Russia", "Japan"])
        return new.logprob - true.logprob, loud_true.logprob - loud_new.logprob

    plain_edit, plain_loud = margins(lmedit.edit(gemma, request, method="rome", apply=False))
    quiet_edit, quiet_loud = margins(lmedit.edit(gemma, request, method="rome", apply=False,
                                                 overrides=["quiet_factor=4"]))
    assert plain_edit > 1.0 and quiet_edit > 1.0  # both make the edit
    assert plain_loud < 0 < quiet_loud            # only the quiet one keeps Sony in Japan after the statement
