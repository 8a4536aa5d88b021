"""WISE (editors/wise.py, editors/wise_memory.py) on tiny random models: the edit lands without writing weights,
inputs the router leaves to the main memory are bit-identical, exact undo, edits in one memory and in two, one
undone, the incremental state, save/load of the sparse increment, the masked gradient, Ties-merging, failures."""

import pytest
import torch

import lmedit
from lmedit.editors import AdaptorEdit, load_edit
from lmedit.editors.wise import (
    GENERIC_PROMPTS,
    WiseConfig,
    WiseEdit,
    WiseEditor,
    edit_mask,
    ties_merge,
)
from lmedit.editors.wise_memory import build_memories, pack_bits, unpack_bits
from lmedit.errors import ConfigError, EditFileError, LMEditError, RequestError
from lmedit.hooks import capture
from lmedit.scoring import next_token_logprobs
from lmedit.testing import tiny_lm
from lmedit.tokens import pad_batch, prompt_ids, target_ids
from lmedit.types import EditDescriptor, Site

# The subject ends the prompt (see tests/contract/test_editors.py for why, on a random 4-layer model).
REQUEST = lmedit.EditRequest("Where is {}", "The Eiffel Tower", "Rome", "Paris")
OTHER = lmedit.EditRequest("Where is {}", "The Louvre", "Seattle", "Paris")
SETTINGS = {"layer": 1, "lr": 0.03, "steps": 30}


def _editor(**changes) -> WiseEditor:
    return WiseEditor(WiseConfig(**{**SETTINGS, **changes}))


def _snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snap) -> bool:
    return all(torch.equal(snap[k], v) for k, v in lm.model.state_dict().items())


def _logits(lm, texts):
    """Full logits of each text (every position), one forward each."""
    with torch.no_grad():
        return [lm.model(input_ids=torch.tensor([prompt_ids(lm, t)], device=lm.device)).logits[0] for t in texts]


def _keys(lm, text, layer=1):
    site = Site("mlp.key", layer)
    with torch.no_grad(), capture(lm, [site], stop_after=site) as acts:
        lm.model(input_ids=torch.tensor([prompt_ids(lm, text)], device=lm.device))
    return acts[site][0]  # (pos, d_mlp)


def _hooks(lm, layer=1) -> int:
    return len(lm.arch.block_module(lm.model, layer, "mlp_out")._forward_hooks)


def _top(lm, text) -> int:
    return next_token_logprobs(lm, [text])[0].argmax().item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_lands_without_writing_weights_and_undo_is_exact(family):
    lm = tiny_lm(family)
    snap = _snapshot(lm)
    texts = [REQUEST.text, *GENERIC_PROMPTS[:2]]
    before = _logits(lm, texts)
    edit = _editor().edit(lm, [REQUEST])
    assert _same(lm, snap) and not lm.edits and _hooks(lm) == 0, "edit() changed the model"
    assert isinstance(edit, AdaptorEdit) and edit.kind == "adaptor" and edit.site == Site("mlp.out", 1)
    info = edit.info
    assert info["losses"][-1] < info["losses"][0] and min(info["subject_acts"]) > info["irrelevant_act_max"]
    assert info["separated"] == (info["irrelevant_act_max"] < info["threshold"])
    assert info["threshold"] == pytest.approx(0.88 * min(info["subject_acts"]), rel=1e-5)
    with edit.applied(lm):
        assert _top(lm, REQUEST.text) == target_ids(lm, REQUEST.target_new)[0]
        assert _same(lm, snap) and _hooks(lm) == 1 and list(lm.edits) == [edit]
    assert _same(lm, snap) and _hooks(lm) == 0 and not lm.edits
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, texts), before))


