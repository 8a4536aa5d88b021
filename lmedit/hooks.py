"""Reading and rewriting activations: `capture()` and `patch()`. The only module that registers torch hooks.

In the spirit of ROME's `nethook.TraceDict` and TransformerLens' `hooks()`: small context managers that
always remove their hooks, even when the forward raises. Sites are `lmedit.types.Site`s; the
`ArchSpec` says which module each one is.

Usage:
    with capture(lm, [Site("resid_out", 3)]) as acts:
        lm.model(**batch)
    acts[Site("resid_out", 3)]  # (batch, pos, d_model)

`attach()` is the one persistent hook: an adaptor edit (`lmedit.editors.adaptor`) keeps it on the model while
it is applied and removes it through the returned handle on undo.

`start_at()` is the one intervention that is not a hook: it skips the first blocks of a forward by
standing in for their `forward` (a torch hook can rewrite a module's input or output but cannot skip it).

Not handled: hooks on modules that are not reachable through the ArchSpec.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle

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

                pre_hook._hooked_site = site  # lets start_at() spot hooks on blocks it skips
                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(_module, _args, output, _site=site, _fn=fn, _stop=stop):
                    new = _fn(_unpack(output), _site)
                    if _stop:
                        raise StopForward
                    return None if new is None else _repack(output, new)

                hook._hooked_site = site
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

    On a half-precision model (bfloat16, float16) each `fn` gets the activation as float32 and its result is
    rounded back to the model's dtype once: what a patch adds (a float32 δ, noise, a restored activation) is
    computed in float32 and gradients flow through both casts. On a float32 model nothing is cast.

    Args:
        lm: the model bundle.
        fns: site -> `fn(activation, site)`, returning the replacement or None to keep the activation.
        stop_after: as in `capture`.

    Example:
        with patch(lm, {Site("mlp.out", 5): lambda act, site: act + delta}):
            logits = lm.model(**batch).logits
    """
    with _hooked(lm, {site: _in_float32(fn) for site, fn in fns.items()}, stop_after):
        yield


_HALF = (torch.float16, torch.bfloat16)


def _in_float32(fn: PatchFn) -> PatchFn:
    """`fn`, called with a half-precision activation upcast to float32 and its result rounded back to that dtype."""

    def upcast(activation: torch.Tensor, site: Site) -> torch.Tensor | None:
        if activation.dtype not in _HALF:
            return fn(activation, site)
        wide = activation.float()
        new = fn(wide, site)
        # None: `fn` kept the activation, possibly changed in place (in the float32 copy, which is handed back).
        return (wide if new is None else new).to(activation.dtype)

    return upcast


class AdaptorFn(Protocol):
    """Rewrites a module's output from its input: return a tensor to replace the output, or None to keep it."""

    def __call__(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None: ...


def attach(lm: LM, site: Site, fn: AdaptorFn) -> RemovableHandle:
    """Keep `fn` on the module that computes `site` until the returned handle's `remove()` is called.

    Unlike `capture`/`patch`, the hook outlives any block: it is how an applied adaptor edit (GRACE's codebook)
    changes every later forward, whoever runs it. `fn` receives the module's first input and its output, e.g.
    for `Site("mlp.out", layer)` the down-projection's input (`mlp.key`, (batch, pos, d_mlp)) and output
    ((batch, pos, d_model)). Hooks registered later (`capture`, `patch`) run after it, so they see its output.
    `start_at` does not check it: a block it skips passes `resid` on, which already holds the block's effect.

    Args:
        lm: the model bundle.
        site: an output site of a module (not `mlp.key`, which is an input).
        fn: the rewrite.

    Returns:
        The torch handle; `handle.remove()` takes the hook off (idempotent).

    Raises:
        ValueError: `site` is a module's input.
        IndexError: `site.layer` is outside the model.

    Example:
        handle = attach(lm, Site("mlp.out", 5), lambda key, out: None)   # keeps every output
        ...
        handle.remove()
    """
    module, is_input = lm.arch.module_for(lm.model, site)
    if is_input:
        raise ValueError(f"attach() rewrites a module's output; {site} is a module's input")

    def hook(_module, args, output):
        new = fn(args[0], _unpack(output))
        return None if new is None else _repack(output, new)

    return module.register_forward_hook(hook)


def _hooked_sites(modules: Iterable[torch.nn.Module]) -> list[Site]:
    """Sites of the `capture`/`patch` hooks currently registered on `modules`."""
    return [fn._hooked_site for m in modules for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            if hasattr(fn, "_hooked_site")]


@contextmanager
def start_at(lm: LM, layer: int, resid: torch.Tensor) -> Iterator[None]:
    """Run the forwards inside from block `layer` on, with `resid` as the residual stream entering it.

    Blocks 0..layer-1 are not computed: block `layer - 1` returns `resid`, so hooks at
    `Site("resid_out", layer - 1)` see (and may rewrite) it, and earlier blocks return their input
    unchanged. Everything else runs as usual: the model embeds its input and prepares masks, positions
    and the key/value cache itself, which is why this needs no per-architecture code. Skipped blocks do
    not write to the cache. Used by causal tracing, whose restored runs match the corrupted run up to
    the restored layer, and by `lmedit.split_forward`, whose value-optimisation steps start at the
    edited block.

    Args:
        lm: the model bundle.
        layer: the first block to run, 0..n_layers (0 changes nothing; n_layers runs no block).
        resid: (batch, pos, d_model) output of block `layer - 1`, shaped like the forward's input ids
            (batch, pos).

    Raises:
        IndexError: `layer` is outside 0..n_layers.
        ValueError: (during the forward) a `capture`/`patch` site lies in a skipped block, other than
            `Site("resid_out", layer - 1)`: it would silently see nothing.

    Example:
        with start_at(lm, 5, resid), capture(lm, [Site("final_norm")]) as acts:   # resid: block 4's output
            lm.model(input_ids=ids)  # runs blocks 5.. only
        acts[Site("final_norm")]  # (batch, pos, d_model)
    """
    blocks = lm.arch.blocks(lm.model)
    if not 0 <= layer <= len(blocks):
        raise IndexError(f"start_at layer {layer} is out of range: the model has {len(blocks)} layers")
    skipped = list(blocks[:layer])
    # An instance attribute shadows the class's `forward` (nn.Module.__call__ looks up `self.forward`);
    # one that was already there (e.g. accelerate's) is put back afterwards.
    saved = [block.__dict__.get("forward") for block in skipped]

    def stand_in(index: int):
        block = skipped[index]
        last = index == layer - 1

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # Hooks on a block's own output are allowed only where that output is `resid`.
            bad = _hooked_sites(m for m in block.modules() if not (last and m is block))
            if bad:
                raise ValueError(f"start_at({layer}) skips block {index}, but sites {[str(s) for s in bad]} "
                                 "are hooked there: start at or before their layer")
            return resid if last else hidden_states

        return forward

    try:
        for index, block in enumerate(skipped):
            block.forward = stand_in(index)
        yield
    finally:
        for block, original in zip(skipped, saved):
            if original is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = original
