"""Figures of the chat-side study (:mod:`rdt_interp.studies.chat`), from saved results.

* :func:`refusal_bars` -- refusal rate with 95% Wilson CIs: baseline on harmful and harmless test
  prompts, harmful under directional ablation, harmless under activation addition;
* :func:`selection_heatmap` -- ablation refusal score, steering score and KL per (layer,
  position) candidate, the chosen one marked and the ones failing a filter crossed;
* :func:`alpha_sweep_chat` -- harmless refusal rate against the addition coefficient (validation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rdt_interp.directions.selection import SelectionResult
from rdt_interp.viz.style import CI_ALPHA, NULL_COLOR, OKABE_ITO, Width, new_figure, paper_style

_CONDITIONS = (
    ("baseline_harmful", "harmful\nbaseline", OKABE_ITO["vermillion"]),
    ("ablation_harmful", "harmful\nablated r", OKABE_ITO["vermillion"]),
    ("baseline_harmless", "harmless\nbaseline", OKABE_ITO["blue"]),
    ("addition_harmless", "harmless\n+α·r", OKABE_ITO["blue"]),
)


def refusal_bars(evaluation: Mapping[str, Any], *, alpha: float | None = None, model: str = "",
                 removed: Mapping[str, Any] | None = None, width: Width = "column",
                 height: float | None = 1.9) -> Figure:
    """Refusal rates (substring judge) of the four test conditions with Wilson CIs; ``removed``
    (the summary's ``ablation_removed_refusals``) adds the share of baseline refusals ablation
    removed."""
    with paper_style():
        fig, (ax,) = new_figure(width, height)
        for i, (key, _label, color) in enumerate(_CONDITIONS):
            if key not in evaluation:
                continue
            e = evaluation[key]
            steered = key.startswith(("ablation", "addition"))
            ax.bar(i, e["refusal"], color=color, alpha=1.0 if steered else 0.45, width=0.7,
                   edgecolor=color, hatch="" if steered else "///")
            ax.errorbar(i, e["refusal"], yerr=[[e["refusal"] - e["refusal_lo"]], [e["refusal_hi"] - e["refusal"]]],
                        color="black", capsize=2, lw=0.7)
            ax.text(i, min(e["refusal_hi"] + 0.03, 1.02), f"{100 * e['refusal']:.0f}%", ha="center",
                    va="bottom", fontsize=6.5)
        ax.set_xticks(range(len(_CONDITIONS)), [c[1] for c in _CONDITIONS])
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("refusal rate (test)")
        n = next(iter(evaluation.values()))["n"]
        title = f"{model}: " if model else ""
        suffix = f", α = {alpha:g}" if alpha is not None else ""
        if removed and removed.get("n"):
            suffix += (f"\nablation removed {100 * removed['rate']:.0f}% [{100 * removed['lo']:.0f}, "
                       f"{100 * removed['hi']:.0f}] of {removed['n']} baseline refusals")
        ax.set_title(f"{title}n = {n} per bar{suffix}", loc="left")
    return fig


def selection_heatmap(selection: SelectionResult | Mapping[str, Any], *, width: Width = "page",
                      height: float | None = 2.1) -> Figure:
    """Ablation refusal score, steering score (when every candidate has one) and KL per candidate
    (screening stage, or final if unscreened)."""
    sel = selection if isinstance(selection, SelectionResult) else SelectionResult.from_dict(dict(selection))
    stage = "screen" if any(s.stage == "screen" for s in sel.scores) else "final"
    panels = [("ablation", "refusal score, r ablated (harmful)", "viridis")]
    if stage == "final":
        panels.append(("steering", f"refusal score, +{sel.config.steering_alpha:g}·r (harmless)", "viridis"))
    panels.append(("kl", "KL(base ‖ ablated), harmless", "magma_r"))
    limit = sel.config.layer_limit(sel.n_layers)
    with paper_style():
        fig, axes = new_figure(width, height, ncols=len(panels))
        for ax, (metric, label, cmap) in zip(axes, panels, strict=True):
            layers, positions, grid = sel.grid(metric, stage)
            values = np.array(grid, dtype=float).T  # positions x layers
            if metric == "kl":
                values = np.log10(np.clip(values, 1e-4, None))
                label = "log10 " + label
            im = ax.imshow(values, aspect="auto", cmap=cmap, origin="lower",
                           extent=(layers[0] - 0.5, layers[-1] + 0.5, -0.5, len(positions) - 0.5))
            ax.set_yticks(range(len(positions)), [str(p) for p in positions])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer")
            ax.set_ylabel("post-instruction position")
            cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
            cb.ax.tick_params(labelsize=6)
            cb.set_label(label, fontsize=6.5)
            for s in sel.final_scores():
                if not s.passes and s.position in positions:
                    ax.plot(s.layer, positions.index(s.position), marker="x", color="white", ms=2.5, mew=0.5, alpha=0.8)
            ax.plot(sel.layer, positions.index(sel.position), marker="*", color="white", ms=8,
                    mec="black", mew=0.6)
            if limit <= layers[-1] + 1:
                ax.axvline(limit - 0.5, color=NULL_COLOR, lw=0.6, ls="--")
        note = "" if sel.filters_passed else f"\nnone passed; relaxation: {sel.relaxation}"
        axes[0].set_title(f"chosen: layer {sel.layer}, position {sel.position}{note}", loc="left")
        axes[-1].set_title(f"×: fails KL ≤ {sel.config.kl_threshold:g} or steering ≥ 0\n"
                           f"layers ≥ {limit} (int({sel.config.max_layer_fraction:g}·L)) not scored", loc="left")
    return fig


def alpha_sweep_chat(alpha_sweep: Mapping[str, Any], *, width: Width = "column",
                     height: float | None = 1.8) -> Figure:
    """Refusal rate on harmless validation prompts vs the activation-addition coefficient."""
    rows = alpha_sweep["rows"]
    a = np.array([r["alpha"] for r in rows])
    v = np.array([r["refusal"] for r in rows])
    lo = np.array([r["lo"] for r in rows])
    hi = np.array([r["hi"] for r in rows])
    with paper_style():
        fig, (ax,) = new_figure(width, height)
        ax.fill_between(a, lo, hi, color=OKABE_ITO["blue"], alpha=CI_ALPHA, lw=0)
        ax.plot(a, v, marker="o", color=OKABE_ITO["blue"])
        chosen = alpha_sweep["chosen_alpha"]
        ax.axvline(chosen, color=NULL_COLOR, ls="--", lw=0.7)
        ax.text(chosen, 1.02, f" chosen α = {chosen:g}", fontsize=6.5, va="bottom")
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("α (coefficient of the raw diff-in-means vector)")
        ax.set_ylabel("harmless refusal (val)")
        ax.set_title(f"n = {alpha_sweep['n']} validation prompts", loc="left")
    return fig
