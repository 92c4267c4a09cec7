"""Model parallelism: one model's decoder layers spread over several devices.

For a model that does not fit one GPU (a 7B VLA in fp32, a 13B+ chat model in bf16), the
decoder layers are split into contiguous blocks, one block per device, and accelerate's
``dispatch_model`` attaches its device-alignment hooks: every block moves its inputs to its own
device before running, and the model's output comes back to the first device. Everything
before the layers (vision backbone, projector, token embeddings, rotary embeddings) stays on
the first device, the final norm and the LM head go to the last one (the LM head stays with the
embeddings when they are tied).

The tracing layer needs nothing special: interventions and recorders run in module hooks on
the residual ``h`` wherever it lives and move what they add (direction, role mask, per-row
alphas, pooling weights) to ``h.device`` at apply time; KV-cache rows are selected per layer
on that layer's device. Chat models loaded from a checkpoint can instead use transformers'
own placement: ``load_chat_model(path, device_map="auto")``.

    adapter = build_random_openvla(openvla_7b_config(), torch.bfloat16, "cuda:0")
    place_model(adapter, ["cuda:0", "cuda:1"])
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import ModelAdapter, get_submodule

#: keyword arguments the alignment hooks must not move (a KV cache lives on every layer's device)
SKIP_KEYS = ("past_key_values", "cache")


def split_evenly(n_layers: int, n_devices: int) -> list[int]:
    """How many consecutive layers each device gets: as equal as possible, extras first."""
    if n_devices < 1 or n_layers < n_devices:
        raise ConfigError(f"cannot split {n_layers} layers over {n_devices} devices",
                          fix="use at most as many devices as the model has layers")
    base, extra = divmod(n_layers, n_devices)
    return [base + (1 if i < extra else 0) for i in range(n_devices)]


def layer_device_map(
    adapter: ModelAdapter,
    devices: Sequence[str | torch.device],
    *,
    layers_per_device: Sequence[int] | None = None,
) -> dict[str, str]:
    """A device map (module name -> device) that splits ``adapter``'s decoder layers over
    ``devices`` in contiguous blocks (``layers_per_device``, default :func:`split_evenly`).

    Modules before the layers go to the first device; the final norm and the LM head to the
    last (the LM head to the first when its weight is tied to the input embeddings).
    """
    devs = [str(torch.device(d)) for d in devices]
    if not devs:
        raise ConfigError("layer_device_map needs at least one device")
    n = adapter.n_layers
    counts = list(layers_per_device) if layers_per_device is not None else split_evenly(n, len(devs))
    if len(counts) != len(devs) or sum(counts) != n or any(c < 0 for c in counts):
        raise ConfigError(f"layers_per_device {counts} must give {n} layers to {len(devs)} devices")
    model = adapter.model
    path = adapter.layers_path
    parent_path, _, list_name = path.rpartition(".")
    first, last = devs[0], devs[-1]
    head = adapter.lm_head
    tied = _tied_to_input(model, head)
    tail = {id(adapter.final_norm): last, id(head): first if tied else last}
    out: dict[str, str] = {}
    i = 0
    for dev, c in zip(devs, counts, strict=True):
        for _ in range(c):
            out[f"{path}.{i}"] = dev
            i += 1
    # Walk from the root down to the layers' parent: every other child goes to first/last.
    chain = parent_path.split(".") if parent_path else []
    prefix = ""
    module: nn.Module = model
    for depth in range(len(chain) + 1):
        next_name = chain[depth] if depth < len(chain) else list_name
        if any(True for _ in module.parameters(recurse=False)) or any(
                b is not None for b in module._buffers.values()):
            raise ConfigError(f"module {prefix or type(model).__name__!r} holds its own tensors; "
                              "it cannot be split at layer granularity",
                              fix="pass an explicit device_map to place_model")
        for name, child in module.named_children():
            if name == next_name:
                continue
            out[f"{prefix}{name}"] = tail.get(id(child), first)
        if depth < len(chain):
            prefix = f"{prefix}{next_name}."
            module = getattr(module, next_name)
    return out


def _tied_to_input(model: nn.Module, head: nn.Module) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(head, "weight", None)
    return emb is not None and w is not None and w is getattr(emb, "weight", None)


def place_model(
    adapter: ModelAdapter,
    devices: Sequence[str | torch.device] | None = None,
    *,
    device_map: Mapping[str, str | torch.device] | None = None,
    layers_per_device: Sequence[int] | None = None,
    force_hooks: bool = False,
) -> dict[str, str]:
    """Spread ``adapter.model`` over ``devices`` (or an explicit ``device_map``) in place, with
    accelerate's ``dispatch_model``; returns the device map (also kept as ``adapter.device_map``).

    ``devices=None`` uses every visible CUDA device. The adapter keeps working as before:
    ``encode`` puts inputs on the first device, outputs come back there, and captures,
    interventions, generation and decoding from a stored prefill run unchanged.
    ``force_hooks`` attaches the hooks even when every module lands on one device (tests).
    """
    from accelerate import dispatch_model

    if device_map is None:
        if devices is None:
            if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
                raise ConfigError("place_model without devices needs CUDA",
                                  fix="pass devices=[...] or a device_map")
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        dm = layer_device_map(adapter, devices, layers_per_device=layers_per_device)
    else:
        dm = {k: str(torch.device(v)) if not isinstance(v, str) else v for k, v in device_map.items()}
    main = next(iter(dm.values())) if device_map is not None else str(torch.device(list(devices)[0]))
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    if torch.device(main).type == "cpu":  # "offloaded to the cpu": not so, cpu is where they run
        quiet.setLevel(logging.ERROR)
    try:
        dispatch_model(adapter.model, dict(dm), main_device=main, skip_keys=list(SKIP_KEYS),
                       force_hooks=force_hooks)
    finally:
        quiet.setLevel(level)
    # accelerate brings mappings (transformers' ModelOutput) back to the main device but leaves
    # other objects alone; a model returning a plain dataclass (OpenVLAOutput) would hand its
    # logits over on the last device.
    adapter.model.register_forward_hook(_output_to(torch.device(main)))
    adapter.device_map = dict(dm)  # type: ignore[attr-defined]
    return dict(dm)


def move_output(output: Any, device: torch.device) -> Any:
    """``output`` with the tensors of a dataclass output (tuples of tensors too) on ``device``;
    KV-cache fields (``past_key_values``/``cache``) stay where their layers are. Mappings and
    other objects are returned unchanged (accelerate moves mappings itself)."""
    if not dataclasses.is_dataclass(output) or isinstance(output, (type, Mapping)):
        return output
    changes = {}
    for f in dataclasses.fields(output):
        if f.name in SKIP_KEYS:
            continue
        v = getattr(output, f.name)
        if isinstance(v, torch.Tensor) and v.device != device:
            changes[f.name] = v.to(device)
        elif isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
            changes[f.name] = tuple(t.to(device) for t in v)
    return dataclasses.replace(output, **changes) if changes else output


def _output_to(device: torch.device):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return move_output(output, device)

    return hook


def layer_devices(adapter: ModelAdapter) -> list[torch.device]:
    """The device of every decoder layer (of its first parameter)."""
    out = []
    for layer in adapter.layers:
        p = next(layer.parameters(), None)
        out.append(p.device if p is not None else adapter.device)
    return out


def module_device(model: nn.Module, name: str) -> Any:
    """The device of the first parameter of ``model``'s submodule ``name``."""
    p = next(get_submodule(model, name).parameters(), None)
    return None if p is None else p.device


__all__ = ["SKIP_KEYS", "layer_device_map", "layer_devices", "module_device", "move_output", "place_model",
           "split_evenly"]
