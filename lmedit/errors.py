"""Exception types raised by lmedit for bad input. Each message names what was wrong and how to fix it."""

from __future__ import annotations


class LMEditError(Exception):
    """Base class of every error lmedit raises on purpose."""


class RequestError(LMEditError, ValueError):
    """An `EditRequest` (or trace query) that cannot be honoured: no subject, subject not in prompt, ..."""


class UnsupportedArchitectureError(LMEditError):
    """The model's `config.model_type` has no `ArchSpec` entry."""


class ModelNotFoundError(LMEditError):
    """A model name that is neither built-in nor available offline."""


class EditFailedError(LMEditError):
    """An editor could not produce a usable edit (NaN, diverged optimisation, ...). The model is untouched."""


class ConfigError(LMEditError, ValueError):
    """A method config that cannot be used: missing file, unknown field, wrong type or out-of-range value."""


class NotAnLMError(LMEditError, TypeError):
    """An object lmedit cannot use as a model bundle: a bare transformers model where an `LM` is needed
    (wrap it with `lmedit.LM.from_hf(model, tokenizer)`), a model object without its tokenizer, or a
    model that is not a decoder-only causal LM."""


class MissingDependencyError(LMEditError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the `pip install` to run."""


class UnknownNameError(LMEditError, KeyError):
    """A name that no registry holds (editor, dataset, metric); the message suggests close matches.

    Still a `KeyError`, for code written when the registry raised a bare one.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputFileError(LMEditError):
    """A file the user gave that cannot be used: unreadable, a directory, not JSON, not the expected kind of file."""


class MissingFileError(InputFileError, FileNotFoundError):
    """A file or directory the user named that does not exist (still a `FileNotFoundError`)."""


class DeviceError(LMEditError, ValueError):
    """A device that is not a device name (`cpu`, `cuda`, `cuda:N`, `mps`, `auto`) or is not available here."""


class CorpusError(LMEditError, ValueError):
    """A statistics corpus that cannot give usable key statistics: a `corpus: file:` that is empty, whitespace
    only, unreadable or not the expected JSONL, or keys whose second moment is not finite. Nothing is cached."""


class EditFileError(InputFileError):
    """A saved edit that cannot be used, found on load: not a safetensors file (random bytes, truncated), an
    unknown format or format version, no base-model fingerprint, metadata that is not the expected JSON, tensors
    with unexpected names, inconsistent shapes, non-float dtypes or non-finite values."""


class ServeError(LMEditError):
    """The web app cannot start where it was asked to: the port is taken, or the host is not an address here."""
