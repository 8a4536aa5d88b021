"""The CLI end to end on a tiny random model saved as a local HF directory (which also tests loading by path)."""

import json

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.errors import ModelNotFoundError
from lmedit.testing import TINY_CORPUS, tiny_lm


@pytest.fixture(autouse=True)
def corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(TINY_CORPUS * 40))


def test_load_local_directory_matches(model_dir):
    lm = lmedit.load(str(model_dir))
    ref = tiny_lm("llama")
    enc = ref.encode(["Where is Paris"])
    assert torch.equal(lm.model(**enc).logits, ref.model(**enc).logits)
    assert lm.fingerprint == ref.fingerprint


def test_unknown_model_lists_builtins(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="gemma3-270m, smollm2-135m"):
        lmedit.load("no-such-org/no-such-model")


def test_generate_and_edit_commands(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "Where is", "--max-new-tokens", "3"]) == 0
    assert "Where is" in capsys.readouterr().out
    out_file = tmp_path / "edit.safetensors"
    code = main(["edit", "--model", str(model_dir), "--prompt", "Where is {}", "--subject", "The Eiffel Tower",
                 "--target-new", "Rome", "--target-true", "Paris", "--set", "layer=1",
                 "--set", f"corpus=file:{tmp_path / 'corpus.txt'}", "--set", "corpus_tokens=2000",
                 "--set", "prefixes_short=2", "--set", "prefixes_long=1", "--save-edit", str(out_file),
                 "--max-new-tokens", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "P before" in out and "new: Rome" in out
    assert out_file.exists()
    edit = lmedit.load_edit(out_file)
    assert edit.requests[0].subject == "The Eiffel Tower"
    assert main(["generate", "--model", str(model_dir), "--edit", str(out_file), "Where is The Eiffel Tower",
                 "--max-new-tokens", "1"]) == 0


def test_edit_bad_input_is_a_clear_error(model_dir, tmp_path, capsys):
    code = main(["edit", "--model", str(model_dir), "--prompt", "Where is", "--subject", "X", "--target-new", "Y"])
    assert code == 2
    assert "exactly one '{}'" in capsys.readouterr().err.replace("\n", " ")
    bad = tmp_path / "reqs.jsonl"
    bad.write_text(json.dumps({"prompt": "{} is in", "subject": "A", "target_new": "B"}) + "\n"
                   + json.dumps({"prompt": "{} is in", "subject": "A"}) + "\n")
    code = main(["edit", "--model", str(model_dir), "--request", str(bad)])
    assert code == 2
    assert "record 2" in capsys.readouterr().err
    code = main(["edit", "--model", str(model_dir), "--method", "rom", "--subject", "A", "--prompt", "{} x",
                 "--target-new", "B"])
    assert code == 2
    assert "Did you mean 'rome'" in capsys.readouterr().err


def test_models_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "smollm2-135m" in out
