"""Causal tracing on tiny random models: exactness of the batched engine against hand-written patched
forwards, the paper's sanity properties, a hand-built model whose association lives in one layer, plots
and bad input."""

import json
import math

import pytest
import torch

from lmedit.errors import RequestError
from lmedit.hooks import capture, patch
from lmedit.testing import tiny_lm
from lmedit.tokens import find_subject, prompt_ids, target_ids
from lmedit.tracing import (
    BUCKETS,
    AverageTraceResult,
    Fact,
    TraceResult,
    average_trace,
    default_window,
    load_facts,
    plot_severing,
    restored_prob,
    suggest_layer,
    token_buckets,
    trace,
    trace_kinds,
    window_layers,
)
from lmedit.types import Site

PROMPT = "The Space Needle is in downtown"
SUBJECT = "Space Needle"
NOISE = 0.5


def _hand_cell(lm, prompt, subject, answer_id, restore_sites, token, *, samples, noise, seed=0, freeze=()):
    """P(answer) restoring `restore_sites` at `token` (and holding `freeze` sites at their corrupted
    values), written out as full-length patched forwards."""
    ids = prompt_ids(lm, prompt)
    span = find_subject(lm, prompt, subject)
    d_model = lm.arch.d_model(lm.model)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(samples, span.last - span.first + 1, d_model, generator=generator) * noise
    x = torch.tensor([ids])
    clean = {}

    def keep(act, site):
        clean[site] = act[0, token].clone()

    with torch.no_grad(), patch(lm, {s: keep for s in restore_sites}):
        lm.model(input_ids=x)
    probs = []
    for s in range(samples):
        def corrupt(act, site, s=s):
            act = act.clone()
            act[0, span.first:span.last + 1] += eps[s]
            return act

        def restore(act, site):
            act = act.clone()
            act[0, token] = clean[site]
            return act

        with torch.no_grad(), patch(lm, {Site("embed"): corrupt}), capture(lm, freeze) as corrupted:
            lm.model(input_ids=x)
        fns = {Site("embed"): corrupt, **{site: restore for site in restore_sites},
               **{site: (lambda act, site: corrupted[site]) for site in freeze}}
        with torch.no_grad(), patch(lm, fns):
            logits = lm.model(input_ids=x).logits[0, -1]
        probs.append(torch.softmax(logits.float(), -1)[answer_id])
    return torch.stack(probs).mean().item()


