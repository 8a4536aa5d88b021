"""Plain frozen dataclasses shared by every part of lmedit: edit requests and activation sites.

`EditRequest` is what a user asks for ("{} is located in" / "The Eiffel Tower" -> "Rome");
`EditDescriptor` is an edit that is not such a triplet (an input-output pair, or an implicit instruction
such as "Topic: singing in the shower. Sentiment: positive"), for editors that read edits as text;
`Site` names one activation in the model (`blocks.5.mlp.key`). Edits themselves live in
`lmedit.editors.base` because they carry behaviour (apply/undo/save).
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class EditRequest:
    """A fact to change: `prompt.format(subject)` should be completed by `target_new`.

    Args:
        prompt: template with exactly one `{}` where the subject goes, e.g. "{} is located in the city of".
        subject: the entity whose fact changes, e.g. "The Eiffel Tower".
        target_new: the new completion, e.g. "Rome" (a leading space is added by the tokenizer helper).
        target_true: the current completion, e.g. "Paris", when known (used for reporting and metrics).

    Raises:
        RequestError: no `{}` or several, empty subject/target, or target_new equal to target_true.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self) -> None:
        n = self.prompt.count("{}")
        if n != 1:
            raise RequestError(
                f"EditRequest.prompt must contain exactly one '{{}}' where the subject goes, found {n} in {self.prompt!r}"
            )
        if "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            raise RequestError(f"EditRequest.prompt has a stray brace besides the one '{{}}': {self.prompt!r}")
        if not self.subject.strip():
            raise RequestError("EditRequest.subject is empty")
        if not self.target_new.strip():
            raise RequestError("EditRequest.target_new is empty")
        if self.target_true is not None and not self.target_true.strip():
            raise RequestError("EditRequest.target_true is empty (use None when unknown)")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise RequestError(f"EditRequest.target_new equals target_true ({self.target_new!r}): nothing to edit")

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
            value = getattr(self, name)
            if value is None or not value.strip():
                raise RequestError(f"EditDescriptor.{name} is empty")

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
