"""Statistics shared by the analysis modules: AUC, Cohen's d, bootstrap CIs, permutation tests,
and the Wilson interval that every reported rate (a proportion) uses.

Conventions (as in scikit-learn): samples are on axis 0; trailing axes are independent columns
that are computed at once. Resampling functions hand the statistic each group with a replicate
axis inserted after the sample axis (``[n_group, B, *rest]``) and expect ``[B, *k]`` back, so
one statistic works for the observed data (``B = 1``), bootstrap replicates and permutations.
AUC over thousands of columns is the hot loop of the specificity test: it is a sort and a
``searchsorted`` per column, never a Python loop.

Inputs may be torch tensors or numpy arrays; outputs are float64 torch tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from rdt_interp.errors import ConfigError

Array = Tensor | np.ndarray
Alternative = Literal["greater", "less", "two-sided"]
# A statistic of resampled groups: each group ``[n_g, B, *rest]`` -> ``[B, *k]``.
Statistic = Callable[..., Tensor]

# Resampling is chunked so that one chunk of one group holds at most this many elements.
_CHUNK_ELEMENTS = 1 << 24
# Below this many input elements, analysis entry points run on one torch thread.
_SMALL_WORK = 1 << 22


@contextlib.contextmanager
def threads_for(n_elements: int) -> Iterator[None]:
    """One torch thread for small work, the current setting otherwise (restored after).

    Statistics on small arrays are thousands of tiny ops; waking a second OpenMP thread for each
    costs more than it saves, dramatically so on a loaded machine (200x measured on 2 shared
    cores for 120 x 120 matrix products).
    """
    prev = torch.get_num_threads()
    small = n_elements < _SMALL_WORK and prev > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(prev)


def as_tensor(x: Shaped[Array, "..."], *, dtype: torch.dtype | None = None) -> Shaped[Tensor, "..."]:
    """``x`` as a CPU tensor (no copy when it already is one); floats keep their precision."""
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    t = t.detach().cpu()
    return t if dtype is None else t.to(dtype)


def as_labels(y: Shaped[Array, "n"], *, n: int | None = None) -> Bool[Tensor, "n"]:
    """Binary labels as a bool tensor (``True`` = the positive class); both classes required."""
    t = as_tensor(y)
    if t.dtype != torch.bool:
        values = torch.unique(t)
        if not bool(((values == 0) | (values == 1)).all()):
            raise ConfigError(f"labels must be 0/1 or bool, got values {values[:8].tolist()}",
                              fix="encode the positive class (e.g. harmful) as 1, the other as 0")
        t = t == 1
    if n is not None and t.shape[0] != n:
        raise ConfigError(f"{t.shape[0]} labels for {n} samples")
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.shape[0]:
        raise ConfigError(f"labels have a single class ({n_pos} positive of {t.shape[0]})",
                          fix="pass samples of both classes")
    return t


def _check_finite(x: Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{what} contain NaN or inf", fix="drop or fix those samples first")


# -- effect sizes ----------------------------------------------------------------------------------
def auc_groups(
    pos: Float[Array, "n_pos *k"], neg: Float[Array, "n_neg *k"]
) -> Float[Tensor, "*k"]:
    """ROC AUC = P(score_pos > score_neg) + P(tie) / 2, per column (Mann-Whitney U / n1 n0).

    Exact with ties. Each column costs a sort of the negatives and a ``searchsorted`` of the
    positives, so ``[n, 1000]`` columns take milliseconds.
    """
    p, q = as_tensor(pos), as_tensor(neg)
    if p.shape[1:] != q.shape[1:]:
        raise ConfigError(f"score columns differ: {tuple(p.shape[1:])} vs {tuple(q.shape[1:])}")
    if p.shape[0] == 0 or q.shape[0] == 0:
        raise ConfigError("AUC needs at least one sample of each class")
    _check_finite(p, "scores")
    _check_finite(q, "scores")
    dtype = torch.promote_types(p.dtype, q.dtype)
    rest = p.shape[1:]
    pt = p.to(dtype).reshape(p.shape[0], -1).T.contiguous()
    qt = torch.sort(q.to(dtype).reshape(q.shape[0], -1).T.contiguous(), dim=1).values
    below = torch.searchsorted(qt, pt, side="left")
    at_or_below = torch.searchsorted(qt, pt, side="right")
    u = (below + at_or_below).sum(dim=1, dtype=torch.float64) / 2.0
    return (u / (p.shape[0] * q.shape[0])).reshape(rest)


def auc_columns(scores: Float[Array, "n k"], labels: Bool[Array, "n k"]) -> Float[Tensor, "k"]:
    """AUC per column when every column has its own labels (e.g. one label permutation each).

    Mann-Whitney from average ranks (exact with ties): ``(sum of positive ranks - n1(n1+1)/2)
    / (n1 n0)`` per column.
    """
    s, lab = as_tensor(scores), as_tensor(labels)
    _check_finite(s, "scores")
    st = s.T.contiguous()
    srt = torch.sort(st, dim=1).values
    rank = (torch.searchsorted(srt, st, side="left") + torch.searchsorted(srt, st, side="right")
            + 1).to(torch.float64) / 2.0
    n1 = lab.sum(dim=0).to(torch.float64)
    n0 = lab.shape[0] - n1
    if bool(((n1 == 0) | (n0 == 0)).any()):
        raise ConfigError("a column has a single class")
    u = (rank * lab.T.to(torch.float64)).sum(dim=1) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def auc(scores: Float[Array, "n *k"], labels: Shaped[Array, "n"]) -> Float[Tensor, "*k"]:
    """ROC AUC of ``scores`` (higher = positive class) per column, e.g. ``[n, k]`` -> ``[k]``."""
    s = as_tensor(scores)
    y = as_labels(labels, n=s.shape[0])
    return auc_groups(s[y], s[~y])


def cohens_d(pos: Float[Array, "n_pos *k"], neg: Float[Array, "n_neg *k"]) -> Float[Tensor, "*k"]:
    """Cohen's d = (mean_pos - mean_neg) / pooled SD, per column."""
    p, q = as_tensor(pos, dtype=torch.float64), as_tensor(neg, dtype=torch.float64)
    n1, n0 = p.shape[0], q.shape[0]
    if n1 < 2 or n0 < 2:
        raise ConfigError("Cohen's d needs at least two samples per class")
    pooled = ((n1 - 1) * p.var(dim=0) + (n0 - 1) * q.var(dim=0)) / (n1 + n0 - 2)
    return (p.mean(dim=0) - q.mean(dim=0)) / pooled.sqrt()


