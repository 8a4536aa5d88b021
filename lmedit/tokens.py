"""Tokenization details written once: where the subject's tokens are, how targets are tokenized, batching.

Targets are tokenized as continuations: `" " + target` without special tokens, appended to the
prompt's ids (so "…city of" + "Rome" scores the tokens of " Rome", as ROME does). Subject tokens are
found from the tokenizer's character offsets, which handles multi-token subjects, subjects at the
start of the prompt and SentencePiece/byte-level leading spaces alike.

The context window is checked here too, in tokens and before any forward: `check_requests_fit` (every
editor's `edit` calls it), `check_prompts_fit` (`lmedit.score`, `lmedit.generate`) and `check_length`
(tracing). A text far longer than the context is refused from its length in characters, before it is
tokenized. Internal scoring (probe texts, dataset prompts inside the harness) is not checked here.

Not handled: slow (Python) tokenizers without offset mappings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.errors import RequestError
from lmedit.types import EditDescriptor, EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM


@dataclass(frozen=True)
class SubjectSpan:
    """Token positions of a subject inside one tokenized prompt: `first <= last`, both inclusive."""

    first: int
    last: int
    n_tokens: int  # length of the whole tokenized prompt


def subject_span(lm: LM, template: str, subject: str) -> SubjectSpan:
    """Token positions of `subject` in `template.format(subject)` (template has one `{}`).

    Raises:
        RequestError: the subject occupies no token of the tokenized prompt (e.g. it is empty).
    """
    if template.count("{}") != 1:
        raise RequestError(f"prompt template must contain exactly one '{{}}', got {template!r}")
    start = template.index("{}")
    end = start + len(subject)
    return span_of_chars(lm, template.format(subject), start, end, subject)


def find_subject(lm: LM, text: str, subject: str) -> SubjectSpan:
    """Token positions of the last occurrence of `subject` in an already-filled `text`.

    Raises:
        RequestError: `subject` is not a substring of `text`.
    """
    start = text.rfind(subject)
    if not subject or start < 0:
        raise RequestError(f"subject {subject!r} does not occur in the prompt {text!r}")
    return span_of_chars(lm, text, start, start + len(subject), subject)


def span_of_chars(lm: LM, text: str, start: int, end: int, subject: str = "") -> SubjectSpan:
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    # A token belongs to the subject when its characters overlap [start, end) (ignoring a leading space).
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start
            and text[max(a, start):min(b, end)].strip()]
    if not hits:
        raise RequestError(f"subject {subject!r} covers no token of the tokenized prompt {text!r}")
    return SubjectSpan(first=hits[0], last=hits[-1], n_tokens=len(enc["input_ids"]))


def prompt_ids(lm: LM, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's usual special tokens (Gemma's <bos>)."""
    return list(lm.tokenizer(text)["input_ids"])


def target_ids(lm: LM, target: str) -> list[int]:
    """Token ids of a target as a continuation: `" " + target`, no special tokens.

    Raises:
        RequestError: the target tokenizes to nothing.
    """
    ids = list(lm.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise RequestError(f"target {target!r} tokenizes to no tokens")
    return ids


@dataclass(frozen=True)
class Batch:
    """Right-padded token batch: `input_ids`/`attention_mask` (batch, pos) and each row's real length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_batch(lm: LM, sequences: Sequence[Sequence[int]]) -> Batch:
    """Right-pad id lists into one batch on the model's device."""
    width = max(len(s) for s in sequences)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids.to(lm.device), mask.to(lm.device), [len(s) for s in sequences])


# A text with more characters than this per position of the context cannot fit, whatever the tokenizer
# (English averages about 4 characters a token; long runs of spaces or symbols reach perhaps 8-10).
MAX_CHARS_PER_TOKEN = 16