def test_inputs_routed_to_the_main_memory_are_bit_identical(tiny_llama):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    quiet = [t for t in GENERIC_PROMPTS if bool((edit.activations(_keys(lm, t)) <= edit.threshold).all())]
    assert len(quiet) >= 4, "the router should leave most of the irrelevant prompts it trained on alone"
    before = _logits(lm, quiet + [REQUEST.text])
    with edit.applied(lm):
        after = _logits(lm, quiet + [REQUEST.text])
    assert all(torch.equal(a, b) for a, b in zip(after[:-1], before[:-1]))
    # The edit prompt reads the side memory from its last subject token on: earlier positions are untouched.
    fired = (edit.activations(_keys(lm, REQUEST.text)) > edit.threshold).nonzero()
    first = int(fired.min())
    assert torch.equal(after[-1][:first], before[-1][:first]) and not torch.equal(after[-1][first:], before[-1][first:])
    # In one batch with the edit prompt, a quiet row is still the unedited model's, bit for bit.
    batch = pad_batch(lm, [prompt_ids(lm, REQUEST.text), prompt_ids(lm, quiet[0])])
    with torch.no_grad():
        unedited = lm.model(**batch.model_inputs()).logits
        with edit.applied(lm):
            edited = lm.model(**batch.model_inputs()).logits
    n = batch.lengths[1]  # its real positions (right-padding after them may fire: nothing reads it)
    assert torch.equal(edited[1, :n], unedited[1, :n]) and not torch.equal(edited[0], unedited[0])


def test_two_edits_share_one_hook_and_undoing_the_first_leaves_the_second(tiny_llama):
    lm = tiny_llama
    first = _editor().edit(lm, [REQUEST])
    second = _editor().edit(lm, [OTHER])  # made apart: two memories, each with its own mask
    assert first.memory != second.memory
    assert not torch.equal(edit_mask(first.shape, 0.2, first.mask_seed), edit_mask(second.shape, 0.2, second.mask_seed))
    alone = _logits(lm, [OTHER.text])[0]
    with second.applied(lm):
        expected = _logits(lm, [OTHER.text])[0]
    first.apply(lm)
    second.apply(lm)
    assert _hooks(lm) == 1, "one hook serves every WISE edit at a layer"
    assert _top(lm, OTHER.text) == target_ids(lm, "Seattle")[0] and _top(lm, REQUEST.text) == target_ids(lm, "Rome")[0]
    first.undo()  # the hook's holder goes: the hook stays for the other, whose side memory is its own again
    assert _hooks(lm) == 1 and torch.equal(_logits(lm, [OTHER.text])[0], expected)
    second.undo()
    assert _hooks(lm) == 0 and not lm.edits and torch.equal(_logits(lm, [OTHER.text])[0], alone)


def test_the_masked_gradient_only_touches_the_edits_subset(tiny_llama):
    lm = tiny_llama
    edit = _editor(mask_ratio=0.3).edit(lm, [REQUEST])
    mask = edit_mask(edit.shape, 0.3, edit.mask_seed)
    assert 0.2 < mask.float().mean() < 0.4
    assert bool((edit.delta[~mask] == 0).all()) and (edit.delta[mask] != 0).float().mean() > 0.9
    assert edit.info["trained_entries"] == int((edit.delta != 0).sum())


def test_norm_constraint_clamps_every_entry(tiny_llama):
    edit = _editor(norm_constraint=1e-3, steps=5).edit(tiny_llama, [REQUEST])
    assert 0 < edit.delta.abs().max() <= torch.tensor(1e-3)  # the bound in float32


def test_ties_merge_elects_signs_and_averages_the_agreeing():
    a = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    b = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    c = torch.tensor([[0.0, -1.0, 0.0, 0.0]])
    assert torch.equal(ties_merge([a]), a)
    assert ties_merge([a, b]).tolist() == [[2.0, -2.0, 0.0, 3.0]]
    assert ties_merge([a, b, c]).tolist() == [[2.0, -1.5, 0.0, 3.0]]


def test_shards_are_trained_apart_and_merged(tiny_llama):
    lm = tiny_llama
    edit = _editor(shards=2).edit(lm, [REQUEST, OTHER])
    assert len(edit.info["shards"]) == 2 and len(edit.info["subject_acts"]) == 2
    with edit.applied(lm):
        assert _top(lm, REQUEST.text) == target_ids(lm, "Rome")[0]


def test_save_load_round_trip(tiny_llama, tmp_path):
    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    loaded = load_edit(edit.save(tmp_path / "wise.safetensors"))
    assert isinstance(loaded, WiseEdit) and loaded.site == edit.site and loaded.requests == edit.requests
    assert loaded.method == "wise" and loaded.config["lr"] == 0.03 and loaded.base_fingerprint == lm.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors().values(), edit.tensors().values()))
    with edit.applied(lm):
        expected = _logits(lm, [REQUEST.text])[0]
    with loaded.applied(lm):
        assert torch.equal(_logits(lm, [REQUEST.text])[0], expected)


