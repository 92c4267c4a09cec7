"""Recording residual-stream values at chosen layers and positions during forward passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp.models.adapter import to_device
from rdt_interp.roles import Selector, gather_positions
from rdt_interp.tracing.interventions import Site, StepContext


@dataclass
class Recorder:
    """Collects ``site`` values at ``layers``; positions by ``selector`` in prefill, every decode
    position otherwise. Values are stored as float32 on ``device`` (``None``: where they were
    computed, so recording adds no device-to-host synchronisation inside the forward pass).
    """

    layers: Sequence[int]
    site: Site | str = Site.RESID_PRE
    selector: Selector | str | None = None
    phases: tuple[str, ...] = ("prefill",)
    device: torch.device | str | None = "cpu"
    prefill: dict[int, Tensor] = field(default_factory=dict)
    decode: dict[int, list[Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        self.site = Site.parse(self.site)
        if self.selector is not None:
            self.selector = Selector.parse(self.selector)
        self._idx: tuple[object, Tensor, Tensor] | None = None

    def sites(self) -> list[tuple[int, Site]]:
        return [(layer, self.site) for layer in self.layers]

    def wants(self, ctx: StepContext) -> bool:
        return ctx.phase in self.phases

    def record(self, h: Float[Tensor, "batch seq d"], layer: int, ctx: StepContext) -> None:
        if ctx.phase == "prefill":
            if self.selector is None:
                picked = h
            else:
                # Resolved once per forward pass (on the host roles) and per device: layers may
                # sit on several devices.
                key = (id(ctx.roles), h.device)
                if self._idx is None or self._idx[0] != key:
                    idx, w = self.selector.resolve(ctx.roles)
                    self._idx = (key, to_device(idx, h.device), to_device(w, h.device))
                _, idx, w = self._idx
                picked = gather_positions(h, idx, w, self.selector.pool)
            self.prefill[layer] = picked.detach().to(self.device or picked.device, torch.float32)
        else:
            self.decode.setdefault(layer, []).append(h[:, -1:].detach().to(self.device or h.device, torch.float32))

    def reset(self) -> None:
        self.prefill.clear()
        self.decode.clear()
        self._idx = None

    def prefill_tensor(self) -> Float[Tensor, "batch layer pos d"]:
        first = self.prefill[self.layers[0]].device  # layers may sit on several devices
        return torch.stack([self.prefill[layer].to(first) for layer in self.layers], dim=1)

    def decode_tensor(self) -> Float[Tensor, "batch layer step d"]:
        return torch.stack([torch.cat(self.decode[layer], dim=1) for layer in self.layers], dim=1)
