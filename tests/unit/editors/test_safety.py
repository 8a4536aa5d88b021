"""Destructive settings are flagged before the edit is applied (lmedit.editors.safety): the API refuses unless
`force=True`, the CLI refuses without a terminal unless `--force`; weights stay bit-identical when refused."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.editors import WeightEdit
from lmedit.editors.base import ParamDelta
from lmedit.editors.safety import MAX_PROBE_RISE, MAX_RELATIVE_NORM, DestructiveEditError, assess
from lmedit.testing import tiny_lm

REQUEST = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
GENTLE = {"layers": [0], "steps": 3, "lr": 1e-3}
WRECKING = {"layers": [0], "steps": 3, "lr": 1e4}  # finite, accepted by the config's range checks


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(lm, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


def test_gentle_edit_is_applied_and_a_wrecking_one_refused_unless_forced():
    lm = tiny_lm("llama")
    gentle = lmedit.edit(lm, REQUEST, method="ft", config=GENTLE)
    assert gentle.is_applied
    gentle.undo()
    before = _state(lm)
    with pytest.raises(DestructiveEditError, match=r"refusing to apply this ft edit: it changes .* its own size"):
        lmedit.edit(lm, REQUEST, method="ft", config=WRECKING)
    assert _same(lm, before)
    forced = lmedit.edit(lm, REQUEST, method="ft", config=WRECKING, force=True)
    assert forced.is_applied and not _same(lm, before)
    forced.undo()
    assert _same(lm, before)


def _scaled_copy(lm, name: str, factor: float) -> WeightEdit:
    weight = dict(lm.model.named_parameters())[name].detach()
    return WeightEdit(deltas={name: ParamDelta(dense=factor * weight.clone())}, method="handmade",
                      base_fingerprint=lm.fingerprint)


def test_assess_measures_the_relative_norm_and_the_loss_rise_and_leaves_the_model_as_it_was(monkeypatch):
    lm = tiny_lm("llama")
    before = _state(lm)
    name = next(n for n, _ in lm.model.named_parameters() if n.endswith("mlp.down_proj.weight"))
    small = assess(_scaled_copy(lm, name, 0.01), lm)
    assert small.relative_norm == pytest.approx(0.01, rel=1e-6) and not small.destructive
    assert abs(small.probe_rise) < MAX_PROBE_RISE
    big = assess(_scaled_copy(lm, name, 3.0), lm)
    assert big.relative_norm == pytest.approx(3.0, rel=1e-6) and 3.0 > MAX_RELATIVE_NORM and big.destructive
    assert any("its own size" in r for r in big.reasons)
    assert _same(lm, before)
    # the loss check on its own: an edit that scrambles the unembedding (norm check lifted)
    monkeypatch.setattr("lmedit.editors.safety.MAX_RELATIVE_NORM", float("inf"))
    head = next(n for n, p in lm.model.named_parameters() if p is lm.model.get_output_embeddings().weight)
    gen = torch.Generator().manual_seed(0)
    weight = dict(lm.model.named_parameters())[head].detach()
    noise = WeightEdit(deltas={head: ParamDelta(dense=torch.randn(weight.shape, generator=gen) * 50 * weight.std())},
                       method="handmade", base_fingerprint=lm.fingerprint)
    loud = assess(noise, lm)
    assert loud.probe_rise > MAX_PROBE_RISE and any("ordinary text" in r for r in loud.reasons)
    assert _same(lm, before)


def test_wrapper_edits_are_not_assessed():
    lm = tiny_lm("llama")
    found = assess(lmedit.edit(lm, REQUEST, method="noop", apply=False), lm)
    assert found.relative_norm is None or found.relative_norm == 0.0
    assert not found.destructive


def test_cli_refuses_without_a_terminal_and_applies_with_force(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    args = ["edit", "--model", str(model_dir), "--method", "ft", "--set", "layers=[0]", "--set", "steps=3",
            "--set", "lr=1e4", "--prompt", REQUEST.prompt, "--subject", REQUEST.subject, "--target-new", "Rome",
            "--max-new-tokens", "1", "--save-edit", str(tmp_path / "wreck.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refusing to apply this ft edit") and "--force" in lines[0]
    assert not (tmp_path / "wreck.safetensors").exists()
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "wreck.safetensors").exists()


def test_adaptor_edits_get_the_probe_text_check(monkeypatch):
    """A GRACE entry whose radius matches every position and whose value is noise changes ordinary text: assessed
    (on a random tiny model text is near-uniform either way, so the limit is lowered below what it measures)."""
    from lmedit.editors.grace import GraceEdit
    from lmedit.types import Site

    lm = tiny_lm("llama")
    before = _state(lm)
    quiet = lmedit.edit(lm, REQUEST, method="grace", config={"layer": 1, "steps": 5}, apply=False)
    found = assess(quiet, lm)
    # its entry matches only near the edit prompt: the probe text reads the unedited model, bit for bit
    assert found.relative_norm is None and found.probe_rise == 0.0 and not found.destructive
    monkeypatch.setattr("lmedit.editors.safety.MAX_PROBE_RISE", 0.01)
    gen = torch.Generator().manual_seed(0)
    loud = GraceEdit(quiet.requests, quiet.keys, torch.randn(quiet.values.shape, generator=gen) * 100,
                     torch.full((1,), 1e9), site=Site("mlp.out", 1), base_fingerprint=lm.fingerprint, method="grace")
    wrecked = assess(loud, lm)
    assert wrecked.probe_rise > 0.01 and any("ordinary text" in r for r in wrecked.reasons)
    with pytest.raises(DestructiveEditError, match="refusing to apply this grace edit"):
        from lmedit.editors.safety import check_not_destructive

        check_not_destructive(loud, lm)
    assert _same(lm, before) and not lm.edits
