"""The quiet option of the weight editors (`lmedit/editors/steps/quiet.py`): texts, settings, and the term in v*."""

import pytest
import torch

import lmedit
from lmedit.editors.alphaedit import AlphaEditConfig
from lmedit.editors.memit import MemitConfig
from lmedit.editors.rome import RomeConfig
from lmedit.editors.steps.quiet import OTHER_SUBJECTS, other_subjects, quiet_templates
from lmedit.editors.steps.value import ValueOptions, optimize_value, optimize_values
from lmedit.errors import ConfigError
from lmedit.hooks import patch
from lmedit.scoring import next_token_logprobs
from lmedit.testing import tiny_lm
from lmedit.tokens import subject_span, target_ids
from lmedit.types import Site

REQUESTS = [
    lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris"),
    lmedit.EditRequest("Who leads {}", "the orchestra", "cats", None),
    lmedit.EditRequest("{} plays", "the quiet river", "music", None),
]
PREFIXES = ["", "A cat sat. "]


def test_other_subjects_are_stable_distinct_and_never_the_edited_one():
    request = lmedit.EditRequest("{} is located in", "Tokyo", "Rome", None)
    picked = other_subjects(request, 8)
    assert picked == other_subjects(request, 8)
    assert len(set(picked)) == 8 and "Tokyo" not in picked and set(picked) <= set(OTHER_SUBJECTS)
    others = {tuple(other_subjects(lmedit.EditRequest("{} is located in", s, "Rome", None), 4))
              for s in ("The Eiffel Tower", "Big Ben", "the Louvre", "Central Park")}
    assert len(others) > 1  # different requests spread over the list


def test_quiet_templates_state_the_edit_then_ask_about_another_subject():
    request = lmedit.EditRequest("{} is located in", "The Eiffel Tower", "Ro{m}e", None)
    texts = [t.format(request.subject) for t in quiet_templates(request, 3)]
    for text, other in zip(texts, other_subjects(request, 3)):
        assert text == f"The Eiffel Tower is located in Ro{{m}}e. {other} is located in"


@pytest.mark.parametrize("config", [RomeConfig, MemitConfig, AlphaEditConfig])
def test_every_weight_editor_takes_the_same_quiet_settings(config):
    cfg = config(quiet_factor=4.0, quiet_prompts=2)
    options = cfg.value_options()
    assert (options.quiet_factor, options.quiet_prompts) == (4.0, 2)
    assert config().value_options().quiet_factor == 0.0  # off by default
    with pytest.raises(ConfigError, match="quiet_factor"):
        config(quiet_factor=-1.0)
    with pytest.raises(ConfigError, match="quiet_prompts"):
        config(quiet_prompts=0)
    with pytest.raises(ConfigError, match="quiet_prompts"):
        config(quiet_prompts=len(OTHER_SUBJECTS) + 1)
    # the early stop the looser quiet setting uses (`--set v_early_stop=0.2`) reaches v*'s options
    assert config().value_options().early_stop_loss == 0.05
    assert config(v_early_stop=0.2).value_options().early_stop_loss == 0.2
    with pytest.raises(ConfigError, match="v_early_stop"):
        config(v_early_stop=-0.1)


def _rise(lm, layer: int, request, result, n: int) -> float:
    """Mean rise of target_new's first-token log-probability over the quiet texts when v_star replaces the
    layer's output at the subject's last token, against the unedited model."""
    first = target_ids(lm, request.target_new)[0]
    rises = []
    for template in quiet_templates(request, n):
        text = template.format(request.subject)
        at = subject_span(lm, template, request.subject).last

        def put(activation, site):
            out = activation.clone()
            out[:, at] = result.v_star.to(out.dtype)
            return out

        before = next_token_logprobs(lm, [text])[0, first]
        with patch(lm, {Site("mlp.out", layer): put}):
            after = next_token_logprobs(lm, [text])[0, first]
        rises.append(float(after - before))
    return sum(max(r, 0.0) for r in rises) / len(rises)


@pytest.mark.parametrize("family, which", [("llama", 1), ("gpt2", 2)])  # requests that leak on these tiny models
def test_quiet_term_holds_the_new_object_back_on_other_subjects(family, which):
    lm = tiny_lm(family)
    request = REQUESTS[which]
    plain = optimize_value(lm, 2, request, PREFIXES, ValueOptions(steps=12, clamp_norm_factor=4.0,
                                                                   early_stop_loss=0.0))
    quiet = optimize_value(lm, 2, request, PREFIXES, ValueOptions(steps=12, clamp_norm_factor=4.0,
                                                                   early_stop_loss=0.0, quiet_factor=50.0))
    # δ = 0 at step 1: the edited and unedited texts agree, so the term adds nothing to the first loss
    assert quiet.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    assert _rise(lm, 2, request, plain, 4) > 0.05  # there is leakage to hold back on this model
    assert _rise(lm, 2, request, quiet, 4) < 0.5 * _rise(lm, 2, request, plain, 4)


def test_quiet_batches_agree_with_full_passes_and_with_one_request_at_a_time():
    lm = tiny_lm("gemma3_text")
    options = ValueOptions(steps=5, clamp_norm_factor=4.0, quiet_factor=3.0, quiet_prompts=3)
    split = optimize_values(lm, 2, REQUESTS, PREFIXES, options, with_keys=True)
    full = optimize_values(lm, 2, REQUESTS, PREFIXES, options, with_keys=True, full_passes=True)
    for request, a, b in zip(REQUESTS, split, full):
        torch.testing.assert_close(a.v_star, b.v_star, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
        alone = optimize_value(lm, 2, request, PREFIXES, options, with_keys=True)
        assert alone.steps == a.steps
        torch.testing.assert_close(alone.v_star, a.v_star, rtol=1e-4, atol=1e-5)
        assert alone.keys.shape == (len(PREFIXES), a.keys.shape[1])


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_each_weight_editor_edits_with_the_quiet_option(method, tmp_path):
    # One mechanism in the shared v* step: the quiet setting changes every weight editor's update, and the
    # edit is still an ordinary reversible weight edit.
    from lmedit.editors import get_editor
    from lmedit.stats import StatsCache
    from lmedit.testing import TINY_CORPUS

    lm = tiny_lm("gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    base = {"corpus": f"file:{corpus}", "corpus_tokens": 3000, "clamp_norm_factor": 4.0}
    base.update({"layer": 2} if method == "rome" else {"layers": [1, 2], "prefixes": 2})
    request = REQUESTS[2]
    edits = []
    for quiet in (0.0, 50.0):
        editor = get_editor(method, {**base, "quiet_factor": quiet})
        editor.cache = StatsCache(tmp_path / "stats")
        edits.append(editor.edit(lm, [request]))
    assert edits[1].config["quiet_factor"] == 50.0 and edits[0].deltas.keys() == edits[1].deltas.keys()
    assert any(not torch.allclose(plain.full(), edits[1].deltas[name].full())
               for name, plain in edits[0].deltas.items())
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with edits[1].applied(lm):
        assert any(not torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
