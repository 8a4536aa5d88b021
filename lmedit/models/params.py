"""Where each parameter's value lives, and reading and writing it there — also on offloaded models.

A model loaded whole holds every parameter's value in `param.data` on its device. A model placed by
accelerate with offloading (`lmedit.load(..., device_map=..., max_memory=...)`, or any transformers model
dispatched with CPU or disk offload) keeps the offloaded blocks' parameters on the "meta" device; their
values sit in the module's `weights_map`, which accelerate's hook (`AlignDevicesHook`) reads before each
forward of that module and drops after it. Disk-offloaded values are read lazily from the checkpoint's own
safetensors files or from accelerate's offload folder.

lmedit never writes those files (they are the user's checkpoint): a changed value goes into the weights
map's in-memory state dict, which accelerate reads before the files, so an edited offloaded weight lives
in CPU memory from then on. Undo puts the original value back bit for bit.

    read(model, name)            the current value, where it lives (do not modify it in place)
    write(model, {name: value})  set values where they live (an offloaded one: in the in-memory overlay)
    named_values(model)          (name, value) for every state-dict entry, offloaded ones read
    resident(model, names)       within the block, the modules holding `names` keep their values as ordinary
                                 tensors on their execution device (offloading paused), for editors that
                                 train parameters directly (FT, LoRA)
    input_device(model)          where the model's inputs go

Everything else in lmedit that needs a parameter's value goes through here; `named_parameters()` is fine for
names, shapes and dtypes. Accelerate's device placement is the same machinery for several GPUs, CPU offload
and disk offload; only CPU and disk offload were exercised here (no GPU on this machine).

Not handled: tied parameters that are offloaded (their two names would need writing together).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager

import torch

from lmedit.errors import LMEditError


def _offload_hook(module: torch.nn.Module):
    """Accelerate's offloading hook on `module` (an `AlignDevicesHook` with a weights map), or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(module_path), attr
    except AttributeError:
        raise LMEditError(f"{type(model).__name__} has no parameter {name!r}") from None


def is_offloaded(model: torch.nn.Module, name: str) -> bool:
    """Whether `name`'s value is held in an accelerate weights map rather than in the module."""
    module, attr = _owner(model, name)
    tensor = getattr(module, attr, None)
    return tensor is not None and tensor.device.type == "meta" and _offload_hook(module) is not None


def _overlay(model: torch.nn.Module, name: str) -> tuple[MutableMapping, str]:
    """The in-memory mapping accelerate reads `name`'s value from first, and its key there."""
    module, attr = _owner(model, name)
    weights_map = _offload_hook(module).weights_map
    prefix = getattr(weights_map, "prefix", "")
    data = getattr(weights_map, "dataset", weights_map)  # accelerate's PrefixedDataset wraps the real mapping
    target = getattr(data, "state_dict", data)           # OffloadedWeightsLoader: its state dict has priority
    if not isinstance(target, MutableMapping):
        raise LMEditError(f"{name} is offloaded to a store lmedit cannot write ({type(data).__name__}); "
                          "load the model with that block in memory (device_map)")
    return target, prefix + attr


def read(model: torch.nn.Module, name: str) -> torch.Tensor:
    """`name`'s current value where it lives: the parameter's data, or an offloaded value (on CPU)."""
    module, attr = _owner(model, name)
    tensor = getattr(module, attr, None)
    if tensor is None:
        raise LMEditError(f"{type(model).__name__} has no parameter {name!r}")
    if tensor.device.type != "meta":
        return tensor.data
    hook = _offload_hook(module)
    if hook is None:
        raise LMEditError(f"{name} is on the meta device with no offloaded value (an uninitialised model?)")
    return hook.weights_map[attr]


def write(model: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Set each named parameter to its value where it lives; values are cast to the parameter's dtype.

    In-memory parameters are written in place (`copy_`); offloaded ones get a new tensor in the weights map's
    in-memory state dict (never the files). All targets are checked before anything is written.
    """
    plan = []
    for name, value in values.items():
        module, attr = _owner(model, name)
        current = read(model, name)
        if tuple(current.shape) != tuple(value.shape):
            raise LMEditError(f"{name} has shape {tuple(current.shape)}, the new value {tuple(value.shape)}")
        plan.append((name, module, attr, current, value))
    overlays = {name: _overlay(model, name) for name, *_ in plan if is_offloaded(model, name)}
    with torch.no_grad():
        for name, _module, _attr, current, value in plan:
            if name in overlays:
                target, key = overlays[name]
                target[key] = value.detach().to(device=current.device, dtype=current.dtype).clone()
            else:
                current.copy_(value)


def named_values(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) for every entry of `model.state_dict()`, sorted by name, offloaded values read."""
    for name, tensor in sorted(model.state_dict().items()):
        yield name, (read(model, name) if tensor.device.type == "meta" else tensor)


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's inputs belong on: the input embedding's execution device when dispatched."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextmanager
def resident(model: torch.nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the block, the modules owning `names` hold their values on their execution device, offloading paused.

    For code that must hold a parameter as a real tensor across forwards (training a copy of it). The
    values are not changed; on exit the modules are offloaded again, exactly as before.
    """
    from accelerate.utils import set_module_tensor_to_device

    paused = []
    try:
        for name in dict.fromkeys(names):
            if not is_offloaded(model, name):
                continue
            module, _ = _owner(model, name)
            if any(module is m for m, _ in paused):
                continue
            hook = _offload_hook(module)
            # The tensors accelerate swaps in before each forward of this module (its direct ones).
            deep = bool(hook.place_submodules)
            local = [n for n, _ in module.named_parameters(recurse=deep)]
            if hook.offload_buffers:
                local += [n for n, _ in module.named_buffers(recurse=deep)]
            for tname in local:
                set_module_tensor_to_device(module, tname, hook.execution_device, value=hook.weights_map[tname])
            hook.offload = False
            paused.append((module, local))
        yield
    finally:
        for module, local in paused:
            hook = _offload_hook_any(module)
            for tname in local:
                set_module_tensor_to_device(module, tname, "meta")
            hook.offload = True


def _offload_hook_any(module: torch.nn.Module):
    """`_offload_hook` while offloading is paused (offload=False): the hook with a weights map."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        if getattr(h, "weights_map", None) is not None:
            return h
    raise LMEditError("lost track of an offloaded module's hook")
