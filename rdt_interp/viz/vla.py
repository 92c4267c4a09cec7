"""Figures of the VLA steering study (:mod:`rdt_interp.studies.vla`), from saved results.

* :func:`alpha_sweep_figure` -- action metrics against alpha, one colour per target mode,
  solid = harmful, dashed = benign instructions, CI bands; alpha 0 is the unsteered model;
* :func:`target_modes_figure` -- grouped bars per target mode at one alpha (harmful | benign);
* :func:`bin_shift_figure` -- distribution of the chosen action bins, unsteered vs steered;
* :func:`decoupling_figure` -- harmful-vs-benign AUC per layer and role;
* :func:`specificity_figure` -- the real direction against the random-direction null.

Results may be the dataclasses or their ``to_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from rdt_interp.errors import ConfigError
from rdt_interp.studies.vla.results import (
    ConditionResult,
    DecouplingResult,
    SweepResult,
    VLARDTResult,
    load_vla_rdt,
)
from rdt_interp.viz.figures import (
    _PROB_METRICS,
    action_bars,
    metric_label,
    probe_layers,
    specificity_plot,
)
from rdt_interp.viz.style import (
    CI_ALPHA,
    NULL_COLOR,
    PALETTE,
    Width,
    new_figure,
    paper_style,
    save_figure,
)

MODE_LABELS = {"none": "unsteered", "action": "RDT (action)", "text": "text only",
               "text+action": "RDT+ (text+action)", "all": "all positions"}
ROLE_LABELS = {"image": "image (mean)", "text": "text (mean)", "last_text": "last text",
               "first_action": "first action"}
_LABEL_STYLE = {"harmful": "-", "benign": "--"}


def _sweep(result: Any) -> Any:
    return result if isinstance(result, SweepResult) else SweepResult.from_dict(result)


def _cond(result: Any) -> Any:
    return result if isinstance(result, ConditionResult) else ConditionResult.from_dict(result)


def alpha_sweep_figure(
    sweep: Any,
    *,
    split: str = "test",
    metrics: Sequence[str] = ("zero_mass", "hrr_partial", "magnitude"),
    modes: Sequence[str] | None = None,
    labels: Sequence[str] = ("harmful", "benign"),
    width: Width = "page",
    height: float | None = 2.0,
) -> Figure:
    """Action metrics vs alpha: colour = target mode, line style = instruction label."""
    s = _sweep(sweep)
    modes = tuple(modes) if modes is not None else s.modes
    if not modes:
        raise ConfigError("the sweep has no steered condition")
    with paper_style():
        fig, axes = new_figure(width, height, ncols=len(metrics))
        ref = s.baseline(split).metrics[labels[0]]
        for a, metric in zip(axes, metrics, strict=True):
            for k, mode in enumerate(modes):
                color = PALETTE[k % len(PALETTE)]
                for label in labels:
                    pts = s.series(mode, label, split)
                    x = np.array([p[0] for p in pts])
                    v, lo, hi = (np.array(c) for c in zip(*(m.value(metric) for _, m in pts), strict=True))
                    a.fill_between(x, lo, hi, color=color, alpha=CI_ALPHA * 0.8, lw=0)
                    a.plot(x, v, color=color, ls=_LABEL_STYLE.get(label, ":"), marker="o", ms=2.2)
            a.set_xlabel("α")
            a.set_ylabel(_metric_label(metric, ref))
            if metric in _PROB_METRICS:
                a.set_ylim(-0.02, 1.02)
            a.xaxis.set_major_locator(MaxNLocator(nbins=5))
        handles = [Line2D([], [], color=PALETTE[k % len(PALETTE)], lw=1.2, label=MODE_LABELS.get(m, m))
                   for k, m in enumerate(modes)]
        handles += [Line2D([], [], color="#444444", ls=_LABEL_STYLE.get(lab, ":"), lw=1.0, label=lab)
                    for lab in labels]
        n = " + ".join(str(s.baseline(split).metrics[lab].n) for lab in labels)
        handles.append(Line2D([], [], color="none", label=f"n = {n} ({split}); 95% CI"))
        fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), frameon=False)
    return fig


def _metric_label(metric: str, m: Any) -> str:
    if metric == "magnitude":
        return f"action norm ({m.magnitude_space})"
    return metric_label(metric, m)


def target_modes_figure(
    targets: Any,
    *,
    split: str = "test",
    metrics: Sequence[str] = ("zero_mass", "hrr_strict", "hrr_partial"),
    labels: Sequence[str] = ("harmful", "benign"),
    width: Width = "page",
    height: float | None = 2.1,
) -> Figure:
    """Bars per target mode (unsteered first) at the sweep's alpha, one panel per label."""
    s = _sweep(targets)
    conds = [c for c in s.conditions if c.split == split]
    if not conds:
        raise ConfigError(f"no conditions on split {split!r}")
    alphas = sorted({c.alpha for c in conds if c.mode != "none"})
    with paper_style():
        fig, axes = new_figure(width, height, ncols=len(labels), sharey=True)
        for a, label in zip(axes, labels, strict=True):
            modes = {MODE_LABELS.get(c.mode, c.mode): c.metrics[label] for c in conds}
            action_bars(modes, metrics=metrics, ax=a)
            a.set_title(f"{label} instructions (n = {conds[0].metrics[label].n})")
        for a in axes[1:]:
            legend = a.get_legend()
            if legend is not None:
                legend.remove()
            a.set_ylabel("")
        axes[0].get_legend().remove()
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside upper center", ncols=len(names), frameon=False)
        if alphas:
            axes[-1].text(0.98, 0.98, "α = " + ", ".join(f"{x:g}" for x in alphas), ha="right", va="top",
                          transform=axes[-1].transAxes, fontsize=6.5, color="#555555")
    return fig


