"""MEND on tiny random models: the gradient identity, training, checkpoints (save/load, fingerprint, resume), the CLI."""

import json

import pytest
import torch

import lmedit
from lmedit.cli.main import main
from lmedit.config import load_config
from lmedit.editors.mend.config import MendConfig
from lmedit.editors.mend.editor import MendEditor, gradient_pieces, request_rows
from lmedit.editors.mend.network import load_network, read_metadata, save_network
from lmedit.errors import LMEditError
from lmedit.eval.records import EvalRecord, Probe
from lmedit.scoring import next_token_logprobs
from lmedit.testing import tiny_lm
from lmedit.tokens import prompt_ids, target_ids
from lmedit.settings import CONFIG_ROOT

REQUESTS = [lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris"),
            lmedit.EditRequest("{} plays the sport of", "Michael Jordan", "soccer", "basketball")]

SUBJECTS = ["The Eiffel Tower", "The Space Needle", "Danielle Darrieux", "The Louvre", "Michael Jordan", "Lionel Messi",
            "Toyota", "Apple", "Steve Jobs", "Rome", "Paris", "Seattle"]
OBJECTS = ["Paris", "Rome", "Seattle", "Japan", "California", "French", "basketball", "soccer", "Italy", "France"]
TEMPLATES = [("Where is {}", "{} is located in"), ("{} plays the sport of", "The sport of {} is"),
             ("{} is a company from", "{} was founded in")]
# Small, fast training settings for a 4-layer, 64-wide model.
TINY = dict(layers=(-2, -1), rank=32, batch_size=4, lr=1e-3, lr_lr=1e-2, edit_lr=0.05, val_size=12)


def tiny_records(n: int, seed: int = 0) -> list[EvalRecord]:
    """Synthetic CounterFact-like records over the tiny tokenizer's words: edit, one paraphrase, one neighbour."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        subject = SUBJECTS[int(torch.randint(len(SUBJECTS), (1,), generator=g))]
        template, paraphrase = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=g))]
        new, true = (OBJECTS[int(j)] for j in torch.randperm(len(OBJECTS), generator=g)[:2])
        other = SUBJECTS[(SUBJECTS.index(subject) + 1) % len(SUBJECTS)]
        request = lmedit.EditRequest(template, subject, new, true)
        out.append(EvalRecord(case_id=f"{seed}-{i}", requests=(request,),
                              paraphrases=(Probe(paraphrase.format(subject), new, true),),
                              neighborhood=(Probe(template.format(other), true, new),)))
    return out


def _autograd_weight_grad(lm, requests, layer):
    """∇W of Σ_requests mean-token NLL(target_new), by plain autograd on the weight, canonical (d_out, d_in)."""
    module = lm.arch.block_module(lm.model, layer, "mlp_out")
    module.weight.requires_grad_(True)
    try:
        total = 0.0
        for r in requests:
            p, t = prompt_ids(lm, r.text), target_ids(lm, r.target_new)
            logits = lm.model(input_ids=torch.tensor([p + t[:-1]]), use_cache=False).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            total = total - torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(t)]).mean()
        (grad,) = torch.autograd.grad(total, [module.weight])
    finally:
        module.weight.requires_grad_(False)
    return grad.T if lm.arch.weight_layout == "in_out" else grad


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and GPT-2's transposed Conv1D
def test_gradient_is_a_sum_of_rank_one_pieces(family):
    lm = tiny_lm(family)
    layers = [1, 3]
    pieces, _ = gradient_pieces(lm, layers, request_rows(lm, REQUESTS))
    for layer in layers:
        expected = _autograd_weight_grad(lm, REQUESTS, layer)
        u, delta = pieces.u[layer], pieces.delta[layer]  # (n_tokens, d_in), (n_tokens, d_out)
        assert u.shape[0] == delta.shape[0] == sum(len(prompt_ids(lm, r.text)) + len(target_ids(lm, r.target_new)) - 1
                                                   for r in REQUESTS)
        torch.testing.assert_close(delta.T @ u, expected, rtol=1e-4, atol=1e-6)  # ∇W = Σ_t δ_t u_tᵀ


def test_special_tokens_contribute_no_piece():
    lm = tiny_lm("llama")
    bos = lm.tokenizer.bos_token
    request = lmedit.EditRequest(bos + "Where is {}", "The Eiffel Tower", "Rome")
    ids = prompt_ids(lm, request.text)
    assert ids[0] == lm.tokenizer.bos_token_id
    pieces, _ = gradient_pieces(lm, [3], request_rows(lm, [request]))
    assert pieces.u[3].shape[0] == len(ids) + len(target_ids(lm, "Rome")) - 1 - 1


def test_untrained_network_is_one_gradient_step():
    lm = tiny_lm("gpt2")
    editor = MendEditor(MendConfig(allow_untrained=True, edit_lr=0.5, layers=(2,)))
    result = editor.edit(lm, REQUESTS)
    (name, delta), = result.deltas.items()
    assert name == lm.arch.param_name(lm.model, 2, "mlp_out")
    assert delta.rank == result.info["n_tokens"]
    grad = _autograd_weight_grad(lm, REQUESTS, 2)
    stored = -0.5 * (grad.T if lm.arch.weight_layout == "in_out" else grad)  # in the parameter's stored layout
    torch.testing.assert_close(delta.full(torch.float32), stored, rtol=1e-4, atol=1e-6)


def test_no_checkpoint_is_a_clear_error():
    with pytest.raises(LMEditError, match="needs a trained editor network"):
        MendEditor().edit(tiny_lm("llama"), REQUESTS[:1])
    with pytest.raises(FileNotFoundError, match="no MEND network"):
        MendEditor(MendConfig(checkpoint="/nonexistent/mend-run")).edit(tiny_lm("llama"), REQUESTS[:1])


def test_config_validation_and_layers():
    assert MendConfig(layers=(-3, -2, -1)).resolve_layers(18) == (15, 16, 17)
    assert MendConfig(layers=(5, -1)).resolve_layers(18) == (5, 17)
    with pytest.raises(ValueError, match="out of range"):
        MendConfig(layers=(4,)).resolve_layers(4)
    with pytest.raises(ValueError, match="same block twice"):
        MendConfig(layers=(3, -1)).resolve_layers(4)
    with pytest.raises(ValueError, match="duplicates"):
        MendConfig(layers=(1, 1))
    with pytest.raises(ValueError, match="batch_size"):
        MendConfig(batch_size=0)
    cfg = load_config(MendConfig, CONFIG_ROOT / "mend" / "gemma3-270m.yaml", ["checkpoint=runs/x"])
    assert cfg.layers == (-3, -2, -1) and cfg.checkpoint == "runs/x"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A MEND network trained for 30 steps on the tiny Llama (a few seconds), and its training summary."""
    out = tmp_path_factory.mktemp("mend") / "run"
    editor = MendEditor(MendConfig(steps=30, val_every=15, checkpoint_every=15, **TINY))
    summary = editor.fit(tiny_lm("llama"), tiny_records(120), out_dir=out)
    return out, summary, editor