def test_engine_matches_hand_written_forwards(tiny_family_lm):
    lm = tiny_family_lm
    results = trace_kinds(lm, PROMPT, SUBJECT, samples=2, noise=NOISE, window=2)
    res = results["resid"]
    n_pos, n_layers = len(res.tokens), lm.n_layers
    first, last = res.subject_range
    assert res.grid.shape == (n_pos, n_layers)
    for token, layer in [(first, 0), (last, 1), (n_pos - 1, n_layers - 2)]:
        expect = _hand_cell(lm, PROMPT, SUBJECT, res.answer_token_id, [Site("resid_out", layer)], token,
                            samples=2, noise=NOISE)
        assert math.isclose(res.scores[token][layer], expect, rel_tol=1e-4, abs_tol=1e-7)
    # the last layer: every block is skipped and the restored state goes straight to the final norm
    expect = _hand_cell(lm, PROMPT, SUBJECT, res.answer_token_id, [Site("resid_out", n_layers - 1)], last,
                        samples=2, noise=NOISE)
    assert math.isclose(res.scores[last][n_layers - 1], expect, rel_tol=1e-4, abs_tol=1e-7)
    # windows starting at block 0 and at block 1 (the forward then starts at block 1)
    for kind, site_kind in (("mlp", "mlp.out"), ("attn", "attn.out")):
        for center in (1, 2):
            sites = [Site(site_kind, j) for j in window_layers(center, 2, n_layers)]
            expect = _hand_cell(lm, PROMPT, SUBJECT, res.answer_token_id, sites, last, samples=2, noise=NOISE)
            assert math.isclose(results[kind].scores[last][center], expect, rel_tol=1e-4, abs_tol=1e-7)
    # clean / corrupted probabilities
    logits = lm.model(input_ids=torch.tensor([prompt_ids(lm, PROMPT)])).logits[0, -1]
    assert res.answer_token_id == int(logits.argmax())
    assert math.isclose(res.clean_prob, torch.softmax(logits, -1).max().item(), rel_tol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_prompt_longer_than_sliding_window(family):
    lm = tiny_lm(family)  # sliding_window=16 in the tiny configs
    prompt = "Rome is the capital of Italy. Toyota is a company from Japan. The Space Needle is in downtown"
    assert len(prompt_ids(lm, prompt)) > lm.model.config.sliding_window
    res = trace(lm, prompt, SUBJECT, samples=2, noise=NOISE)
    first = res.subject_range[0]
    assert first > lm.model.config.sliding_window  # restored on top of a cache longer than the window
    expect = _hand_cell(lm, prompt, SUBJECT, res.answer_token_id, [Site("resid_out", 1)], first,
                        samples=2, noise=NOISE)
    assert math.isclose(res.scores[first][1], expect, rel_tol=1e-4, abs_tol=1e-7)


def test_full_restoration_reproduces_clean_probability(tiny_family_lm):
    lm = tiny_family_lm
    res = trace(lm, PROMPT, SUBJECT, samples=3, noise=NOISE)
    n_pos = len(res.tokens)
    for layer in range(lm.n_layers):
        restored = restored_prob(lm, PROMPT, SUBJECT, {Site("resid_out", layer): range(n_pos)}, samples=3, noise=NOISE)
        assert math.isclose(restored, res.clean_prob, rel_tol=1e-5)
    # the last token's last-layer state alone decides the output
    assert math.isclose(res.scores[-1][-1], res.clean_prob, rel_tol=1e-5)
    assert res.corrupted_prob != res.clean_prob


def test_zero_noise_has_zero_effect_everywhere(tiny_family_lm):
    results = trace_kinds(tiny_family_lm, PROMPT, SUBJECT, samples=2, noise=0.0)
    for result in results.values():
        assert result.corrupted_prob == pytest.approx(result.clean_prob, abs=1e-7)
        assert result.effect.abs().max().item() < 1e-6


def _one_layer_model():
    """A tiny Llama where only block 2's MLP and block 3's attention write to the residual stream: the
    subject's information can only travel through MLP 2 at the subject tokens and attention 3 to the end."""
    lm = tiny_lm("llama", seed=1)
    for layer in range(lm.n_layers):
        if layer != 2:
            lm.arch.weight(lm.model, layer, "mlp_out").zero_()
        if layer != 3:
            lm.arch.weight(lm.model, layer, "attn_out").zero_()
    lm.arch.weight(lm.model, 2, "mlp_out").mul_(20)  # make the association strong enough to read
    lm.arch.weight(lm.model, 3, "attn_out").mul_(20)
    lm.model.lm_head.weight.mul_(20)
    return lm


def test_hand_built_model_shows_the_effect_at_its_layer():
    lm = _one_layer_model()
    results = trace_kinds(lm, PROMPT, SUBJECT, kinds=("mlp", "attn"), samples=4, noise=0.1, window=1)
    last = results["mlp"].subject_range[1]
    mlp = results["mlp"].effect[last]  # (n_layers,)
    assert mlp[2] > 0.01
    assert mlp[[0, 1, 3]].abs().max() < 1e-6
    attn = results["attn"].effect[-1]  # the last token gathers the subject through attention 3 only
    assert attn[3] > 0.1
    assert attn[:3].abs().max() < 1e-6
    assert math.isclose(results["attn"].scores[-1][3], results["attn"].clean_prob, rel_tol=1e-5)


def test_severing_matches_hand_written_forwards(tiny_family_lm):
    lm = tiny_family_lm
    n_layers = lm.n_layers
    for sever, site_kind in (("mlp", "mlp.out"), ("attn", "attn.out")):
        res = trace(lm, PROMPT, SUBJECT, samples=2, noise=NOISE, sever=sever, tokens=[1, 3])
        for token, layer in ((1, 0), (3, 1)):
            freeze = [Site(site_kind, j) for j in range(layer + 1, n_layers)]
            expect = _hand_cell(lm, PROMPT, SUBJECT, res.answer_token_id, [Site("resid_out", layer)], token,
                                samples=2, noise=NOISE, freeze=freeze)
            assert math.isclose(res.scores[token][layer], expect, rel_tol=1e-4, abs_tol=1e-7)


def test_severing_with_no_later_layers_changes_nothing(tiny_family_lm):
    lm = tiny_family_lm
    plain = trace(lm, PROMPT, SUBJECT, samples=2, noise=NOISE)
    for sever in ("mlp", "attn"):
        severed = trace(lm, PROMPT, SUBJECT, samples=2, noise=NOISE, sever=sever)
        torch.testing.assert_close(severed.grid[:, -1], plain.grid[:, -1], rtol=1e-5, atol=1e-8)
        assert severed.severed == sever
    severed = trace(lm, PROMPT, SUBJECT, samples=2, noise=NOISE, sever="mlp")
    assert not torch.allclose(severed.grid[plain.subject_range[1], :-1], plain.grid[plain.subject_range[1], :-1])


def test_patching_from_another_prompt(tiny_llama):
    lm = tiny_llama
    source = "The Eiffel Tower is in downtown"
    res = trace(lm, PROMPT, SUBJECT, source_prompt=source)
    src_logits = lm.model(input_ids=torch.tensor([prompt_ids(lm, source)])).logits[0, -1]
    assert res.answer_token_id == int(src_logits.argmax())
    assert res.source_offset == len(prompt_ids(lm, source)) - len(res.tokens)
    # the last token's last-layer state decides the output: patching it gives the source's probability
    assert math.isclose(res.scores[-1][-1], res.clean_prob, rel_tol=1e-5)
    base = torch.softmax(lm.model(input_ids=torch.tensor([prompt_ids(lm, PROMPT)])).logits[0, -1], -1)
    assert math.isclose(res.corrupted_prob, base[res.answer_token_id].item(), rel_tol=1e-5)
    assert res.samples == 1 and res.noise == 0.0


def test_multi_token_answer_scores_the_first_token(tiny_llama):
    answer = "Seattle Washington"
    ids = target_ids(tiny_llama, answer)
    assert len(ids) > 1
    res = trace(tiny_llama, PROMPT, SUBJECT, answer, samples=2, noise=NOISE)
    assert res.answer_token_id == ids[0] and res.answer_n_tokens == len(ids)


def test_tokens_before_the_subject_are_not_run_and_hold_the_corrupted_probability(tiny_llama):
    res = trace(tiny_llama, PROMPT, SUBJECT, samples=2, noise=NOISE)
    first = res.subject_range[0]
    assert first > 0
    assert all(v == res.corrupted_prob for row in res.scores[:first] for v in row)
    restricted = trace(tiny_llama, PROMPT, SUBJECT, samples=2, noise=NOISE, tokens=[first])
    assert all(math.isnan(v) for v in restricted.scores[-1])
    assert restricted.scores[first] == pytest.approx(res.scores[first])


def test_json_round_trip_and_plots(tmp_path, tiny_llama):
    res = trace(tiny_llama, PROMPT, SUBJECT, kind="mlp", samples=2, noise=NOISE, tokens=[1, 2])
    path = res.save(tmp_path / "trace.json")
    loaded = TraceResult.load(path)
    assert loaded.kind == "mlp" and loaded.subject_range == res.subject_range
    assert torch.equal(loaded.grid.isnan(), res.grid.isnan())
    assert torch.allclose(loaded.grid.nan_to_num(), res.grid.nan_to_num())
    written = res.plot(tmp_path / "mlp")
    assert [p.suffix for p in written] == [".png", ".svg"]
    assert all(p.stat().st_size > 1000 for p in written)
    severed = {k: trace(tiny_llama, PROMPT, SUBJECT, samples=2, noise=NOISE, sever=k) for k in ("mlp", "attn")}
    plain = trace(tiny_llama, PROMPT, SUBJECT, samples=2, noise=NOISE)
    assert all(p.stat().st_size > 1000 for p in plot_severing(plain, severed, tmp_path / "sever"))


def test_average_and_suggest_layer(tmp_path, tiny_llama):
    facts = [Fact("{} is in downtown", "The Space Needle", "Seattle"),
             Fact("{} is located in the city of", "The Eiffel Tower", "Paris"),
             Fact("{} plays the sport of", "Michael Jordan", "basketball")]
    avg = average_trace(tiny_llama, facts, samples=2, noise=NOISE)
    assert avg.n_given == 3 and avg.n_known == 0  # a random model knows nothing: its own predictions are traced
    assert avg.buckets == list(BUCKETS)
    for kind in avg.kinds:
        assert len(avg.mean[kind]) == len(BUCKETS) and len(avg.mean[kind][0]) == tiny_llama.n_layers
    assert avg.counts["last subject"] == 3
    loaded = AverageTraceResult.load(avg.save(tmp_path / "avg.json"))
    assert loaded.counts == avg.counts
    assert all(p.stat().st_size > 1000 for p in avg.plot(tmp_path / "avg"))
    suggestion = suggest_layer(tiny_llama, facts, samples=2, noise=NOISE, cache=False)
    assert 0 <= suggestion.layer < tiny_llama.n_layers
    assert len(suggestion.curve) == tiny_llama.n_layers
    assert suggestion.curve[suggestion.layer] == max(suggestion.curve)


def test_token_buckets():
    b = token_buckets(n_pos=8, first=1, last=3)
    assert b == {"first subject": [1], "middle subject": [2], "last subject": [3], "first subsequent": [4],
                 "further tokens": [5, 6], "last token": [7]}
    b = token_buckets(n_pos=3, first=2, last=2)  # one-token subject at the end
    assert b["first subject"] == b["last subject"] == b["last token"] == [2]
    assert b["first subsequent"] == [] and b["further tokens"] == []


def test_window_helpers():
    assert default_window(48) == 10 and default_window(18) == 4 and default_window(30) == 6
    assert default_window(2) == 1
    assert list(window_layers(0, 4, 18)) == [0, 1]
    assert list(window_layers(5, 4, 18)) == [3, 4, 5, 6]
    assert list(window_layers(17, 4, 18)) == [15, 16, 17]


def test_load_facts_formats(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "{} is in", "subject": "X", "answer": "Y"}\n'
                    '{"prompt": "Z is owned by", "subject": "Z", "attribute": "W"}\n')
    assert load_facts(path) == [Fact("{} is in", "X", "Y"), Fact("{} is owned by", "Z", "W")]
    with pytest.raises(RequestError):
        Fact.from_dict({"prompt": "A is in", "subject": "B", "answer": "C"})


