"""Paper figures from saved analysis results -- never from a model.

Every function takes result dataclasses or their ``to_dict()`` (as read back from JSON), draws
into ``ax`` when one is given (to compose panels) or into a new figure of paper width, and
returns the :class:`~matplotlib.figure.Figure`. Save it with
:func:`rdt_interp.viz.style.save_figure`.

Chance is always drawn: AUC 0.5, the random-direction band of a cosine, the shuffled spectrum,
the random-subspace angles, the random-direction histogram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from rdt_interp.analysis._result import coerce
from rdt_interp.analysis.alignment import AlignmentResult
from rdt_interp.analysis.behaviour import ActionMetrics
from rdt_interp.analysis.probe_grid import ProbeGrid
from rdt_interp.analysis.specificity import SpecificityResult
from rdt_interp.analysis.subspace import Spectrum, SubspaceComparison
from rdt_interp.errors import ConfigError
from rdt_interp.viz.style import (
    CI_ALPHA,
    NULL_BAND_ALPHA,
    NULL_COLOR,
    PALETTE,
    Width,
    new_figure,
    paper_style,
)

Result = Mapping[str, Any]
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _grid_title(g: ProbeGrid, metric: str) -> str:
    if metric == "proj_auc":
        return "Projection AUC" + (" (cross-fitted)" if "cross-fitted" in g.proj_source else "")
    return "Probe AUC" + (f" ({g.folds}-fold CV)" if "-fold CV" in g.probe_source else " (held out)")


def _panels(ax: Axes | Sequence[Axes] | None, n: int, width: Width | None, height: float | None,
            **kw: Any) -> tuple[Figure, list[Axes]]:
    if ax is None:
        w = width if width is not None else ("column" if n == 1 else "page")
        return new_figure(w, height if height is not None else 2.1, ncols=n, **kw)
    axes = [ax] if isinstance(ax, Axes) else list(ax)
    if len(axes) != n:
        raise ConfigError(f"this figure needs {n} axes, got {len(axes)}")
    fig = axes[0].get_figure()
    assert isinstance(fig, Figure)
    return fig, axes


def format_p(p: float, n_resamples: int | None = None) -> str:
    """``p = 0.03``, or ``p ≤ 1/(N+1)`` at the floor of an empirical p-value."""
    if not math.isfinite(p):
        return "p = n/a"
    if n_resamples is not None and p <= 1.0 / (n_resamples + 1) * (1 + 1e-9):
        return f"p ≤ {1.0 / (n_resamples + 1):.1g}"
    if p < 1e-3:
        return f"p = {p:.0e}".replace("e-0", "e-")
    return f"p = {p:.2g}"


def _note(ax: Axes, text: str) -> None:
    ax.text(0.02, 0.98, text, transform=ax.transAxes, ha="left", va="top", fontsize=6.5, color="#555555")


# -- probes ----------------------------------------------------------------------------------------
def probe_layers(
    grid: ProbeGrid | Result,
    *,
    positions: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    metrics: Sequence[str] = ("proj_auc", "probe_auc"),
    ax: Axes | Sequence[Axes] | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """AUC per layer with CI bands, one line per position (e.g. last text vs first action: the
    decoupling diagnostic), one panel per metric; chance (0.5) dashed."""
    g: ProbeGrid = coerce(grid, ProbeGrid)
    positions = tuple(positions) if positions is not None else g.positions
    labels = dict(labels or {})
    shown = [m for m in metrics if not np.all(np.isnan(getattr(g, m)))]
    if not shown:
        raise ConfigError(f"none of {list(metrics)} was computed in this grid")
    with paper_style():
        fig, axes = _panels(ax, len(shown), width, height, sharey=True)
        lows = []
        for a, metric in zip(axes, shown, strict=True):
            for k, pos in enumerate(positions):
                layers, v, lo, hi = g.series(metric, pos)  # type: ignore[arg-type]
                color = PALETTE[k % len(PALETTE)]
                a.fill_between(layers, lo, hi, color=color, alpha=CI_ALPHA, lw=0)
                a.plot(layers, v, color=color, marker=_MARKERS[k % len(_MARKERS)], ms=2.2,
                       label=labels.get(pos, pos))
                lows.append(np.nanmin(lo))
            a.axhline(0.5, color=NULL_COLOR, ls="--", lw=0.8, zorder=0)
            a.set_title(_grid_title(g, metric))
            a.set_xlabel("layer")
            a.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        axes[0].set_ylabel("AUC")
        axes[0].set_ylim(min(0.4, float(np.nanmin(lows)) - 0.03), 1.02)
        _note(axes[0], f"n = {g.n_pos} + {g.n_neg}, {g.split}; {int(round(100 * g.level))}% CI")
        if len(positions) > 1:
            if ax is None:  # our own figure: one legend below the panels, clear of every line
                fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
                           ncols=min(len(positions), 4))
            else:
                axes[-1].legend(loc="best")
    return fig


# -- alignment -------------------------------------------------------------------------------------
def alignment_layers(
    result: AlignmentResult | Result,
    *,
    ax: Axes | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Cosine of the two models' directions per layer, against the band that random directions
    in ``d_model`` dimensions fall in (95%: shaded, 99%: dotted), and, when the result carries
    one, the label-permutation null's 95% quantile per layer (dashed)."""
    r: AlignmentResult = coerce(result, AlignmentResult)
    if not r.layers:
        raise ConfigError("the two direction sets share no layer labels")
    with paper_style():
        fig, (a,) = _panels(ax, 1, width, height)
        x = np.asarray(r.layers)
        a.fill_between([x.min() - 0.5, x.max() + 0.5], -r.null_q95, r.null_q95, color=NULL_COLOR,
                       alpha=NULL_BAND_ALPHA, lw=0, label=f"random directions (95%, d = {r.d_model})")
        for s in (-1, 1):
            a.axhline(s * r.null_q99, color=NULL_COLOR, ls=":", lw=0.8, label="99%" if s == 1 else None)
        a.axhline(0.0, color=NULL_COLOR, lw=0.5)
        perm_top = 0.0
        if r.permutation is not None:
            px, pq = np.asarray(r.permutation.layers), np.asarray(r.permutation.null_q95, dtype=np.float64)
            for s in (-1, 1):
                a.plot(px, s * pq, color=PALETTE[1], ls="--", lw=0.8,
                       label=f"shuffled labels (95%, {r.permutation.n_permutations} perm.)" if s == 1 else None)
            finite_q = pq[np.isfinite(pq)]
            perm_top = float(finite_q.max()) if finite_q.size else 0.0
        a.plot(x, r.cos, color=PALETTE[0], marker="o", ms=2.5, label=f"{r.name_a} vs {r.name_b}")
        a.set_xlim(x.min() - 0.5, x.max() + 0.5)
        a.set_xlabel("layer")
        a.set_ylabel("cosine similarity")
        a.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        finite = r.cos[np.isfinite(r.cos)]  # a zero direction has no cosine (NaN): a gap
        top = float(np.max(np.abs(finite))) if finite.size else 0.0
        lim = min(1.05, max(1.1 * top, 3 * r.null_q99, 1.1 * perm_top))
        low = finite.size and float(np.min(finite)) < -r.null_q99
        a.set_ylim(-lim if low or perm_top else -min(lim, 3 * r.null_q99), lim)
        a.legend(loc="best")
    return fig


