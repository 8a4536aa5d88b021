"""The ledger's command line end to end on tiny models saved as local directories (the `model_dir` fixture)."""

import torch
from ledger_helpers import LENIENT, REQUESTS, random_edit, same_weights, snapshot

import lmedit
from lmedit.cli.main import main
from lmedit.ledger import Ledger
from lmedit.ledger.audit import CHECKS
from lmedit.testing import TINY_CORPUS, tiny_lm

FACTS = [("The Eiffel Tower", "Rome", "Paris"), ("The Space Needle", "Paris", "Seattle"), ("The Louvre", "Seattle", "Paris")]


def _setup(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TINY_CORPUS * 40))
    rome = ["--set", "layer=1", "--set", f"corpus=file:{corpus}", "--set", "corpus_tokens=2000",
            "--set", "prefixes_short=2", "--set", "prefixes_long=1"]
    lenient = tmp_path / "audit.yaml"
    lenient.write_text("".join(f"{c.name}_{level}: null\n" for c in CHECKS for level in ("warn", "refuse"))
                       + "generation_tokens: 0\n")
    return rome, lenient


def test_ledger_commands(model_dir, tmp_path, capsys):
    rome, lenient = _setup(tmp_path)
    ledger_dir = str(tmp_path / "ledger")
    for subject, new, old in FACTS:
        code = main(["edit", "--model", str(model_dir), "--ledger", ledger_dir, "--audit-config", str(lenient),
                     "--prompt", "Where is {}", "--subject", subject, "--target-new", new, "--target-true", old,
                     "--max-new-tokens", "1", *rome])
        assert code == 0
    out = capsys.readouterr().out
    assert "recorded as edit 3" in out and "efficacy" in out

    assert main(["ledger", "list", "--ledger", ledger_dir]) == 0
    out = capsys.readouterr().out
    assert all(f"│ {i}" in out for i in (1, 2, 3)) and out.count("applied") == 3
    assert main(["ledger", "show", "2", "--ledger", ledger_dir]) == 0
    assert "The Space Needle" in capsys.readouterr().out

    plot = tmp_path / "edit-1.png"
    assert main(["audit", "1", "--ledger", ledger_dir, "--plot", str(plot), "--probes"]) == 0
    out = capsys.readouterr().out
    assert "specificity_plus" in out and "neighborhood_plus" in out and plot.exists()
    assert main(["audit", "1", "--ledger", ledger_dir, "--rerun", "--audit-config", str(lenient)]) == 0
    assert (tmp_path / "ledger" / "audits" / "edit-1.png").exists()
    capsys.readouterr()

    assert main(["ledger", "revert", "2", "--ledger", ledger_dir, "--audit-config", str(lenient)]) == 0
    out = capsys.readouterr().out
    assert "edit 2 reverted" in out and "[1, 3]" in out and "re-audited" in out
    ledger = Ledger(ledger_dir)
    assert ledger.applied_ids() == [1, 3] and ledger.reports(3)[-1][0] == "revert 2"

    patch = tmp_path / "edits.lmpatch"
    assert main(["ledger", "export", "--ledger", ledger_dir, "--patch", str(patch)]) == 0
    assert "2 applied edit(s)" in capsys.readouterr().out
    copy_dir = str(tmp_path / "copy")
    assert main(["ledger", "import", str(patch), "--ledger", copy_dir]) == 0
    assert "imported 2 edit(s)" in capsys.readouterr().out

    out_dir = tmp_path / "edited"
    assert main(["export-model", str(out_dir), "--ledger", copy_dir]) == 0
    capsys.readouterr()
    exported = lmedit.load(str(out_dir))
    edited = lmedit.load(str(model_dir))
    ledger.apply(edited)
    assert same_weights(snapshot(exported), snapshot(edited))

    assert main(["ledger", "apply", "2", "--ledger", ledger_dir, "--audit-config", str(lenient),
                 "--generate", "Where is The Louvre", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "edit 2 applied again" in out and "3 edit(s) [1, 2, 3] apply" in out


def test_refused_edit_is_not_recorded(model_dir, tmp_path, capsys):
    rome, _ = _setup(tmp_path)
    ledger_dir = str(tmp_path / "ledger")
    code = main(["edit", "--model", str(model_dir), "--ledger", ledger_dir, "--prompt", "Where is {}",
                 "--subject", "The Louvre", "--target-new", "Seattle", "--max-new-tokens", "1", *rome,
                 "--audit-set", "efficacy_warn=null", "--audit-set", "efficacy_refuse=1.5"])
    assert code == 1
    assert "refused by the audit gate" in capsys.readouterr().out.replace("\n", " ")
    assert Ledger(ledger_dir).entries() == []


def test_hash_mismatch_is_a_clear_error(model_dir, tmp_path, capsys):
    ledger = Ledger(tmp_path / "ledger", audit_config=LENIENT)
    lm = lmedit.load(str(model_dir))
    ledger.record(lm, random_edit(lm, REQUESTS[0], seed=0))
    patch = ledger.export_patch(tmp_path / "edits.lmpatch")
    other = tiny_lm("llama", seed=1)
    other_dir = tmp_path / "other-llama"
    other.model.save_pretrained(other_dir)
    other.tokenizer.save_pretrained(other_dir)
    code = main(["ledger", "import", str(patch), "--ledger", str(tmp_path / "copy"), "--model", str(other_dir)])
    assert code == 2
    assert "model hash mismatch" in capsys.readouterr().err.replace("\n", " ")
    assert main(["ledger", "apply", "--ledger", str(ledger.path), "--model", str(other_dir)]) == 2
    assert "model hash mismatch" in capsys.readouterr().err.replace("\n", " ")


def test_replay_command(model_dir, tmp_path, capsys):
    rome, lenient = _setup(tmp_path)
    ledger_dir = str(tmp_path / "ledger")
    assert main(["edit", "--model", str(model_dir), "--ledger", ledger_dir, "--audit-config", str(lenient),
                 "--prompt", "Where is {}", "--subject", "The Eiffel Tower", "--target-new", "Rome",
                 "--max-new-tokens", "1", *rome]) == 0
    other = tiny_lm("llama", seed=1)
    other_dir = tmp_path / "other-llama"
    other.model.save_pretrained(other_dir)
    other.tokenizer.save_pretrained(other_dir)
    configs = tmp_path / "configs" / "rome"
    configs.mkdir(parents=True)
    (configs / "other-llama.yaml").write_text("\n".join(r.replace("=", ": ") for r in rome[1::2]) + "\n")
    capsys.readouterr()
    assert main(["ledger", "replay", "--ledger", ledger_dir, "--onto", str(other_dir), "--into",
                 str(tmp_path / "replayed"), "--config-dir", str(tmp_path / "configs"), "--audit-config",
                 str(lenient)]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "carried over" in out and "1 of 1 edit(s) carried over" in out
    replayed = Ledger(tmp_path / "replayed")
    assert replayed.base_fingerprint == other.fingerprint and len(replayed.entries()) == 1
    assert torch.is_tensor(next(iter(replayed.load_edit(1).deltas.values())).left)