def test_a_damaged_file_is_refused_on_load(tiny_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _editor(steps=2).edit(tiny_llama, [REQUEST]).save(tmp_path / "wise.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    cases = {"no-keys": ({k: v for k, v in tensors.items() if k != "subject_keys"}, "'subject_keys'"),
             "short-values": ({**tensors, "values": tensors["values"][:-1]}, "'values' holds"),
             "float-support": ({**tensors, "support": tensors["support"].float()}, "packed bits"),
             "long-support": ({**tensors, "support": torch.cat([tensors["support"], torch.full((1,), 255, dtype=torch.uint8)])},
                              "do not hold")}
    for name, (bad, message) in cases.items():
        save_file(bad, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(EditFileError, match=message):
            load_edit(tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("bad", [[], [EditDescriptor("The Eiffel Tower is in Rome.")]])
def test_a_bad_request_leaves_nothing_applied(tiny_llama, bad):
    lm = tiny_llama
    snap = _snapshot(lm)
    with pytest.raises((RequestError, LMEditError)):
        lmedit.edit(lm, bad, "wise", config=SETTINGS)
    assert not lm.edits and _hooks(lm) == 0 and _same(lm, snap)


def test_an_edit_that_does_not_fit_the_model_is_refused_unapplied(tiny_llama):
    lm = tiny_llama
    edit = _editor(steps=2).edit(lm, [REQUEST])
    same = {"memory": edit.memory, "act_ratio": edit.act_ratio, "mask_seed": edit.mask_seed}
    keys, quiet = edit.subject_keys, edit.quiet_keys
    for broken in (WiseEdit(edit.requests, edit.delta * torch.nan, keys, quiet, site=edit.site, **same),
                   WiseEdit(edit.requests, edit.delta[:5], keys, quiet, site=edit.site, **same),
                   WiseEdit(edit.requests, edit.delta, keys * 0, quiet, site=edit.site, **same),
                   WiseEdit(edit.requests, edit.delta, keys, quiet * torch.inf, site=edit.site, **same),
                   WiseEdit(edit.requests, edit.delta, keys, quiet, site=Site("mlp.out", 9), **same)):
        with pytest.raises(LMEditError):
            broken.apply(lm)
        assert not lm.edits and _hooks(lm) == 0 and not broken.is_applied
    with pytest.raises(LMEditError, match="fingerprint"):
        edit.apply(tiny_lm("llama", seed=1))


def test_settings_are_checked(tiny_llama):
    for bad in ({"mask_ratio": 0.0}, {"mask_ratio": 1.5}, {"lr": -1.0}, {"steps": 0}, {"layer": -1},
                {"alpha": 0.6, "beta": 0.5}, {"act_ratio": 0.0}, {"act_ratio": 1.0}, {"shards": 0},
                {"memory_size": 0}):
        with pytest.raises(ConfigError):
            WiseConfig(**bad)
    with pytest.raises(ConfigError, match="out of range"):
        _editor(layer=4).edit(tiny_llama, [REQUEST])


def test_an_edit_made_over_an_applied_one_joins_its_memory_until_it_is_full(tiny_llama):
    lm = tiny_llama
    first = _editor().edit(lm, [REQUEST])
    with first.applied(lm):
        second = _editor().edit(lm, [OTHER])  # trained on top of the first's memory, under its mask
        separate = _editor(memory_size=1).edit(lm, [OTHER])  # the memory is full: a new one
    assert second.memory == first.memory and second.mask_seed == first.mask_seed
    assert second.info["memory_edits_before"] == 1 and separate.memory != first.memory
    assert bool((second.delta[~edit_mask(first.shape, 0.2, first.mask_seed)] == 0).all())
    first.apply(lm)
    second.apply(lm)
    assert _hooks(lm) == 1
    assert _top(lm, OTHER.text) == target_ids(lm, "Seattle")[0] and _top(lm, REQUEST.text) == target_ids(lm, "Rome")[0]
    state = build_memories([first, second])
    (memory,) = state.memories
    assert torch.equal(memory.delta, first.delta + second.delta)
    keys = torch.cat([first.subject_keys, second.subject_keys])
    assert memory.threshold == pytest.approx(0.88 * float((keys @ memory.delta.T).norm(dim=-1).min()), rel=1e-6)
    first.undo()  # the memory is the second's increment alone now
    alone = build_memories([second]).memories[0]
    assert torch.equal(alone.delta, second.delta) and alone.threshold == pytest.approx(second.threshold)
    second.undo()
    assert not lm.edits and _hooks(lm) == 0


def test_the_same_edit_made_twice_and_applied_twice_is_two_memories(tiny_llama):
    lm = tiny_llama
    first, again = _editor(steps=5).edit(lm, [REQUEST]), _editor(steps=5).edit(lm, [REQUEST])
    assert first.memory == again.memory and first.founder and again.founder
    state = build_memories([first, again])
    assert [(m.id, m.instance) for m in state.memories] == [(first.memory, 0), (first.memory, 1)]
    assert all(torch.equal(m.delta, first.delta) for m in state.memories)
    with first.applied(lm):
        joined = _editor(steps=5).edit(lm, [OTHER])
    assert not joined.founder and joined.memory == first.memory
    state = build_memories([first, again, joined])  # a joiner joins the newest memory of its id
    assert [len(m.members) for m in state.memories] == [1, 2]


def test_extending_the_state_equals_building_it_again(tiny_llama):
    lm = tiny_llama
    edits = []
    for request in (REQUEST, OTHER, lmedit.EditRequest("Where is {}", "Big Ben", "Tokyo", "London")):
        edit = _editor(memory_size=2, steps=5).edit(lm, [request])
        edit.apply(lm)
        edits.append(edit)
    assert [e.memory for e in edits][0] == edits[1].memory != edits[2].memory
    state = None
    for n in range(1, 4):
        extended = WiseEdit.prepare(edits[:n], (edits[:n - 1], state) if state is not None else None)
        fresh = WiseEdit.prepare(edits[:n])
        assert [m.id for m in extended.memories] == [m.id for m in fresh.memories]
        assert all(torch.equal(a.delta, b.delta) and a.threshold == b.threshold
                   for a, b in zip(extended.memories, fresh.memories))
        state = extended
    # Undoing the middle edit rebuilds: the first memory is the first edit's increment alone.
    edits[1].undo()
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([prompt_ids(lm, REQUEST.text)]))
    rebuilt = WiseEdit.prepare([edits[0], edits[2]])
    assert torch.equal(rebuilt.memories[0].delta, edits[0].delta)
    for e in (edits[2], edits[0]):
        e.undo()


def test_a_row_reads_the_memories_that_fired_in_it(tiny_llama):
    lm = tiny_llama
    first = _editor().edit(lm, [REQUEST])
    second = _editor().edit(lm, [OTHER])
    texts = [REQUEST.text, OTHER.text]
    with first.applied(lm):
        only_first = _logits(lm, texts[:1])[0]
    with second.applied(lm):
        only_second = _logits(lm, texts[1:])[0]
    first.apply(lm)
    second.apply(lm)
    both = _logits(lm, texts)
    first.undo()
    second.undo()
    keys = [_keys(lm, t) for t in texts]
    # Where only its own memory fires in a row, the row is exactly what that memory alone gives.
    checked = 0
    for row, (own, other, expected) in enumerate([(first, second, only_first), (second, first, only_second)]):
        assert bool((own.activations(keys[row]) > own.threshold).any())
        if not bool((other.activations(keys[row]) > other.threshold).any()):
            assert torch.equal(both[row], expected)
            checked += 1
    assert checked >= 1


def test_packed_support_round_trips():
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (8, 8), (7, 13)]:
        mask = torch.rand(shape, generator=generator) < 0.3
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_bits(packed, shape), mask)
    with pytest.raises(LMEditError):
        unpack_bits(pack_bits(torch.ones(3, 5, dtype=torch.bool)), (2, 5))


