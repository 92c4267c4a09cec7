"""A grid of linear read-outs over (layer, position), with intervals and p-values; layer
selection on validation data; transfer of a probe to another model.

Two read-outs per cell, each with a percentile bootstrap CI and a label-permutation p-value:

* **projection AUC** (and Cohen's d) along a direction: given (e.g. from another model), the
  class-mean difference of a separate ``fit`` split, or by default the class-mean difference
  *cross-fitted* over stratified folds, so that no sample is scored by a direction that saw it;
* **logistic-regression probe AUC**: fitted on the ``fit`` split and scored on held-out data,
  or by default K-fold CV with out-of-fold scores (an in-sample probe on thousands of
  dimensions separates anything).

With a ``fit`` split every interval and p-value is exact. Cross-fitting and CV pool scores of
different fits, so their bootstrap intervals are approximate; their p-values come from
within-fold label permutations with re-fitting (:class:`ProbeGrid` says which is which).

Layer selection happens on a validation split (:func:`select_layer` refuses a split named
``test``; :func:`evaluate_selected` selects on one split and reports another). A fitted
:class:`~rdt_interp.analysis.probes.LinearProbe` transfers to another model of the same width
(:func:`transfer_auc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from rdt_interp.analysis._result import ResultMixin
from rdt_interp.analysis.probes import (
    Labeled,
    LinearProbe,
    _grid_directions,
    _index,
    _project,
    class_mean_difference,
)
from rdt_interp.analysis.stats import (
    Array,
    as_labels,
    as_tensor,
    auc_columns,
    auc_groups,
    bootstrap_ci,
    cohens_d,
    empirical_pvalue,
    permutation_test,
    stratified_folds,
    threads_for,
)
from rdt_interp.errors import ConfigError, DModelMismatchError


@dataclass(frozen=True, eq=False)
class ProbeGrid(ResultMixin):
    """Per (layer, position): projection AUC / Cohen's d and probe AUC, with CIs and p-values.

    How each number was obtained is spelled out in ``proj_source`` / ``probe_source`` and in
    ``proj_method`` / ``probe_method``:

    * a direction fixed before seeing ``data`` (given, or from a ``fit`` split) and a probe fitted
      on a ``fit`` split give exact intervals (stratified bootstrap of the test samples) and exact
      label-permutation p-values;
    * cross-fitted directions and K-fold CV probes pool out-of-fold scores from different fits,
      which a bootstrap of those scores cannot see: their intervals are approximate (they
      undercover under the null at small n / large d). Their p-values re-fit under within-fold
      label permutations (exact): always for the cross-fitted direction (cheap, through the Gram
      matrix), for CV probes only with ``n_perm_refit > 0`` (costly; NaN otherwise).

    ``proj_p`` is two-sided around AUC 0.5 (a direction may be flipped); ``probe_p`` is
    one-sided (a probe is trained to score positives higher). p-values are per cell; adjust for
    the grid with :func:`rdt_interp.analysis.stats.holm`.
    """

    layers: tuple[int, ...]
    positions: tuple[str, ...]
    split: str
    n_pos: int
    n_neg: int
    proj_auc: Float[np.ndarray, "layer pos"]
    proj_auc_lo: Float[np.ndarray, "layer pos"]
    proj_auc_hi: Float[np.ndarray, "layer pos"]
    proj_d: Float[np.ndarray, "layer pos"]
    proj_d_lo: Float[np.ndarray, "layer pos"]
    proj_d_hi: Float[np.ndarray, "layer pos"]
    proj_p: Float[np.ndarray, "layer pos"]
    probe_auc: Float[np.ndarray, "layer pos"]
    probe_auc_lo: Float[np.ndarray, "layer pos"]
    probe_auc_hi: Float[np.ndarray, "layer pos"]
    probe_p: Float[np.ndarray, "layer pos"]
    proj_source: str
    proj_method: str
    probe_source: str
    probe_method: str
    folds: int
    C: float
    n_boot: int
    n_perm: int
    n_perm_refit: int
    seed: int
    level: float
    n_unconverged: int = 0
    model: dict[str, Any] = field(default_factory=dict)

    _arrays: ClassVar[tuple[str, ...]] = (
        "proj_auc", "proj_auc_lo", "proj_auc_hi", "proj_d", "proj_d_lo", "proj_d_hi", "proj_p",
        "probe_auc", "probe_auc_lo", "probe_auc_hi", "probe_p")
    _undefined: ClassVar[dict[str, str]] = {
        name: "Cohen's d undefined: zero pooled variance (identical projections, e.g. layer 0 over "
        "template tokens)" for name in ("proj_d", "proj_d_lo", "proj_d_hi")}

    def index(self, layer: int, position: str | None = None) -> tuple[int, int]:
        return _index(self.layers, self.positions, layer, position)

    def cell(self, layer: int, position: str | None = None) -> dict[str, float]:
        i, j = self.index(layer, position)
        return {name: float(getattr(self, name)[i, j]) for name in self._arrays}

    def series(
        self, metric: str, position: str | None = None
    ) -> tuple[tuple[int, ...], Float[np.ndarray, "layer"], Float[np.ndarray, "layer"], Float[np.ndarray, "layer"]]:
        """``(layers, value, low, high)`` of a metric across layers at one position."""
        _check_metric(metric)
        _, j = self.index(self.layers[0], position)
        return (self.layers, getattr(self, metric)[:, j], getattr(self, f"{metric}_lo")[:, j],
                getattr(self, f"{metric}_hi")[:, j])


def _check_metric(metric: str) -> None:
    if metric not in ("proj_auc", "probe_auc"):
        raise ConfigError(f"metric must be proj_auc or probe_auc, got {metric!r}")


def _auc_and_d(p: Tensor, q: Tensor) -> Tensor:
    return torch.stack([auc_groups(p, q), cohens_d(p, q)], dim=1)


def _intervals(scores: Float[Tensor, "n k"], y: Bool[Tensor, "n"], *, with_d: bool, n_boot: int,
               seed: int, level: float) -> dict[str, Tensor]:
    pos, neg = scores[y], scores[~y]
    if with_d:
        est, lo, hi = bootstrap_ci(_auc_and_d, pos, neg, n_boot=n_boot, seed=seed, level=level)
        return {"auc": est[0], "auc_lo": lo[0], "auc_hi": hi[0], "d": est[1], "d_lo": lo[1], "d_hi": hi[1]}
    est, lo, hi = bootstrap_ci(auc_groups, pos, neg, n_boot=n_boot, seed=seed, level=level)
    return {"auc": est, "auc_lo": lo, "auc_hi": hi}


def _within_fold_permutations(
    y: Bool[Tensor, "n"], split_idx: Sequence[tuple[np.ndarray, np.ndarray]], n_perm: int, seed: int
) -> Bool[Tensor, "n_perm n"]:
    """Labels shuffled inside each test fold: per-fold class counts, hence the stratified folds,
    stay valid, so under the null every row is as likely as the observed labels."""
    gen = torch.Generator().manual_seed(seed)
    out = y[None].repeat(n_perm, 1)
    for _, te in split_idx:
        rows = torch.as_tensor(te)
        perm = torch.rand((n_perm, rows.numel()), generator=gen).argsort(dim=1)
        out[:, rows] = y[rows][perm]
    return out


def _crossfit_null(
    x: Float[Tensor, "n k d"], labels: Bool[Tensor, "n_perm n"],
    split_idx: Sequence[tuple[np.ndarray, np.ndarray]],
) -> Float[Tensor, "n_perm k"]:
    """Cross-fitted projection AUC re-fitted under each row of ``labels``.

    The class-mean difference is linear in the labels, so with the Gram matrix ``G = X X^T``
    the out-of-fold scores of every permutation are two matrix products per fold.
    """
    n_perm, n = labels.shape
    out = torch.empty(n_perm, x.shape[1], dtype=torch.float64)
    for c in range(x.shape[1]):
        # Centred as in probe_grid; float32 like the activations (float64 doubles the time).
        xc = x[:, c].float()
        xc = xc - xc.mean(dim=0, keepdim=True)
        gram = xc @ xc.T
        scores = torch.empty(n, n_perm, dtype=torch.float32)
        for tr, te in split_idx:
            tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
            lab = labels[:, tr_t].T  # [n_train, n_perm]
            n1 = lab.sum(dim=0, keepdim=True).float()
            w = torch.where(lab, 1.0 / n1, -1.0 / (lab.shape[0] - n1))
            g_tr = gram[tr_t][:, tr_t]
            norm = (w * (g_tr @ w)).sum(dim=0).clamp_min(1e-30).sqrt()
            scores[te_t] = (gram[te_t][:, tr_t] @ w) / norm
        out[:, c] = auc_columns(scores, labels.T)
    return out


def _oof_probe_scores(
    x: Float[Tensor, "n d"], y: Bool[Tensor, "n"], split_idx: Sequence[tuple[np.ndarray, np.ndarray]],
    C: float, max_iter: int,
) -> tuple[Tensor, int]:
    oof = torch.empty(x.shape[0], dtype=torch.float64)
    unconverged = 0
    for tr, te in split_idx:
        probe = LinearProbe.fit(x[tr], y[tr], C=C, max_iter=max_iter)
        unconverged += not probe.converged
        oof[te] = probe.decision_function(x[te])
    return oof, unconverged


def probe_grid(
    data: Labeled,
    *,
    directions: Float[Array, "..."] | None = None,
    fit: Labeled | None = None,
    probe: bool = True,
    folds: int = 5,
    C: float = 1.0,
    max_iter: int = 2000,
    n_boot: int = 1000,
    n_perm: int = 1000,
    n_perm_refit: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> ProbeGrid:
    """Projection and logistic-probe statistics for every (layer, position) cell of ``data``.

    Projection direction: ``directions`` (``[d]``, ``[layer, d]`` or ``[layer, pos, d]``) if
    given, else the class-mean difference of ``fit`` (a *different* split), else the class-mean
    difference cross-fitted over ``folds`` stratified folds of ``data``.
    Probe: fitted on ``fit`` and scored on ``data`` (held out) if ``fit`` is given, else K-fold
    CV on ``data`` (out-of-fold scores). ``probe=False`` skips the probes (the slow part:
    layer x position x folds fits, times ``n_perm_refit`` for CV p-values).

    Pass a ``fit`` split whenever there is one: every interval and p-value is then exact.
    """
    with threads_for(data.x.numel()):
        return _probe_grid(data, directions, fit, probe, folds, C, max_iter, n_boot, n_perm,
                           n_perm_refit, seed, level)


def _probe_grid(
    data: Labeled, directions: Float[Array, "..."] | None, fit: Labeled | None, probe: bool,
    folds: int, C: float, max_iter: int, n_boot: int, n_perm: int, n_perm_refit: int, seed: int,
    level: float,
) -> ProbeGrid:
    x, y = data.x, data.y
    n, L, P, _ = x.shape
    k = L * P
    if fit is not None:
        _check_separate(fit, data, "fit")
        if fit.layers != data.layers or fit.positions != data.positions:
            raise ConfigError("fit and data have different layer/position grids",
                              fix="capture both splits with the same layers and selector")
        if fit.d_model != data.d_model:
            raise DModelMismatchError(expected=data.d_model, actual=fit.d_model, what="fit split")
    crossfit = directions is None and fit is None
    needs_folds = crossfit or (probe and fit is None)
    split_idx = stratified_folds(y, folds, seed) if needs_folds else []

    # -- projection ------------------------------------------------------------------------
    exact = "exact: stratified bootstrap CI and label-permutation p of fixed-direction scores"
    if directions is not None:
        scores = _project(x, _grid_directions(directions, data))
        proj_source, proj_method = "given", exact
    elif fit is not None:
        scores = _project(x, class_mean_difference(fit.x, fit.y))
        proj_source, proj_method = f"class-mean difference of split {fit.split!r}", exact
    else:
        # Centred by the mean of all samples (label-free): otherwise each fold's scores shift by
        # mean . r_fold, noise that pooling the folds would add to the AUC.
        xc = x - x.mean(dim=0, keepdim=True)
        scores = torch.empty(n, L, P, dtype=x.dtype)
        for tr, te in split_idx:
            scores[te] = _project(xc[te], class_mean_difference(xc[tr], y[tr]))
        proj_source = f"class-mean difference cross-fitted over {folds} folds"
        proj_method = ("approximate CI (bootstrap of out-of-fold scores); exact p (within-fold "
                       "label permutations, direction re-fitted)")
    flat = rearrange(scores, "n layer pos -> n (layer pos)")
    proj = _intervals(flat, y, with_d=True, n_boot=n_boot, seed=seed, level=level)
    if crossfit:
        null = _crossfit_null(rearrange(x, "n layer pos d -> n (layer pos) d"),
                              _within_fold_permutations(y, split_idx, n_perm, seed + 1), split_idx)
        proj["p"] = empirical_pvalue(proj["auc"], null, "two-sided", center=0.5)
    else:
        proj["p"] = permutation_test(auc_groups, flat, y, n_perm=n_perm, seed=seed + 1,
                                     alternative="two-sided", center=0.5)[1]

    # -- logistic probes -------------------------------------------------------------------
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    pr = {"auc": nan, "auc_lo": nan, "auc_hi": nan, "p": nan}
    unconverged = 0
    probe_source = probe_method = "not computed"
    if probe:
        cells = rearrange(x, "n layer pos d -> n (layer pos) d")
        oof = torch.empty(n, k, dtype=torch.float64)
        if fit is not None:
            fx = rearrange(fit.x, "n layer pos d -> n (layer pos) d")
            for c in range(k):
                lp = LinearProbe.fit(fx[:, c], fit.y, C=C, max_iter=max_iter)
                unconverged += not lp.converged
                oof[:, c] = lp.decision_function(cells[:, c])
            pr = _intervals(oof, y, with_d=False, n_boot=n_boot, seed=seed, level=level)
            pr["p"] = permutation_test(auc_groups, oof, y, n_perm=n_perm, seed=seed + 1,
                                       alternative="greater")[1]
            probe_source = f"logistic regression fitted on split {fit.split!r} (C={C})"
            probe_method = exact.replace("fixed-direction", "held-out")
        else:
            for c in range(k):
                oof[:, c], bad = _oof_probe_scores(cells[:, c], y, split_idx, C, max_iter)
                unconverged += bad
            pr = _intervals(oof, y, with_d=False, n_boot=n_boot, seed=seed, level=level)
            pr["p"] = nan
            probe_source = f"logistic regression, {folds}-fold CV on {data.split!r} (C={C})"
            if n_perm_refit > 0:
                perms = _within_fold_permutations(y, split_idx, n_perm_refit, seed + 2)
                null = torch.empty(n_perm_refit, k, dtype=torch.float64)
                for b in range(n_perm_refit):
                    for c in range(k):
                        s_b = _oof_probe_scores(cells[:, c], perms[b], split_idx, C, max_iter)[0]
                        null[b, c] = auc_groups(s_b[perms[b]], s_b[~perms[b]])
                pr["p"] = empirical_pvalue(pr["auc"], null, "greater")
                probe_method = (f"approximate CI (bootstrap of out-of-fold scores); exact p "
                                f"({n_perm_refit} within-fold label permutations, probes re-fitted)")
            else:
                probe_method = ("approximate CI (bootstrap of out-of-fold scores); no p-value "
                                "(pass n_perm_refit > 0, or a fit split)")

    def grid(t: Tensor) -> np.ndarray:
        return rearrange(t, "(layer pos) -> layer pos", layer=L, pos=P).numpy().astype(np.float64)

    return ProbeGrid(
        layers=data.layers, positions=data.positions, split=data.split, n_pos=data.n_pos,
        n_neg=data.n_neg, proj_auc=grid(proj["auc"]), proj_auc_lo=grid(proj["auc_lo"]),
        proj_auc_hi=grid(proj["auc_hi"]), proj_d=grid(proj["d"]), proj_d_lo=grid(proj["d_lo"]),
        proj_d_hi=grid(proj["d_hi"]), proj_p=grid(proj["p"]), probe_auc=grid(pr["auc"]),
        probe_auc_lo=grid(pr["auc_lo"]), probe_auc_hi=grid(pr["auc_hi"]), probe_p=grid(pr["p"]),
        proj_source=proj_source, proj_method=proj_method, probe_source=probe_source,
        probe_method=probe_method, folds=folds, C=float(C), n_boot=n_boot, n_perm=n_perm,
        n_perm_refit=n_perm_refit, seed=seed, level=level, n_unconverged=unconverged,
        model=dict(data.model),
    )


def _check_separate(a: Labeled, b: Labeled, what: str) -> None:
    if a is b or a.split == b.split:
        raise ConfigError(f"{what} split {a.split!r} is the split being evaluated",
                          fix="fit on train, select on val, report on test (three different splits)")


def _is_test(split: str) -> bool:
    return "test" in split.lower()


# -- layer selection -------------------------------------------------------------------------------
def select_layer(grid: ProbeGrid, *, metric: str = "proj_auc", position: str | None = None) -> tuple[int, str]:
    """The (layer, position) with the highest ``metric`` on a *validation* grid.

    Refuses a grid measured on a split whose name contains ``test``: choosing the layer on the
    split you report inflates the reported AUC.
    """
    if _is_test(grid.split):
        raise ConfigError(f"refusing to select a layer on split {grid.split!r}",
                          fix="select on a validation split and report test with evaluate_selected()")
    _check_metric(metric)
    values = np.array(getattr(grid, metric), dtype=np.float64)
    if position is not None:
        j = grid.index(grid.layers[0], position)[1]
        keep = np.full(values.shape, -np.inf)
        keep[:, j] = values[:, j]
        values = keep
    if np.all(~np.isfinite(values)):
        raise ConfigError(f"{metric} was not computed on this grid", fix="run probe_grid with probe=True")
    i, j = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(values), values, -np.inf))), values.shape)
    return grid.layers[int(i)], grid.positions[int(j)]


@dataclass(frozen=True)
class LayerSelection(ResultMixin):
    """A layer chosen on one split and evaluated on another."""

    layer: int
    position: str
    metric: str
    val_split: str
    test_split: str
    val_value: float
    test_value: float
    test_lo: float
    test_hi: float
    test_p: float
    n_candidates: int
    level: float


def evaluate_selected(
    val: Labeled,
    test: Labeled,
    *,
    metric: str = "proj_auc",
    position: str | None = None,
    fit: Labeled | None = None,
    **grid_kwargs: Any,
) -> LayerSelection:
    """Select the layer on ``val``, then report ``metric`` at that layer on ``test`` only.

    With ``fit`` (a train split) the projection direction is its class-mean difference; without,
    it is cross-fitted within each split.
    """
    _check_separate(val, test, "validation")
    if _is_test(val.split):
        raise ConfigError(f"validation split is named {val.split!r}",
                          fix="pass the validation split as val= and the test split as test=")
    if fit is not None:
        _check_separate(fit, test, "fit")
    _check_metric(metric)
    need_probe = metric == "probe_auc"
    val_grid = probe_grid(val, fit=fit, probe=need_probe, **grid_kwargs)
    layer, pos = select_layer(val_grid, metric=metric, position=position)
    test_cell = test.select([layer], [pos])
    fit_cell = fit.select([layer], [pos]) if fit is not None else None
    test_grid = probe_grid(test_cell, fit=fit_cell, probe=need_probe, **grid_kwargs)
    key = "proj" if metric == "proj_auc" else "probe"
    return LayerSelection(
        layer=layer, position=pos, metric=metric, val_split=val.split, test_split=test.split,
        val_value=val_grid.cell(layer, pos)[metric], test_value=float(getattr(test_grid, metric)[0, 0]),
        test_lo=float(getattr(test_grid, f"{metric}_lo")[0, 0]),
        test_hi=float(getattr(test_grid, f"{metric}_hi")[0, 0]),
        test_p=float(getattr(test_grid, f"{key}_p")[0, 0]),
        n_candidates=len(val.layers) * (len(val.positions) if position is None else 1),
        level=test_grid.level,
    )


# -- transfer --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferResult(ResultMixin):
    """AUC of a probe fitted on one model (or split) applied to another's activations."""

    auc: float
    auc_lo: float
    auc_hi: float
    p: float
    n_pos: int
    n_neg: int
    d_model: int
    source_layer: int | None
    source_position: str | None
    source: dict[str, Any]
    target: dict[str, Any]
    level: float
    n_boot: int
    n_perm: int


