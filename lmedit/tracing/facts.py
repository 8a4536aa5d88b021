"""Facts to trace: `Fact`, reading them from JSONL/JSON, the built-in facts, and which facts a model knows."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmedit.errors import RequestError
from lmedit.scoring import next_token_logprobs
from lmedit.tokens import target_ids

if TYPE_CHECKING:
    from lmedit.models.load import LM



@dataclass(frozen=True)
class Fact:
    """A fact to trace: `prompt.format(subject)` should be completed by `answer`."""

    prompt: str
    subject: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fact:
        """Accepts `answer`, ROME knowns' `attribute` or an edit request's `target_true`; filled prompts too."""
        answer = data.get("answer", data.get("attribute", data.get("target_true")))
        if isinstance(answer, Mapping):
            answer = answer.get("str")
        if "prompt" not in data or "subject" not in data or not answer:
            raise RequestError(f"a fact needs prompt, subject and answer (or attribute); got keys {sorted(data)}")
        prompt, subject = data["prompt"], data["subject"]
        if "{}" not in prompt:
            if subject not in prompt:
                raise RequestError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
            prompt = prompt.replace(subject, "{}", 1)
        return cls(prompt=prompt, subject=subject, answer=answer)


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file (one JSON object per line) or a JSON list.

    Raises:
        MissingFileError: no such file.
        InputFileError: not JSON, or a fact without prompt, subject and answer (file and line or index named).
    """
    from lmedit.errors import InputFileError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"facts file {path} does not exist" if not path.exists() else
                               f"facts file {path} is a directory, expected a JSONL file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = [(f"item {i}", d) for i, d in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as exc:
            raise InputFileError(f"facts file {path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InputFileError(f"facts file {path}, line {lineno}: not valid JSON ({exc.msg})") from None
    facts = []
    for where, data in items:
        if not isinstance(data, Mapping):
            raise InputFileError(f"facts file {path}, {where}: expected a JSON object, got {type(data).__name__}")
        try:
            facts.append(Fact.from_dict(data))
        except RequestError as exc:
            raise InputFileError(f"facts file {path}, {where}: {exc}") from None
    return facts


def builtin_facts() -> list[Fact]:
    """The built-in facts (ROME's known_1000 subset that gemma3-270m completes correctly; docs/tracing.md)."""
    text = resources.files("lmedit").joinpath("data/trace_facts.jsonl").read_text()
    return [Fact.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


@torch.no_grad()
def known_facts(lm: LM, facts: Sequence[Fact]) -> list[Fact]:
    """The facts whose answer's first token is the model's top next-token prediction."""
    if not facts:
        return []
    top = next_token_logprobs(lm, [f.text for f in facts]).argmax(-1).tolist()
    return [f for f, t in zip(facts, top) if target_ids(lm, f.answer)[0] == t]