# -- proportions -----------------------------------------------------------------------------------
def wilson_interval(
    k: int | float | Array | Sequence[bool], n: int, *, level: float = 0.95
) -> tuple[float, float, float]:
    """``(rate, low, high)`` of ``k`` successes in ``n`` trials: the Wilson score interval.

    Every rate the project reports goes through here. Unlike a percentile bootstrap it does not
    collapse to ``[0, 0]`` at ``0/n`` (or ``[1, 1]`` at ``n/n``). ``k`` may also be a 0/1 array
    of length ``n``.

    Examples
    --------
    >>> rate, lo, hi = wilson_interval(0, 20)
    >>> rate, round(lo, 3), round(hi, 3)
    (0.0, 0.0, 0.161)
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if not isinstance(k, int | float):
        flags = as_tensor(torch.as_tensor(k) if isinstance(k, list | tuple) else k, dtype=torch.float64).reshape(-1)
        if flags.numel() != n:
            raise ConfigError(f"{flags.numel()} outcomes for n = {n}")
        if bool(((flags != 0) & (flags != 1)).any()):
            raise ConfigError("outcomes must be 0/1", fix="pass booleans, or the count of successes")
        k = float(flags.sum())
    if n < 1 or not 0 <= k <= n:
        raise ConfigError(f"need 0 <= k <= n and n >= 1, got k = {k}, n = {n}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the edges (round-off would otherwise give 1e-17 instead of 0)
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return p, lo, hi


# -- resampling ------------------------------------------------------------------------------------
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _chunks(n_rep: int, groups: Sequence[Tensor]) -> list[slice]:
    per_rep = max(int(np.prod(g.shape)) for g in groups)
    size = max(1, _CHUNK_ELEMENTS // max(per_rep, 1))
    return [slice(i, min(i + size, n_rep)) for i in range(0, n_rep, size)]


def _apply(statistic: Statistic, groups: Sequence[Tensor], index: Sequence[Tensor]) -> Tensor:
    """Statistic of the groups read at ``index`` (each ``[n_g, B]``), chunked over ``B``."""
    n_rep = index[0].shape[1]
    out = []
    for sl in _chunks(n_rep, groups):
        picked = [g[ix[:, sl]] for g, ix in zip(groups, index, strict=True)]
        out.append(statistic(*picked))
    return torch.cat(out, dim=0)


def observed(statistic: Statistic, *groups: Shaped[Array, "..."]) -> Tensor:
    """The statistic of the data as given (one replicate), ``[*k]``."""
    gs = [as_tensor(g) for g in groups]
    return statistic(*[g[:, None] for g in gs])[0]


def bootstrap_distribution(
    statistic: Statistic, *groups: Shaped[Array, "..."], n_boot: int = 1000, seed: int = 0
) -> Tensor:
    """``[n_boot, *k]`` replicates; each group is resampled with replacement on its own
    (a stratified bootstrap: class sizes stay fixed)."""
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    gs = [as_tensor(g) for g in groups]
    gen = _generator(seed)
    # All indices up front: the replicates do not depend on the chunk size.
    index = [torch.randint(g.shape[0], (g.shape[0], n_boot), generator=gen) for g in gs]
    return _apply(statistic, gs, index)


def percentile_interval(
    replicates: Float[Tensor, "B *k"], level: float = 0.95
) -> tuple[Float[Tensor, "*k"], Float[Tensor, "*k"]]:
    """Percentile interval of bootstrap replicates (NaN replicates are ignored)."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    a = (1.0 - level) / 2.0
    q = torch.tensor([a, 1.0 - a], dtype=torch.float64)
    lo_hi = torch.nanquantile(replicates.to(torch.float64), q, dim=0)
    return lo_hi[0], lo_hi[1]


