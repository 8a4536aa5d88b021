"""The command line answers at once and never shows a traceback for a user's mistake.

Each mistake prints one line `error: <message>` on stderr (naming the file, field or flag) and exits 2;
`--debug` re-raises. Run in-process through `main([...])`, and a few through a real subprocess for the exit
status and the exact stderr. Also: `--help` imports no torch, `--version`, `lmedit ls`, user text printed
verbatim (no rich markup), trace file names, the `--request` formats, and `lmedit train serac`.
Tiny models only (`model_dir`: a tiny Llama saved as an HF directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lmedit.cli.main import main
from lmedit.errors import ConfigError, DeviceError, LMEditError, MissingFileError, UnknownNameError

TRIPLET = ["--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target-new", "Rome"]


def one_error(capsys) -> str:
    """The single stderr line, which must start with `error: `; returns its message."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("error: ")


def last_error(capsys) -> str:
    """For errors raised after the model loaded (log lines may precede): exactly one `error:` line, last."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    assert "Traceback" not in err
    return lines[-1].removeprefix("error: ")


@pytest.fixture
def wide(monkeypatch):
    from lmedit.cli.common import console

    monkeypatch.setattr(console, "width", 300)  # rich folds table cells to the terminal width


# ---- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, expected", [
    ("layr=3", ["'layr'", "Did you mean 'layer'", "layr=3"]),
    ("layer=abc", ["'layer'", "'abc'", "layer=abc"]),
    ("layer", ["key=value"]),
])
def test_bad_set_is_one_line(model_dir, capsys, setting, expected):
    assert main(["edit", "--model", str(model_dir), "--set", setting, *TRIPLET]) == 2
    message = last_error(capsys)
    assert all(e in message for e in expected), message


@pytest.mark.parametrize("text, expected", [
    (None, ["does not exist", "not found"]),
    ("layer: [1\n", ["invalid YAML", "line 2"]),
    ("- 1\n- 2\n", ["mapping", "list"]),
    ("layer: yes\n", ["'layer'", "True"]),
    ("layr: 3\n", ["'layr'", "Did you mean 'layer'"]),
])
def test_bad_config_file_is_named(model_dir, tmp_path, capsys, text, expected):
    path = tmp_path / "rome-settings.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["edit", "--model", str(model_dir), "--config", str(path), *TRIPLET]) == 2
    message = last_error(capsys)
    assert "rome-settings.yaml" in message and any(e in message for e in expected), message


def test_settings_that_do_not_fit_the_model(model_dir, capsys):
    assert main(["edit", "--model", str(model_dir), "--set", "layer=99", *TRIPLET]) == 2
    assert "RomeConfig.layer=99 but the model has 4 layers" in last_error(capsys)
    assert main(["neurons", "--model", str(model_dir), "{} is located in", "--subject", "The Eiffel Tower",
                 "--target", "Paris", "--layers", "99"]) == 2
    assert "layers [99] are out of range" in last_error(capsys)


def test_load_config_errors_name_file_and_field(tmp_path):
    from lmedit.config import load_config
    from lmedit.editors.rome import RomeConfig

    path = tmp_path / "c.yaml"
    path.write_text("layer: yes\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'layer'"):  # a bool is not an int
        load_config(RomeConfig, path)
    path.write_text("v_lr: on\n")
    with pytest.raises(ValueError, match="'v_lr'"):  # ConfigError is still a ValueError
        load_config(RomeConfig, path)
    with pytest.raises(ConfigError, match="override 'layer=-1'.*layer"):  # __post_init__ validation, source named
        load_config(RomeConfig, None, ["layer=-1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RomeConfig, tmp_path / "missing.yaml")
    assert load_config(RomeConfig, None, ["layer=3"]).layer == 3


# ---- names, devices, models --------------------------------------------------------------------------


def test_unknown_method_and_dataset(model_dir, capsys):
    from lmedit.registry import datasets, editors

    with pytest.raises(KeyError):  # still a KeyError for old callers
        editors.get("rom")
    with pytest.raises(UnknownNameError, match="unknown dataset 'cf'"):
        datasets.get("cf")
    assert main(["edit", "--model", str(model_dir), "--method", "rom", *TRIPLET]) == 2
    assert "Did you mean 'rome'" in last_error(capsys)
    assert main(["eval", "--model", str(model_dir), "--method", "noop", "--dataset", "countrfact"]) == 2
    assert "unknown dataset 'countrfact'" in last_error(capsys)
    assert main(["train", "romee", "--out", "x"]) == 2
    assert "unknown editor 'romee'" in last_error(capsys)


def test_devices_are_checked_before_loading(model_dir, capsys, monkeypatch):
    import torch

    assert main(["edit", "--model", str(model_dir), "--device", "bogus", *TRIPLET]) == 2
    assert "unknown device 'bogus'" in last_error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", str(model_dir), "--device", "cuda", "hi"]) == 2
    assert "CUDA is not available" in last_error(capsys)
    from lmedit.models.load import resolve_device

    with pytest.raises(DeviceError):
        resolve_device("cuda:0")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_model_directory_without_tokenizer_or_config(model_dir, tmp_path, capsys):
    no_tokenizer = tmp_path / "weights-only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tokenizer / name)
    assert main(["generate", "--model", str(no_tokenizer), "hi"]) == 2
    message = last_error(capsys)
    assert str(no_tokenizer) in message and "tokenizer" in message
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    assert main(["generate", "--model", str(not_a_model), "hi"]) == 2
    message = last_error(capsys)
    assert str(not_a_model) in message and "config.json" in message


# ---- files --------------------------------------------------------------------------------------------


def test_request_file_problems_name_file_and_line(tmp_path, capsys):
    good = json.dumps({"prompt": "{} is in", "subject": "A", "target_new": "B"})
    cases = {
        "missing.json": (None, "does not exist"),
        "folder": ("dir", "is a directory"),
        "broken.json": ('{"prompt": "{} is in",\n', "not valid JSON: line 2"),
        "lines.jsonl": (good + "\n" + good[:-5] + "\n", "line 2"),
        "record.jsonl": (good + "\n" + json.dumps({"prompt": "{} is in", "subject": "A"}) + "\n", "record 2"),
        "empty.json": ("  \n", "is empty"),
        "number.json": ("3", "holds a JSON int"),
        "typed.json": (json.dumps({"prompt": 5, "subject": "A", "target_new": "B"}), "'prompt' must be a string"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_text(content)
        assert main(["edit", "--request", str(path)]) == 2, name  # fails before any model loads
        message = one_error(capsys)
        assert name in message and expected in message, message


def test_saved_edit_average_and_ledger_paths(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--edit", str(tmp_path / "no.safetensors"), "hi"]) == 2
    assert "no edit file at" in one_error(capsys)
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not an edit")
    assert main(["generate", "--model", str(model_dir), "--edit", str(fake), "hi"]) == 2
    assert "fake.safetensors is not" in one_error(capsys)
    assert main(["trace", "--average", str(tmp_path / "facts.jsonl"), "--model", str(model_dir)]) == 2
    assert "facts.jsonl" in one_error(capsys)
    bad_facts = tmp_path / "bad.jsonl"
    bad_facts.write_text('{"prompt": "{} is in", "subject": "X", "answer": "Y"}\n{"prompt": \n')
    assert main(["trace", "--average", str(bad_facts), "--model", str(model_dir)]) == 2
    assert "bad.jsonl, line 2" in one_error(capsys)
    ledger = tmp_path / "no-ledger"
    for argv in (["ledger", "list"], ["ledger", "show", "1"], ["audit", "1"], ["export-model", str(tmp_path / "o")]):
        assert main([*argv, "--ledger", str(ledger)]) == 2
        assert f"ledger {ledger} does not exist" in one_error(capsys)
    assert not ledger.exists()  # a typo does not create an empty ledger
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    assert main(["ledger", "list", "--ledger", str(folder)]) == 2
    assert "is not a ledger" in one_error(capsys)
    assert main(["ledger", "import", str(tmp_path / "none.lmpatch"), "--ledger", str(ledger)]) == 2
    assert "none.lmpatch" in one_error(capsys)


def test_usage_errors_are_one_line_and_debug_reraises(tmp_path, capsys):
    assert main(["edit", "--max-new-tokens", "many"]) == 2
    assert "--max-new-tokens" in one_error(capsys)
    assert main(["nonsense"]) == 2
    assert "nonsense" in one_error(capsys)
    with pytest.raises(MissingFileError):
        main(["--debug", "edit", "--request", str(tmp_path / "missing.json")])
    with pytest.raises(MissingFileError):  # after the command too
        main(["edit", "--request", str(tmp_path / "missing.json"), "--debug"])
    with pytest.raises(MissingFileError):
        main(["ledger", "list", "--ledger", str(tmp_path / "none"), "--debug"])
    assert main(["edit", "--request", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in one_error(capsys)
    with pytest.raises(LMEditError):
        main(["--debug", "eval"])  # no --method


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmedit.cli.main", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_real_exit_code_and_stderr(model_dir, tmp_path):
    for argv, expected in [
        (["edit", "--request", str(tmp_path / "requests.jsonl")], "requests.jsonl does not exist"),
        (["edit", "--model", str(model_dir), "--set", "layr=3", *TRIPLET], "Did you mean 'layer'"),
        (["edit", "--bogus-flag"], "--bogus-flag"),
    ]:
        done = _run(*argv)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# ---- fast help, version, ls -------------------------------------------------------------------------------


def test_help_and_version_import_no_torch():
    code = ("import sys; from lmedit.cli.main import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'lmedit.editors', 'lmedit.models.load') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    done = _run("--version", timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("lmedit ")


def test_cli_constants_agree_with_the_library():
    import lmedit.cli.trace as cli_trace
    from lmedit import defaults
    from lmedit.editors import DEFAULT_METHOD
    from lmedit.models.load import DEFAULT_MODEL
    from lmedit.tracing import KINDS

    assert tuple(cli_trace.KINDS) == tuple(KINDS)
    assert DEFAULT_METHOD == defaults.DEFAULT_METHOD and DEFAULT_MODEL == defaults.DEFAULT_MODEL


def test_ls(capsys, wide, monkeypatch, tmp_path):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    from lmedit.registry import datasets, editors

    assert main(["ls", "editors"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in editors.names()) and "arXiv:2202.05262" in out
    serac = next(line for line in out.splitlines() if "serac" in line)
    assert "yes" in serac  # takes descriptors, trainable
    assert main(["ls", "datasets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in datasets.names())
    assert main(["ls", "models"]) == 0
    assert "gemma3-270m" in capsys.readouterr().out
    assert main(["ls", "things"]) == 2
    assert "things" in one_error(capsys)


# ---- user text is printed verbatim -------------------------------------------------------------------------


def test_markup_in_user_text_prints_verbatim(model_dir, capsys, wide):
    assert main(["edit", "--model", str(model_dir), "--method", "noop", "--prompt", "[bold]{} is in", "--subject",
                 "[red]X", "--target-new", "[/]", "--target-true", "x[/b]", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "[bold][red]X is in" in out and "new: [/]" in out and "true: x[/b]" in out
    assert main(["generate", "--model", str(model_dir), "[i]x[/i]", "--max-new-tokens", "1"]) == 0
    assert "[i]x[/i]" in capsys.readouterr().out


def test_ledger_rows_escape_requests(capsys, wide):
    from lmedit.cli.ledger_common import render_rows

    row = SimpleNamespace(id=1, state="applied", verdict="keep", method="rome", kind="weight", created="today",
                          requests=[{"prompt": "{} is [bold]in", "subject": "[A]", "target_new": "[/]"}])
    render_rows([row], "ledger [x]")
    out = capsys.readouterr().out
    assert "[A] is [bold]in → [/]" in out and "ledger [x]" in out


# ---- trace file names ---------------------------------------------------------------------------------------


def test_trace_file_names_follow_the_prompt():
    from lmedit.cli.trace import file_stem

    def args(prompt: str, subject: str, **kw) -> argparse.Namespace:
        base = dict(prompt=prompt, subject=subject, answer=None, source_prompt=None, source_answer=None, samples=None,
                    noise=None, window=None, seed=0)
        return argparse.Namespace(**{**base, **kw})

    a = file_stem(args("The Space Needle is in downtown", "The Space Needle"), "m")
    assert a.startswith("the-space-needle-is-in-downtown-") and len(a.rsplit("-", 1)[1]) == 8
    assert a == file_stem(args("The Space Needle is in downtown", "The Space Needle"), "m")
    others = {file_stem(args("The Space Needle is in downtown", "Space Needle"), "m"),
              file_stem(args("The Space Needle is in downtown", "The Space Needle", window=3), "m"),
              file_stem(args("The Space Needle is in downtown", "The Space Needle"), "other-model"),
              file_stem(args("Paris is in", "Paris"), "m")}
    assert a not in others and len(others) == 4
    assert "/" not in file_stem(args("a/b: c.d?", "a"), "m") and "." not in file_stem(args("a/b: c.d?", "a"), "m")


# ---- --request formats ----------------------------------------------------------------------------------------


def _requests(path) -> list:
    from lmedit.cli.edit import read_requests

    return read_requests(argparse.Namespace(descriptor=None, descriptor_output=None, request=str(path), prompt=None,
                                            subject=None, target_new=None, target_true=None))


def test_request_file_formats(tmp_path):
    from lmedit.types import EditDescriptor, EditRequest

    eiffel = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    own = {"prompt": eiffel.prompt, "subject": eiffel.subject, "target_new": "Rome", "target_true": "Paris"}
    rome = {"case_id": 1, "requested_rewrite": {"prompt": eiffel.prompt, "subject": eiffel.subject, "relation_id": "P131",
                                                "target_new": {"str": "Rome", "id": "Q220"},
                                                "target_true": {"str": "Paris", "id": "Q90"}},
            "paraphrase_prompts": ["Where is it? The Eiffel Tower is in"], "neighborhood_prompts": ["The Louvre is in"],
            "attribute_prompts": [], "generation_prompts": []}
    easyedit = {"case_id": 2, "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
                "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? In",
                "locality_prompt": "The Louvre is located in the city of", "locality_ground_truth": "Paris"}
    files = {"one.json": json.dumps(own), "list.json": json.dumps([own, rome, easyedit]),
             "lines.jsonl": "\n".join(json.dumps(r) for r in (own, rome, easyedit)) + "\n",
             "lines.json": json.dumps(rome) + "\n" + json.dumps(easyedit) + "\n",  # JSON lines under a .json name
             "rome.json": json.dumps([rome]), "easyedit.json": json.dumps([easyedit])}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        requests = _requests(tmp_path / name)
        assert requests and all(r == eiffel for r in requests), (name, requests)
    assert len(_requests(tmp_path / "list.json")) == 3
    (tmp_path / "pair.json").write_text(json.dumps({"input": "Who is the UK PM?", "output": "Boris Johnson"}))
    assert _requests(tmp_path / "pair.json") == [EditDescriptor(input="Who is the UK PM?", output="Boris Johnson")]
    (tmp_path / "bad.json").write_text(json.dumps([{**easyedit, "ground_truth": ""}]))
    with pytest.raises(LMEditError, match="record 1.*ground_truth"):
        _requests(tmp_path / "bad.json")


# ---- lmedit train serac ---------------------------------------------------------------------------------------


def test_train_serac_saves_its_scope_head(model_dir, tmp_path, capsys):
    facts = [("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris", "The Louvre"),
             ("Lionel Messi", "{} plays the sport of", "tennis", "soccer", "Neymar"),
             ("Toyota", "{} is a company from", "France", "Japan", "Honda"),
             ("Danielle Darrieux", "The mother tongue of {} is", "English", "French", "Jean Gabin"),
             ("BBC One", "{}, by", "Sega", "BBC", "BBC Radio")]
    records = [{"case_id": i, "prompt": p.format(s), "subject": s, "target_new": new, "ground_truth": true,
                "rephrase_prompt": f"{s}: " + p.format("it"), "locality_prompt": p.format(n),
                "locality_ground_truth": true} for i, (s, p, new, true, n) in enumerate(facts)]
    data = tmp_path / "cf-train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "serac-run"
    common = ["train", "serac", "--model", str(model_dir), "--device", "cpu", "--dataset", "counterfact",
              "--data", str(data), "--out", str(out), "--set", "encoder=lexical", "--set", "train_batch_edits=4",
              "--set", "projection_dim=8"]
    assert main([*common, "--resume"]) == 2
    assert "serac training does not take --resume" in one_error(capsys)
    assert main([*common, "--steps", "5", "--val-dataset", "counterfact", "--val-data", str(data)]) == 0
    printed = capsys.readouterr().out
    head = out / "scope.safetensors"
    assert head.exists() and f"scope_path={head}" in printed.replace("\n", "")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["network"] == str(head) and "balanced" in summary["final"]
    from lmedit.editors import get_editor

    trained = get_editor("serac", None, ["encoder=lexical", f"scope_path={head}"])
    from lmedit.models.load import load

    lm = load(str(model_dir))
    assert trained.head(lm).projection is not None
    assert main(["train", "rome", "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to train" in one_error(capsys)
