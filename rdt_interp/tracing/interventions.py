"""Interventions as values: what to change in the residual stream, where and when.

``AddDirection`` adds ``alpha * direction`` at chosen layers and token roles; ``AblateDirection``
projects a direction (or a subspace) out of the residual stream and out of what attention and
MLP blocks write into it. An :class:`InterventionPlan` compiles a list of them into per-site
edits. The nnsight path and the fast hook path both call :meth:`InterventionPlan.apply`, so
the arithmetic is shared and the two paths agree exactly.

RDT is ``AddDirection(r, alpha_act, roles=Role.ACTION, phase="decode")``; RDT+ adds
``AddDirection(r, alpha_text, roles=Role.TEXT, phase="prefill")``.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.models.adapter import to_device
from rdt_interp.roles import ANY_REAL, Role, role_mask

Phase = Literal["prefill", "decode", "both"]


@runtime_checkable
class DirectionLike(Protocol):
    """What carries its tensor as ``.vector``: a :class:`rdt_interp.directions.Direction`.

    Structural, so the tracing core does not import the directions layer built on top of it.
    """

    @property
    def vector(self) -> Tensor: ...


class Site(enum.StrEnum):
    """Points in a decoder layer, listed in execution order."""

    RESID_PRE = "resid_pre"  # input of the decoder layer
    ATTN_OUT = "attn_out"  # what attention writes into the residual stream
    MLP_OUT = "mlp_out"  # what the MLP writes into the residual stream
    RESID_POST = "resid_post"  # output of the decoder layer

    @classmethod
    def parse(cls, value: str | Site) -> Site:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown residual point {value!r}",
                              fix=f"use one of {[s.value for s in cls]}") from None


SITE_ORDER = {s: i for i, s in enumerate(Site)}


@dataclass(frozen=True)
class StepContext:
    """What the current forward pass is: prefill or a decode step, and the role of each position.

    Pass the roles on the host (``EncodedBatch.roles`` always are): edits and recorders resolve
    their positions there and never make the host wait for the accelerator.
    """

    phase: Literal["prefill", "decode"]
    roles: Int[Tensor, "batch seq"]
    step: int = 0


def _as_vector(direction: Tensor | DirectionLike) -> Tensor:
    """The direction's tensor; NaN/inf is refused here, since it would steer silently into
    garbage tokens (a :class:`Direction` checks this too, a raw tensor did not)."""
    vec = getattr(direction, "vector", direction)
    if not isinstance(vec, Tensor):
        raise ConfigError(f"direction must be a tensor or a Direction, got {type(direction).__name__}")
    vec = vec.detach()
    if vec.is_floating_point() and not bool(torch.isfinite(vec).all()):
        bad = int((~torch.isfinite(vec)).sum())
        raise ConfigError(f"direction has {bad} NaN/inf entries (shape {tuple(vec.shape)})",
                          fix="check how it was computed (e.g. a mean over zero rows, or a "
                          "division by a zero norm)")
    return vec


def _check_alpha(alpha: float | Tensor) -> None:
    """``alpha`` is a finite real number or a 1-D tensor of them (a string is not coerced)."""
    if isinstance(alpha, Tensor):
        if alpha.is_floating_point() and not bool(torch.isfinite(alpha).all()):
            raise ConfigError("alpha has NaN/inf entries")
        return
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"alpha must be a number or a 1-D tensor, got {type(alpha).__name__} {alpha!r}")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be finite, got {alpha}")


def _phase_ok(phase: Phase, ctx: StepContext) -> bool:
    return phase == "both" or phase == ctx.phase


@dataclass(frozen=True, eq=False)
class AddDirection:
    """Add ``alpha * direction`` at ``layers`` (block input by default) at positions of ``roles``.

    ``alpha`` is a number, or one number per batch row (a 1-D tensor) for per-row steering.
    """

    direction: Tensor | DirectionLike
    alpha: float | Tensor
    layers: int | Sequence[int]
    roles: Role = ANY_REAL
    phase: Phase = "both"
    site: Site | str = Site.RESID_PRE

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", _as_vector(self.direction))
        _check_alpha(self.alpha)
        object.__setattr__(self, "site", Site.parse(self.site))
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if self.direction.ndim != 1:
            raise ConfigError(
                f"AddDirection needs a 1-D direction, got shape {tuple(self.direction.shape)}",
                fix="for a rank-k subspace use Direction.steering_vector() (norm-preserving)",
            )
        if self.phase not in ("prefill", "decode", "both"):
            raise ConfigError(f"phase must be prefill, decode or both, got {self.phase!r}")

    def sites(self) -> Iterable[tuple[int, Site]]:
        return ((layer, self.site) for layer in self.layers)

    def _on(self, device: torch.device, dtype: torch.dtype, alpha: float | None = None) -> Tensor:
        """The direction (times ``alpha``, rounded as ``apply`` rounds it) on ``device`` in
        ``dtype``, copied once per (device, dtype, alpha) rather than at every forward pass; an
        in-place edit of the direction (a new tensor version) invalidates the copies."""
        cache: dict[tuple[object, ...], Tensor] = self.__dict__.setdefault("_copies", {})
        key = (device, dtype, alpha, self.direction._version)
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 8:
                cache.clear()
            hit = self.direction.to(device=device, dtype=dtype)
            if alpha is not None:  # bf16(alpha) * r: what a mask of ones gives below
                hit = torch.tensor(alpha, dtype=torch.float32).to(device=device, dtype=dtype) * hit
            cache[key] = hit
        return hit

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        if not _phase_ok(self.phase, ctx):
            return h
        mask = role_mask(ctx.roles, self.roles)  # on the host when the caller passed host roles
        if not bool(mask.any()):
            return h
        alpha = self.alpha
        if not isinstance(alpha, Tensor) and mask.device.type == "cpu" and bool(mask.all()):
            # every position steered (a decode step at action positions): one addition, no mask
            return h + self._on(h.device, h.dtype, float(alpha))
        mask = to_device(mask, h.device)  # layers may sit on other devices than the batch
        vec = self._on(h.device, h.dtype)
        if isinstance(alpha, Tensor):
            if alpha.ndim != 1 or alpha.shape[0] != h.shape[0]:
                raise ConfigError(
                    f"per-row alpha has shape {tuple(alpha.shape)}, batch has {h.shape[0]} rows")
            scale = alpha.to(device=h.device, dtype=h.dtype)[:, None] * mask.to(h.dtype)
        else:
            scale = float(alpha) * mask.to(h.dtype)
        return h + scale[:, :, None] * vec


@dataclass(frozen=True, eq=False)
class AblateDirection:
    """Project ``direction`` (``[d]``, or an orthonormal basis ``[k, d]``) out of the residual stream.

    Arditi et al.'s directional ablation: at every layer, from the block input and from the
    attention and MLP outputs, at all positions, in prefill and decode.
    """

    direction: Tensor | DirectionLike
    layers: Sequence[int] | None = None  # None: every layer
    sites: tuple[Site, ...] = (Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT)
    phase: Phase = "both"
    basis: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        vec = _as_vector(self.direction).to(torch.float64)
        basis = vec[None, :] if vec.ndim == 1 else vec
        if basis.ndim != 2:
            raise ConfigError(f"AblateDirection needs [d] or [k, d], got {tuple(vec.shape)}")
        if bool((basis.norm(dim=-1) == 0).any()):
            raise ConfigError("AblateDirection got a zero vector", fix="check the direction's norm")
        # Orthonormalise once (QR), so a raw diff-in-means vector or a non-orthogonal set works.
        q, _ = torch.linalg.qr(basis.T)
        object.__setattr__(self, "basis", q.T.contiguous())
        object.__setattr__(self, "sites", tuple(Site.parse(s) for s in self.sites))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    def all_sites(self, n_layers: int) -> Iterable[tuple[int, Site]]:
        layers = range(n_layers) if self.layers is None else self.layers
        return ((layer, s) for layer in layers for s in self.sites)

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        if not _phase_ok(self.phase, ctx):
            return h
        q = self.basis.to(device=h.device, dtype=h.dtype)
        return h - (h @ q.T) @ q


Intervention = AddDirection | AblateDirection


class InterventionPlan:
    """Interventions compiled into ordered edits per ``(layer, site)``."""

    def __init__(self, interventions: Sequence[Intervention], n_layers: int, d_model: int) -> None:
        self.interventions = tuple(interventions)
        self.n_layers = n_layers
        self.edits: dict[tuple[int, Site], list[Intervention]] = {}
        for iv in self.interventions:
            width = iv.direction.shape[-1]
            if width != d_model:
                raise DModelMismatchError(expected=d_model, actual=int(width))
            sites = iv.all_sites(n_layers) if isinstance(iv, AblateDirection) else iv.sites()
            for layer, site in sites:
                if not 0 <= layer < n_layers:
                    raise ConfigError(f"layer {layer} out of range for a model with {n_layers} layers")
                self.edits.setdefault((layer, site), []).append(iv)

    def __bool__(self) -> bool:
        return bool(self.edits)

    def sites(self) -> list[tuple[int, Site]]:
        return sorted(self.edits, key=lambda ls: (ls[0], SITE_ORDER[ls[1]]))

    def apply(self, h: Float[Tensor, "batch seq d"], layer: int, site: Site, ctx: StepContext) -> Tensor:
        for iv in self.edits.get((layer, site), ()):
            h = iv.apply(h, ctx)
        return h


def rdt(direction: Tensor | DirectionLike, alpha_act: float, layers: int | Sequence[int]) -> list[Intervention]:
    """RDT: add ``alpha_act * r`` at action positions during decoding."""
    return [AddDirection(direction, alpha_act, layers, roles=Role.ACTION, phase="decode")]


def rdt_plus(
    direction: Tensor | DirectionLike,
    alpha_act: float,
    alpha_text: float,
    layers: int | Sequence[int],
    *,
    include_image: bool = False,
) -> list[Intervention]:
    """RDT+: RDT plus ``alpha_text * r`` at text (and optionally image) positions in prefill.

    Parameters
    ----------
    direction
        ``[d_model]`` tensor or a :class:`~rdt_interp.directions.Direction` (NaN/inf refused).
    alpha_act, alpha_text
        Scales at the generated action tokens (decode) and at the prompt's text (prefill).
    layers
        Decoder layers to steer (their input, ``resid_pre``).
    include_image
        Steer the image-patch positions in prefill too.

    Returns
    -------
    list of Intervention
        The decode-phase RDT edit, then the prefill-phase text edit.

    Examples
    --------
    >>> import torch
    >>> edits = rdt_plus(torch.ones(8), alpha_act=4.0, alpha_text=2.0, layers=[3, 5])
    >>> [(e.alpha, e.phase, e.layers) for e in edits]
    [(4.0, 'decode', (3, 5)), (2.0, 'prefill', (3, 5))]
    """
    text_roles = Role.TEXT | Role.IMAGE if include_image else Role.TEXT
    return rdt(direction, alpha_act, layers) + [
        AddDirection(direction, alpha_text, layers, roles=text_roles, phase="prefill")
    ]