def bin_shift_figure(
    baseline: Any,
    steered: Any,
    *,
    labels: Sequence[str] = ("harmful", "benign"),
    group: int = 4,
    width: Width = "page",
    height: float | None = 1.9,
) -> Figure:
    """Share of chosen action bins (all action dims pooled, ``group`` bins per bar), unsteered
    vs steered, one panel per label; the zero-motion bin is marked and the paired mean bin shift
    (with its CI) is in the title."""
    base, st = _cond(baseline), _cond(steered)
    if group < 1:
        raise ConfigError("group must be >= 1")
    with paper_style():
        fig, axes = new_figure(width, height, ncols=len(labels), sharey=True)
        for a, label in zip(axes, labels, strict=True):
            b = np.asarray(base.bin_counts[label], dtype=float)
            c = np.asarray(st.bin_counts[label], dtype=float)
            n_groups = -(-b.size // group)
            pad = n_groups * group - b.size
            bg = np.pad(b, (0, pad)).reshape(n_groups, group).sum(1) / b.sum()
            cg = np.pad(c, (0, pad)).reshape(n_groups, group).sum(1) / c.sum()
            edges = np.arange(n_groups + 1) * group - 0.5
            a.stairs(bg, edges, fill=True, color=NULL_COLOR, alpha=0.7, lw=0, label="unsteered")
            a.stairs(cg, edges, color=PALETTE[1], lw=1.0,
                     label=f"{MODE_LABELS.get(st.mode, st.mode)}, α = {st.alpha:g}")
            zb = st.metrics[label].zero_bins[0]
            a.axvline(zb, color="#333333", ls=":", lw=0.7, label="zero motion")
            sh = st.shift[label]
            a.set_title(f"{label}: shift {sh.shift:+.1f} [{sh.shift_lo:+.1f}, {sh.shift_hi:+.1f}], "
                        f"abs. shift {sh.abs_shift:.1f} bins")
            a.set_xlabel("action bin")
            a.set_xlim(edges[0], edges[-1])
        axes[0].set_ylabel(f"share of tokens (per {group} bins)")
        axes[0].legend(loc="upper left")
    return fig


def decoupling_figure(result: Any, *, roles: Sequence[str] | None = None, width: Width = "page",
                      height: float | None = 2.1) -> Figure:
    """Harmful vs benign: projection AUC along r and CV-probe AUC per layer, one line per role."""
    r = result if isinstance(result, DecouplingResult) else DecouplingResult.from_dict(result)
    shown = tuple(roles) if roles is not None else r.roles
    fig = probe_layers(r.grid, positions=shown, labels={k: ROLE_LABELS.get(k, k) for k in shown},
                       width=width, height=height)
    with paper_style():
        for a in fig.axes:
            a.axvline(r.layer, color="#333333", ls=":", lw=0.7, zorder=0)
    return fig


def specificity_figure(result: Any, *, label: str = "r", width: Width = "column",
                       height: float | None = 2.2) -> Figure:
    """The random-direction null of the steering effect, with ``r`` and ``-r`` marked."""
    fig = specificity_plot(result, label=label, width=width, height=height)
    return fig


def vla_rdt_figures(result: VLARDTResult | str | Path, out_dir: str | Path) -> list[Path]:
    """Every figure of a run (PDF + PNG): alpha sweep, target modes, action-bin shift,
    decoupling per layer, specificity histogram. Returns the written paths."""
    res = result if isinstance(result, VLARDTResult) else load_vla_rdt(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    written += save_figure(alpha_sweep_figure(res.sweep, split="test"), out / "alpha_sweep")
    written += save_figure(target_modes_figure(res.targets), out / "target_modes")
    rdt_name = "action" if "action" in res.config.target_modes else res.targets.modes[0]
    written += save_figure(bin_shift_figure(res.targets.baseline("test"),
                                            res.targets.get(rdt_name, res.alpha, "test")), out / "bin_shift")
    if res.decoupling is not None:
        written += save_figure(decoupling_figure(res.decoupling), out / "decoupling")
    if res.specificity is not None:
        written += save_figure(specificity_figure(res.specificity), out / "specificity")
    return written


__all__ = ["alpha_sweep_figure", "bin_shift_figure", "decoupling_figure", "specificity_figure",
           "target_modes_figure", "vla_rdt_figures"]
