"""Random weights built directly on the target device (no CPU initialisation).

Latency and memory do not depend on weight values, so benchmarks at 7B scale use random
weights. Building a 7B model the usual way runs a slow CPU initialisation; here parameters are
created on the meta device, given uninitialised storage on the target device, and filled with
cheap N(0, std) values there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init cost); buffers stay real.

    Buffers (rotary ``inv_freq``, position ids) are computed in constructors and are not in
    checkpoints, so they keep their values; only parameters are deferred.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialize_(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Give every meta parameter uninitialised storage on ``device`` (tied parameters stay tied)."""
    device = torch.device(device)
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                dt = dtype if p.is_floating_point() else p.dtype
                made[id(p)] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dt),
                                           requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


@torch.no_grad()
def fill_random_(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Cheap random weights in place: N(0, std) matrices/embeddings, unit gains, zero biases."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)  # norm gains and LayerScale
        else:
            p.normal_(0.0, std, generator=gen)


def build_random(factory: Callable[[], M], *, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0, std: float = 0.02) -> M:
    """``factory()`` built on ``device`` in ``dtype`` with random weights, without CPU init
    (on the ``meta`` device: parameters without storage or values)."""
    with parameters_on_meta():
        model = factory()
    if torch.device(device).type == "meta":  # structure only: a real-scale dry run costs no memory
        return model.to(dtype=dtype).eval()
    materialize_(model, device, dtype)
    fill_random_(model, seed, std)
    return model.eval()