def alignment_matrix(
    result: AlignmentResult | Result,
    *,
    ax: Axes | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Layer x layer cosine matrix (diverging colours, symmetric around 0)."""
    r: AlignmentResult = coerce(result, AlignmentResult)
    with paper_style():
        fig, (a,) = _panels(ax, 1, width, height if height is not None else 2.8)
        m = float(np.max(np.abs(r.matrix))) or 1.0
        im = a.imshow(r.matrix, cmap="PuOr_r", vmin=-m, vmax=m, origin="lower", aspect="auto",
                      extent=(-0.5, len(r.layers_b) - 0.5, -0.5, len(r.layers_a) - 0.5))
        for axis, layers in ((a.xaxis, r.layers_b), (a.yaxis, r.layers_a)):
            ticks = np.linspace(0, len(layers) - 1, min(len(layers), 6)).round().astype(int)
            axis.set_ticks(ticks, [str(layers[i]) for i in ticks])
        a.set_xlabel(f"layer ({r.name_b})")
        a.set_ylabel(f"layer ({r.name_a})")
        cb = fig.colorbar(im, ax=a, shrink=0.9)
        cb.set_label("cosine")
        cb.outline.set_linewidth(0.5)
    return fig


# -- spectra and subspaces -------------------------------------------------------------------------
def _as_list(items: Any, cls: type[Any]) -> list[Any]:
    if isinstance(items, (cls, Mapping)):
        items = [items]
    return [coerce(i, cls) for i in items]


def spectrum_plot(
    spectra: Spectrum | Result | Sequence[Spectrum | Result],
    *,
    n_components: int = 20,
    ax: Axes | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Explained variance per component (log scale) with the shuffled-feature null's upper
    quantile (dashed) -- components above it are structure, not noise."""
    items: list[Spectrum] = _as_list(spectra, Spectrum)
    with paper_style():
        fig, (a,) = _panels(ax, 1, width, height)
        for k, sp in enumerate(items):
            n = min(n_components, sp.explained.size)
            x = np.arange(1, n + 1)
            color = PALETTE[k % len(PALETTE)]
            a.plot(x, sp.explained[:n], color=color, marker=_MARKERS[k % len(_MARKERS)], ms=2.2,
                   label=f"{sp.label or 'data'} ({sp.n_above_null} above null)")
            if sp.n_null > 0:
                a.plot(x, sp.null_explained_hi[:n], color=color, ls="--", lw=0.8, alpha=0.8)
        if any(sp.n_null > 0 for sp in items):
            a.plot([], [], color=NULL_COLOR, ls="--", lw=0.8,
                   label=f"shuffled features ({int(round(100 * items[0].level))}%)")
        a.set_yscale("log")
        a.yaxis.set_minor_formatter(NullFormatter())  # 2x10^-2, 3x10^-2... clutter a small panel
        a.set_xlabel("component")
        a.set_ylabel("explained variance")
        a.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        a.legend(loc="upper right")
    return fig


def principal_angles_plot(
    comparisons: SubspaceComparison | Result | Sequence[SubspaceComparison | Result],
    *,
    ax: Axes | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Principal angles (degrees) between subspaces against random subspaces of the same sizes."""
    items: list[SubspaceComparison] = _as_list(comparisons, SubspaceComparison)
    with paper_style():
        fig, (a,) = _panels(ax, 1, width, height)
        for k, c in enumerate(items):
            x = np.arange(1, c.angles_deg.size + 1)
            color = PALETTE[k % len(PALETTE)]
            a.fill_between(x, c.null_lo_deg, c.null_hi_deg, color=NULL_COLOR, alpha=NULL_BAND_ALPHA, lw=0,
                           label="random subspaces" if k == 0 else None)
            a.plot(x, c.null_mean_deg, color=NULL_COLOR, ls="--", lw=0.8)
            a.plot(x, c.angles_deg, color=color, marker=_MARKERS[k % len(_MARKERS)], ms=2.5,
                   label=f"{c.label_a} vs {c.label_b} ({format_p(c.p_mean_angle, c.n_null)})")
        a.set_ylim(0, 92)
        a.set_yticks([0, 30, 60, 90])
        a.set_xlabel("principal angle index")
        a.set_ylabel("angle (°)")
        a.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        a.legend(loc="best")
    return fig


# -- specificity -----------------------------------------------------------------------------------
def specificity_plot(
    result: SpecificityResult | Result,
    *,
    label: str = "r",
    bins: int | None = None,
    ax: Axes | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Histogram of the random-direction null with the real direction (and its CI) and the
    controls marked, each with its empirical p-value."""
    r: SpecificityResult = coerce(result, SpecificityResult)
    with paper_style():
        fig, (a,) = _panels(ax, 1, width, height)
        if bins is None:
            bins = int(np.clip(1.2 * np.sqrt(r.null.size), 10, 50))
        a.hist(r.null, bins=bins, color=NULL_COLOR, alpha=0.8, lw=0,
               label=f"{r.n_random} random directions")
        if math.isfinite(r.real_lo) and math.isfinite(r.real_hi):
            # The CI as a bar along the top (a shaded span wider than the null hid the histogram).
            top = blended_transform_factory(a.transData, a.transAxes)
            a.plot([r.real_lo, r.real_hi], [0.97, 0.97], transform=top, color=PALETTE[0], lw=1.0,
                   marker="|", ms=5, label=f"{label}: {100 * r.level:g}% CI", clip_on=False)
        a.axvline(r.real, color=PALETTE[0], lw=1.5, label=f"{label} ({format_p(r.p, r.n_random)})")
        for k, (name, c) in enumerate(r.controls.items()):
            a.axvline(c["effect"], color=PALETTE[(k + 1) % len(PALETTE)], lw=1.1,
                      ls=_LINESTYLES[(k + 1) % len(_LINESTYLES)],
                      label=f"{name} ({format_p(c['p'], r.n_random)})")
        a.set_xlabel(r.effect_name)
        a.set_ylabel("count")
        # Above the axes: the real direction usually sits at the edge, where a legend would go.
        a.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, borderaxespad=0.2,
                 columnspacing=1.0)
    return fig


# -- behaviour -------------------------------------------------------------------------------------
_PROB_METRICS = ("zero_mass", "hrr_strict", "hrr_partial")


def metric_label(metric: str, m: ActionMetrics | None = None) -> str:
    if metric == "zero_mass":
        return "zero-motion mass" + (f" (±{m.window} bins)" if m is not None else "")
    if metric == "hrr_strict":
        return "HRR strict"
    if metric == "hrr_partial":
        return f"HRR partial (≥{m.partial_min}/{m.steps})" if m is not None else "HRR partial"
    if metric == "mean_bin":
        return "mean action bin"
    if metric == "magnitude":
        return f"|action| ({m.magnitude_space})" if m is not None else "|action|"
    raise ConfigError(f"unknown action metric {metric!r}")


def action_sweep(
    sweeps: Mapping[str, Sequence[tuple[float | int, ActionMetrics | Result]]]
    | Sequence[tuple[float | int, ActionMetrics | Result]],
    *,
    metrics: Sequence[str] = ("zero_mass", "hrr_strict"),
    xlabel: str = "α",
    ax: Axes | Sequence[Axes] | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Action metrics against the steering coefficient, one line (with CI band) per condition
    (e.g. RDT, RDT+, a random direction), one panel per metric."""
    series = dict(sweeps) if isinstance(sweeps, Mapping) else {"": sweeps}
    parsed = {name: sorted(((float(alpha), coerce(m, ActionMetrics)) for alpha, m in pts), key=lambda t: t[0])
              for name, pts in series.items()}
    with paper_style():
        fig, axes = _panels(ax, len(metrics), width, height)
        for a, metric in zip(axes, metrics, strict=True):
            ref = None
            for k, (name, pts) in enumerate(parsed.items()):
                if not pts:
                    continue
                ref = pts[0][1]
                x = np.array([p[0] for p in pts])
                v, lo, hi = (np.array(col) for col in zip(*(m.value(metric) for _, m in pts), strict=True))
                color = PALETTE[k % len(PALETTE)]
                a.fill_between(x, lo, hi, color=color, alpha=CI_ALPHA, lw=0)
                a.plot(x, v, color=color, marker=_MARKERS[k % len(_MARKERS)], ms=2.5, label=name or None)
            a.set_xlabel(xlabel)
            a.set_ylabel(metric_label(metric, ref))
            if metric in _PROB_METRICS:
                a.set_ylim(-0.02, 1.02)
        if len(parsed) > 1:
            axes[0].legend(loc="best")
    return fig


def action_bars(
    modes: Mapping[str, ActionMetrics | Result],
    *,
    metrics: Sequence[str] = _PROB_METRICS,
    ax: Axes | None = None,
    width: Width | None = None,
    height: float | None = None,
) -> Figure:
    """Grouped bars (with CI error bars) of action metrics per condition (e.g. target modes)."""
    parsed = {name: coerce(m, ActionMetrics) for name, m in modes.items()}
    if not parsed:
        raise ConfigError("action_bars needs at least one condition")
    n = len(parsed)
    bar_w = 0.8 / n
    with paper_style():
        fig, (a,) = _panels(ax, 1, width, height)
        x = np.arange(len(metrics))
        for k, (name, m) in enumerate(parsed.items()):
            v, lo, hi = (np.array(col) for col in zip(*(m.value(metric) for metric in metrics), strict=True))
            a.bar(x - 0.4 + bar_w * (k + 0.5), v, bar_w, color=PALETTE[k % len(PALETTE)], label=name,
                  yerr=np.vstack([v - lo, hi - v]), error_kw={"elinewidth": 0.7, "capsize": 1.5,
                                                             "capthick": 0.7})
        first = next(iter(parsed.values()))
        a.set_xticks(x, [metric_label(metric, first).replace(" (", "\n(") for metric in metrics])
        if all(metric in _PROB_METRICS for metric in metrics):
            a.set_ylim(0, 1.02)
            a.set_ylabel("rate / probability")
        a.legend(loc="best")
    return fig
