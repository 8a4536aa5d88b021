"""Models placed by accelerate with offloaded blocks (`lmedit.load(..., device_map=...)`, `lmedit.models.params`).

On this CPU-only machine the blocks go to "disk": their parameters sit on the meta device and accelerate's
hooks read them from the checkpoint's safetensors file before each forward, the same machinery as CPU
offload and multi-GPU dispatch. Every result is compared with the same tiny model loaded whole.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import lmedit
from lmedit.errors import DeviceError
from lmedit.models import params
from lmedit.scoring import next_token_logprobs
from lmedit.testing import disk_map, tiny_lm
from lmedit.tracing.single import trace

EDITED = "model.layers.1.mlp.down_proj.weight"
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
PROMPTS = ["Where is The Eiffel Tower", "Who leads the orchestra", "the quiet river"]


def _disk_map() -> dict[str, str]:
    """Blocks 1 and 2 on disk, the rest in memory (the ROME layer of the tiny settings is 1)."""
    device_map = disk_map(tiny_lm("llama"), [1, 2])
    assert device_map == {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                          "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
                          "model.layers.3": "cpu"}
    return device_map


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(lm, prompts=PROMPTS) -> torch.Tensor:
    return next_token_logprobs(lm, prompts)


@pytest.fixture
def pair(model_dir):
    """(the tiny Llama loaded whole, the same checkpoint with blocks 1-2 on disk, its safetensors file)."""
    whole = lmedit.load(model_dir)
    offloaded = lmedit.load(model_dir, device_map=_disk_map())
    assert params.is_offloaded(offloaded.model, EDITED) and offloaded.device_map is not None
    return whole, offloaded, model_dir / "model.safetensors"


def test_offloaded_model_reads_like_the_whole_one(pair):
    whole, offloaded, _ = pair
    torch.testing.assert_close(_logits(offloaded), _logits(whole), rtol=0, atol=1e-6)
    assert offloaded.fingerprint == whole.fingerprint and offloaded.weights_hash == whole.weights_hash
    assert offloaded.device == torch.device("cpu")


def test_rome_on_an_offloaded_block_matches_and_never_writes_the_checkpoint(pair, rome_config):
    whole, offloaded, checkpoint = pair
    before = _sha(checkpoint)
    original = params.read(offloaded.model, EDITED).clone()
    plain = lmedit.edit(whole, REQUEST, "rome", config=rome_config, apply=False)
    edit = lmedit.edit(offloaded, REQUEST, "rome", config=rome_config, apply=False)
    torch.testing.assert_close(edit.deltas[EDITED].full(), plain.deltas[EDITED].full(), rtol=1e-5, atol=1e-6)
    with plain.applied(whole), edit.applied(offloaded):
        assert params.is_offloaded(offloaded.model, EDITED)  # still offloaded: the new value is in the overlay
        torch.testing.assert_close(_logits(offloaded), _logits(whole), rtol=0, atol=1e-5)
        assert not torch.equal(params.read(offloaded.model, EDITED), original)
    assert torch.equal(params.read(offloaded.model, EDITED), original)  # undo: bit for bit
    torch.testing.assert_close(_logits(offloaded), _logits(whole), rtol=0, atol=1e-6)
    assert _sha(checkpoint) == before


def test_memit_on_offloaded_blocks_matches(pair, tmp_path):
    whole, offloaded, checkpoint = pair
    before = _sha(checkpoint)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lmedit.testing.TINY_CORPUS * 40))
    config = {"layers": [1, 2], "corpus": f"file:{corpus}", "corpus_tokens": 2000, "prefixes": 2}
    plain = lmedit.edit(whole, REQUEST, "memit", config=config, apply=False)
    edit = lmedit.edit(offloaded, REQUEST, "memit", config=config, apply=False)
    assert set(edit.deltas) == set(plain.deltas)
    for name in plain.deltas:
        torch.testing.assert_close(edit.deltas[name].full(), plain.deltas[name].full(), rtol=1e-4, atol=1e-6)
    with edit.applied(offloaded), plain.applied(whole):
        torch.testing.assert_close(_logits(offloaded), _logits(whole), rtol=0, atol=1e-5)
    assert _sha(checkpoint) == before


def test_tracing_an_offloaded_model_matches(pair):
    whole, offloaded, _ = pair
    a = trace(whole, "Where is The Eiffel Tower", "The Eiffel Tower", samples=2)
    b = trace(offloaded, "Where is The Eiffel Tower", "The Eiffel Tower", samples=2)
    torch.testing.assert_close(torch.as_tensor(b.scores), torch.as_tensor(a.scores), rtol=0, atol=1e-6, equal_nan=True)


def test_fine_tuning_an_offloaded_block(pair):
    """FT trains the offloaded weight itself: `params.resident` holds it in memory for the training only."""
    whole, offloaded, _ = pair
    config = {"layers": [1], "steps": 3}
    plain = lmedit.edit(whole, REQUEST, "ft", config=config, apply=False)
    edit = lmedit.edit(offloaded, REQUEST, "ft", config=config, apply=False)
    assert params.is_offloaded(offloaded.model, EDITED)  # offloaded again after training
    for name in plain.deltas:
        torch.testing.assert_close(edit.deltas[name].full(), plain.deltas[name].full(), rtol=1e-4, atol=1e-6)


def test_an_edited_offloaded_model_exports_its_edited_weights(pair, rome_config, tmp_path):
    whole, offloaded, _ = pair
    ledger = lmedit.Ledger(tmp_path / "ledger")
    assert ledger.edit(offloaded, REQUEST, "rome", config=rome_config, force=True).recorded  # tiny model: no audit
    out = ledger.export_model(offloaded, tmp_path / "exported")
    exported = lmedit.load(out)
    with lmedit.edit(whole, REQUEST, "rome", config=rome_config, apply=False).applied(whole):
        torch.testing.assert_close(_logits(exported), _logits(whole), rtol=0, atol=1e-5)


def test_a_loaded_model_object_can_be_dispatched_with_disk_offload():
    lm = tiny_lm("llama")
    reference = _logits(lm)
    placed = lmedit.load(lm.model, tokenizer=lm.tokenizer, device_map=_disk_map())
    assert params.is_offloaded(placed.model, EDITED)
    torch.testing.assert_close(_logits(placed), reference, rtol=0, atol=1e-6)


def test_device_and_device_map_together_are_refused(model_dir):
    with pytest.raises(DeviceError, match="not both"):
        lmedit.load(model_dir, device="cpu", device_map="auto")
    with pytest.raises(DeviceError, match="device_map"):
        lmedit.load(model_dir, max_memory={"cpu": "1GiB"})
    with pytest.raises(DeviceError, match="'balanced'"):
        lmedit.load(model_dir, device_map="balanced")


def test_disk_map_names_gpt2_blocks():
    assert disk_map(tiny_lm("gpt2"), [0])["transformer.h.0"] == "disk"


def test_cli_places_blocks_with_device_map(model_dir, capsys):
    from lmedit.cli.main import main

    device_map = json.dumps(_disk_map())
    assert main(["generate", "--model", str(model_dir), "--device-map", device_map, "--max-new-tokens", "2", "hi"]) == 0
    for args, expected in [(["--device-map", "{not json"], "expected 'auto' or a JSON object"),
                           (["--device-map", "[1]"], "JSON object of module name"),
                           (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
                           (["--max-memory", "cpu=1GiB"], "go with --device-map"),
                           (["--device", "cuda", "--device-map", "auto"], "not both")]:
        assert main(["generate", "--model", str(model_dir), *args, "hi"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], (args, err)


def test_key_statistics_of_offloaded_blocks(pair, tmp_path):
    """C = E[kkᵀ] read through accelerate's hooks, computed afresh (no cache) on both models."""
    from lmedit.stats import CorpusSpec, key_second_moment

    whole, offloaded, _ = pair
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lmedit.testing.TINY_CORPUS * 20))
    spec = CorpusSpec(source=f"file:{corpus}", n_tokens=500)
    a, b = key_second_moment(whole, [1, 2], spec), key_second_moment(offloaded, [1, 2], spec)
    for layer in (1, 2):
        torch.testing.assert_close(b[layer], a[layer], rtol=1e-6, atol=1e-9)
