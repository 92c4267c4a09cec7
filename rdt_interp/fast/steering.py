"""Interventions as static buffers: the *structure* is fixed when a step is captured, the
*values* (direction, alpha, which positions) are copied into buffers before every call.

A :class:`SteeringLayout` is what a captured step depends on: which ``(layer, site)`` gets how
many additions, in the order :class:`~rdt_interp.tracing.interventions.InterventionPlan` applies
them. Its ``key`` ignores directions and alphas, so changing them reuses the captured graphs;
:class:`SteeringBuffers` holds the values:

* decode: one ``[max_batch, 1, d]`` buffer per addition, holding exactly what
  :meth:`AddDirection.apply` adds at an action step (``alpha * r``, rounded as the eager path
  rounds it);
* prefill: a ``[max_batch, max_len]`` scale (``alpha`` at positions whose role matches, 0
  elsewhere, padding included) and the ``[d]`` direction; the step adds ``scale * r``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from rdt_interp.errors import ConfigError
from rdt_interp.roles import Role, role_mask
from rdt_interp.tracing.interventions import (
    SITE_ORDER,
    AddDirection,
    InterventionPlan,
    Site,
    StepContext,
    alpha_scale,
)

PhaseName = Literal["prefill", "decode"]


@dataclass(frozen=True)
class Slot:
    """One addition: intervention ``index`` (in the list given) at ``(layer, site)``."""

    layer: int
    site: Site
    index: int


@dataclass(frozen=True)
class SteeringLayout:
    """Which additions happen where, per phase (values excluded)."""

    decode: tuple[Slot, ...]
    prefill: tuple[Slot, ...]

    @classmethod
    def of(
        cls, interventions: Sequence[object], *, n_layers: int, d_model: int, generated_role: Role
    ) -> SteeringLayout:
        ivs = list(interventions)
        for iv in ivs:
            if not isinstance(iv, AddDirection):
                raise ConfigError(
                    f"the fast path applies AddDirection (RDT / RDT+) only, got {type(iv).__name__}",
                    fix="run ablations and other edits on the eager path "
                    "(rdt_interp.tracing.generate / VLAAdapter.predict_actions)",
                )
        InterventionPlan(ivs, n_layers, d_model)  # validates widths and layer ranges
        gen = torch.tensor([[int(generated_role)]])
        decode: list[Slot] = []
        prefill: list[Slot] = []
        for i, iv in enumerate(ivs):
            for layer, site in iv.sites():
                if iv.phase in ("decode", "both") and bool(role_mask(gen, iv.roles).any()):
                    decode.append(Slot(layer, site, i))
                if iv.phase in ("prefill", "both"):
                    prefill.append(Slot(layer, site, i))
        # InterventionPlan applies per (layer, site) in execution order, and within one site in
        # the order the interventions were given: a stable sort keeps the latter.
        order = lambda s: (s.layer, SITE_ORDER[s.site])  # noqa: E731
        return cls(tuple(sorted(decode, key=order)), tuple(sorted(prefill, key=order)))

    @staticmethod
    def _key(slots: tuple[Slot, ...]) -> tuple[tuple[int, str], ...]:
        return tuple((s.layer, s.site.value) for s in slots)

    @property
    def decode_key(self) -> tuple[tuple[int, str], ...]:
        return self._key(self.decode)

    @property
    def prefill_key(self) -> tuple[tuple[int, str], ...]:
        return self._key(self.prefill)

    @property
    def key(self) -> tuple[tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]:
        return self.decode_key, self.prefill_key


class SteeringBuffers:
    """Static tensors for one layout; captured steps read them, :meth:`fill` rewrites them."""

    def __init__(
        self, layout: SteeringLayout, *, max_batch: int, max_len: int, d_model: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.layout = layout
        self.max_batch = max_batch
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.decode_add = [torch.zeros(max_batch, 1, d_model, dtype=dtype, device=device) for _ in layout.decode]
        self.prefill_scale = [torch.zeros(max_batch, max_len, dtype=dtype, device=device) for _ in layout.prefill]
        self.prefill_vec = [torch.zeros(d_model, dtype=dtype, device=device) for _ in layout.prefill]

    def decode_sites(self, batch: int) -> dict[tuple[int, Site], list[Tensor]]:
        """Per ``(layer, site)``, the additions of a decode step (views of the buffers)."""
        out: dict[tuple[int, Site], list[Tensor]] = {}
        for slot, buf in zip(self.layout.decode, self.decode_add, strict=True):
            out.setdefault((slot.layer, slot.site), []).append(buf[:batch])
        return out

    def prefill_sites(self, batch: int, length: int) -> dict[tuple[int, Site], list[tuple[Tensor, Tensor]]]:
        """Per ``(layer, site)``, the ``(scale, direction)`` pairs of a prefill of ``length``."""
        out: dict[tuple[int, Site], list[tuple[Tensor, Tensor]]] = {}
        for slot, scale, vec in zip(self.layout.prefill, self.prefill_scale, self.prefill_vec, strict=True):
            out.setdefault((slot.layer, slot.site), []).append((scale[:batch, :length], vec))
        return out

    @torch.no_grad()
    def fill(
        self,
        interventions: Sequence[AddDirection],
        prefill_roles: Int[Tensor, "batch seq"],
        generated_role: Role,
    ) -> None:
        """Write the values of ``interventions`` (same layout) for a batch whose (padded)
        prefill positions have ``prefill_roles``."""
        if not self.layout.decode and not self.layout.prefill:
            return
        b, n = prefill_roles.shape
        if b > self.max_batch or n > self.max_len:
            raise ConfigError(f"batch {b} x {n} positions exceeds the buffers ({self.max_batch} x {self.max_len})")
        gen = torch.full((b, 1), int(generated_role), dtype=torch.long, device=self.device)
        zero = torch.zeros(b, 1, self.decode_add[0].shape[-1] if self.decode_add else 1,
                           dtype=self.dtype, device=self.device)
        ctx = StepContext("decode", gen, 1)
        for slot, buf in zip(self.layout.decode, self.decode_add, strict=True):
            # exactly what the eager hook adds at an action step: apply() to zeros
            buf[:b].copy_(interventions[slot.index].apply(zero, ctx))
        for slot, scale, vec in zip(self.layout.prefill, self.prefill_scale, self.prefill_vec, strict=True):
            iv = interventions[slot.index]
            scale[:b, :n].copy_(prefill_scale(iv, prefill_roles, self.dtype))
            vec.copy_(iv.direction.to(device=self.device, dtype=self.dtype))


def prefill_scale(iv: AddDirection, roles: Int[Tensor, "batch seq"], dtype: torch.dtype) -> Tensor:
    """``alpha`` where ``roles`` match ``iv.roles``, else 0, computed (and rounded) as
    :meth:`AddDirection.apply` computes its scale (:func:`alpha_scale`); ``[batch, seq]`` in ``dtype``."""
    return alpha_scale(iv.alpha, role_mask(roles, iv.roles), dtype, roles.device)
