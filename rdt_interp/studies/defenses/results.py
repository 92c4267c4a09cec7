"""Results of the defense comparison: plain values (what :mod:`rdt_interp.viz.defenses` draws)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdt_interp.defenses.gate import GateRates
from rdt_interp.errors import ConfigError
from rdt_interp.storage import read_json
from rdt_interp.studies.defenses.config import (
    DEFENSE_LABELS,
    STEERED,
    DefensesConfig,
    condition_key,
)
from rdt_interp.studies.vla.config import LABELS
from rdt_interp.studies.vla.results import ConditionResult


@dataclass(frozen=True, eq=False)
class DefenseCondition:
    """One defense at one strength on the test split: action metrics per label (with the
    paired bin shift against the undefended actions), the gate's firing rate per label (gated
    RDT+), closed-loop task success (when run) and the seconds its predictions took."""

    defense: str
    strength: float
    result: ConditionResult
    zero_motion: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    fired: Mapping[str, float] = field(default_factory=dict)
    closed_loop: Mapping[str, Any] | None = None
    seconds: float = float("nan")

    @property
    def key(self) -> str:
        return condition_key(self.defense, self.strength)

    @property
    def label(self) -> str:
        name = DEFENSE_LABELS.get(self.defense, self.defense)
        if self.defense in STEERED:
            return f"{name} α={self.strength:g}"
        if self.defense == "vlm_guard_clamp":
            return f"{name} ×{self.strength:g}"
        return name

    def value(self, label: str, metric: str) -> tuple[float, float, float]:
        """``(value, low, high)`` of an action metric, ``zero_motion`` (rate) or ``abs_shift`` /
        ``shift`` (bins)."""
        if metric == "zero_motion":
            v = self.zero_motion[label]
            return float(v[0]), float(v[1]), float(v[2])
        if metric in ("abs_shift", "shift"):
            s = self.result.shift[label]
            return getattr(s, metric), getattr(s, f"{metric}_lo"), getattr(s, f"{metric}_hi")
        return self.result.metrics[label].value(metric)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "DefenseCondition", "defense": self.defense, "strength": self.strength,
                "result": self.result.to_dict(), "zero_motion": {k: list(v) for k, v in self.zero_motion.items()},
                "fired": dict(self.fired),
                "closed_loop": dict(self.closed_loop) if self.closed_loop is not None else None,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DefenseCondition:
        return cls(str(d["defense"]), float(d["strength"]), ConditionResult.from_dict(d["result"]),
                   {k: tuple(float(x) for x in v) for k, v in d.get("zero_motion", {}).items()},
                   dict(d.get("fired", {})), dict(d["closed_loop"]) if d.get("closed_loop") else None,
                   float(d.get("seconds", float("nan"))))


@dataclass(frozen=True, eq=False)
class DefensesResult:
    """What :func:`run_defenses` found (every part also sits in its run directory)."""

    config: DefensesConfig
    model: Mapping[str, Any]
    direction: Mapping[str, Any]
    layers: tuple[int, ...]
    conditions: tuple[DefenseCondition, ...]
    subspace: Mapping[str, Any] | None = None
    gate: Mapping[str, Any] | None = None
    gate_test: GateRates | None = None
    gate_alternatives: Mapping[str, Any] = field(default_factory=dict)
    n_requests: Mapping[str, int] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)

    def get(self, defense: str, strength: float | None = None) -> DefenseCondition:
        for c in self.conditions:
            if c.defense == defense and (strength is None or math.isclose(c.strength, strength)):
                return c
        raise ConfigError(f"no condition {defense!r}" + (f" at {strength:g}" if strength is not None else ""))

    def pareto(self, metric: str = "zero_motion", cost: str = "abs_shift") -> list[str]:
        """Keys of the conditions no other condition beats on both harmful ``metric`` (higher
        is better) and benign ``cost`` (lower is better) -- descriptive, on the test split."""
        pts = {c.key: (c.value("harmful", metric)[0], c.value("benign", cost)[0]) for c in self.conditions}
        return [k for k, (m, b) in pts.items()
                if not any((m2 >= m and b2 <= b) and (m2 > m or b2 < b) for k2, (m2, b2) in pts.items() if k2 != k)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "DefensesResult", "config": self.config.to_dict(), "model": dict(self.model),
                "direction": dict(self.direction), "layers": list(self.layers),
                "conditions": [c.to_dict() for c in self.conditions],
                "subspace": dict(self.subspace) if self.subspace is not None else None,
                "gate": dict(self.gate) if self.gate is not None else None,
                "gate_test": self.gate_test.to_dict() if self.gate_test is not None else None,
                "gate_alternatives": dict(self.gate_alternatives), "n_requests": dict(self.n_requests),
                "timings": dict(self.timings)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DefensesResult:
        return cls(DefensesConfig.from_dict(d["config"]), dict(d["model"]), dict(d["direction"]),
                   tuple(int(x) for x in d["layers"]),
                   tuple(DefenseCondition.from_dict(c) for c in d["conditions"]),
                   dict(d["subspace"]) if d.get("subspace") else None, dict(d["gate"]) if d.get("gate") else None,
                   GateRates.from_dict(d["gate_test"]) if d.get("gate_test") else None,
                   dict(d.get("gate_alternatives", {})), dict(d.get("n_requests", {})), dict(d.get("timings", {})))

    # -- the table -----------------------------------------------------------------------------
    def table_rows(self) -> list[dict[str, Any]]:
        """One row per condition: the numbers of the markdown table, with CIs."""
        pareto = set(self.pareto())
        rows = []
        for c in self.conditions:
            row: dict[str, Any] = {"key": c.key, "defense": c.defense, "label": c.label, "strength": c.strength,
                                   "pareto": c.key in pareto, "seconds": c.seconds}
            for label in LABELS:
                if label not in c.result.metrics:
                    continue
                for m in ("zero_motion", "zero_mass", "hrr_strict", "hrr_partial", "magnitude", "abs_shift"):
                    row[f"{label}/{m}"] = list(c.value(label, m))
            for label, rate in c.fired.items():
                row[f"{label}/gate_fired"] = rate
            if c.closed_loop is not None:
                row["success"] = [c.closed_loop["rate"], c.closed_loop["lo"], c.closed_loop["hi"]]
            rows.append(row)
        return rows

    def markdown(self) -> str:
        """The results table (test split) as markdown."""
        m = self.conditions[0].result.metrics
        first = next(iter(m.values()))
        space = "m, rad" if first.magnitude_space == "unnormalized" else "normalized"
        has_gate = any(c.fired for c in self.conditions)
        has_loop = any(c.closed_loop is not None for c in self.conditions)
        head = ["defense", "harmful zero-motion rate", "harmful zero-motion mass", "harmful HRR strict",
                "harmful HRR partial", f"harmful \\|action\\| ({space})", "benign zero-motion rate",
                "benign \\|Δbin\\| vs none"]
        if has_gate:
            head.append("gate fired (harmful / benign)")
        if has_loop:
            head.append("benign task success")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        pareto = set(self.pareto())

        def ci(v: Sequence[float], digits: int = 2) -> str:
            return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"

        for c in self.conditions:
            name = c.label + (" *" if c.key in pareto else "")
            cells = [name, ci(c.value("harmful", "zero_motion")), ci(c.value("harmful", "zero_mass")),
                     ci(c.value("harmful", "hrr_strict")), ci(c.value("harmful", "hrr_partial")),
                     ci(c.value("harmful", "magnitude"), 3), ci(c.value("benign", "zero_motion")),
                     ci(c.value("benign", "abs_shift"), 1)]
            if has_gate:
                cells.append(f"{c.fired['harmful']:.2f} / {c.fired['benign']:.2f}" if c.fired else "")
            if has_loop:
                cl = c.closed_loop
                cells.append(ci([cl["rate"], cl["lo"], cl["hi"]]) if cl is not None else "")
            lines.append("| " + " | ".join(cells) + " |")
        n = self.n_requests
        lines.append("")
        lines.append(f"Test split: {n.get('test/harmful', '?')} harmful and {n.get('test/benign', '?')} benign "
                     f"requests; mean [95% bootstrap CI]. Zero-motion rate: all six motion dimensions within "
                     f"±{first.window} bins of zero. * = Pareto-optimal on test (harmful zero-motion rate vs "
                     f"benign |Δbin|; descriptive, nothing was chosen on test).")
        if self.gate_test is not None:
            g = self.gate_test
            where = ""
            if self.gate is not None:
                src = self.gate.get("meta", {}).get("probe_source", "?")
                where = f" ({src} probe at layer {self.gate['layer']}, {self.gate['role']})"
            lines.append(f"Gate{where} on test: AUC {g.auc:.3f}, TPR {g.tpr:.2f} [{g.tpr_lo:.2f}, {g.tpr_hi:.2f}], "
                         f"FPR {g.fpr:.2f} [{g.fpr_lo:.2f}, {g.fpr_hi:.2f}] (threshold set on val for FPR "
                         f"{self.config.gate_target_fpr:g}).")
        return "\n".join(lines) + "\n"



def load_defenses(run_dir: str | Path) -> DefensesResult:
    """The result of a finished run, read from its directory (no model)."""
    return DefensesResult.from_dict(read_json(Path(run_dir) / "result.json", what="defense comparison result"))


__all__ = ["DefenseCondition", "DefensesResult", "load_defenses"]
