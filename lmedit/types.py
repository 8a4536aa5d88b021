"""Plain frozen dataclasses shared by every part of lmedit: edit requests and activation sites.

`EditRequest` is what a user asks for ("{} is located in" / "The Eiffel Tower" -> "Rome");
`EditDescriptor` is an edit that is not such a triplet (an input-output pair, or an implicit instruction
such as "Topic: singing in the shower. Sentiment: positive"), for editors that read edits as text;
`Site` names one activation in the model (`blocks.5.mlp.key`). Edits themselves live in
`lmedit.editors.base` because they carry behaviour (apply/undo/save).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lmedit.errors import RequestError

SiteKind = Literal["embed", "resid_out", "attn.out", "mlp.key", "mlp.out", "final_norm", "logits"]
SITE_KINDS: tuple[str, ...] = ("embed", "resid_out", "attn.out", "mlp.key", "mlp.out", "final_norm", "logits")
_LAYERLESS = ("embed", "final_norm", "logits")


@dataclass(frozen=True)
class Site:
    """One activation site, spelled one way: `blocks.{layer}.{kind}` or just `{kind}` for layerless kinds.

    Kinds (TransformerLens dimension words):
      embed       output of the token embedding (Gemma: already scaled by sqrt(d_model))  (batch, pos, d_model)
      resid_out   output of transformer block `layer` (the residual stream after it)   (batch, pos, d_model)
      attn.out    output of block `layer`'s attention output projection                (batch, pos, d_model)
      mlp.key     input of block `layer`'s MLP down-projection: ROME's key k           (batch, pos, d_mlp)
      mlp.out     output of that down-projection: ROME's value v                       (batch, pos, d_model)
      final_norm  output of the final norm: the unembedding's input                    (batch, pos, d_model)
      logits      output of the unembedding (before any logit soft-capping)            (batch, pos, d_vocab)
    """

    kind: SiteKind
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"Site.kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if self.kind in _LAYERLESS and self.layer is not None:
            raise ValueError(f"Site.layer must be None for kind {self.kind!r}")
        if self.kind not in _LAYERLESS and (self.layer is None or self.layer < 0):
            raise ValueError(f"Site.layer must be a non-negative int for kind {self.kind!r}")

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"


# Characters that print nothing: format controls (zero-width space U+200B, BOM, ...), controls, separators.
_INVISIBLE = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})
# Unicode category Cc (U+0000-001F, U+007F-009F) but newline and tab, and Cs (lone surrogates: not text).
_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _has_visible(text: str) -> bool:
    """Whether `text` has a character a reader would see (not whitespace, not an invisible one)."""
    return any(not c.isspace() and unicodedata.category(c) not in _INVISIBLE for c in text)


def _normal(text: str) -> str:
    """`text` as a reader compares it: format characters (U+200B, ...) dropped, whitespace runs made one space."""
    return " ".join("".join(c for c in text if unicodedata.category(c) != "Cf").split())


def _show(text: str, limit: int = 80) -> str:
    """repr of `text`, shortened (a request field can be a megabyte long)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def check_text(owner: str, name: str, value: object, *, optional: bool = False, allow_empty: bool = False) -> None:
    """Refuse a request text field that is not a string, holds a control character (newline and tab are
    allowed) or a lone surrogate, or is empty once whitespace and invisible characters are removed.

    Raises:
        RequestError: naming `owner.name` and what was expected.
    """
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RequestError(f"{owner}.{name} must be a string, got {type(value).__name__} {repr(value)[:80]}")
    bad = _FORBIDDEN.search(value)
    if bad is not None:
        c = bad.group()
        what = ("a lone surrogate", "not text") if unicodedata.category(c) == "Cs" else \
            ("the control character", "only newline and tab are allowed")
        raise RequestError(f"{owner}.{name} contains {what[0]} U+{ord(c):04X} at position {bad.start()} "
                           f"({what[1]}): {_show(value)}")
    if not allow_empty and not _has_visible(value):
        raise RequestError(f"{owner}.{name} is empty (nothing but whitespace or invisible characters such as "
                           f"U+200B): {_show(value)}")


