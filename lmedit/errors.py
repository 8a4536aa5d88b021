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