def test_bad_input(tiny_llama):
    lm = tiny_llama
    with pytest.raises(RequestError, match="does not occur"):
        trace(lm, PROMPT, "Eiffel Tower")
    with pytest.raises(RequestError, match="empty"):
        trace(lm, "   ", SUBJECT)
    with pytest.raises(RequestError, match="window"):
        trace(lm, PROMPT, SUBJECT, kind="mlp", window=lm.n_layers + 1)
    with pytest.raises(RequestError, match="window"):
        trace(lm, PROMPT, SUBJECT, kind="mlp", window=0)
    with pytest.raises(RequestError, match="context"):
        trace(lm, "Paris " * 200 + SUBJECT, SUBJECT)
    with pytest.raises(RequestError, match="unknown trace kind"):
        trace(lm, PROMPT, SUBJECT, kind="neurons")
    with pytest.raises(RequestError, match="sever"):
        trace(lm, PROMPT, SUBJECT, kind="mlp", sever="mlp")
    with pytest.raises(RequestError, match="samples"):
        trace(lm, PROMPT, SUBJECT, samples=0)
    with pytest.raises(RequestError, match="outside"):
        trace(lm, PROMPT, SUBJECT, tokens=[99])


CLI_FACTS = [{"prompt": "{} is in downtown", "subject": "The Space Needle", "answer": "Seattle"},
             {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "attribute": "basketball"}]