def context_length(lm: LM) -> int | None:
    """The most token positions the model takes (`max_position_embeddings`, GPT-2's `n_positions`), from its
    text config; else the tokenizer's `model_max_length` when it is a real limit; None when neither says."""
    config = lm.model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    limit = getattr(lm.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else None


def check_length(lm: LM, what: str, *, chars: int | None = None, tokens: int | None = None, reserve: int = 0,
                 reserved_for: str = "") -> None:
    """Refuse `what` (e.g. "EditRequest.prompt + target_new") when it cannot fit the model's context window.

    Call it with `chars` before tokenizing (cheap: a 1 MB prompt is refused without being tokenized) and
    with `tokens` once the ids are known; `reserve` tokens (generated tokens, context prefixes) are added.

    Raises:
        RequestError: naming `what`, its length and the model's context length.
    """
    limit = context_length(lm)
    if limit is None:
        return
    extra = f" plus {reserve} tokens for {reserved_for}" if reserve else ""
    if chars is not None and chars > MAX_CHARS_PER_TOKEN * limit:
        raise RequestError(f"{what} is {chars:,} characters{extra}: far more than the model's context of {limit} "
                           "tokens (config.max_position_embeddings) can hold; shorten it")
    if tokens is not None and tokens + reserve > limit:
        raise RequestError(f"{what} is {tokens} tokens{extra}, more than the model's context of {limit} tokens "
                           "(config.max_position_embeddings); shorten it")


def check_requests_fit(lm: LM, requests: Sequence[object], *, prefix_tokens: int = 0) -> None:
    """Refuse any request whose prompt (subject filled in) plus its longer target does not fit `lm`'s context
    window, with `prefix_tokens` more for the context prefixes the editor puts in front of it. Descriptors
    are checked as their text, or input + output; anything else is left to the editor's own checks.

    Raises:
        RequestError: naming the request's index and fields, its length in tokens and the context length.
    """
    reserved_for = "the editor's context prefixes"
    for i, request in enumerate(requests):
        if isinstance(request, EditRequest):
            text = request.text
            targets = {name: value for name in ("target_new", "target_true")
                       if (value := getattr(request, name)) is not None}
            what = f"edit request {i}: EditRequest.prompt (subject filled in) + "
        elif isinstance(request, EditDescriptor):
            text = request.input if request.is_pair else request.text
            targets = {"output": request.output} if request.is_pair else {}
            what = f"edit request {i}: EditDescriptor.{'input' if request.is_pair else 'text'}"
            what += " + " if targets else ""
        else:
            continue
        assert text is not None
        longest = max(targets, key=lambda name: len(targets[name]), default="")
        what += longest
        check_length(lm, what, chars=len(text) + len(targets.get(longest, "")), reserve=prefix_tokens,
                     reserved_for=reserved_for)
        n_target = max((len(target_ids(lm, t)) for t in targets.values() if t is not None), default=0)
        check_length(lm, what, tokens=len(prompt_ids(lm, text)) + n_target, reserve=prefix_tokens,
                     reserved_for=reserved_for)


def check_prompts_fit(lm: LM, prompts: Sequence[object], targets: Sequence[object] | None = None, *,
                      reserve: int = 0, reserved_for: str = "") -> None:
    """Refuse any user prompt (with `targets[i]` as its continuation, and `reserve` more tokens, e.g. the tokens
    to generate) that is not a string or does not fit `lm`'s context window.

    Raises:
        RequestError: naming the prompt's index, its length and the context length.
    """
    for i, prompt in enumerate(prompts):
        target = targets[i] if targets is not None else ""
        for name, value in (("prompt", prompt), ("target", target)):
            if not isinstance(value, str):
                raise RequestError(f"{name} {i} must be a string, got {type(value).__name__} {repr(value)[:80]}")
        assert isinstance(prompt, str) and isinstance(target, str)
        what = f"prompt {i} + its target" if targets is not None else f"prompt {i}"
        check_length(lm, what, chars=len(prompt) + len(target), reserve=reserve, reserved_for=reserved_for)
        n = len(prompt_ids(lm, prompt)) + (len(target_ids(lm, target)) if targets is not None else 0)
        check_length(lm, what, tokens=n, reserve=reserve, reserved_for=reserved_for)
