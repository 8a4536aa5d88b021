"""Second-moment statistics of MLP keys, C = E[k kᵀ], with corpora and an explicit on-disk cache.

ROME and MEMIT (arXiv:2202.05262 §3.1, arXiv:2210.07229 §3) need C at the edited layer to spread an
update away from the keys the layer usually sees. The papers use 100k Wikipedia samples; offline we
use one of these corpora:
  - `sampled`: text sampled from the model itself (temperature 1, seeded), n_samples × length tokens;
  - `docstrings`: docstrings of the Python standard library (human-written English on every machine),
    parsed with `ast` (nothing is imported);
  - `file:PATH`: a user text file (paragraphs) or JSONL file (a "text" field per line).
A forward that stops after the deepest requested layer reads all requested layers in one pass.
Results are cached under `StatsCache(root)/<LM.weights_hash>/<corpus id>/layer<l>-<n_tokens>.safetensors`
(the exact weights, dtype included: a bfloat16 copy of a model has its own statistics),
with their provenance and a checksum (`lmedit.cache`): a file that fails the check is recomputed with a
warning. A statistic that is not finite (an empty corpus file: 0/0) is an error and is never cached.

Not handled: keys of attention layers; per-token weighting.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmedit.cache import cache_root, describe, is_int, read_json, read_tensors, write_json, write_tensors
from lmedit.config import check_ranges
from lmedit.errors import ConfigError, CorpusError, MissingFileError
from lmedit.hooks import capture
from lmedit.tokens import pad_batch
from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total): phase "sampling corpus" or "key statistics"


@dataclass(frozen=True)
class CorpusSpec:
    """Which text the statistics are computed on.

    Attributes:
        source: "sampled", "docstrings" or "file:PATH".
        n_tokens: number of key vectors to average (tokens read from the corpus).
        seq_len: tokens per sequence (sampled length, or chunk size for text).
        seed: sampling seed (`sampled` only).
    """

    source: str = "sampled"
    n_tokens: int = 20_000
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=("n_tokens",), intervals={"seq_len": "[2, inf)"})
        if not (self.source in ("sampled", "docstrings") or self.source.startswith("file:")):
            raise ConfigError(f"CorpusSpec.source must be 'sampled', 'docstrings' or 'file:PATH', got {self.source!r}")
        if self.source.startswith("file:") and not Path(self.source[5:]).is_file():
            raise MissingFileError(f"corpus file {self.source[5:]!r} does not exist")
        if self.source.startswith("file:"):
            _file_texts(Path(self.source[5:]))  # an empty or malformed file fails here, before any model work

    def corpus_id(self) -> str:
        if self.source == "sampled":
            return f"sampled-s{self.seed}-L{self.seq_len}"
        if self.source == "docstrings":
            # v2: length filter applied after whitespace normalisation. Bump when stdlib_docstrings() changes.
            return f"docstrings-v2-py{sys.version_info.major}{sys.version_info.minor}-L{self.seq_len}"
        try:
            digest = hashlib.sha256(Path(self.source[5:]).read_bytes()).hexdigest()[:12]
        except OSError as exc:
            raise CorpusError(f"corpus file {self.source[5:]} cannot be read ({exc.strerror or exc})") from None
        return f"file-{digest}-L{self.seq_len}"


class StatsCache:
    """Where statistics and sampled corpora are kept on disk. Pass one explicitly; there is no global cache."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "stats"

    def path(self, lm: LM, spec: CorpusSpec, layer: int) -> Path:
        return self.root / lm.weights_hash / spec.corpus_id() / f"layer{layer}-n{spec.n_tokens}.safetensors"

    def corpus_path(self, lm: LM, spec: CorpusSpec) -> Path:
        return self.root / lm.weights_hash / spec.corpus_id() / "corpus.json"


# transformers renamed the key/value cache argument and output (past_key_values -> cache) in 5.2x.
_CACHE_KWARG = "cache" if "cache" in __import__("inspect").signature(
    __import__("transformers").modeling_outputs.CausalLMOutputWithPast).parameters else "past_key_values"


