"""Pick the best layer of a grid and report its p-value adjusted for having picked it.

Taking the layer with the highest score out of ``m`` and quoting its raw p-value overstates the
evidence: with 32 null layers the smallest raw p-value is below 0.05 four times in five. The
p-value reported with a picked layer is therefore adjusted across the whole grid (Holm by
default, which controls the family-wise error rate under any dependence between layers;
Benjamini-Hochberg on request). The pick itself is unchanged: the highest score, the lowest
index on ties.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float

from rdt_interp.analysis._result import ResultMixin
from rdt_interp.analysis.probe_grid import ProbeGrid
from rdt_interp.analysis.stats import Array, as_tensor, benjamini_hochberg, holm
from rdt_interp.errors import ConfigError

_ADJUST = {"holm": holm, "bh": benjamini_hochberg}


@dataclass(frozen=True, eq=False)
class LayerPick(ResultMixin):
    """The picked layer, its raw and grid-adjusted p-value, and every layer's adjusted p-value.

    Unpacks as ``layer, p_adjusted, p_adjusted_all = pick``. ``significant`` is
    ``p_adjusted <= level``. ``p_adjusted_all`` pairs ``layers``; NaN where a layer had no test.
    """

    layer: int
    index: int
    score: float
    p: float
    p_adjusted: float
    p_adjusted_all: Float[np.ndarray, "layer"]
    layers: tuple[int, ...]
    method: str
    level: float
    significant: bool

    _arrays: ClassVar[tuple[str, ...]] = ("p_adjusted_all",)
    _undefined: ClassVar[dict[str, str]] = {"p_adjusted_all": "no test at this layer (its p-value is undefined)"}

    def __iter__(self) -> Iterator[Any]:
        return iter((self.layer, self.p_adjusted, self.p_adjusted_all))


def pick_layer(
    p_values: Float[Array, "layer"] | Sequence[float],
    scores: Float[Array, "layer"] | Sequence[float] | None = None,
    *,
    layers: Sequence[int] | None = None,
    higher_is_better: bool = True,
    method: str = "holm",
    level: float = 0.05,
) -> LayerPick:
    """The best layer of a grid, with its p-value adjusted across the grid.

    Parameters
    ----------
    p_values : array of float, shape (layer,)
        One raw p-value per layer (NaN: no test at that layer; it is left out of the family).
    scores : array of float, shape (layer,), optional
        What the layer is picked by (e.g. an AUC). Default: the smallest p-value is picked.
        NaN scores are never picked.
    layers : sequence of int, optional
        Layer labels of the entries (default ``0..L-1``).
    higher_is_better : bool
        Pick the highest score (default) or the lowest.
    method : {"holm", "bh"}
        Holm-Bonferroni (family-wise error) or Benjamini-Hochberg (false discovery rate).
    level : float
        Significance level of ``significant``.

    Returns
    -------
    LayerPick
        ``layer``, ``index`` (position in the grid), ``score``, raw ``p``, ``p_adjusted``,
        ``p_adjusted_all``, ``significant``.

    Raises
    ------
    ConfigError
        Empty grid, mismatched lengths, p-values outside ``[0, 1]``, no finite score, duplicate
        layer labels, unknown ``method``.

    Examples
    --------
    >>> pick = pick_layer([0.2, 0.01, 0.04], scores=[0.6, 0.9, 0.8], layers=[4, 8, 12])
    >>> pick.layer, round(pick.p_adjusted, 3), pick.p_adjusted_all.round(3).tolist()
    (8, 0.03, [0.2, 0.03, 0.08])
    >>> layer, p_adj, _ = pick
    """
    if method not in _ADJUST:
        raise ConfigError(f"unknown adjustment {method!r}", fix="use method='holm' or method='bh'")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    p = _vector(p_values, "p_values")
    if p.numel() == 0:
        raise ConfigError("pick_layer needs at least one layer")
    s = p if scores is None else _vector(scores, "scores")
    if s.shape != p.shape:
        raise ConfigError(f"{s.numel()} scores for {p.numel()} p-values", fix="pass one score per layer")
    labels = tuple(range(p.numel())) if layers is None else tuple(int(v) for v in layers)
    if len(labels) != p.numel() or len(set(labels)) != len(labels):
        raise ConfigError(f"layers {list(labels)} must be {p.numel()} distinct labels")
    adjusted = _ADJUST[method](p)
    key = p if scores is None else (-s if higher_is_better else s)  # the smallest key is picked
    if bool(torch.isnan(key).all()):
        raise ConfigError("no layer has a finite score (or p-value) to pick by",
                          fix="check the grid: every entry is NaN")
    key = torch.where(torch.isnan(key), torch.full_like(key, math.inf), key)
    i = int(torch.nonzero(key == key.min()).flatten()[0])
    p_adj = float(adjusted[i])
    return LayerPick(layer=labels[i], index=i, score=float(s[i]), p=float(p[i]), p_adjusted=p_adj,
                     p_adjusted_all=adjusted.numpy(), layers=labels, method=method, level=float(level),
                     significant=bool(p_adj <= level))


# metric -> (its p-value field, how the peak is scored): proj_p is two-sided around AUC 0.5 / d 0,
# probe_p one-sided (a probe is trained to score positives higher).
_GRID_METRICS = {"proj_auc": "proj_p", "proj_d": "proj_p", "probe_auc": "probe_p"}


def grid_peaks(grid: ProbeGrid, metric: str = "proj_auc", *, method: str = "holm",
               level: float = 0.05) -> dict[str, LayerPick]:
    """Per position (role) of a :class:`~rdt_interp.analysis.probe_grid.ProbeGrid`: the peak layer of
    ``metric`` with its p-value adjusted across the grid's layers (one family per role).

    ``proj_auc`` peaks at the largest ``|AUC - 0.5|`` and ``proj_d`` at the largest ``|d|``
    (their p-value ``proj_p`` is two-sided); ``probe_auc`` at the largest AUC (``probe_p``,
    one-sided; NaN for K-fold probes without ``n_perm_refit``, so the adjusted p is then NaN).
    The returned ``score`` is the distance / absolute value the peak was picked by.

    Examples
    --------
    >>> from rdt_interp.analysis.probe_grid import probe_grid
    >>> from rdt_interp.analysis.probes import Labeled
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(40) < 20
    >>> x = torch.randn(40, 3, 1, 8, generator=g)
    >>> x[:, 2, 0, 0] += 2.0 * y.float()  # the classes differ at layer 2 only
    >>> grid = probe_grid(Labeled(x, y, (0, 1, 2), ("last",), "test"), directions=torch.eye(8)[0],
    ...                   probe=False, n_boot=10, n_perm=199)
    >>> peak = grid_peaks(grid)["last"]
    >>> peak.layer, peak.significant
    (2, True)
    """
    if metric not in _GRID_METRICS:
        raise ConfigError(f"unknown grid metric {metric!r}", fix=f"use one of: {', '.join(_GRID_METRICS)}")
    p_name = _GRID_METRICS[metric]
    values = np.asarray(getattr(grid, metric), dtype=np.float64)
    scores = np.abs(values - 0.5) if metric == "proj_auc" else np.abs(values) if metric == "proj_d" else values
    p = np.asarray(getattr(grid, p_name), dtype=np.float64)
    return {pos: pick_layer(p[:, j], scores[:, j], layers=grid.layers, method=method, level=level)
            for j, pos in enumerate(grid.positions)}


def _vector(v: Any, what: str) -> torch.Tensor:  # the check itself: any shape in
    t = (torch.as_tensor(v, dtype=torch.float64) if isinstance(v, list | tuple)
         else as_tensor(v, dtype=torch.float64))
    if t.ndim != 1:
        raise ConfigError(f"{what} must be one value per layer (1-D), got shape {tuple(t.shape)}",
                          fix="for a layer x role grid, pass one role's column, or flatten it to pick "
                              "over both at once")
    return t


__all__ = ["LayerPick", "grid_peaks", "pick_layer"]