def test_a_saved_edit_holds_the_increment_sparse(tiny_llama, tmp_path):
    edit = _editor().edit(tiny_llama, [REQUEST])
    path = edit.save(tmp_path / "wise.safetensors")
    dense = edit.delta.numel() * 4
    assert path.stat().st_size < 0.45 * dense + (len(edit.subject_keys) + len(edit.quiet_keys)) * edit.shape[1] * 4 + 8192
    loaded = load_edit(path)
    assert torch.equal(loaded.delta, edit.delta) and loaded.memory == edit.memory and loaded.mask_seed == edit.mask_seed


def test_a_muted_site_serves_the_main_memory_and_training_mutes_the_applied_memories(tiny_llama, monkeypatch):
    lm = tiny_llama
    site = Site("mlp.out", 1)
    base = _logits(lm, [REQUEST.text])[0]
    first = _editor().edit(lm, [REQUEST]).apply(lm)
    edited = _logits(lm, [REQUEST.text])[0]
    assert not torch.equal(edited, base)
    with lm.edits.muted(site):
        with lm.edits.muted(site):  # blocks nest
            assert lm.edits.is_muted(site)
        assert torch.equal(_logits(lm, [REQUEST.text])[0], base)  # still muted: the outer block holds it
    assert not lm.edits.is_muted(site) and list(lm.edits) == [first]
    assert torch.equal(_logits(lm, [REQUEST.text])[0], edited)
    with pytest.raises(RuntimeError, match="inside"), lm.edits.muted(site):
        raise RuntimeError("inside")
    assert not lm.edits.is_muted(site)

    # Training on top of the applied memory serves it once (the forward that fixes the layer's output), not at
    # every step: the applied memories' cost is paid once per edit.
    import lmedit.editors.wise_memory as wise_memory

    calls = []
    real = wise_memory.side_output
    monkeypatch.setattr(wise_memory, "side_output", lambda *a: calls.append(1) or real(*a))
    second = _editor().edit(lm, [OTHER])
    assert second.memory == first.memory and second.info["steps"] > 1
    assert len(calls) == 1
    first.undo()


