"""Steering as one serializable value: :class:`SteeringSpec`.

A spec names how a direction is applied -- target mode (RDT = ``action``, RDT+ =
``text+action``), ``alpha``, the text ratio, the layers, whether the image patches are steered --
and, once a direction is attached, where that direction came from. It turns a direction into
interventions through :func:`rdt_interp.tracing.interventions.steer` and computes ``alpha_text``
through :func:`~rdt_interp.tracing.interventions.text_alpha`: the studies hold no other copy of
either rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rdt_interp.directions.direction import Direction
from rdt_interp.errors import ConfigError
from rdt_interp.storage import digest_tensor
from rdt_interp.tracing.interventions import TARGET_MODES, Intervention, steer, text_alpha

#: short names a config may use for the two methods of the paper
MODE_ALIASES = {"rdt": "action", "rdt_plus": "text+action", "rdt+": "text+action"}


def direction_info(direction: Direction) -> dict[str, Any]:
    """What a run records about a direction: repr, norm, rank, digest and provenance."""
    return {"repr": repr(direction), "norm": direction.norm, "rank": direction.rank,
            "digest": digest_tensor(direction.vector)[:16], "provenance": direction.provenance.to_dict()}


@dataclass(frozen=True)
class SteeringSpec:
    """How to steer with a direction: target mode, ``alpha``, text ratio, layers.

    Parameters
    ----------
    mode
        ``"action"`` (RDT: ``alpha * r`` at action tokens, decode steps), ``"text+action"`` (RDT+:
        plus ``alpha_text * r`` at the text tokens of the prefill), ``"text"``, ``"all"``, or an
        alias: ``"rdt"``, ``"rdt_plus"`` / ``"rdt+"``.
    alpha
        The coefficient at action (and ``all``) positions.
    layers
        Decoder layers the direction is added at (block input).
    text_ratio
        ``alpha_text = text_ratio * alpha`` (:attr:`alpha_text`).
    include_image
        Text modes also steer the image patches.
    direction
        Provenance of the direction this spec is meant for (:meth:`for_direction` fills it):
        digest, norm, rank, source model, layer, position. Travels with :meth:`to_dict`.

    Examples
    --------
    >>> import torch
    >>> spec = SteeringSpec("rdt_plus", alpha=4.0, layers=(1,), text_ratio=0.5)
    >>> spec.mode, spec.alpha_text
    ('text+action', 2.0)
    >>> [iv.phase for iv in spec.interventions(torch.ones(8))]
    ['prefill', 'decode']
    >>> SteeringSpec.from_dict(spec.to_dict()) == spec
    True
    """

    mode: str
    alpha: float
    layers: tuple[int, ...]
    text_ratio: float = 1.0
    include_image: bool = False
    direction: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        mode = MODE_ALIASES.get(self.mode, self.mode)
        if mode not in TARGET_MODES:
            raise ConfigError(f"unknown target mode {self.mode!r}",
                              fix=f"use one of {list(TARGET_MODES)} (or {sorted(MODE_ALIASES)})")
        object.__setattr__(self, "mode", mode)
        for name in ("alpha", "text_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"SteeringSpec.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(x) for x in self.layers)
        if not layers:
            raise ConfigError("SteeringSpec.layers is empty", fix="name at least one decoder layer")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "include_image", bool(self.include_image))

    @property
    def alpha_text(self) -> float:
        """The coefficient at text positions: ``text_ratio * alpha``."""
        return float(text_alpha(self.alpha, self.text_ratio))

    @property
    def touches_prefill(self) -> bool:
        """Whether the spec edits the prompt's forward pass (then a stored prefill cannot be reused)."""
        return self.mode != "action"

    def at(self, alpha: float) -> SteeringSpec:
        """The same spec at another ``alpha`` (the text ratio is kept)."""
        return dataclasses.replace(self, alpha=alpha)

    def for_direction(self, direction: Direction) -> SteeringSpec:
        """The spec with ``direction``'s provenance attached (what :meth:`to_dict` records)."""
        return dataclasses.replace(self, direction=direction_info(direction))

    def interventions(
        self, direction: Direction | Tensor, *, per_row: bool = False, d_model: int | None = None,
    ) -> list[Intervention]:
        """The interventions that apply this spec with ``direction`` (``[d]``, a
        :class:`Direction`, or ``[batch, d]`` with ``per_row``)."""
        return steer(direction, self.mode, self.alpha, self.layers, alpha_text=self.alpha_text,
                     include_image=self.include_image, per_row=per_row, d_model=d_model)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "SteeringSpec", "mode": self.mode, "alpha": self.alpha, "layers": list(self.layers),
                "text_ratio": self.text_ratio, "include_image": self.include_image,
                "direction": dict(self.direction) if self.direction is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SteeringSpec:
        known = {"kind", "mode", "alpha", "layers", "text_ratio", "include_image", "direction"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown SteeringSpec fields {unknown}", fix=f"use {sorted(known - {'kind'})}")
        if "mode" not in d or "alpha" not in d or "layers" not in d:
            raise ConfigError("a SteeringSpec needs mode, alpha and layers")
        for name in ("alpha", "text_ratio"):
            value = d.get(name, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"SteeringSpec.{name} must be a number, got {type(value).__name__} {value!r}",
                                  fix=f"write {name} = 2.0, not a string")
        return cls(str(d["mode"]), d["alpha"], tuple(d["layers"]), d.get("text_ratio", 1.0),
                   bool(d.get("include_image", False)), d.get("direction"))


def steering_specs(modes: Sequence[str], alphas: Sequence[float], layers: Sequence[int], *,
                   text_ratio: float = 1.0, include_image: bool = False) -> list[SteeringSpec]:
    """One spec per (mode, alpha), modes outer (the order of a sweep)."""
    return [SteeringSpec(m, float(a), tuple(layers), text_ratio, include_image) for m in modes for a in alphas]


__all__ = ["MODE_ALIASES", "SteeringSpec", "direction_info", "steering_specs"]