@dataclass(frozen=True)
class EditRequest:
    """A fact to change: `prompt.format(subject)` should be completed by `target_new`.

    Args:
        prompt: template with exactly one `{}` where the subject goes, e.g. "{} is located in the city of".
        subject: the entity whose fact changes, e.g. "The Eiffel Tower".
        target_new: the new completion, e.g. "Rome" (a leading space is added by the tokenizer helper).
        target_true: the current completion, e.g. "Paris", when known (used for reporting and metrics).

    Raises:
        RequestError: a field that is not a string, is empty or only invisible characters, or holds a control
            character (newline and tab aside); a prompt without exactly one `{}` or with any other brace;
            target_new equal to target_true.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new", "target_true"):
            check_text("EditRequest", name, getattr(self, name), optional=name == "target_true",
                       allow_empty=name == "prompt")  # "{}" alone is a prompt: the subject is the whole text
        n = self.prompt.count("{}")
        if n != 1:
            raise RequestError(
                f"EditRequest.prompt must contain exactly one '{{}}' where the subject goes, found {n} in {_show(self.prompt)}"
            )
        if "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            raise RequestError(f"EditRequest.prompt has a stray brace besides the one '{{}}' (no other format fields, "
                               f"no escaped braces): {_show(self.prompt)}")
        if self.target_true is not None and _normal(self.target_true) == _normal(self.target_new):
            raise RequestError(f"EditRequest.target_new equals target_true ({_show(self.target_new)}): nothing to edit")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Build from a dict. Accepts ROME's `{"prompt", "subject", "target_new": {"str": ...}}` layout too."""
        if not isinstance(data, dict):
            raise RequestError(f"an edit request must be a JSON object, got {type(data).__name__}")

        def text(value: Any) -> Any:
            return value["str"] if isinstance(value, dict) and "str" in value else value

        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
        if missing:
            raise RequestError(f"edit request is missing field(s) {missing}; got keys {sorted(data)}")
        unknown = set(data) - {"prompt", "subject", "target_new", "target_true", "case_id"}
        if unknown:
            raise RequestError(f"edit request has unknown field(s) {sorted(unknown)}")
        for key in ("prompt", "subject", "target_new", "target_true"):
            value = text(data.get(key))
            if not (isinstance(value, str) or (key == "target_true" and value is None)):
                raise RequestError(f"edit request field {key!r} must be a string, got {value!r}")
        prompt = data["prompt"]
        subject = data["subject"]
        if "{}" not in prompt and subject in prompt:
            prompt = prompt.replace(subject, "{}", 1)  # already-filled prompts (EasyEdit layout)
        return cls(prompt=prompt, subject=subject, target_new=text(data["target_new"]),
                   target_true=text(data.get("target_true")))

    @classmethod
    def from_json(cls, text: str) -> EditRequest:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class EditDescriptor:
    """An edit that is not a (subject, relation, object) triplet, for editors that read edits as text.

    Two forms (Mitchell et al. 2022, "Memory-Based Model Editing at Scale", arXiv:2206.06520, §4):
      explicit pair   `EditDescriptor(input="Who is the UK PM?", output="Boris Johnson")`: inputs like
                      this one should now be answered with `output`;
      implicit        `EditDescriptor("Topic: singing in the shower. Sentiment: positive")` or
                      `EditDescriptor("Be more positive about vaccines")`: a change of behaviour on a topic.
    Triplet editors (ROME, MEMIT, FT, ...) reject descriptors with a `RequestError`.

    Raises:
        RequestError: neither or both forms given, or an empty field.
    """

    text: str | None = None
    input: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        pair = self.input is not None or self.output is not None
        if self.text is not None and pair:
            raise RequestError("EditDescriptor takes either text (implicit) or input and output (a pair), not both")
        if self.text is None and not pair:
            raise RequestError("EditDescriptor needs text (implicit descriptor) or input and output (a pair)")
        for name in ("input", "output") if pair else ("text",):
            check_text("EditDescriptor", name, getattr(self, name))

    @property
    def is_pair(self) -> bool:
        return self.text is None

    @property
    def statement(self) -> str:
        """The edit as one sentence: the text itself, or "{input} {output}" for a pair."""
        return f"{self.input} {self.output}" if self.is_pair else str(self.text)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditDescriptor:
        if not isinstance(data, dict):
            raise RequestError(f"an edit descriptor must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"text", "input", "output"}
        if unknown:
            raise RequestError(f"edit descriptor has unknown field(s) {sorted(unknown)}; expected text, or input and output")
        bad = {k: v for k, v in data.items() if not isinstance(v, str)}
        if bad:
            raise RequestError(f"edit descriptor field(s) must be strings, got {bad}")
        return cls(text=data.get("text"), input=data.get("input"), output=data.get("output"))


def request_from_dict(data: dict[str, Any]) -> EditRequest | EditDescriptor:
    """An `EditDescriptor` for `{"text"}` or `{"input", "output"}` objects, else an `EditRequest`."""
    if isinstance(data, dict) and ("text" in data or "input" in data or "output" in data) and "prompt" not in data:
        return EditDescriptor.from_dict(data)
    return EditRequest.from_dict(data)


def describe_stored(request: dict[str, Any]) -> str:
    """A stored request (a ledger row's `requests` entry) as one plain line: `subject prompt → new (was old)`, or
    a descriptor's text. Never through str.format: a stored prompt may hold other braces ("{1}", "{}{}")."""
    if "prompt" in request:
        old = f" (was {request['target_true']})" if request.get("target_true") else ""
        text = str(request["prompt"]).replace("{}", str(request.get("subject")), 1)
        return f"{text} → {request.get('target_new')}{old}"
    return str(request.get("text") or f"{request.get('input')} → {request.get('output')}")