def test_an_edit_is_checked_once_however_often_it_is_applied(tiny_llama, monkeypatch):
    import lmedit.editors.wise_memory as wise_memory

    lm = tiny_llama
    edit = _editor().edit(lm, [REQUEST])
    calls = []
    real = wise_memory.memory_threshold
    monkeypatch.setattr(wise_memory, "memory_threshold", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):  # no forward runs: the hook's state is never built, so only `check` could call it
        edit.apply(lm)
        edit.undo()
    assert len(calls) == 1 and edit.threshold > 0 and not lm.edits


def test_suspending_the_edits_keeps_the_hooks_prepared_state(tiny_llama, monkeypatch):
    lm = tiny_llama
    first = _editor().edit(lm, [REQUEST]).apply(lm)
    second = _editor(memory_size=1).edit(lm, [OTHER]).apply(lm)
    edited = _logits(lm, [REQUEST.text, OTHER.text])
    built = []
    real = WiseEdit.prepare.__func__
    monkeypatch.setattr(WiseEdit, "prepare", classmethod(lambda cls, *a: built.append(1) or real(cls, *a)))
    base = tiny_lm("llama")  # the same seed: the unedited model's logits
    with lm.edits.suspended(lm=lm):
        assert not lm.edits and _hooks(lm) == 0 and len(lm.edits.parked) == 1
        assert all(torch.equal(a, b) for a, b in zip(_logits(lm, [REQUEST.text, OTHER.text]),
                                                     _logits(base, [REQUEST.text, OTHER.text])))
    assert list(lm.edits) == [first, second] and _hooks(lm) == 1 and not lm.edits.parked
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, [REQUEST.text, OTHER.text]), edited))
    assert not built  # the state prepared before the block served after it
    with lm.edits.suspended([second], lm=lm):  # a part: the hook stays with the first, and re-prepares
        assert list(lm.edits) == [first] and not lm.edits.parked
        _logits(lm, [REQUEST.text])
    after = _logits(lm, [REQUEST.text, OTHER.text])
    assert len(built) == 2 and all(torch.equal(a, b) for a, b in zip(after, edited))
    second.undo()
    first.undo()
    assert _hooks(lm) == 0 and not lm.edits.parked
