"""Interventions as values: what to change in the residual stream, where and when.

``AddDirection`` adds ``alpha * direction`` at chosen layers and token roles; ``AblateDirection``
projects a direction (or a subspace) out of the residual stream and out of what attention and
MLP blocks write into it. An :class:`InterventionPlan` compiles a list of them into per-site
edits. The nnsight path and the fast hook path both call :meth:`InterventionPlan.apply`, so
the arithmetic is shared and the two paths agree exactly.

RDT is ``AddDirection(r, alpha_act, roles=Role.ACTION, phase="decode")``; RDT+ adds
``AddDirection(r, alpha_text, roles=Role.TEXT, phase="prefill")``. :func:`steer` is the one
place that builds them (and the other target modes); :func:`text_alpha` is the one place that
turns a text ratio into ``alpha_text``. Studies name steering through
:class:`rdt_interp.studies.steering.SteeringSpec`, which calls these two.
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


@runtime_checkable
class DirectionLike(Protocol):
    """What carries its tensor as ``.vector``: a :class:`rdt_interp.directions.Direction`.

    Structural, so the tracing core does not import the directions layer built on top of it.
    """

    @property
    def vector(self) -> Tensor: ...


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


def alpha_scale(alpha: float | Tensor, mask: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``alpha`` where ``mask`` (``[batch, seq]``) is set, else 0, in ``dtype`` on ``device``.

    The one computation (and rounding) of an addition's scale: :meth:`AddDirection.apply`,
    :meth:`AddRowDirections.apply` and the fast path's static buffers all call it, so they agree
    bit for bit.
    """
    m = mask.to(dtype)
    if isinstance(alpha, Tensor):
        if alpha.ndim != 1 or alpha.shape[0] != mask.shape[0]:
            raise ConfigError(f"per-row alpha has shape {tuple(alpha.shape)}, batch has {mask.shape[0]} rows")
        return alpha.to(device=device, dtype=dtype)[:, None] * m
    return float(alpha) * m


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

    #: dimensions of ``direction``: ``[d]`` here, ``[batch, d]`` for :class:`AddRowDirections`
    _direction_ndim = 1

    def __post_init__(self) -> None:
        vec = _as_vector(self.direction)
        _check_alpha(self.alpha)
        if vec.ndim != self._direction_ndim:
            raise self._shape_error(vec)
        object.__setattr__(self, "direction", vec)
        object.__setattr__(self, "site", Site.parse(self.site))
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if self.phase not in ("prefill", "decode", "both"):
            raise ConfigError(f"phase must be prefill, decode or both, got {self.phase!r}")

    def _shape_error(self, vec: Tensor) -> ConfigError:
        return ConfigError(
            f"AddDirection needs a 1-D direction, got shape {tuple(vec.shape)}",
            fix="for a rank-k subspace use Direction.steering_vector() (norm-preserving)",
        )

    def sites(self) -> Iterable[tuple[int, Site]]:
        return ((layer, self.site) for layer in self.layers)

    def _check_rows(self, h: Tensor) -> None:
        """Per-row directions must match the batch (nothing to check for one direction)."""

    def _on(self, device: torch.device, dtype: torch.dtype, alpha: float | None = None) -> Tensor:
        """The direction (times ``alpha``, rounded as :func:`alpha_scale` rounds it) on ``device``
        in ``dtype``, copied once per (device, dtype, alpha) rather than at every forward pass;
        an in-place edit of the direction (a new tensor version) invalidates the copies."""
        cache: dict[tuple[object, ...], Tensor] = self.__dict__.setdefault("_copies", {})
        key = (device, dtype, alpha, self.direction._version)
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 8:
                cache.clear()
            hit = self.direction.to(device=device, dtype=dtype)
            if alpha is not None:  # the scale of a one-position mask, times r
                one = torch.ones(1, 1, dtype=torch.bool, device=device)
                hit = alpha_scale(alpha, one, dtype, device)[0, 0] * hit
            cache[key] = hit
        return hit

    def _vector(self, h: Tensor) -> Tensor:
        """The direction, broadcastable against ``h`` ``[batch, seq, d]``."""
        return self._on(h.device, h.dtype)

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        if not _phase_ok(self.phase, ctx):
            return h
        self._check_rows(h)
        mask = role_mask(ctx.roles, self.roles)  # on the host when the caller passed host roles
        if not bool(mask.any()):
            return h
        if (self._direction_ndim == 1 and not isinstance(self.alpha, Tensor) and mask.device.type == "cpu"
                and bool(mask.all())):
            # every position steered (a decode step at action positions): one addition, no mask
            return h + self._on(h.device, h.dtype, float(self.alpha))
        mask = to_device(mask, h.device)  # layers may sit on other devices than the batch
        scale = alpha_scale(self.alpha, mask, h.dtype, h.device)
        return h + scale[:, :, None] * self._vector(h)


