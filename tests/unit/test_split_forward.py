"""`SplitForward` (δ-only passes) against plain full forwards, and the value optimisation built on it."""

import pytest
import torch

from lmedit.editors.steps.value import ValueOptions, optimize_values
from lmedit.hooks import capture, patch
from lmedit.split_forward import SplitForward
from lmedit.testing import tiny_lm
from lmedit.tokens import pad_batch, prompt_ids, subject_span
from lmedit.types import EditRequest, Site

TEMPLATES = ["{} is located in the city of", "Hello there. {} is located in the city of",
             "A much longer prefix text, with more words in it. {} is located in the city of", "{} is a"]
SUBJECT = "The Eiffel Tower"
REQUESTS = [EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
            EditRequest("{} plays the sport of", "Michael Jordan", "soccer", "basketball")]
PREFIXES = ["", "Hello there. ", "A much longer prefix text, with more words in it. "]


def _batch(lm):
    seqs = [prompt_ids(lm, t.format(SUBJECT)) for t in TEMPLATES]
    splits = [subject_span(lm, t, SUBJECT).last for t in TEMPLATES]
    return seqs, splits


def _full_final(lm, seqs, fns):
    site = Site("final_norm")
    with torch.no_grad(), patch(lm, fns), capture(lm, [site], stop_after=site) as acts:
        lm.model(**pad_batch(lm, seqs).model_inputs(), use_cache=False)
    return acts[site]


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_split_forward_matches_full_forward(tiny_family_lm, layer):
    """With δ added at the subject's last token of block `layer`, every recomputed position matches the full forward."""
    lm = tiny_family_lm
    seqs, splits = _batch(lm)
    torch.manual_seed(0)
    delta = torch.randn(lm.arch.d_model(lm.model))
    rows = torch.arange(len(seqs))

    def add_full(act, site):
        out = act.clone()
        out[rows, torch.tensor(splits)] += delta
        return out

    full = _full_final(lm, seqs, {Site("mlp.out", layer): add_full})
    fwd = SplitForward(lm, seqs, splits, layer)
    cols = fwd.columns(rows, torch.tensor(splits))
    assert (cols == 0).all() and fwd.P == max(splits) > 0 and fwd.n_lanes == len(seqs)
    _check_rows(fwd, full, seqs, splits, delta, layer, rows)
    # A sub-batch of rows reads the right rows of the cache.
    _check_rows(fwd, full, seqs, splits, delta, layer, torch.tensor([2, 0]))


def _check_rows(fwd, full, seqs, splits, delta, layer, rows):
    """`fwd`'s forward of the lanes of `rows`, δ added at each row's split point, matches `full` at every
    recomputed position of those rows."""
    lanes = fwd.lanes_of(rows)
    at = fwd.address(rows, torch.zeros_like(rows), lanes)
    with torch.no_grad():
        part = fwd.final(lanes, {Site("mlp.out", layer): lambda act, site: act.index_put(at, act[at] + delta)})
    for i in rows.tolist():
        n = len(seqs[i]) - splits[i]
        lane, col = fwd.address(torch.tensor([i] * n), torch.arange(n), lanes)
        torch.testing.assert_close(part[lane, col], full[i, splits[i]:len(seqs[i])], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 2])
def test_packed_lanes_match_full_forward(tiny_family_lm, layer):
    """Short rows packed into one lane beside a long one (one group) compute what their own full forwards do."""
    lm = tiny_family_lm
    seqs, splits = _batch(lm)
    long = "{} is located in the city of Rome. The Statue of Liberty is located in the city of"
    seqs.append(prompt_ids(lm, long.format(SUBJECT)))
    splits.append(subject_span(lm, long, SUBJECT).last)
    torch.manual_seed(0)
    delta = torch.randn(lm.arch.d_model(lm.model))
    rows = torch.arange(len(seqs))

    def add_full(act, site):
        out = act.clone()
        out[rows, torch.tensor(splits)] += delta
        return out

    full = _full_final(lm, seqs, {Site("mlp.out", layer): add_full})
    fwd = SplitForward(lm, seqs, splits, layer, groups=[0] * len(seqs))
    assert fwd.n_lanes < len(seqs), "the short rows share lanes"
    _check_rows(fwd, full, seqs, splits, delta, layer, rows)