def test_short_training_lowers_the_edit_loss(trained):
    out, summary, _ = trained
    first, last = summary["initial"], summary["final"]
    assert last["edit_nll"] < first["edit_nll"] - 1.0, (first, last)
    assert last["loss"] < first["loss"]
    assert summary["best"]["step"] > 0
    curve = json.loads((out / "curve.json").read_text())
    assert [h["step"] for h in curve["history"]] == [0, 15, 30]
    assert (out / "curve.png").stat().st_size > 0
    for name in ("mend.safetensors", "last.safetensors", "train_state.pt"):
        assert (out / name).exists()


def test_trained_editor_edits_through_its_checkpoint(trained):
    _, _, editor = trained
    lm = tiny_lm("llama")
    request = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
    new_first = target_ids(lm, "Rome")[0]
    before = next_token_logprobs(lm, [request.text])[0]
    result = editor.edit(lm, [request])  # fit() pointed the editor at its checkpoint
    with result.applied(lm):
        after = next_token_logprobs(lm, [request.text])[0]
    assert after[new_first] > before[new_first] + 1.0
    assert set(result.deltas) == {lm.arch.param_name(lm.model, l, "mlp_out") for l in (2, 3)}


def test_save_load_round_trips(trained, tmp_path):
    out, _, _ = trained
    lm = tiny_lm("llama")
    network, meta = load_network(out, fingerprint=lm.fingerprint)
    assert meta["base_fingerprint"] == lm.fingerprint and meta["network"]["layers"] == [2, 3]
    copy = save_network(network, tmp_path / "copy.safetensors", config=meta["config"],
                        base_fingerprint=meta["base_fingerprint"], base_model=meta["base_model"], step=meta["step"])
    again, _ = load_network(copy)
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    first = MendEditor(MendConfig(checkpoint=str(out))).edit(lm, REQUESTS)
    second = MendEditor(MendConfig(checkpoint=str(copy))).edit(lm, REQUESTS)
    assert set(first.deltas) == set(second.deltas)
    for name in first.deltas:
        assert torch.equal(first.deltas[name].full(), second.deltas[name].full()), name
    # the edit itself saves and loads like any weight edit
    reloaded = lmedit.load_edit(first.save(tmp_path / "edit.safetensors"))
    for name in first.deltas:
        assert torch.equal(first.deltas[name].full(), reloaded.deltas[name].full())


