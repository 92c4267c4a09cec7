"""Label permutations of a two-class sample, and the difference-in-means they give, vectorized.

A relabelling keeps the class sizes (``n_pos`` of ``n`` samples stay positive), so it is drawn
from the exact permutation null of any two-group statistic. ``N`` relabellings are one bool matrix
``[N, n]``; the class-mean difference under each is one row of ``W @ x`` with
``W = labels / n_pos - (~labels) / n_neg``, so a thousand shuffled directions are one matrix
product, not a Python loop. :mod:`rdt_interp.analysis.alignment` and
:mod:`rdt_interp.analysis.specificity` build their label-shuffle nulls on these.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from rdt_interp.analysis.stats import Array, as_labels, as_tensor
from rdt_interp.errors import ConfigError

MIN_PER_CLASS = 2
# A fixed salt, so that permutation streams are not the stream of torch.manual_seed(seed).
_SALT = 0x9E37_79B9


def check_two_classes(y: Shaped[Array, "ny"], *, n: int | None = None,
                      min_per_class: int = MIN_PER_CLASS) -> Bool[Tensor, "ny"]:
    """Labels as bool, with at least ``min_per_class`` samples in each class (else ConfigError)."""
    lab = as_labels(y, n=n)
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if min(n_pos, n_neg) < min_per_class:
        raise ConfigError(f"need at least {min_per_class} samples per class, got {n_pos} positive "
                          f"and {n_neg} negative",
                          fix="add samples of the smaller class (a mean difference of one sample "
                              "per class has no permutation null)")
    return lab


def check_activations(x: Float[Array, "n *rest"], what: str = "activations") -> Float[Tensor, "n *rest"]:
    """``x`` as a float tensor, rejecting NaN / inf (ConfigError naming the first bad sample)."""
    t = as_tensor(x)
    if not t.is_floating_point():
        raise ConfigError(f"{what} must be floating point, got {t.dtype}", fix="pass float activations")
    finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) if t.ndim > 1 else torch.isfinite(t)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise ConfigError(f"{what} contain NaN or inf in {bad.numel()} sample(s), first at row {int(bad[0])}",
                          fix="drop those samples (or find the overflow: e.g. fp16 residuals)")
    return t


def check_n_permutations(n_permutations: int, what: str = "n_permutations") -> int:
    if isinstance(n_permutations, bool) or int(n_permutations) != n_permutations or n_permutations < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {n_permutations!r}",
                          fix=f"use {what}=1000 (the p-value cannot go below 1 / ({what} + 1))")
    return int(n_permutations)


def permuted_labels(y: Shaped[Array, "n"], n_permutations: int, *, seed: int = 0) -> Bool[Tensor, "n_perm n"]:
    """``n_permutations`` uniformly random relabellings of ``y`` that keep its class sizes.

    Row ``k`` depends only on ``seed`` and ``k``'s position in the stream: the same seed gives the
    same rows, and a longer run extends a shorter one.

    Examples
    --------
    >>> lab = permuted_labels(torch.tensor([1, 1, 0, 0, 0]), 3, seed=0)
    >>> tuple(lab.shape), lab.sum(dim=1).tolist()
    ((3, 5), [2, 2, 2])
    """
    lab = as_labels(y)
    n_perm = check_n_permutations(n_permutations)
    n, n_pos = int(lab.shape[0]), int(lab.sum())
    gen = torch.Generator().manual_seed(_SALT + int(seed))
    order = torch.rand(n_perm, n, generator=gen, dtype=torch.float64).argsort(dim=1)
    out = torch.zeros(n_perm, n, dtype=torch.bool)
    out.scatter_(1, order[:, :n_pos], True)
    return out


def mean_difference_weights(labels: Bool[Tensor, "n_perm n"]) -> Float[Tensor, "n_perm n"]:
    """Rows ``w`` with ``w @ x = mean(x[labels]) - mean(x[~labels])`` (float64)."""
    lab = labels.to(torch.float64)
    n_pos = lab.sum(dim=1, keepdim=True)
    n_neg = lab.shape[1] - n_pos
    if bool(((n_pos == 0) | (n_neg == 0)).any()):
        raise ConfigError("a relabelling has a single class")
    return lab / n_pos - (1.0 - lab) / n_neg


def permutation_pvalue(obs: Float[Tensor, "*k"], null: Float[Tensor, "N *k"]) -> Float[Tensor, "*k"]:
    """``(1 + #{null >= obs}) / (1 + N)`` in float64 (ties count, with a round-off tolerance).

    One-sided: pass ``|statistic|`` for a two-sided test. NaN where ``obs`` is NaN; NaN null
    entries never count as extreme.
    """
    o = obs.to(torch.float64)
    z = null.to(torch.float64)
    finite = o[torch.isfinite(o)]
    tol = 1e-12 * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    hits = (z >= o - tol).sum(dim=0).to(torch.float64)
    p = (1.0 + hits) / (1.0 + z.shape[0])
    return torch.where(torch.isnan(o), torch.full_like(p, float("nan")), p)


def shuffled_mean_differences(
    x: Float[Array, "n *grid d"], y: Shaped[Array, "ny"], n_permutations: int, *, seed: int = 0
) -> Float[Tensor, "n_perm *grid d"]:
    """Class-mean differences of ``x`` under ``n_permutations`` shuffles of the labels ``y``.

    One matrix product (``[N, n] @ [n, *grid * d]``) in float64, returned as float32; memory is
    ``N * prod(grid) * d`` floats, so for many layers at d = 4096 pass one layer at a time.

    Examples
    --------
    >>> x = torch.arange(12.0).reshape(6, 2)
    >>> shuffled_mean_differences(x, torch.tensor([1, 1, 1, 0, 0, 0]), 4, seed=0).shape
    torch.Size([4, 2])
    """
    t = check_activations(x)
    lab = check_two_classes(y, n=t.shape[0])
    w = mean_difference_weights(permuted_labels(lab, n_permutations, seed=seed))
    flat = t.reshape(t.shape[0], -1).to(torch.float64)
    return (w @ flat).reshape(w.shape[0], *t.shape[1:]).to(torch.float32)


__all__ = ["check_activations", "check_n_permutations", "check_two_classes", "mean_difference_weights",
           "permutation_pvalue", "permuted_labels", "shuffled_mean_differences"]