def test_split_forward_past_a_sliding_window():
    """Gemma 3's sliding-window layers (window 16 in the tiny model) with prompts longer than the window."""
    lm = tiny_lm("gemma3_text")
    assert lm.model.config.sliding_window == 16
    long = "word " * 30 + "{} is located in"
    seqs = [prompt_ids(lm, t.format(SUBJECT)) for t in (long, "{} is located in")]
    splits = [subject_span(lm, t, SUBJECT).last for t in (long, "{} is located in")]
    assert len(seqs[0]) > 2 * 16
    full = _full_final(lm, seqs, {})
    fwd = SplitForward(lm, seqs, splits, 2, groups=[0, 0])
    _check_rows(fwd, full, seqs, splits, torch.zeros(lm.arch.d_model(lm.model)), 2, torch.arange(2))


def test_split_forward_gradient_reaches_delta_only_through_recomputed_part(tiny_llama):
    lm = tiny_llama
    seqs, splits = _batch(lm)
    fwd = SplitForward(lm, seqs, splits, 2)
    delta = torch.zeros(lm.arch.d_model(lm.model), requires_grad=True)

    def add(act, site):
        out = act.clone()
        out[:, 0] += delta
        return out

    fwd.final(None, {Site("mlp.out", 2): add}).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_split_forward_rejects_bad_splits(tiny_llama):
    with pytest.raises(ValueError, match="outside"):
        SplitForward(tiny_llama, [[1, 2, 3]], [3], 0)
    with pytest.raises(ValueError, match="one split point"):
        SplitForward(tiny_llama, [[1, 2, 3]], [0, 1], 0)


@pytest.mark.parametrize("layer,kind,quiet", [(1, "mlp.out", 0.0), ((1, 2), "mlp.out", 0.0), (2, "resid_out", 0.0),
                                              (1, "mlp.out", 4.0)])
def test_value_optimisation_same_answer_as_full_passes(tiny_family_lm, layer, kind, quiet):
    """v* from the δ-only passes equals the full-forward result to 1e-5, with the same number of steps
    (with the quiet option too, whose long texts share lanes with the prompts)."""
    lm = tiny_family_lm
    layers = list(layer) if isinstance(layer, tuple) else layer
    options = ValueOptions(steps=8, quiet_factor=quiet, quiet_prompts=3)
    full = optimize_values(lm, layers, REQUESTS, PREFIXES, options, site_kind=kind, full_passes=True)
    split = optimize_values(lm, layers, REQUESTS, PREFIXES, options, site_kind=kind)
    for a, b in zip(full, split):
        assert a.steps == b.steps
        assert ((a.v_star - b.v_star).norm() / a.v_star.norm()).item() < 1e-5
        assert ((a.v_init - b.v_init).norm() / a.v_init.norm()).item() < 1e-5
        assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-6)


def test_value_optimisation_keys_match_keys_read_on_their_own(tiny_llama):
    """ROME's keys, read in the optimisation's first forward, are the keys a forward of their own reads."""
    from lmedit.editors.steps.mass import at_subject

    lm = tiny_llama
    result = optimize_values(lm, 1, REQUESTS[:1], PREFIXES, ValueOptions(steps=2), with_keys=True)[0]
    expected = at_subject(lm, Site("mlp.key", 1), [(p + REQUESTS[0].prompt, REQUESTS[0].subject) for p in PREFIXES], 8)
    torch.testing.assert_close(result.keys, expected.to(torch.float32), rtol=1e-5, atol=1e-6)
