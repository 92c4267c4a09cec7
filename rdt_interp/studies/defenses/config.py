"""The defense comparison's settings: :class:`DefensesConfig` and the names of the defenses."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rdt_interp.defenses.prompting import DEFAULT_DEFENSE_TEXT, POSITIONS, DefensivePrompt
from rdt_interp.errors import ConfigError
from rdt_interp.schema import from_stored
from rdt_interp.studies.steering import SteeringSpec
from rdt_interp.studies.vla.config import VLARDTConfig

DEFENSES: tuple[str, ...] = ("none", "adashield", "vlm_guard", "vlm_guard_clamp", "rdt", "rdt+", "gated_rdt+")
STEERED: tuple[str, ...] = ("rdt", "rdt+", "gated_rdt+")
NEEDS_SUBSPACE: tuple[str, ...] = ("vlm_guard", "vlm_guard_clamp")
DEFENSE_LABELS = {"none": "no defense", "adashield": "AdaShield (prompt)", "vlm_guard": "VLM-Guard (project)",
                  "vlm_guard_clamp": "VLM-Guard (clamp)", "rdt": "RDT", "rdt+": "RDT+",
                  "gated_rdt+": "gated RDT+"}


# -- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DefensesConfig:
    """Everything :func:`run_defenses` does (stored in the run directory)."""

    defenses: tuple[str, ...] = ("none", "adashield", "vlm_guard", "rdt", "rdt+", "gated_rdt+")
    # steering (rdt, rdt+, gated_rdt+)
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0)
    alpha_text_ratio: float = 1.0
    include_image: bool = False
    layers: tuple[int, ...] | None = None  # None: the direction's own layer
    # AdaShield
    defense_text: str = DEFAULT_DEFENSE_TEXT
    defense_position: str = "prefix"
    # VLM-Guard
    guard_layers: tuple[int, ...] | None = None  # project: None = every layer; clamp: the subspace's layer
    guard_scales: tuple[float, ...] = (1.0,)  # clamp targets: scale x harmful-class mean
    # the gate of gated RDT+
    gate_probe: str = "vla"  # "vla": fitted on the VLA's val activations; "chat": the chat probe passed in
    gate_layers: tuple[int, ...] | None = None  # candidates, best val AUC wins; None: the first steering layer
    gate_role: str = "last_text"
    gate_target_fpr: float = 0.05
    gate_C: float = 1.0
    gate_folds: int = 5
    # requests
    prompt_file: str | None = None
    n_pairs: int | None = None
    val_fraction: float = 0.3
    images: str = "scenes"
    # decoding
    batch_size: int = 16
    backend: str = "hooks"
    constrain_actions: bool = True
    # metrics
    window: int = 2
    unnorm_key: str | None = None
    partial_min: int = 4
    n_boot: int = 1000
    # closed loop (testbed VLAs only)
    closed_loop_episodes: int = 0
    closed_loop_steps: int = 80
    closed_loop_conditions: tuple[str, ...] | None = None  # condition keys (e.g. "rdt@2"); None: all
    figures: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("defenses", "alphas", "guard_scales"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers", "guard_layers", "gate_layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        if self.closed_loop_conditions is not None:
            object.__setattr__(self, "closed_loop_conditions", tuple(self.closed_loop_conditions))
            keys = [condition_key(d, s) for d, s in self.conditions()]
            bad_keys = [k for k in self.closed_loop_conditions if k not in keys]
            if bad_keys:
                raise ConfigError(f"closed_loop_conditions {bad_keys} are not conditions of this run",
                                  fix=f"choose from {keys}")
        bad = [d for d in self.defenses if d not in DEFENSES]
        if bad or not self.defenses:
            raise ConfigError(f"unknown defenses {bad}" if bad else "no defense to run",
                              fix=f"choose from {list(DEFENSES)}")
        if len(set(self.defenses)) != len(self.defenses):
            raise ConfigError(f"defenses repeat: {list(self.defenses)}")
        if any(d in STEERED for d in self.defenses) and (
                not self.alphas or any(not math.isfinite(a) or a <= 0 for a in self.alphas)):
            raise ConfigError("alphas must be finite numbers > 0")
        if "vlm_guard_clamp" in self.defenses and (
                not self.guard_scales or any(not math.isfinite(s) for s in self.guard_scales)):
            raise ConfigError("guard_scales must be finite numbers")
        if self.defense_position not in POSITIONS:
            raise ConfigError(f"unknown defense_position {self.defense_position!r}", fix=f"use {list(POSITIONS)}")
        if self.gate_probe not in ("vla", "chat"):
            raise ConfigError(f"gate_probe must be 'vla' or 'chat', got {self.gate_probe!r}")
        if not 0.0 <= self.gate_target_fpr < 1.0:
            raise ConfigError(f"gate_target_fpr must be in [0, 1), got {self.gate_target_fpr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if "gated_rdt+" in self.defenses and self.val_fraction == 0:
            raise ConfigError("gated RDT+ fits its gate on the val split", fix="set val_fraction > 0")
        if self.images not in ("scenes", "noise"):
            raise ConfigError(f"images must be 'scenes' or 'noise', got {self.images!r}")
        if self.backend not in ("hooks", "nnsight"):
            raise ConfigError(f"backend must be 'hooks' or 'nnsight', got {self.backend!r}")
        if self.batch_size < 1 or self.closed_loop_episodes < 0 or self.closed_loop_steps < 1:
            raise ConfigError("batch_size and closed_loop_steps must be >= 1, closed_loop_episodes >= 0")
        DefensivePrompt(self.defense_text, self.defense_position)  # validates the text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DefensesConfig:
        return from_stored(cls, d)

    def steering(self, defense: str, alpha: float, layers: Sequence[int]) -> SteeringSpec:
        """The :class:`SteeringSpec` of a steered defense (``rdt``: RDT; ``rdt+`` and
        ``gated_rdt+``: RDT+) at ``alpha``, with this config's text ratio and image setting."""
        if defense not in STEERED:
            raise ConfigError(f"defense {defense!r} does not steer", fix=f"use one of {list(STEERED)}")
        mode = "action" if defense == "rdt" else "text+action"
        return SteeringSpec(mode, float(alpha), tuple(layers), self.alpha_text_ratio, self.include_image)

    def metrics_config(self) -> VLARDTConfig:
        """The metric settings, in the form :func:`condition_metrics` takes."""
        return VLARDTConfig(window=self.window, unnorm_key=self.unnorm_key, partial_min=self.partial_min,
                            n_boot=self.n_boot, seed=self.seed, specificity=False, decoupling=False,
                            figures=False)

    def conditions(self) -> list[tuple[str, float]]:
        """``(defense, strength)`` in run order; strength is alpha (steered), the clamp scale
        (``vlm_guard_clamp``) or 0 (no strength)."""
        out: list[tuple[str, float]] = []
        for d in self.defenses:
            if d in STEERED:
                out += [(d, float(a)) for a in self.alphas]
            elif d == "vlm_guard_clamp":
                out += [(d, float(s)) for s in self.guard_scales]
            else:
                out.append((d, 0.0))
        return out


_ADD_LATER = ("closed_loop_episodes", "closed_loop_steps", "closed_loop_conditions", "figures")


def condition_key(defense: str, strength: float) -> str:
    return f"{defense}@{strength:g}" if defense in STEERED or defense == "vlm_guard_clamp" else defense



__all__ = ["DEFENSES", "DEFENSE_LABELS", "NEEDS_SUBSPACE", "STEERED", "DefensesConfig", "condition_key"]