# --- corpora --------------------------------------------------------------------------------------
def stdlib_docstrings() -> list[str]:
    """Docstrings (≥ 200 characters) of the Python standard library's modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = " ".join((ast.get_docstring(node) or "").split())
                if len(doc) >= 200:
                    texts.append(doc)
    return texts


def _file_texts(path: Path) -> list[str]:
    """The non-blank texts of a corpus file; `CorpusError` if it cannot be read or has none."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"corpus file {path} cannot be read as UTF-8 text ({getattr(exc, 'strerror', None) or exc})"
                          ) from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise CorpusError(f"{path}:{i}: a JSONL corpus line must be a JSON object") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CorpusError(f"{path}:{i}: JSONL corpus records need a 'text' field holding a string")
                if record["text"].strip():
                    texts.append(record["text"])
    else:
        texts = [p.strip() for p in content.split("\n\n") if p.strip()]
    if not texts:
        raise CorpusError(f"corpus file {path} has no text (it is empty or only whitespace): key statistics "
                          "need at least a few hundred tokens of text")
    return texts


def _chunk_token_ids(lm: LM, texts: Sequence[str], spec: CorpusSpec) -> list[list[int]]:
    """Concatenate tokenized texts and cut them into `seq_len`-token sequences until `n_tokens` are covered."""
    sequences: list[list[int]] = []
    total = 0
    bos = [lm.tokenizer.bos_token_id] if lm.tokenizer.bos_token_id is not None else []
    buffer: list[int] = []
    for text in texts:
        buffer.extend(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buffer) >= spec.seq_len - len(bos):
            seq = bos + buffer[: spec.seq_len - len(bos)]
            buffer = buffer[spec.seq_len - len(bos):]
            sequences.append(seq)
            total += len(seq)
            if total >= spec.n_tokens:
                return sequences
    if buffer:
        sequences.append(bos + buffer)
        total += len(bos) + len(buffer)
    if total < spec.n_tokens:
        log.warning("corpus %s has only %d tokens (asked for %d)", spec.corpus_id(), total, spec.n_tokens)
    return sequences