def transfer_auc(
    probe: LinearProbe,
    target: Labeled | Float[Array, "n d"],
    labels: Shaped[Array, "n"] | None = None,
    *,
    layer: int | None = None,
    position: str | None = None,
    n_boot: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> TransferResult:
    """AUC (CI, one-sided permutation p) of ``probe`` on ``target`` activations of the same width.

    ``target`` is a :class:`Labeled` grid (``layer``/``position`` pick the cell; ``layer``
    defaults to the probe's) or a plain ``[n, d]`` array with ``labels``. A probe of another
    width raises :class:`DModelMismatchError`.
    """
    if isinstance(target, Labeled):
        if labels is not None:
            raise ConfigError("labels come with the Labeled target; do not pass labels=")
        lay = probe.layer if layer is None else layer
        if lay is None:
            raise ConfigError("the probe has no layer; pass layer=")
        pos = position if position is not None or len(target.positions) == 1 else probe.position
        x, y = target.cell(lay, pos), target.y
        info = {"split": target.split, "model": target.model, "layer": lay, "position": pos}
    else:
        if labels is None:
            raise ConfigError("pass labels= with an array target")
        x, y = as_tensor(target), as_labels(labels, n=int(target.shape[0]))
        info = {"layer": layer, "position": position}
    if x.shape[-1] != probe.d_model:
        raise DModelMismatchError(expected=int(x.shape[-1]), actual=probe.d_model, what="probe")
    with threads_for(x.numel()):
        s = probe.decision_function(x)[:, None]
        st = _intervals(s, y, with_d=False, n_boot=n_boot, seed=seed, level=level)
        st["p"] = permutation_test(auc_groups, s, y, n_perm=n_perm, seed=seed + 1, alternative="greater")[1]
    return TransferResult(
        auc=float(st["auc"][0]), auc_lo=float(st["auc_lo"][0]), auc_hi=float(st["auc_hi"][0]),
        p=float(st["p"][0]), n_pos=int(y.sum()), n_neg=int((~y).sum()), d_model=probe.d_model,
        source_layer=probe.layer, source_position=probe.position, source=dict(probe.meta),
        target=info, level=level, n_boot=n_boot, n_perm=n_perm,
    )
