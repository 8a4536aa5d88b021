"""lmedit.eval.health.probe_loss: the one probe-text loss (health check, audit gate, destructive-edit check)."""

from __future__ import annotations

import pytest

from lmedit.editors import WrapperEdit
from lmedit.eval.health import PROBE_TEXT, probe_loss
from lmedit.tokens import context_length

OTHER = "Mountains are large landforms that rise high above the land around them, usually with steep sides."


class _Claims(WrapperEdit):
    """A wrapper claiming every prompt that contains `word`, which the base model then reads as `text`."""

    def __init__(self, word: str, text: str) -> None:
        super().__init__(method="test-claims")
        self.word, self.text = word, text

    @property
    def requests(self):
        return ()

    def match(self, prompts):
        return [(1.0, self.text) if self.word in p else None for p in prompts]

    def tensors(self):
        return {}

    def metadata(self):
        return {}

    @classmethod
    def from_saved(cls, tensors, metadata, common):
        raise NotImplementedError


def test_probe_loss_reads_the_first_tokens_the_context_takes(tiny_gpt2):
    # GPT-2's positions are learned for 128 tokens only: the text's later tokens must not be read.
    lm = tiny_gpt2
    assert len(lm.tokenizer(PROBE_TEXT).input_ids) > context_length(lm) == 128
    loss = probe_loss(lm)
    assert 0 < loss < 20
    assert probe_loss(lm, PROBE_TEXT + " Lakes are still; rivers move.") == loss


def test_probe_loss_reads_the_text_a_wrapper_edit_routes_it_to(tiny_llama):
    lm = tiny_llama
    plain, other = probe_loss(lm), probe_loss(lm, OTHER)
    assert other != pytest.approx(plain)
    wrapper = _Claims("river", OTHER).apply(lm, check_fingerprint=False)
    try:
        assert probe_loss(lm) == other
    finally:
        wrapper.undo()
    assert probe_loss(lm) == plain


def test_probe_loss_remembers_recent_model_states_and_sees_changes_outside_the_edits(tiny_llama):
    # The safety check and the audit ask for the same two states in turn: each is computed once. A change made
    # to the weights outside lm.edits is a new state (the weights' fingerprint is part of the key).
    import torch

    from lmedit.editors.base import ParamDelta, WeightEdit

    lm = tiny_llama
    forwards = []
    hook = lm.model.register_forward_hook(lambda *args: forwards.append(1))
    name = lm.arch.param_name(lm.model, 1, "mlp_out")
    rows, cols = dict(lm.model.named_parameters())[name].shape
    generator = torch.Generator().manual_seed(0)
    edit = WeightEdit({name: ParamDelta(left=torch.randn(rows, 1, generator=generator),
                                        right=torch.randn(cols, 1, generator=generator))}, method="test")
    try:
        base = probe_loss(lm)
        edit.apply(lm, check_fingerprint=False)
        edited = probe_loss(lm)
        edit.undo()
        assert edited != base and len(forwards) == 2
        assert probe_loss(lm) == base and len(forwards) == 2
        edit.apply(lm, check_fingerprint=False)
        assert probe_loss(lm) == edited and len(forwards) == 2
        edit.undo()
        weight = dict(lm.model.named_parameters())[name]
        original = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)  # outside lm.edits
        try:
            changed = probe_loss(lm)
            assert len(forwards) == 3 and changed != base
        finally:
            with torch.no_grad():
                weight.copy_(original)
    finally:
        hook.remove()


def test_the_health_figure_gives_each_run_one_colour_and_names_every_run(tmp_path):
    """An adaptor run has no update norm: its line is absent from that panel, and the weight editor's line keeps
    its own colour in every panel (not the first free one); the legend names both runs."""
    from matplotlib.colors import to_hex

    from lmedit.eval.plots import health_figure
    from lmedit.eval.report import Run

    def run(method, norm):
        edits = [{"n_edits": n, "update_norm": norm(n), "denominator": None, "probe_loss": 2.8 + n / 100,
                  "flagged": n == 2} for n in (1, 2, 3)]
        return Run(path=tmp_path / method, summary={"run": {"method": method, "mode": "sequential"},
                                                    "health": {"edits": edits}}, rows=[])

    fig = health_figure([run("grace", lambda n: None), run("rome", lambda n: float(n))])
    norm_ax, probe_ax = fig.axes
    colour = {line.get_label(): to_hex(line.get_color()) for line in probe_ax.get_lines()}
    assert set(colour) == {"grace", "rome"} and colour["grace"] != colour["rome"]
    assert [(line.get_label(), to_hex(line.get_color())) for line in norm_ax.get_lines()] == [("rome", colour["rome"])]
    assert [t.get_text() for t in probe_ax.get_legend().get_texts()] == ["grace", "rome"]
