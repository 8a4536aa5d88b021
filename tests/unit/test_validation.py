"""Validate before work: configs, requests and the context window refuse bad input before anything runs.

Configs: every number field of every config holds a finite number of its type in its range
(`lmedit.config.check_ranges`), whether built from YAML, `--set` or directly in Python, and every shipped
YAML still loads. Requests: text fields are non-empty printable strings, the prompt has exactly one `{}`
and no other format field. Context: a request, scored prompt, generation or trace longer than the
model's context is refused in tokens (or, when absurdly long, in characters) before any forward, with
the weights bit-identical. Tiny models only.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import lmedit
from lmedit.config import number_fields, check_ranges, load_config
from lmedit.editors import get_editor
from lmedit.editors.alphaedit import AlphaEditConfig
from lmedit.editors.ft import FtConfig, FtLConfig
from lmedit.editors.kn import KnConfig
from lmedit.editors.memit import MemitConfig
from lmedit.editors.mend import MendConfig
from lmedit.editors.rome import RomeConfig
from lmedit.editors.serac import SeracConfig
from lmedit.errors import ConfigError, RequestError
from lmedit.eval.harness import EvalConfig
from lmedit.ledger.audit import AuditConfig
from lmedit.registry import editors
from lmedit.stats import CorpusSpec
from lmedit.testing import tiny_lm
from lmedit.tokens import MAX_CHARS_PER_TOKEN, context_length, prompt_ids, target_ids
from lmedit.types import EditDescriptor, EditRequest

NAN, INF = float("nan"), float("inf")
CONFIGS_DIR = Path(lmedit.__file__).parent / "configs"
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_unchanged(lm, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def forwards(monkeypatch):
    """A tiny Llama whose forward passes are counted (`lm.forwards`), to show a check ran before any."""
    lm = tiny_lm("llama")
    calls = []
    original = lm.model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", counting)
    lm.forwards = calls  # type: ignore[attr-defined]
    return lm


# ---- configs ------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    # ROME: the accepted nonsense of issue 15
    (RomeConfig, "v_lr", 0.0), (RomeConfig, "v_lr", -0.5), (RomeConfig, "kl_factor", NAN),
    (RomeConfig, "kl_factor", INF), (RomeConfig, "kl_factor", -1.0), (RomeConfig, "v_weight_decay", NAN),
    (RomeConfig, "clamp_norm_factor", NAN), (RomeConfig, "clamp_norm_factor", -1.0),
    (RomeConfig, "clamp_norm_factor", 0.0), (RomeConfig, "layer", True), (RomeConfig, "layer", -1),
    (RomeConfig, "v_steps", 0), (RomeConfig, "prefixes_short", -1), (RomeConfig, "cov_shrinkage", 1.0),
    (RomeConfig, "corpus_tokens", 0),
    # FT / FT-L
    (FtConfig, "lr", 0.0), (FtConfig, "lr", NAN), (FtConfig, "lr", -1e-4), (FtConfig, "steps", 0),
    (FtConfig, "weight_decay", -0.1), (FtConfig, "early_stop_loss", INF), (FtConfig, "layers", (-1,)),
    (FtConfig, "layers", (1, 1)), (FtConfig, "layers", (True,)), (FtLConfig, "norm_constraint", 0.0),
    (FtLConfig, "norm_constraint", NAN), (FtLConfig, "norm_constraint", -1.0), (FtLConfig, "lr", INF),
    # KN
    (KnConfig, "steps", 0), (KnConfig, "threshold", 0.0), (KnConfig, "threshold", 1.5), (KnConfig, "threshold", NAN),
    (KnConfig, "share", 0.0), (KnConfig, "refine_share", 1.0), (KnConfig, "lambda_add", 0.0),
    (KnConfig, "lambda_erase", -1.0), (KnConfig, "lambda_erase", NAN), (KnConfig, "layers", (1, 1)),
    (KnConfig, "layers", (-2,)), (KnConfig, "max_neurons", 0), (KnConfig, "n_prefixes", -1),
    # MEMIT / AlphaEdit
    (MemitConfig, "mom2_weight", -1.0), (MemitConfig, "mom2_weight", 0.0), (MemitConfig, "mom2_weight", NAN),
    (MemitConfig, "mom2_weight", INF), (MemitConfig, "layers", (-1, 0)), (MemitConfig, "layers", (2, 2)),
    (MemitConfig, "v_lr", 0.0), (MemitConfig, "kl_factor", -1.0), (MemitConfig, "clamp_norm_factor", 0.0),
    (MemitConfig, "prefixes", -1), (MemitConfig, "chunk", 0), (AlphaEditConfig, "l2", 0.0),
    (AlphaEditConfig, "l2", NAN), (AlphaEditConfig, "nullspace_threshold", 1.0),
    (AlphaEditConfig, "nullspace_threshold", NAN), (AlphaEditConfig, "v_weight_decay", -1.0),
    (AlphaEditConfig, "layers", (3, 3)),
    # MEND
    (MendConfig, "edit_lr", 0.0), (MendConfig, "edit_lr", -1e-4), (MendConfig, "edit_lr", NAN),
    (MendConfig, "lr", 0.0), (MendConfig, "lr_lr", INF), (MendConfig, "grad_clip", INF),
    (MendConfig, "edit_weight", -1.0), (MendConfig, "loc_weight", NAN), (MendConfig, "layers", (-1, -1)),
    (MendConfig, "rank", 0), (MendConfig, "n_hidden", -1), (MendConfig, "steps", 0),
    # SERAC
    (SeracConfig, "train_lr", 0.0), (SeracConfig, "train_lr", NAN), (SeracConfig, "threshold", 1.5),
    (SeracConfig, "threshold", NAN), (SeracConfig, "train_steps", 0), (SeracConfig, "projection_dim", 0),
    # evaluation, audit gate, statistics corpus
    (EvalConfig, "batch_size", 0), (EvalConfig, "disabling_rise", NAN), (EvalConfig, "disabling_rise", -1.0),
    (EvalConfig, "n_drift", -1), (AuditConfig, "efficacy_warn", NAN), (AuditConfig, "probe_loss_refuse", INF),
    (AuditConfig, "records_per_pass", 0), (AuditConfig, "generation_tokens", -1), (CorpusSpec, "n_tokens", 0),
    (CorpusSpec, "seq_len", 1),
]


@pytest.mark.parametrize("cls, field, value", BAD_CONFIGS,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD_CONFIGS])
def test_config_out_of_range_is_a_config_error_naming_class_field_and_value(cls, field, value):
    with pytest.raises(ConfigError) as info:
        cls(**{field: value})
    message = str(info.value)
    assert f"{cls.__name__}.{field}" in message, message
    shown = repr(value[0] if isinstance(value, tuple) and len(value) == 1 else value)
    assert shown in message or repr(value) in message, message


def _config_classes() -> list[type]:
    return sorted({editors.get(name).config_class for name in editors.names()} | {EvalConfig, AuditConfig, CorpusSpec},
                  key=lambda c: c.__name__)


def _float_fields() -> list[tuple[type, str]]:
    return [(cls, name) for cls in _config_classes() for name, (kind, _) in number_fields(cls).items()
            if kind is float]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("cls, field", _float_fields(), ids=[f"{c.__name__}.{f}" for c, f in _float_fields()])
def test_every_float_field_of_every_config_refuses_non_finite(cls, field, value):
    hint = number_fields(cls)[field]
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: (value,) if hint[1] else value})


def test_every_config_refuses_a_bool_for_a_number():
    checked = 0
    for cls in _config_classes():
        for field, (_, is_tuple) in number_fields(cls).items():
            with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field} expects"):
                cls(**{field: (True,) if is_tuple else True})
            checked += 1
    assert checked > 50  # every editor's and the eval/audit/corpus configs' number fields


@pytest.mark.parametrize("override, field", [
    ("v_lr=0", "v_lr"), ("kl_factor=nan", "kl_factor"), ("kl_factor=.inf", "kl_factor"), ("kl_factor=-1", "kl_factor"),
    ("v_weight_decay=.nan", "v_weight_decay"), ("clamp_norm_factor=0", "clamp_norm_factor"),
    ("clamp_norm_factor=-1", "clamp_norm_factor"), ("layer=yes", "layer"), ("layer=-3", "layer"),
])
def test_rome_overrides_name_the_override_and_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(RomeConfig, None, [override])
    assert f"override {override!r}" in str(info.value) and field in str(info.value)


def test_yaml_file_out_of_range_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    for text in ("layer: yes\n", "kl_factor: .nan\n", "v_lr: 0\n", "clamp_norm_factor: -1\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"bad\.yaml.*{text.split(':')[0]}"):
            load_config(RomeConfig, path)


def _shipped() -> list[tuple[str, Path]]:
    return sorted((p.parent.name, p) for p in CONFIGS_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("method, path", _shipped(), ids=[f"{m}/{p.name}" for m, p in _shipped()])
def test_every_shipped_config_loads(method, path):
    config = load_config(editors.get(method).config_class, path)
    assert isinstance(config, editors.get(method).config_class)


def test_shipped_configs_cover_every_method_directory():
    methods = {p.name for p in CONFIGS_DIR.iterdir() if p.is_dir()}
    assert methods <= set(editors.names()) and {m for m, _ in _shipped()} == methods


def test_check_ranges_rules():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        rate: float = 0.5
        count: int = 1
        share: float | None = None
        layers: tuple[int, ...] = (0,)
        ids: tuple[int, ...] = ()

        def __post_init__(self):
            check_ranges(self, positive=("rate",), at_least_one=("count",), intervals={"share": "(0, 1]"},
                         layers=("layers",), distinct=("ids",))

    Toy(share=None, ids=(-1, 2))                         # None is "not set"; distinct allows negatives
    Toy(rate=1e-30, count=7, share=1.0, layers=(0, 5))
    Toy(layers=[0, 5])                                   # a list where a tuple is declared: its entries are checked
    for bad, expected in [({"rate": 0.0}, "> 0"), ({"count": 0}, ">= 1"), ({"share": 0.0}, r"in \(0, 1\]"),
                          ({"layers": (0, -1)}, "every entry"), ({"layers": (2, 2)}, "duplicates"), ({"ids": (1, 1)}, "duplicates"),
                          ({"count": 1.0}, "expects an int"), ({"rate": "0.5"}, "expects a number"),
                          ({"share": math.nan}, "finite"), ({"layers": 3}, "expects a list of ints"),
                          ({"layers": [0, -1]}, "every entry")]:
        with pytest.raises(ConfigError, match=expected):
            Toy(**bad)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("method, setting", [
    ("rome", {"layer": 1, "v_lr": 0}), ("rome", {"layer": 1, "kl_factor": NAN}), ("ft", {"lr": 0}),
    ("ft_l", {"norm_constraint": -1}), ("kn", {"threshold": 2.0}), ("memit", {"layers": [1, 2], "mom2_weight": -1}),
    ("alphaedit", {"layers": [1], "l2": 0}), ("mend", {"allow_untrained": True, "edit_lr": 0}),
    ("serac", {"encoder": "lexical", "threshold": NAN}),
])
def test_edit_with_a_bad_setting_is_refused_and_leaves_the_weights(method, setting):
    lm = tiny_lm("llama")
    before = snapshot(lm)
    bad = [k for k in setting if k not in ("layer", "layers", "allow_untrained", "encoder")][0]
    with pytest.raises(ConfigError, match=bad):
        lmedit.edit(lm, REQUEST, method, config=setting)
    assert_unchanged(lm, before)


# ---- requests -----------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"subject": "\u200b"}, "subject"),                 # zero-width space only
    ({"subject": "\u200b \u2060\ufeff"}, "subject"),    # invisible and blank only
    ({"subject": " \t\n "}, "subject"),
    ({"subject": "The\x00Tower"}, "subject"),           # control character
    ({"subject": "The \x1b[31mTower"}, "subject"),
    ({"subject": b"The Eiffel Tower"}, "subject"),      # bytes
    ({"subject": None}, "subject"),
    ({"subject": 42}, "subject"),
    ({"subject": "\ud800"}, "subject"),                 # lone surrogate: not text
    ({"prompt": "{0} is located in"}, "prompt"),
    ({"prompt": "{x} is located in"}, "prompt"),
    ({"prompt": "{} is located in {x}"}, "prompt"),
    ({"prompt": "{} is {1}"}, "prompt"),
    ({"prompt": "{} is located in }"}, "prompt"),
    ({"prompt": "{{}} {} is"}, "prompt"),
    ({"prompt": "{} and {}"}, "prompt"),
    ({"prompt": "is located in"}, "prompt"),
    ({"prompt": "{}\r is located in"}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"target_new": ""}, "target_new"),
    ({"target_new": "\u200b"}, "target_new"),
    ({"target_new": "Rome\x7f"}, "target_new"),
    ({"target_new": b"Rome"}, "target_new"),
    ({"target_true": " "}, "target_true"),
    ({"target_true": 7}, "target_true"),
    ({"target_true": "Rome"}, "target_new equals target_true"),
    ({"target_true": " Rome\u200b "}, "target_new equals target_true"),  # once invisible characters are dropped
]


@pytest.mark.parametrize("change, field", BAD_REQUESTS, ids=[repr(c) for c, _ in BAD_REQUESTS])
def test_bad_request_field_is_a_request_error_naming_it(change, field):
    kwargs = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
              "target_true": "Paris"} | change
    with pytest.raises(RequestError, match=rf"EditRequest\.{field}"):
        EditRequest(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"prompt": "{}", "subject": "Paris", "target_new": "France"},                 # the subject is the whole prompt
    {"prompt": "{} is\tlocated\nin", "subject": "Zürich", "target_new": "Rom"},  # tab and newline are fine
    {"prompt": "{} works in", "subject": "\U0001F469\u200d\U0001F52C", "target_new": "a lab"},  # ZWJ inside an emoji
    {"prompt": "{} is in", "subject": "X", "target_new": "New York", "target_true": "NewYork"},
])
def test_good_requests_are_accepted(kwargs):
    assert EditRequest(**kwargs).text == kwargs["prompt"].format(kwargs["subject"])


@pytest.mark.parametrize("kwargs, field", [
    ({"text": "\u200b"}, "text"), ({"text": "\x07ding"}, "text"), ({"text": b"be kind"}, "text"),
    ({"input": "Who is the UK PM?", "output": "\u200b\u200b"}, "output"),
    ({"input": 1, "output": "x"}, "input"), ({"input": "Who?", "output": None}, "output"),
])
def test_bad_descriptor_field_is_a_request_error_naming_it(kwargs, field):
    with pytest.raises(RequestError, match=rf"EditDescriptor\.{field}"):
        EditDescriptor(**kwargs)


def test_from_dict_goes_through_the_same_checks():
    with pytest.raises(RequestError, match="subject"):
        EditRequest.from_dict({"prompt": "{} is in", "subject": "\u200b", "target_new": "Rome"})
    with pytest.raises(RequestError, match="prompt"):
        EditRequest.from_dict({"prompt": "{1} is in {}", "subject": "X", "target_new": "Rome"})


# ---- context window -----------------------------------------------------------------------------------


def _n_tokens(lm, request: EditRequest) -> int:
    return len(prompt_ids(lm, request.text)) + max(len(target_ids(lm, t)) for t in (request.target_new, request.target_true)
                                                   if t is not None)


def _request_of(lm, n_tokens: int) -> EditRequest:
    """A request whose prompt + target is exactly `n_tokens` tokens on `lm`'s tokenizer."""
    for words in range(n_tokens, 0, -1):
        request = EditRequest("{} is located in the city of" + " Paris" * words, "The Eiffel Tower", "Rome", "Paris")
        if _n_tokens(lm, request) == n_tokens:
            return request
    raise AssertionError(f"no request of {n_tokens} tokens")


