"""The VLA RDT study's settings: :class:`VLARDTConfig` (one value, stored in the run directory)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rdt_interp.analysis.specificity import MIN_SHUFFLED
from rdt_interp.errors import ConfigError
from rdt_interp.schema import from_stored
from rdt_interp.studies.steering import SteeringSpec
from rdt_interp.tracing.interventions import TARGET_MODES

LABELS = ("harmful", "benign")
METRICS = ("zero_mass", "mean_bin", "magnitude", "hrr_strict", "hrr_partial")
SPEC_METRICS = ("zero_mass", "hrr_strict", "hrr_partial", "mean_bin", "abs_bin_shift")
SPEC_METRIC_NAMES = {"zero_mass": "zero-motion mass", "hrr_strict": "HRR strict", "hrr_partial": "HRR partial",
                     "mean_bin": "mean action bin", "abs_bin_shift": "mean |bin shift|"}
_LABEL_ALIASES = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "harmless": "benign",
                  "safe": "benign"}


# -- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VLARDTConfig:
    """Everything :func:`run_vla_rdt` does, in one value (stored in the run directory)."""

    # steering
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    alpha: float | None = None  # the alpha of the target-mode sweep and specificity; None: chosen on val
    sweep_modes: tuple[str, ...] = ("action", "text+action")
    target_modes: tuple[str, ...] = TARGET_MODES
    alpha_text_ratio: float = 1.0  # alpha_text = ratio * alpha (text positions of text modes)
    include_image: bool = False  # text modes also steer the image patches
    layers: tuple[int, ...] | None = None  # None: the direction's own layer
    # requests
    prompt_file: str | None = None  # None: rdt_interp.prompts.robot_instructions()
    prompt_column: str = "instruction"
    label_column: str = "label"
    category_column: str | None = "category"
    pair_column: str | None = "pair_id"
    n_pairs: int | None = None  # None: every pair
    val_fraction: float = 0.3
    images: str = "scenes"  # "scenes" (testbed tabletop) or "noise"
    # decoding
    batch_size: int = 16
    backend: str = "hooks"
    constrain_actions: bool = True
    # metrics
    window: int = 2
    unnorm_key: str | None = None
    partial_min: int = 4
    n_boot: int = 1000
    choose_metric: str = "zero_mass"  # alpha = argmax of this on val (RDT, choose_label)
    choose_label: str = "harmful"
    # specificity
    specificity: bool = True
    specificity_mode: str = "action"
    specificity_metric: str = "zero_mass"
    specificity_pairs: int | None = 16  # test pairs used (None: all)
    n_random: int = 100
    # label-shuffled chat directions as a second null (0: off; else >= 19, so p can reach 0.05);
    # the study builds them from the chat activations (run_study), run_vla_rdt takes them as shuffled=
    n_shuffled: int = 0
    specificity_rows: int = 64  # (prompt, direction) rows per forward pass
    # decoupling
    decoupling: bool = True
    decoupling_roles: tuple[str, ...] = ("image", "text", "last_text", "first_action", "action[3]")
    decoupling_layers: tuple[int, ...] | None = None  # None: every layer
    folds: int = 5  # CV folds, only without a val split (otherwise probes fit on val)
    n_perm: int = 1000
    probe: bool = True
    figures: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("alphas", "sweep_modes", "target_modes", "decoupling_roles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers", "decoupling_layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        bad = [m for m in (*self.sweep_modes, *self.target_modes, self.specificity_mode) if m not in TARGET_MODES]
        if bad:
            raise ConfigError(f"unknown target modes {bad}", fix=f"use {list(TARGET_MODES)}")
        if not self.alphas or any(not math.isfinite(a) for a in self.alphas):
            raise ConfigError("alphas must be a non-empty tuple of finite numbers")
        if self.specificity_metric not in SPEC_METRICS:
            raise ConfigError(f"unknown specificity metric {self.specificity_metric!r}",
                              fix=f"use one of {list(SPEC_METRICS)}")
        if self.choose_metric not in METRICS or self.choose_label not in LABELS:
            raise ConfigError(f"choose_metric/choose_label must be in {list(METRICS)} / {list(LABELS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.images not in ("scenes", "noise"):
            raise ConfigError(f"images must be 'scenes' or 'noise', got {self.images!r}")
        if self.backend not in ("hooks", "nnsight"):
            raise ConfigError(f"backend must be 'hooks' or 'nnsight', got {self.backend!r}")
        if self.batch_size < 1 or self.specificity_rows < 1:
            raise ConfigError("batch_size and specificity_rows must be >= 1")
        # Counts where zero means nothing (no pairs, no bootstrap, no null): bounds, not a
        # silent empty study. ``None`` keeps meaning "all" where the field allows it.
        for name, low in (("n_pairs", 1), ("specificity_pairs", 1), ("n_random", 1), ("n_boot", 1),
                          ("n_perm", 1), ("folds", 2), ("partial_min", 1), ("window", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}",
                                  fix=f"set {name} to at least {low}"
                                  + (" (or leave it out for all)" if name.endswith("pairs") else ""))
        if self.n_shuffled != 0 and self.n_shuffled < MIN_SHUFFLED:
            raise ConfigError(f"n_shuffled must be 0 (off) or >= {MIN_SHUFFLED}, got {self.n_shuffled}",
                              fix=f"set n_shuffled to 0, or to at least {MIN_SHUFFLED} so that the shuffled-label "
                                  "p-value can reach 0.05")
        for name in ("alpha", "alpha_text_ratio"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value}")

    def steering(self, mode: str, alpha: float, layers: Sequence[int]) -> SteeringSpec:
        """The :class:`SteeringSpec` of target ``mode`` at ``alpha`` with this config's text ratio
        and image setting."""
        return SteeringSpec(mode, float(alpha), tuple(layers), self.alpha_text_ratio, self.include_image)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.n_shuffled:  # off: the dict (and so run directories' identity) of configs before the option
            del out["n_shuffled"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VLARDTConfig:
        return from_stored(cls, d)



__all__ = ["LABELS", "METRICS", "SPEC_METRICS", "SPEC_METRIC_NAMES", "VLARDTConfig"]
