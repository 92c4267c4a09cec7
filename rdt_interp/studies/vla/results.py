"""Results of the VLA RDT study: plain frozen values with ``to_dict``/``from_dict``.

Figures (:mod:`rdt_interp.viz.vla`) read these types and nothing else of the study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdt_interp.analysis.behaviour import ActionMetrics, BinShift
from rdt_interp.analysis.layer_pick import LayerPick
from rdt_interp.analysis.probe_grid import ProbeGrid
from rdt_interp.analysis.specificity import SpecificityResult
from rdt_interp.errors import ConfigError
from rdt_interp.storage import read_json
from rdt_interp.studies.vla.config import METRICS, VLARDTConfig


@dataclass(frozen=True, eq=False)
class ConditionResult:
    """Action metrics of one condition (target mode, alpha) on one split, per label.

    ``shift`` is the paired bin shift against the unsteered actions of the same requests;
    ``bin_counts`` counts chosen action bins over every step (the distribution-shift figure).
    Mode ``none`` is the unsteered baseline.
    """

    mode: str
    alpha: float
    alpha_text: float
    split: str
    layers: tuple[int, ...]
    metrics: Mapping[str, ActionMetrics]
    shift: Mapping[str, BinShift]
    bin_counts: Mapping[str, tuple[int, ...]]

    @property
    def name(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}@{self.alpha:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ConditionResult", "mode": self.mode, "alpha": self.alpha,
                "alpha_text": self.alpha_text, "split": self.split, "layers": list(self.layers),
                "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "shift": {k: v.to_dict() for k, v in self.shift.items()},
                "bin_counts": {k: list(v) for k, v in self.bin_counts.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionResult:
        return cls(str(d["mode"]), float(d["alpha"]), float(d["alpha_text"]), str(d["split"]),
                   tuple(int(x) for x in d["layers"]),
                   {k: ActionMetrics.from_dict(v) for k, v in d["metrics"].items()},
                   {k: BinShift.from_dict(v) for k, v in d["shift"].items()},
                   {k: tuple(int(x) for x in v) for k, v in d["bin_counts"].items()})


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Conditions of a sweep (the unsteered baseline of each split included)."""

    conditions: tuple[ConditionResult, ...]
    direction: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)

    def get(self, mode: str, alpha: float, split: str = "test") -> ConditionResult:
        for c in self.conditions:
            if c.split == split and c.mode == mode and (mode == "none" or math.isclose(c.alpha, alpha)):
                return c
        raise ConfigError(f"no condition {mode}@{alpha:g} on split {split!r} in this sweep")

    def baseline(self, split: str = "test") -> ConditionResult:
        return self.get("none", 0.0, split)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.split for c in self.conditions))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.mode for c in self.conditions if c.mode != "none"))

    def series(self, mode: str, label: str, split: str = "test") -> list[tuple[float, ActionMetrics]]:
        """``(alpha, metrics)`` of one mode and label, from the baseline at alpha 0 upwards."""
        pts = [(0.0, self.baseline(split).metrics[label])]
        pts += sorted(((c.alpha, c.metrics[label]) for c in self.conditions
                       if c.split == split and c.mode == mode), key=lambda t: t[0])
        return pts

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "SweepResult", "conditions": [c.to_dict() for c in self.conditions],
                "direction": dict(self.direction), "model": dict(self.model)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepResult:
        return cls(tuple(ConditionResult.from_dict(c) for c in d["conditions"]), dict(d.get("direction", {})),
                   dict(d.get("model", {})))