TOO_LONG = EditRequest("{} is located in the city of" + " Paris" * 200, "The Eiffel Tower", "Rome", "Paris")
HUGE = EditRequest("{} " + "is located in the city of " * 40_000, "The Eiffel Tower", "Rome", "Paris")  # ~1 MB

EDIT_SETTINGS = {"rome": {"layer": 1}, "memit": {"layers": [1, 2]}, "alphaedit": {"layers": [1, 2]},
                 "mend": {"allow_untrained": True}, "serac": {"encoder": "lexical"}}


@pytest.mark.parametrize("method", sorted(editors.names()))
@pytest.mark.parametrize("request_", [TOO_LONG, HUGE], ids=["too-long", "1MB"])
def test_every_editor_refuses_a_request_longer_than_the_context_before_any_forward(forwards, method, request_):
    lm = forwards
    before = snapshot(lm)
    with pytest.raises(RequestError, match=r"EditRequest\.prompt.*context of 128 tokens"):
        lmedit.edit(lm, request_, method, config=EDIT_SETTINGS.get(method, {}))
    assert lm.forwards == []
    assert_unchanged(lm, before)


def test_a_huge_prompt_is_refused_by_its_length_in_characters():
    lm = tiny_lm("llama")
    assert len(HUGE.text) > MAX_CHARS_PER_TOKEN * context_length(lm)
    with pytest.raises(RequestError, match="characters"):
        lmedit.edit(lm, HUGE, "noop")