@torch.no_grad()
def sample_sequences(lm: LM, n_sequences: int, length: int, seed: int, *, batch_size: int = 64,
                     progress: Progress | None = None) -> list[list[int]]:
    """Sample `n_sequences` token sequences of `length` tokens from the model (temperature 1, seeded).

    Each step reads the whole unembedding (670 MB for Gemma 3's 262k words in float32) whatever the batch,
    so a wide batch is what makes sampling affordable on a CPU.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    out: list[list[int]] = []
    for b in range(0, n_sequences, batch_size):
        n = min(batch_size, n_sequences - b)
        ids = torch.full((n, 1), start, dtype=torch.long, device=lm.device)
        past = None
        tokens = ids
        for step in range(length - 1):
            result = lm.model(input_ids=tokens, **{_CACHE_KWARG: past}, use_cache=True, logits_to_keep=1)
            past = getattr(result, _CACHE_KWARG)
            probs = torch.softmax(result.logits[:, -1].float(), dim=-1).cpu()
            tokens = torch.multinomial(probs, 1, generator=gen).to(lm.device)
            ids = torch.cat([ids, tokens], dim=1)
            if progress:
                progress("sampling corpus", b * length + (step + 2) * n, n_sequences * length)
        out.extend(ids.tolist())
    return out


def corpus_sequences(lm: LM, spec: CorpusSpec, cache: StatsCache | None = None,
                     progress: Progress | None = None) -> list[list[int]]:
    """The token sequences of a corpus (sampled ones are cached, as sampling is the expensive part)."""
    if spec.source == "sampled":
        n_seq = -(-spec.n_tokens // spec.seq_len)
        path = cache.corpus_path(lm, spec) if cache else None
        provenance = {"kind": "sampled_corpus", "model": lm.weights_hash, "corpus": spec.corpus_id()}
        if path is not None:
            vocab = lm.model.get_input_embeddings().num_embeddings
            stored = read_json(path, provenance, lambda payload: _check_sequences(payload, spec.seq_len, vocab))
            if stored is not None and len(stored) >= n_seq:  # a shorter one is resampled
                return stored[:n_seq]
        seqs = sample_sequences(lm, n_seq, spec.seq_len, spec.seed, progress=progress)
        if path is not None:
            write_json(path, seqs, provenance)
        return seqs
    texts = stdlib_docstrings() if spec.source == "docstrings" else _file_texts(Path(spec.source[5:]))
    return _chunk_token_ids(lm, texts, spec)


def _check_sequences(payload: object, seq_len: int, vocab: int) -> str | None:
    """Why a cached sampled corpus cannot be used (None if it can): a list of `seq_len`-token id lists."""
    if not isinstance(payload, list) or not payload:
        return f"the payload is {describe(payload)}, expected a non-empty list of token sequences"
    for i, seq in enumerate(payload):
        if not (isinstance(seq, list) and len(seq) == seq_len and all(is_int(t, 0, vocab) for t in seq)):
            return f"sequence {i} is not a list of {seq_len} token ids below {vocab}"
    return None


def _corpus_name(spec: CorpusSpec) -> str:
    return f"corpus file {spec.source[5:]}" if spec.source.startswith("file:") else f"the {spec.source} corpus"


# --- statistics -----------------------------------------------------------------------------------
@torch.no_grad()
def key_second_moment(lm: LM, layers: Sequence[int], spec: CorpusSpec = CorpusSpec(), *,
                      cache: StatsCache | None = None, batch_size: int = 16,
                      progress: Progress | None = None) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] of the MLP keys at each layer in `layers`, over `spec.n_tokens` corpus tokens.

    Args:
        lm: the model bundle.
        layers: block indices; all are read in one forward that stops after the deepest one.
        spec: the corpus.
        cache: where to read/write results (None: compute, keep nothing).
        batch_size: sequences per forward.
        progress: called with (phase, tokens done, tokens total) while sampling and while reading keys.

    Returns:
        layer -> C as float64 (d_mlp, d_mlp), symmetric positive semi-definite.
    """
    layers = sorted(set(layers))
    result: dict[int, torch.Tensor] = {}
    todo = []
    d_mlp = lm.arch.d_mlp(lm.model)
    for layer in layers:
        stored = None
        if cache is not None:
            stored = read_tensors(cache.path(lm, spec, layer), _stats_provenance(lm, spec, layer),
                                  {"C": ((d_mlp, d_mlp), torch.float32)})
        if stored is not None:
            result[layer] = stored["C"].to(device=lm.device, dtype=torch.float64)
        else:
            todo.append(layer)
    if not todo:
        return result
    sequences = corpus_sequences(lm, spec, cache, progress)
    sums = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=lm.device) for layer in todo}
    count = 0
    sites = [Site("mlp.key", layer) for layer in todo]
    total = sum(len(s) for s in sequences)
    for start in range(0, len(sequences), batch_size):
        batch = pad_batch(lm, sequences[start:start + batch_size])
        with capture(lm, sites, stop_after=sites[-1]) as acts:
            lm.model(**batch.model_inputs(), use_cache=False)
        mask = batch.attention_mask.bool()
        for site in sites:
            keys = acts[site][mask].to(torch.float64)  # (tokens, d_mlp)
            sums[site.layer].addmm_(keys.T, keys)  # type: ignore[index]
        count += int(mask.sum())
        if progress:
            progress("key statistics", count, total)
    if count == 0:
        raise CorpusError(f"{_corpus_name(spec)} gave no tokens to average key statistics over; nothing was cached")
    # Stored as float32; the fresh result is rounded the same way, so a first edit (computing C) and a
    # later one (reading it back) are identical.
    computed = {layer: (sums[layer] / count).to(torch.float32) for layer in todo}
    bad = [layer for layer, C in computed.items() if not bool(torch.isfinite(C).all())]
    if bad:  # checked for every layer before any is written: a non-finite statistic is never cached
        raise CorpusError(f"key statistics over {_corpus_name(spec)} ({count} tokens) are not finite at layers {bad} "
                          "(the model's MLP keys overflow on this text); nothing was cached")
    for layer, C in computed.items():
        result[layer] = C.to(torch.float64)
        if cache is not None:
            write_tensors(cache.path(lm, spec, layer), {"C": C}, _stats_provenance(lm, spec, layer),
                          extra={"count": str(count)})
    return result


def _stats_provenance(lm: LM, spec: CorpusSpec, layer: int) -> dict[str, object]:
    return {"kind": "key_second_moment", "model": lm.weights_hash, "corpus": spec.corpus_id(), "layer": layer,
            "n_tokens": spec.n_tokens}
