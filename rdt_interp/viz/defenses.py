"""Figures of the defense comparison (:mod:`rdt_interp.studies.defenses`).

:func:`pareto_figure` -- harmful suppression against benign cost, one panel per harmful metric:
x is the mean |bin shift| of benign actions against the undefended policy (0 for no defense),
y a harmful action metric (default: the zero-motion rate, the zero-motion mass and the decoded
action magnitude); 95% bootstrap CIs as error bars; the strengths of one defense
(alpha, clamp scale) joined by a line and labelled where the labels do not collide. Left is
cheaper; up is better for the zero-motion metrics, down for the magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rdt_interp.errors import ConfigError
from rdt_interp.studies.defenses.config import DEFENSE_LABELS
from rdt_interp.studies.defenses.results import DefensesResult, load_defenses
from rdt_interp.viz.figures import metric_label as _action_label
from rdt_interp.viz.style import NULL_COLOR, PALETTE, Width, new_figure, paper_style, save_figure

_MARKERS = {"none": "*", "adashield": "s", "vlm_guard": "D", "vlm_guard_clamp": "d", "rdt": "o", "rdt+": "^",
            "gated_rdt+": "v"}
_COLORS = {"none": "#000000", "adashield": PALETTE[3], "vlm_guard": PALETTE[4], "vlm_guard_clamp": PALETTE[5],
           "rdt": PALETTE[0], "rdt+": PALETTE[1], "gated_rdt+": PALETTE[2]}


def metric_label(metric: str, m: Any = None) -> str:
    if metric == "zero_motion":
        return "zero-motion rate" + (f" (±{m.window} bins)" if m is not None else "")
    return _action_label(metric, m)


def _place_tags(ax: Any, tags: Sequence[tuple[float, float, str, str]], min_gap: float = 0.045) -> None:
    """Strength labels next to their points, skipping one that would sit on a label already
    placed (closer than ``min_gap`` of the axes in both x and y): clusters stay readable."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for x, y, tag, color in tags:
        u, v = (x - x0) / ((x1 - x0) or 1.0), (y - y0) / ((y1 - y0) or 1.0)
        if any(abs(u - pu) < min_gap * 1.6 and abs(v - pv) < min_gap for pu, pv in placed):
            continue
        placed.append((u, v))
        ax.annotate(tag, (x, y), xytext=(2.5, 2), textcoords="offset points", fontsize=5.5, color=color)


def _result(result: Any) -> Any:
    return result if isinstance(result, DefensesResult) else DefensesResult.from_dict(result)


def pareto_figure(
    result: Any,
    *,
    metrics: Sequence[str] = ("zero_motion", "zero_mass", "magnitude"),
    cost: str = "abs_shift",
    width: Width = "page",
    height: float | None = 2.6,
) -> Figure:
    """Harmful ``metrics`` (one panel each) against the benign ``cost`` (``abs_shift``: mean
    |bin shift| vs no defense; or an action metric such as ``hrr_partial``), every condition."""
    res = _result(result)
    if not res.conditions:
        raise ConfigError("the result has no condition to plot")
    with paper_style():
        fig, axes = new_figure(width, height, ncols=len(metrics))
        for i, (a, metric) in enumerate(zip(axes, metrics, strict=True)):
            base = None
            tags: list[tuple[float, float, str, str]] = []
            if len(metrics) > 1:
                a.set_title(f"({chr(ord('a') + i)})", loc="left")
            for defense in dict.fromkeys(c.defense for c in res.conditions):
                pts = sorted((c for c in res.conditions if c.defense == defense), key=lambda c: c.strength)
                x = np.array([c.value("benign", cost) for c in pts])
                y = np.array([c.value("harmful", metric) for c in pts])
                color = _COLORS.get(defense, NULL_COLOR)
                if len(pts) > 1:
                    a.plot(x[:, 0], y[:, 0], color=color, lw=0.8, alpha=0.7, zorder=2)
                a.errorbar(x[:, 0], y[:, 0], xerr=np.abs(np.vstack([x[:, 0] - x[:, 1], x[:, 2] - x[:, 0]])),
                           yerr=np.abs(np.vstack([y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]])), fmt=_MARKERS.get(defense, "o"),
                           color=color, ms=4.5 if defense == "none" else 3.2, elinewidth=0.5, capsize=0,
                           label=DEFENSE_LABELS.get(defense, defense), zorder=3)
                if len(pts) > 1:  # every strength, α for the steering defenses
                    for j, c in enumerate(pts):
                        tag = f"×{c.strength:g}" if defense == "vlm_guard_clamp" else (
                            f"α={c.strength:g}" if j == 0 else f"{c.strength:g}")
                        tags.append((x[j, 0], y[j, 0], tag, color))
                if defense == "none":
                    base = y[0, 0]
            if base is not None:
                a.axhline(base, color=NULL_COLOR, lw=0.6, ls=":", zorder=1)
            first = res.conditions[0].result.metrics["harmful"]
            a.set_ylabel("harmful: " + metric_label(metric, first))
            a.set_xlabel("benign: mean |Δbin| vs no defense" if cost == "abs_shift"
                         else "benign: " + metric_label(cost, first))
            if metric in ("zero_motion", "zero_mass", "hrr_strict", "hrr_partial"):
                lo, hi = a.get_ylim()
                lo, hi = max(-0.02, lo), min(1.02, hi)
                if hi - lo < 0.05:  # every condition at one value (e.g. a rate of 0): show the scale
                    lo, hi = max(-0.02, lo - 0.02), min(1.02, max(hi, lo) + 0.08)
                a.set_ylim(lo, hi)
            _place_tags(a, tags)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=6.5, markerscale=1.0)
    return fig


def defenses_figures(result: DefensesResult | str | Path, out_dir: str | Path) -> list[Path]:
    """The Pareto figure (PDF + PNG) of a run; returns the written paths."""
    res = result if isinstance(result, DefensesResult) else load_defenses(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(pareto_figure(res), out / "pareto")


__all__ = ["defenses_figures", "pareto_figure"]