@dataclass(frozen=True, eq=False)
class DecouplingResult:
    """Harmful vs benign separability per (layer, role): the probe grid, and its cells at the
    steering ``layer`` (``at_layer``). Positives are the harmful requests.

    ``peaks`` maps a role to the layer where the projection AUC along ``r`` is furthest from
    0.5, with its p-value Holm-adjusted over the grid's layers
    (:func:`~rdt_interp.analysis.layer_pick.grid_peaks`); empty for results written before
    peaks were reported.
    """

    grid: ProbeGrid
    roles: tuple[str, ...]
    layer: int
    direction: Mapping[str, Any] = field(default_factory=dict)
    peaks: Mapping[str, LayerPick] = field(default_factory=dict)

    def at_layer(self, layer: int | None = None) -> dict[str, dict[str, tuple[float, float, float]]]:
        """Per role: ``proj_auc``, ``proj_d``, ``probe_auc`` as ``(value, low, high)``."""
        L = self.layer if layer is None else layer
        out = {}
        for role in self.roles:
            c = self.grid.cell(L, role)
            out[role] = {m: (c[m], c[f"{m}_lo"], c[f"{m}_hi"]) for m in ("proj_auc", "proj_d", "probe_auc")}
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": "DecouplingResult", "grid": self.grid.to_dict(), "roles": list(self.roles),
               "layer": self.layer, "direction": dict(self.direction)}
        if self.peaks:  # absent, as in results written before peaks were reported
            out["peaks"] = {role: pk.to_dict() for role, pk in self.peaks.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecouplingResult:
        return cls(ProbeGrid.from_dict(d["grid"]), tuple(d["roles"]), int(d["layer"]), dict(d.get("direction", {})),
                   {role: LayerPick.from_dict(pk) for role, pk in d.get("peaks", {}).items()})



@dataclass(frozen=True, eq=False)
class VLARDTResult:
    """What :func:`run_vla_rdt` found (every part also sits in its run directory as JSON)."""

    config: VLARDTConfig
    model: Mapping[str, Any]
    direction: Mapping[str, Any]
    layers: tuple[int, ...]
    alpha: float
    alpha_choice: Mapping[str, Any]
    sweep: SweepResult
    targets: SweepResult
    specificity: SpecificityResult | None
    decoupling: DecouplingResult | None
    n_requests: Mapping[str, int]
    timings: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "VLARDTResult", "config": self.config.to_dict(), "model": dict(self.model),
                "direction": dict(self.direction), "layers": list(self.layers), "alpha": self.alpha,
                "alpha_choice": dict(self.alpha_choice), "sweep": self.sweep.to_dict(),
                "targets": self.targets.to_dict(),
                "specificity": self.specificity.to_dict() if self.specificity is not None else None,
                "decoupling": self.decoupling.to_dict() if self.decoupling is not None else None,
                "n_requests": dict(self.n_requests), "timings": dict(self.timings)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VLARDTResult:
        return cls(VLARDTConfig.from_dict(d["config"]), dict(d["model"]), dict(d["direction"]),
                   tuple(int(x) for x in d["layers"]), float(d["alpha"]), dict(d["alpha_choice"]),
                   SweepResult.from_dict(d["sweep"]), SweepResult.from_dict(d["targets"]),
                   SpecificityResult.from_dict(d["specificity"]) if d.get("specificity") else None,
                   DecouplingResult.from_dict(d["decoupling"]) if d.get("decoupling") else None,
                   dict(d["n_requests"]), dict(d.get("timings", {})))

    def summary(self) -> dict[str, Any]:
        """The headline numbers (test split): RDT and RDT+ at the chosen alpha vs unsteered."""
        out: dict[str, Any] = {"alpha": self.alpha, "layers": list(self.layers)}
        for c in self.targets.conditions:
            for label, m in c.metrics.items():
                out[f"{c.name}/{label}"] = {k: round(float(m.value(k)[0]), 4) for k in METRICS}
        if self.specificity is not None:
            s = self.specificity
            out["specificity"] = {"real": s.real, "p": s.p, "z": s.z, "null_mean": s.null_mean,
                                  "n_random": s.n_random, "-r": s.controls.get("-r", {}).get("effect")}
            if s.shuffled_null is not None:  # the label-shuffled null, beside the random-direction p
                out["specificity"].update({"shuffled_p": s.shuffled_p, "shuffled_z": s.shuffled_z,
                                           "n_shuffled": s.n_shuffled})
        if self.decoupling is not None:
            out["decoupling"] = {role: {k: round(v[0], 4) for k, v in cell.items()}
                                 for role, cell in self.decoupling.at_layer().items()}
            if self.decoupling.peaks:
                out["decoupling_peaks"] = {
                    role: {"layer": pk.layer, "proj_auc_distance": round(pk.score, 4), "p": pk.p,
                           "p_holm": pk.p_adjusted, "significant": pk.significant}
                    for role, pk in self.decoupling.peaks.items()}
        return out



def load_vla_rdt(run_dir: str | Path) -> VLARDTResult:
    """The result of a finished run, read from its directory (no model)."""
    return VLARDTResult.from_dict(read_json(Path(run_dir) / "result.json", what="VLA study result"))


__all__ = ["ConditionResult", "DecouplingResult", "SweepResult", "VLARDTResult", "load_vla_rdt"]