def test_checkpoint_refuses_another_model(trained):
    out, _, _ = trained
    other = tiny_lm("llama", seed=1)
    with pytest.raises(LMEditError, match="fingerprint"):
        MendEditor(MendConfig(checkpoint=str(out))).edit(other, REQUESTS[:1])
    with pytest.raises(LMEditError, match="fingerprint"):
        load_network(out, fingerprint=other.fingerprint)


def test_not_a_mend_file_is_refused(tmp_path):
    edit = MendEditor(MendConfig(allow_untrained=True)).edit(tiny_lm("llama"), REQUESTS[:1])
    path = edit.save(tmp_path / "edit.safetensors")
    with pytest.raises(LMEditError, match="not an lmedit MEND network"):
        read_metadata(path)


def test_resume_continues_from_a_checkpoint(tmp_path):
    records = tiny_records(60, seed=3)
    config = MendConfig(steps=4, val_every=4, checkpoint_every=2, **{**TINY, "val_size": 4})
    straight = tmp_path / "straight"
    MendEditor(config).fit(tiny_lm("llama"), records, out_dir=straight)

    split = tmp_path / "split"
    MendEditor(MendConfig(**{**config.__dict__, "steps": 2})).fit(tiny_lm("llama"), records, out_dir=split)
    with pytest.raises(LMEditError, match="already holds a MEND training run"):
        MendEditor(config).fit(tiny_lm("llama"), records, out_dir=split)
    summary = MendEditor(config).fit(tiny_lm("llama"), records, out_dir=split, resume=True)
    assert summary["steps"] == 4
    a, _ = load_network(straight / "last.safetensors")
    b, _ = load_network(split / "last.safetensors")
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, msg=name)
    history = json.loads((split / "curve.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 2, 4]  # the interrupted run validated at its last step, 2
    with pytest.raises(LMEditError, match="nothing to resume"):
        MendEditor(config).fit(tiny_lm("llama"), records, out_dir=tmp_path / "empty", resume=True)
    with pytest.raises(LMEditError, match="network settings"):
        MendEditor(MendConfig(**{**config.__dict__, "rank": 16, "steps": 6})).fit(
            tiny_lm("llama"), records, out_dir=split, resume=True)


def _write_counterfact(path, records):
    """Records in CounterFact's EasyEdit layout, as `lmedit train/eval --dataset counterfact` read them."""
    rows = [{"case_id": i, "prompt": r.requests[0].text, "subject": r.requests[0].subject,
             "target_new": r.requests[0].target_new, "ground_truth": r.requests[0].target_true,
             "rephrase_prompt": r.paraphrases[0].prompt, "locality_prompt": r.neighborhood[0].prompt,
             "locality_ground_truth": r.neighborhood[0].target} for i, r in enumerate(records)]
    path.write_text(json.dumps(rows))


def test_train_edit_and_eval_commands(model_dir, tmp_path, capsys):
    data = tmp_path / "cf-train.json"
    _write_counterfact(data, tiny_records(40, seed=5))
    out = tmp_path / "mend-run"
    settings = ["--set", "layers=[-2,-1]", "--set", "rank=16", "--set", "val_size=4", "--set", "val_every=3",
                "--set", "edit_lr=0.05"]
    code = main(["train", "mend", "--model", str(model_dir), "--device", "cpu", "--dataset", "counterfact",
                 "--data", str(data), "--out", str(out), "--steps", "3", *settings])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation, step 0 → step 3" in printed and "edit_nll" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert main(["train", "mend", "--model", str(model_dir), "--device", "cpu", "--dataset", "counterfact",
                 "--data", str(data), "--out", str(out), "--steps", "3", *settings]) == 2  # exists, no --resume
    assert "--resume" in capsys.readouterr().err.replace("\n", " ")

    code = main(["edit", "--model", str(model_dir), "--method", "mend", "--set", f"checkpoint={out}",
                 "--prompt", "Where is {}", "--subject", "The Eiffel Tower", "--target-new", "Rome",
                 "--target-true", "Paris", "--max-new-tokens", "2", "--save-edit", str(tmp_path / "e.safetensors")])
    assert code == 0
    assert "new: Rome" in capsys.readouterr().out
    assert lmedit.load_edit(tmp_path / "e.safetensors").method == "mend"

    code = main(["eval", "--model", str(model_dir), "--method", "mend", "--set", f"checkpoint={out}",
                 "--dataset", "counterfact", "--data", str(data), "--limit", "3", "--out", str(tmp_path / "eval")])
    assert code == 0
    summary = json.loads((tmp_path / "eval" / "mend-single" / "summary.json").read_text())
    assert summary["edited"]["metrics"]["efficacy_score"]["n"] == 3


def test_train_refuses_an_editor_without_training(model_dir, tmp_path, capsys):
    code = main(["train", "noop", "--model", str(model_dir), "--device", "cpu", "--dataset", "starter",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "nothing to train" in capsys.readouterr().err
