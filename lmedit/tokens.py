"""Tokenization details written once: where the subject's tokens are, how targets are tokenized, batching.

Targets are tokenized as continuations: `" " + target` without special tokens, appended to the
prompt's ids (so "…city of" + "Rome" scores the tokens of " Rome", as ROME does). Subject tokens are
found from the tokenizer's character offsets, which handles multi-token subjects, subjects at the
start of the prompt and SentencePiece/byte-level leading spaces alike.

Not handled: slow (Python) tokenizers without offset mappings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmedit.errors import RequestError

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