def bootstrap_ci(
    statistic: Statistic,
    *groups: Shaped[Array, "..."],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[Float[Tensor, "*k"], Float[Tensor, "*k"], Float[Tensor, "*k"]]:
    """``(estimate, low, high)``: the statistic and its percentile bootstrap interval."""
    est = observed(statistic, *groups).to(torch.float64)
    lo, hi = percentile_interval(bootstrap_distribution(statistic, *groups, n_boot=n_boot, seed=seed),
                                 level)
    return est, lo, hi


def mean_ci(
    x: Float[Array, "n *k"], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[Float[Tensor, "*k"], Float[Tensor, "*k"], Float[Tensor, "*k"]]:
    """Mean over samples with a percentile bootstrap interval."""
    return bootstrap_ci(lambda v: v.to(torch.float64).mean(dim=0), as_tensor(x), n_boot=n_boot,
                        seed=seed, level=level)


def permutation_null(
    statistic: Statistic,
    values: Shaped[Array, "n *rest"],
    labels: Shaped[Array, "n"],
    *,
    n_perm: int = 1000,
    seed: int = 0,
) -> Tensor:
    """``[n_perm, *k]`` statistics with the labels shuffled (``statistic(pos, neg)``)."""
    if n_perm < 1:
        raise ConfigError(f"n_perm must be >= 1, got {n_perm}")
    v = as_tensor(values)
    y = as_labels(labels, n=v.shape[0])
    n, n1 = v.shape[0], int(y.sum())
    gen = _generator(seed)
    perm = torch.rand((n, n_perm), generator=gen).argsort(dim=0)
    # The first n1 rows of each permutation play the positive class.
    return _apply(statistic, [v, v], [perm[:n1], perm[n1:]])


def empirical_pvalue(
    obs: Float[Array, "*k"],
    null: Float[Array, "N *k"],
    alternative: str = "greater",
    *,
    center: float | Float[Array, "*k"] | None = None,
) -> Float[Tensor, "*k"]:
    """``(1 + #{null at least as extreme}) / (1 + N)`` (never 0; Phipson & Smyth 2010).

    ``two-sided`` measures extremeness as ``|x - center|`` (default: the null mean).
    Ties count as extreme, with a tolerance for float round-off.
    """
    o = as_tensor(obs, dtype=torch.float64)
    z = as_tensor(null, dtype=torch.float64)
    tol = 1e-12 * max(1.0, float(o.abs().max()) if o.numel() else 1.0)
    if alternative == "greater":
        hits = z >= o - tol
    elif alternative == "less":
        hits = z <= o + tol
    elif alternative == "two-sided":
        c = z.mean(dim=0) if center is None else as_tensor(torch.as_tensor(center), dtype=torch.float64)
        hits = (z - c).abs() >= (o - c).abs() - tol
    else:
        raise ConfigError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    return (1.0 + hits.sum(dim=0)) / (1.0 + z.shape[0])


def permutation_test(
    statistic: Statistic,
    values: Shaped[Array, "n *rest"],
    labels: Shaped[Array, "n"],
    *,
    n_perm: int = 1000,
    seed: int = 0,
    alternative: str = "greater",
    center: float | None = None,
) -> tuple[Float[Tensor, "*k"], Float[Tensor, "*k"]]:
    """``(observed, p)`` of a two-group statistic against its label-permutation null."""
    v = as_tensor(values)
    y = as_labels(labels, n=v.shape[0])
    obs = observed(statistic, v[y], v[~y]).to(torch.float64)
    null = permutation_null(statistic, v, y, n_perm=n_perm, seed=seed)
    return obs, empirical_pvalue(obs, null, alternative, center=center)


def zscore(obs: Float[Array, "*k"], null: Float[Array, "N *k"]) -> Float[Tensor, "*k"]:
    """``(obs - mean(null)) / sd(null)``."""
    z = as_tensor(null, dtype=torch.float64)
    return (as_tensor(obs, dtype=torch.float64) - z.mean(dim=0)) / z.std(dim=0)


def _p_values(p: Float[Array, "*k"] | Sequence[float]) -> Tensor:
    t = torch.as_tensor(p, dtype=torch.float64) if isinstance(p, list | tuple) else as_tensor(p, dtype=torch.float64)
    bad = torch.isfinite(t) & ((t < 0.0) | (t > 1.0))
    if bool(bad.any()) or bool(torch.isinf(t).any()):
        raise ConfigError(f"p-values must lie in [0, 1], got {t[bad | torch.isinf(t)][:4].tolist()}",
                          fix="pass p-values, not scores or log p-values")
    return t


def holm(p: Float[Array, "*k"] | Sequence[float]) -> Float[Tensor, "*k"]:
    """Holm-Bonferroni step-down adjusted p-values; the family is every entry of ``p``.

    The ``i``-th smallest of ``m`` p-values becomes ``max_{j <= i} (m - j + 1) p_(j)``, capped at 1.
    Rejecting where the adjusted value is ``<= alpha`` controls the family-wise error rate at
    ``alpha`` under any dependence between the tests (e.g. neighbouring layers of one model).
    NaN entries (no test, e.g. a zero-norm direction) stay NaN and are not counted in ``m``
    (as R's ``p.adjust``).

    Parameters
    ----------
    p : array or sequence of float, any shape
        Raw p-values in ``[0, 1]`` (NaN allowed), e.g. one per layer of a grid.

    Returns
    -------
    Tensor of float64, the shape of ``p``
        Adjusted p-values, never below the raw ones.

    Raises
    ------
    ConfigError
        If a p-value lies outside ``[0, 1]``.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03, 0.5]).tolist()
    [0.04, 0.09, 0.09, 0.5]
    """
    def step_down(ps: Tensor) -> Tensor:  # sorted ascending; running max of (m - i) p_(i)
        m = ps.numel()
        return torch.cummax((m - torch.arange(m, dtype=torch.float64)) * ps, dim=0).values

    return _adjust_sorted(p, step_down)


def benjamini_hochberg(p: Float[Array, "*k"] | Sequence[float]) -> Float[Tensor, "*k"]:
    """Benjamini-Hochberg step-up adjusted p-values (q-values); the family is every entry of ``p``.

    The ``i``-th smallest of ``m`` p-values becomes ``min_{j >= i} m p_(j) / j``, capped at 1.
    Rejecting where the adjusted value is ``<= q`` controls the false discovery rate at ``q`` for
    independent or positively dependent tests; it is less strict than :func:`holm`, which controls
    the chance of any false positive. NaN entries stay NaN and are not counted in ``m``.

    Parameters
    ----------
    p : array or sequence of float, any shape
        Raw p-values in ``[0, 1]`` (NaN allowed).

    Returns
    -------
    Tensor of float64, the shape of ``p``
        Adjusted p-values, never below the raw ones and never above Holm's.

    Raises
    ------
    ConfigError
        If a p-value lies outside ``[0, 1]``.

    Examples
    --------
    >>> [round(v, 4) for v in benjamini_hochberg([0.01, 0.04, 0.03, 0.5]).tolist()]
    [0.04, 0.0533, 0.0533, 0.5]
    """
    def step_up(ps: Tensor) -> Tensor:  # sorted ascending; running min from the top of m p_(i) / i
        m = ps.numel()
        scaled = ps * m / torch.arange(1, m + 1, dtype=torch.float64)
        return torch.flip(torch.cummin(torch.flip(scaled, (0,)), dim=0).values, (0,))

    return _adjust_sorted(p, step_up)


def _adjust_sorted(p: Float[Array, "*k"] | Sequence[float], rule: Callable[[Tensor], Tensor]) -> Tensor:
    """Multiple-comparison adjustment: ``rule`` maps the ascending non-NaN p-values to their
    adjusted values (capped at 1 here); NaN entries stay NaN and are not in the family."""
    t = _p_values(p)
    flat = t.reshape(-1)
    ok = ~torch.isnan(flat)
    q = flat[ok]
    order = q.argsort(stable=True)
    adj = torch.empty_like(q)
    adj[order] = rule(q[order]).clamp(max=1.0)
    out = torch.full_like(flat, float("nan"))
    out[ok] = adj
    return out.reshape(t.shape)


def stratified_folds(
    labels: Shaped[Array, "n"], folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled K-fold ``(train_index, test_index)`` pairs (scikit-learn's)."""
    from sklearn.model_selection import StratifiedKFold

    y = as_labels(labels).numpy()
    smallest = int(min(y.sum(), (~y).sum()))
    if folds < 2 or smallest < folds:
        raise ConfigError(f"{folds}-fold CV needs >= {folds} samples per class, smallest class has "
                          f"{smallest}", fix="lower folds= or add samples")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in skf.split(np.zeros(len(y)), y)]
