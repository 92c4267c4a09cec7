"""Interventions as static buffers: the *structure* is fixed when a step is captured, the
*values* (direction, alpha, which positions) are copied into buffers before every call.

A :class:`SteeringLayout` is what a captured step depends on: which ``(layer, site)`` gets how
many additions, in the order :class:`~rdt_interp.tracing.interventions.InterventionPlan` applies
them. Its ``key`` ignores directions and alphas, so changing them reuses the captured graphs;
:class:`SteeringBuffers` holds the values (direction, alpha per row, role flags) and turns them
into additions on the device, inside the captured prefill step:

* decode: one ``[max_batch, 1, d]`` buffer per addition, holding exactly what
  :meth:`AddDirection.apply` adds at an action step (``alpha * r``, rounded as the eager path
  rounds it), written once per call by the prefill step;
* prefill: a ``[batch, seq]`` scale (``alpha`` at positions whose role matches, 0 elsewhere,
  padding included) and the ``[d]`` direction; the step adds ``scale * r``.

The host's work per call is the few scalar fills of :meth:`SteeringBuffers.fill`; no mask is built
on the host and nothing is copied while the values stay the same (measured in
docs/benchmarks.md: the steering cost of the fast path).
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
    """Static tensors for one layout; captured steps read them, :meth:`fill` rewrites them.

    Per addition the buffers hold the *values* only: the direction ``[d]`` and ``alpha`` per row
    ``[max_batch]``, both in the model's dtype (rounded as :meth:`AddDirection.apply` rounds
    them), and for prefill additions the role flags to match. Everything positional is computed
    on the device inside the captured prefill step (:meth:`compute`), from the roles the engine
    stages with the batch, so a call costs the host one ``fill_`` per alpha and nothing else
    while the directions stay the same tensors (a changed or new direction is one copy).
    """

    def __init__(
        self, layout: SteeringLayout, *, max_batch: int, max_len: int, d_model: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.layout = layout
        self.max_batch = max_batch
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        slots = layout.decode + layout.prefill
        self.vec = [torch.zeros(d_model, dtype=dtype, device=device) for _ in slots]
        self.alpha = [torch.zeros(max_batch, dtype=dtype, device=device) for _ in slots]
        long0 = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.role_bits = [long0() for _ in layout.prefill]  # positions carrying any of these flags
        self.pad_bits = [long0() for _ in layout.prefill]  # ... and none of these (PAD, unless asked)
        self.decode_add = [torch.zeros(max_batch, 1, d_model, dtype=dtype, device=device) for _ in layout.decode]
        # what the buffers hold now, per slot: (direction kept alive, its pointer, its version),
        # the scalar alpha (None after a per-row one), and per prefill slot the role flags
        self._held_vec: list[tuple[Tensor, int, int] | None] = [None] * len(slots)
        self._held_alpha: list[float | None] = [None] * len(slots)
        self._held_role: list[int | None] = [None] * len(layout.prefill)

    # -- host side: values -------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, interventions: Sequence[AddDirection], rows: int, layout: SteeringLayout | None = None) -> None:
        """Write the values of ``interventions`` for a batch of ``rows`` rows.

        ``layout`` is the layout of this list (default: the one the buffers were made for). A list
        with the same key may give its edits in another order; buffer ``k`` then takes the edit
        that the list's own layout puts in place ``k``, which is where its captured step applies it.
        Copies only what changed since the last call: a direction is the same if it is the same
        storage at the same version (an in-place edit bumps the version), an alpha if it is the
        same number.
        """
        lay = self.layout if layout is None else layout
        if lay.key != self.layout.key:
            raise ConfigError("the interventions' layout differs from the buffers'")
        if rows > self.max_batch:
            raise ConfigError(f"batch of {rows} rows exceeds the buffers ({self.max_batch})")
        for i, slot in enumerate(lay.decode + lay.prefill):
            iv = interventions[slot.index]
            self._set_vector(i, iv.direction)
            self._set_alpha(i, iv.alpha, rows)
        for j, slot in enumerate(lay.prefill):
            role = int(interventions[slot.index].roles)
            if self._held_role[j] != role:
                self.role_bits[j].fill_(role)
                self.pad_bits[j].fill_(0 if role & Role.PAD else int(Role.PAD))
                self._held_role[j] = role

    def _set_vector(self, i: int, direction: Tensor) -> None:
        held = self._held_vec[i]
        if (held is not None and held[0] is direction and held[1] == direction.data_ptr()
                and held[2] == direction._version):
            return
        self.vec[i].copy_(direction)  # the dtype cast rounds as direction.to(dtype) does
        # holding the tensor keeps its storage (and pointer) from being reused by another one
        self._held_vec[i] = (direction, direction.data_ptr(), direction._version)

    def _set_alpha(self, i: int, alpha: float | Tensor, rows: int) -> None:
        if isinstance(alpha, Tensor):
            if alpha.ndim != 1 or alpha.shape[0] != rows:
                raise ConfigError(f"per-row alpha has shape {tuple(alpha.shape)}, batch has {rows} rows")
            self.alpha[i][:rows].copy_(alpha.to(self.dtype))  # rounded as apply() rounds it
            self._held_alpha[i] = None
            return
        if self._held_alpha[i] != float(alpha):
            self.alpha[i].fill_(float(alpha))
            self._held_alpha[i] = float(alpha)

    # -- device side: inside the captured steps ------------------------------------------------------
    def compute(
        self, batch: int, roles: Int[Tensor, "batch seq"]
    ) -> dict[tuple[int, Site], list[tuple[Tensor, Tensor]]]:
        """Run inside the prefill step: write the decode additions (``alpha * r`` per row, what
        :meth:`AddDirection.apply` adds at an action step) and return, per ``(layer, site)``,
        the ``(scale [batch, seq], direction [d])`` pairs of the prefill additions, where
        ``scale`` is ``alpha`` at positions whose role matches and 0 elsewhere (padding too)."""
        for i, buf in enumerate(self.decode_add):
            buf[:batch].copy_(self.alpha[i][:batch, None, None] * self.vec[i])
        out: dict[tuple[int, Site], list[tuple[Tensor, Tensor]]] = {}
        off = len(self.layout.decode)
        for j, slot in enumerate(self.layout.prefill):
            mask = ((roles & self.role_bits[j]) != 0) & ((roles & self.pad_bits[j]) == 0)
            scale = self.alpha[off + j][:batch, None] * mask.to(self.dtype)
            out.setdefault((slot.layer, slot.site), []).append((scale, self.vec[off + j]))
        return out

    def decode_sites(self, batch: int) -> dict[tuple[int, Site], list[Tensor]]:
        """Per ``(layer, site)``, the additions of a decode step (views of the buffers)."""
        out: dict[tuple[int, Site], list[Tensor]] = {}
        for slot, buf in zip(self.layout.decode, self.decode_add, strict=True):
            out.setdefault((slot.layer, slot.site), []).append(buf[:batch])
        return out