def test_context_prefixes_count_for_the_editors_that_add_them(forwards):
    lm = forwards
    request = _request_of(lm, context_length(lm) - 2)  # fits alone, not behind ROME's 10-token prefixes
    before = snapshot(lm)
    with pytest.raises(RequestError, match="context prefixes"):
        lmedit.edit(lm, request, "rome", config={"layer": 1})
    with pytest.raises(RequestError, match="context prefixes"):
        get_editor("memit", {"layers": [1, 2]}).edit(lm, [request])  # the path the harness and ledger take
    assert lm.forwards == []
    assert_unchanged(lm, before)
    edit = lmedit.edit(lm, request, "noop", apply=False)  # no prefixes: the same request fits
    assert edit is not None


def test_a_request_at_the_limit_fits_and_one_token_more_does_not():
    lm = tiny_lm("llama")
    limit = context_length(lm)
    lmedit.edit(lm, _request_of(lm, limit), "noop", apply=False)
    with pytest.raises(RequestError, match=f"is {limit + 1} tokens"):
        lmedit.edit(lm, _request_of(lm, limit + 1), "noop", apply=False)


def test_a_long_descriptor_is_refused_naming_its_field(forwards):
    with pytest.raises(RequestError, match=r"EditDescriptor\.text"):
        lmedit.edit(forwards, EditDescriptor("Be kind about " + "Paris " * 300), "serac", config={"encoder": "lexical"})
    assert forwards.forwards == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_score_generate_and_trace_refuse_prompts_longer_than_the_context(family, monkeypatch):
    lm = tiny_lm(family)
    calls = []
    original = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    long_prompt, huge_prompt = "Paris " * 200, "Paris " * 200_000
    checks = [
        (lambda: lmedit.score(lm, long_prompt, "Rome"), r"prompt 0 \+ its target is \d+ tokens"),
        (lambda: lmedit.score(lm, ["The Louvre is in", long_prompt], ["Paris", "Rome"]), r"prompt 1 \+ its target"),
        (lambda: lmedit.score(lm, huge_prompt, "Rome"), "characters"),
        (lambda: lmedit.generate(lm, long_prompt), r"prompt 0 is \d+ tokens plus 20 tokens for max_new_tokens"),
        (lambda: lmedit.generate(lm, "The Louvre is in", max_new_tokens=10**6), "max_new_tokens"),
        (lambda: lmedit.generate(lm, huge_prompt), "characters"),
        (lambda: lmedit.trace(lm, long_prompt + "The Louvre is in", "The Louvre"), r"\d+ tokens"),
        (lambda: lmedit.trace(lm, huge_prompt + "The Louvre is in", "The Louvre"), "characters"),
    ]
    for call, expected in checks:
        with pytest.raises(RequestError, match=expected):
            call()
    assert calls == []
    assert lmedit.score(lm, "The Louvre is in", "Paris").n_tokens >= 1  # a short prompt still works