def test_cli_writes_heatmaps_json_and_severing(tmp_path, model_dir):
    from lmedit.cli.main import main

    out = tmp_path / "out"
    code = main(["trace", PROMPT, "--subject", SUBJECT, "--model", str(model_dir), "--samples", "2",
                 "--noise", "0.5", "--sever", "--out", str(out)])
    assert code == 0
    # files are named <prompt slug>-<8 hex of prompt, subject, settings>_<kind>
    (stem,) = {p.name.removesuffix("_resid.json") for p in out.glob("*_resid.json")}
    assert stem.startswith("the-space-needle-is-in-downtown-") and len(stem.rsplit("-", 1)[1]) == 8
    for kind in ("resid", "mlp", "attn"):
        assert TraceResult.load(out / f"{stem}_{kind}.json").kind == kind
        assert (out / f"{stem}_{kind}.png").stat().st_size > 1000 and (out / f"{stem}_{kind}.svg").stat().st_size > 1000
    assert (out / f"{stem}_sever.png").stat().st_size > 1000
    assert main(["trace", PROMPT, "--subject", "Eiffel", "--model", str(model_dir), "--out", str(out)]) == 2


def test_suggest_layer_is_cached_on_disk(tmp_path, monkeypatch, tiny_llama):
    import lmedit.tracing.suggest as suggest_module  # suggest_layer looks average_trace up here

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    facts = [Fact("{} is in downtown", "The Space Needle", "Seattle"),
             Fact("{} plays the sport of", "Michael Jordan", "basketball")]
    first = suggest_layer(tiny_llama, facts, samples=2, noise=NOISE)
    files = list((tmp_path / "tracing" / tiny_llama.weights_hash).glob("suggest_layer-*.json"))
    assert len(files) == 1 and not list(files[0].parent.glob(".*tmp"))
    stored = json.loads(files[0].read_text())["payload"]  # in lmedit.cache's envelope
    assert stored["layer"] == first.layer and stored["curve"] == first.curve and stored["band"] == first.band
    assert stored["fingerprint"] == tiny_llama.fingerprint and stored["samples"] == 2

    def no_trace(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(suggest_module, "average_trace", no_trace)
    assert suggest_layer(tiny_llama, facts, samples=2, noise=NOISE) == first
    # other facts, settings or models are other keys; cache=False neither reads nor writes
    for call in (lambda: suggest_layer(tiny_llama, facts[:1], samples=2, noise=NOISE),
                 lambda: suggest_layer(tiny_llama, facts, samples=2, noise=NOISE, seed=1),
                 lambda: suggest_layer(tiny_llama, facts, samples=3, noise=NOISE),
                 lambda: suggest_layer(tiny_lm("llama", seed=1), facts, samples=2, noise=NOISE),
                 lambda: suggest_layer(tiny_llama, facts, samples=2, noise=NOISE, cache=False)):
        with pytest.raises(AssertionError, match="recomputed"):
            call()
    # a damaged entry is recomputed and rewritten
    monkeypatch.undo()
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    files[0].write_text('{"layer": 1, "cur')
    with pytest.warns(UserWarning, match="not JSON"):
        assert suggest_layer(tiny_llama, facts, samples=2, noise=NOISE) == first
    assert json.loads(files[0].read_text())["payload"]["curve"] == first.curve
    # an explicit directory
    assert suggest_layer(tiny_llama, facts, samples=2, noise=NOISE, cache=tmp_path / "elsewhere") == first
    assert list((tmp_path / "elsewhere").rglob("suggest_layer-*.json"))


def test_cli_source_prompt(tmp_path, model_dir, capsys):
    from lmedit.cli.main import main

    out = tmp_path / "out"
    source = "The Eiffel Tower is in downtown"
    code = main(["trace", PROMPT, "--subject", SUBJECT, "--source-prompt", source, "--kind", "resid", "mlp",
                 "--model", str(model_dir), "--out", str(out)])
    assert code == 0
    (stem,) = {p.name.removesuffix("_resid.json") for p in out.glob("*_source_resid.json")}
    for kind in ("resid", "mlp"):
        result = TraceResult.load(out / f"{stem}_{kind}.json")
        assert result.source_prompt == source and result.samples == 1 and result.noise == 0.0
        assert all((out / f"{stem}_{kind}{suffix}").stat().st_size > 1000 for suffix in (".png", ".svg"))
    resid = TraceResult.load(out / f"{stem}_resid.json")
    # the last token's last-layer state decides the output: patching it gives the source's probability
    assert math.isclose(resid.scores[-1][-1], resid.clean_prob, rel_tol=1e-5)
    assert not list(out.glob("*attn*"))
    assert "corrupted p" in capsys.readouterr().out
    assert main(["trace", PROMPT, "--subject", SUBJECT, "--source-prompt", "   ", "--model", str(model_dir),
                 "--out", str(out)]) == 2


def test_cli_average(tmp_path, model_dir, capsys):
    from lmedit.cli.main import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in CLI_FACTS))
    out = tmp_path / "out"
    code = main(["trace", "--average", str(facts), "--kind", "mlp", "attn", "--samples", "2", "--noise", "0.5",
                 "--model", str(model_dir), "--out", str(out)])
    assert code == 0
    [path] = out.glob("average_*.json")
    result = AverageTraceResult.load(path)
    assert result.kinds == ["mlp", "attn"] and result.n_given == 2 and result.samples == 2
    assert result.counts["last subject"] == 2
    assert all(path.with_suffix(suffix).stat().st_size > 1000 for suffix in (".png", ".svg"))
    assert "of 2 facts" in capsys.readouterr().out
    assert main(["trace", "--average", str(tmp_path / "missing.jsonl"), "--model", str(model_dir)]) != 0


def test_cli_suggest_layer(tmp_path, model_dir, capsys, monkeypatch):
    import lmedit.tracing.suggest as suggest_module  # suggest_layer looks average_trace up here
    from lmedit.cli.main import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in CLI_FACTS))
    out = tmp_path / "out"
    args = ["trace", "--suggest-layer", "--facts", str(facts), "--samples", "2", "--noise", "0.5",
            "--model", str(model_dir), "--out", str(out)]
    assert main(args) == 0
    [path] = out.glob("suggest_layer_*.json")
    first = json.loads(path.read_text())
    assert 0 <= first["layer"] < 4 and len(first["curve"]) == 4 and first["n_facts"] == 2
    assert first["curve"][first["layer"]] == max(first["curve"])
    printed = capsys.readouterr().out
    assert "suggested layer for" in printed and "curve:" in printed
    assert len(list((tmp_path / "cache" / "tracing").rglob("suggest_layer-*.json"))) == 1

    # the second run reads the cache; --no-cache recomputes
    def no_trace(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(suggest_module, "average_trace", no_trace)
    path.unlink()
    assert main(args) == 0
    assert json.loads(path.read_text()) == first
    with pytest.raises(AssertionError, match="recomputed"):
        main([*args, "--no-cache"])
