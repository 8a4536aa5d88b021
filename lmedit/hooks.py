"""Reading and rewriting activations: `capture()` and `patch()`. The only module that registers torch hooks.

In the spirit of ROME's `nethook.TraceDict` and TransformerLens' `hooks()`: small context managers that
always remove their hooks, even when the forward raises. Sites are `lmedit.types.Site`s; the
`ArchSpec` says which module each one is.

Usage:
    with capture(lm, [Site("resid_out", 3)]) as acts:
        lm.model(**batch)
    acts[Site("resid_out", 3)]  # (batch, pos, d_model)

Not handled: hooks on modules that are not reachable through the ArchSpec.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmedit.types import Site

if TYPE_CHECKING:
    from lmedit.models.load import LM


class PatchFn(Protocol):
    """Rewrites one activation: return a tensor to replace it, or None to keep it (possibly modified in place)."""

    def __call__(self, activation: torch.Tensor, site: Site) -> torch.Tensor | None: ...


class StopForward(Exception):
    """Raised by a hook at `stop_after` to skip the rest of the forward; swallowed by the context manager."""


def _unpack(output: Any) -> torch.Tensor:
    # Blocks return a tensor in recent transformers and a tuple (hidden, ...) in older ones / GPT-2.
    return output[0] if isinstance(output, tuple) else output


def _repack(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextmanager
def _hooked(lm: LM, fns: Mapping[Site, PatchFn], stop_after: Site | None) -> Iterator[None]:
    if stop_after is not None and stop_after not in fns:
        fns = {**fns, stop_after: lambda activation, site: None}
    handles = []
    try:
        for site, fn in fns.items():
            module, is_input = lm.arch.module_for(lm.model, site)
            stop = site == stop_after

            if is_input:
                def pre_hook(_module, args, _site=site, _fn=fn, _stop=stop):
                    new = _fn(args[0], _site)
                    if _stop:
                        raise StopForward
                    return None if new is None else (new, *args[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(_module, _args, output, _site=site, _fn=fn, _stop=stop):
                    new = _fn(_unpack(output), _site)
                    if _stop:
                        raise StopForward
                    return None if new is None else _repack(output, new)

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        except StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(lm: LM, sites: Iterable[Site], *, stop_after: Site | None = None,
            detach: bool = True) -> Iterator[dict[Site, torch.Tensor]]:
    """Record the activations at `sites` during the forward passes run inside the block.

    Args:
        lm: the model bundle.
        sites: where to record; each value is `(batch, pos, dim)`.
        stop_after: stop the forward right after this site is computed (ROME's StopForward): later
            layers are not run and the model call returns nothing.
        detach: detach the recorded tensors (set False to backpropagate through them).

    Yields:
        A dict site -> tensor, filled as the forward runs (the last forward wins).

    Example:
        with capture(lm, [Site("mlp.key", 5)], stop_after=Site("mlp.key", 5)) as acts:
            lm.model(**batch)
        keys = acts[Site("mlp.key", 5)]  # (batch, pos, d_mlp)
    """
    acts: dict[Site, torch.Tensor] = {}

    def record(activation: torch.Tensor, site: Site) -> None:
        acts[site] = activation.detach() if detach else activation

    with _hooked(lm, {site: record for site in sites}, stop_after):
        yield acts


@contextmanager
def patch(lm: LM, fns: Mapping[Site, PatchFn], *, stop_after: Site | None = None) -> Iterator[None]:
    """Rewrite activations at the given sites during the forwards run inside the block.

    Args:
        lm: the model bundle.
        fns: site -> `fn(activation, site)`, returning the replacement or None to keep the activation.
        stop_after: as in `capture`.

    Example:
        with patch(lm, {Site("mlp.out", 5): lambda act, site: act + delta}):
            logits = lm.model(**batch).logits
    """
    with _hooked(lm, dict(fns), stop_after):
        yield