@dataclass(frozen=True, eq=False)
class AddRowDirections(AddDirection):
    """Add ``alpha * direction[i]`` to batch row ``i``: one direction per row, ``[batch, d]``.

    Lets one batch carry several directions (e.g. a random-direction null); ``alpha`` is a
    number or one per row, as for :class:`AddDirection` (whose ``apply`` it uses).
    """

    _direction_ndim = 2

    def _shape_error(self, vec: Tensor) -> ConfigError:
        return ConfigError(f"AddRowDirections needs directions [batch, d], got {tuple(vec.shape)}")

    def _check_rows(self, h: Tensor) -> None:
        if self.direction.shape[0] != h.shape[0]:
            raise ConfigError(f"{self.direction.shape[0]} row directions for a batch of {h.shape[0]} rows")

    def _vector(self, h: Tensor) -> Tensor:
        return self._on(h.device, h.dtype)[:, None, :]


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


# -- the steering rule: target modes, alpha_text, RDT / RDT+ -------------------------------------
TargetMode = Literal["action", "text", "text+action", "all"]
TARGET_MODES: tuple[str, ...] = ("action", "text", "text+action", "all")


def text_alpha(alpha: float | Tensor, text_ratio: float) -> float | Tensor:
    """``alpha_text = text_ratio * alpha``: the coefficient at text positions of a text mode.

    The one place the rule is written (configs store ``alpha_text_ratio``).

    Examples
    --------
    >>> text_alpha(4.0, 0.5)
    2.0
    """
    return text_ratio * alpha


def check_mode(mode: str) -> str:
    if mode not in TARGET_MODES:
        raise ConfigError(f"unknown target mode {mode!r}", fix=f"use one of {list(TARGET_MODES)}")
    return mode


def steer(
    direction: Tensor | DirectionLike,
    mode: TargetMode | str,
    alpha: float | Tensor,
    layers: int | Sequence[int],
    *,
    alpha_text: float | Tensor | None = None,
    include_image: bool = False,
    per_row: bool = False,
    d_model: int | None = None,
) -> list[Intervention]:
    """Interventions that add a direction at the positions of a target mode (the one construction
    of RDT and RDT+).

    ``action`` = RDT (``alpha * r`` at action positions in decode steps), ``text+action`` = RDT+
    (plus ``alpha_text * r`` at text, optionally image, positions in the prefill), ``text``
    (prefill only) and ``all`` (every real position, both phases).

    ``direction``: a tensor ``[d]`` or a :class:`~rdt_interp.directions.direction.Direction`
    (a rank-k one adds its norm-safe ``vector``); with ``per_row`` a tensor ``[batch, d]``, one
    direction per row. ``alpha`` (action and ``all`` positions) and ``alpha_text`` (text
    positions; default ``alpha``) are numbers or one number per row. ``include_image`` adds
    ``alpha_text * r`` at the image patches too. With ``d_model`` the width is checked now
    (:class:`DModelMismatchError`), not at the first run.

    Examples
    --------
    >>> ivs = steer(torch.ones(4), "text+action", 2.0, [1], alpha_text=1.0)
    >>> [(iv.phase, iv.alpha) for iv in ivs]
    [('prefill', 1.0), ('decode', 2.0)]
    """
    check_mode(mode)
    vec = _as_vector(direction)
    if vec.ndim != (2 if per_row else 1):
        raise ConfigError(
            f"direction of shape {tuple(vec.shape)} with per_row={per_row}",
            fix="pass [d] (or a Direction), or [batch, d] with per_row=True; for a rank-k "
            "subspace use its Direction (whose vector is the norm-safe steering vector)")
    if d_model is not None and vec.shape[-1] != d_model:
        raise DModelMismatchError(expected=d_model, actual=int(vec.shape[-1]))
    cls = AddRowDirections if per_row else AddDirection
    a_text = alpha if alpha_text is None else alpha_text
    text_roles = Role.TEXT | Role.IMAGE if include_image else Role.TEXT
    out: list[Intervention] = []
    if mode == "all":
        return [cls(vec, alpha, layers, roles=ANY_REAL, phase="both")]
    if mode in ("text", "text+action"):
        out.append(cls(vec, a_text, layers, roles=text_roles, phase="prefill"))
    if mode in ("action", "text+action"):
        out.append(cls(vec, alpha, layers, roles=Role.ACTION, phase="decode"))
    return out


def rdt(direction: Tensor | DirectionLike, alpha_act: float, layers: int | Sequence[int]) -> list[Intervention]:
    """RDT: add ``alpha_act * r`` at action positions during decoding (:func:`steer`, mode ``action``)."""
    return steer(direction, "action", alpha_act, layers)


def rdt_plus(
    direction: Tensor | DirectionLike,
    alpha_act: float,
    alpha_text: float,
    layers: int | Sequence[int],
    *,
    include_image: bool = False,
) -> list[Intervention]:
    """RDT+: RDT plus ``alpha_text * r`` at text (and optionally image) positions in prefill
    (:func:`steer`, mode ``text+action``).

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
    text, act = steer(direction, "text+action", alpha_act, layers, alpha_text=alpha_text,
                      include_image=include_image)
    return [act, text]
