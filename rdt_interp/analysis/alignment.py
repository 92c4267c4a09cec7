"""How aligned are two models' directions? Cosine per layer and layer x layer, against chance.

Two nulls:

* isotropic (:func:`align_directions`): the cosine between a fixed direction and a uniformly
  random one in ``d`` dimensions (the same law as between two random directions):
  ``(cos + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)``, so ``|cos|`` concentrates near ``1/sqrt(d)`` (about
  0.012 for d = 4096). p-values and null quantiles are analytic; :func:`sample_abs_cos_null`
  draws the same law for checks and plots. It is too lenient when one model is a fine-tune of
  the other: their residual streams share high-variance directions, so even a meaningless
  difference of means of one model lines up with the other model's direction far above
  ``1/sqrt(d)``.
* label permutation (:func:`cosine_permutation_null`): the difference in means of model A's
  activations is recomputed with the harmful/harmless labels shuffled, and its cosine with model
  B's (fixed) direction is the null. It keeps A's covariance, so shared anisotropy is in the null.
  One matrix product over a ``[n_permutations, n]`` relabelling matrix per layer, through the
  ``n x n`` Gram matrix when ``n < d``: 1000 permutations of 512 x 4096 activations take well under
  a second per layer on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from rdt_interp.analysis._result import ResultMixin
from rdt_interp.analysis.permutation import (
    check_activations,
    check_n_permutations,
    check_two_classes,
    mean_difference_weights,
    permutation_pvalue,
    permuted_labels,
)
from rdt_interp.analysis.stats import Array, as_tensor, threads_for
from rdt_interp.errors import ConfigError, DModelMismatchError


def _check_width(a: Tensor, b: Tensor) -> int:
    if a.shape[-1] != b.shape[-1]:
        raise DModelMismatchError(expected=int(a.shape[-1]), actual=int(b.shape[-1]),
                                  what="second direction set")
    if a.shape[-1] < 2:
        raise ConfigError("directions need d_model >= 2")
    return int(a.shape[-1])


def cosine_similarity(a: Float[Array, "*batch da"], b: Float[Array, "*batch db"]) -> Float[Tensor, "*batch"]:
    """Cosine of matching rows (``[layer, d]`` x ``[layer, d]`` -> ``[layer]``)."""
    x, y = as_tensor(a, dtype=torch.float64), as_tensor(b, dtype=torch.float64)
    _check_width(x, y)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def cosine_matrix(a: Float[Array, "m da"], b: Float[Array, "k db"]) -> Float[Tensor, "m k"]:
    """All-pairs cosine, e.g. every layer of model A against every layer of model B.

    A zero direction (e.g. a class-mean difference at layer 0 over chat-template tokens, where
    every prompt has the same embedding) has no cosine: NaN.
    """
    x, y = as_tensor(a, dtype=torch.float64), as_tensor(b, dtype=torch.float64)
    _check_width(x, y)
    return (x / x.norm(dim=-1, keepdim=True)) @ (y / y.norm(dim=-1, keepdim=True)).T


def abs_cos_pvalue(abs_cos: Float[Array, "*k"] | float, d: int) -> Float[np.ndarray, "*k"]:
    """``P(|cos| >= c)`` for a uniformly random direction in ``d`` dimensions (analytic)."""
    c = np.abs(np.asarray(abs_cos.detach().cpu() if isinstance(abs_cos, Tensor) else abs_cos,
                          dtype=np.float64))
    from scipy import stats as sps  # imported here: the GPU image may lack scipy

    a = (d - 1) / 2.0
    return np.asarray(np.clip(2.0 * sps.beta.sf((1.0 + c) / 2.0, a, a), 0.0, 1.0), dtype=np.float64)


def abs_cos_quantile(q: float, d: int) -> float:
    """The ``q`` quantile of ``|cos|`` between random directions in ``d`` dimensions."""
    if not 0.0 <= q < 1.0:
        raise ConfigError(f"quantile must be in [0, 1), got {q}")
    from scipy import stats as sps

    a = (d - 1) / 2.0
    return float(2.0 * sps.beta.isf((1.0 - q) / 2.0, a, a) - 1.0)


def sample_abs_cos_null(d: int, n: int, *, seed: int = 0) -> Float[Tensor, "n"]:
    """``n`` draws of ``|cos|`` between random directions in ``d`` dimensions.

    Exact without forming ``d``-vectors: the cosine of ``g ~ N(0, I_d)`` with a fixed unit vector
    is ``z / sqrt(z^2 + chi2_{d-1})``.
    """
    if d < 2 or n < 1:
        raise ConfigError(f"need d >= 2 and n >= 1, got d={d}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    # chi2 with k dof = 2 * Gamma(k/2); torch's Gamma sampler takes no generator, so draw it
    # through numpy from the same seed.
    rest = np.random.default_rng(seed).chisquare(d - 1, size=n)
    return (z / torch.sqrt(z**2 + torch.as_tensor(rest))).abs()


@dataclass(frozen=True, eq=False)
class AlignmentResult(ResultMixin):
    """Cosines between two direction sets with their random-direction null.

    ``cos`` / ``p`` pair ``layers`` (the layers both sets share); ``matrix`` / ``matrix_p`` are
    all-pairs (``layers_a`` x ``layers_b``). p-values are for ``|cos|`` and are not adjusted for
    the number of pairs (use ``stats.holm`` on them).
    """

    name_a: str
    name_b: str
    d_model: int
    layers: tuple[int, ...]
    cos: Float[np.ndarray, "layer"]  # NaN where a direction is zero
    p: Float[np.ndarray, "layer"]
    layers_a: tuple[int, ...]
    layers_b: tuple[int, ...]
    matrix: Float[np.ndarray, "la lb"]
    matrix_p: Float[np.ndarray, "la lb"]
    null_q95: float
    null_q99: float
    null_median: float
    # The label-permutation null (cosine_permutation_null); absent from to_dict() when None.
    permutation: PermutationCosine | None = None

    _arrays: ClassVar[tuple[str, ...]] = ("cos", "p", "matrix", "matrix_p")
    _undefined: ClassVar[dict[str, str]] = {
        name: "cosine undefined: zero-norm direction (null entries)" for name in _arrays}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.permutation is None:
            del out["permutation"]
        else:
            out["permutation"] = self.permutation.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlignmentResult:
        perm = d.get("permutation")
        base = super().from_dict({k: v for k, v in d.items() if k != "permutation"})
        return base if perm is None else dataclasses.replace(base, permutation=PermutationCosine.from_dict(perm))


def align_directions(
    a: Float[Array, "la da"],
    b: Float[Array, "lb db"],
    *,
    layers_a: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
    name_a: str = "a",
    name_b: str = "b",
    permutation: PermutationCosine | None = None,
) -> AlignmentResult:
    """Compare per-layer direction sets ``a`` and ``b`` (e.g. chat vs VLA refusal directions).

    Layer labels default to ``0..L-1``; per-layer cosines use the labels both sets have.
    Different widths raise :class:`DModelMismatchError` (no implicit mapping between models).
    ``permutation`` (from :func:`cosine_permutation_null` on the same two models) is carried in
    the result beside the isotropic null.
    """
    x, y = as_tensor(a, dtype=torch.float64), as_tensor(b, dtype=torch.float64)
    d = _check_width(x, y)
    la = tuple(range(x.shape[0])) if layers_a is None else tuple(int(v) for v in layers_a)
    lb = tuple(range(y.shape[0])) if layers_b is None else tuple(int(v) for v in layers_b)
    if len(la) != x.shape[0] or len(lb) != y.shape[0]:
        raise ConfigError("layer labels do not match the number of directions")
    if bool((x.norm(dim=-1) == 0).all()) or bool((y.norm(dim=-1) == 0).all()):
        raise ConfigError("every direction of a set has zero norm")
    shared = tuple(sorted(set(la) & set(lb)))
    matrix = cosine_matrix(x, y)
    ia = [la.index(v) for v in shared]
    ib = [lb.index(v) for v in shared]
    cos = matrix[ia, ib].numpy() if shared else np.zeros(0)
    m = matrix.numpy()
    return AlignmentResult(
        name_a=name_a, name_b=name_b, d_model=d, layers=shared, cos=cos,
        p=abs_cos_pvalue(cos, d).reshape(cos.shape), layers_a=la, layers_b=lb, matrix=m,
        matrix_p=abs_cos_pvalue(m, d).reshape(m.shape), null_q95=abs_cos_quantile(0.95, d),
        null_q99=abs_cos_quantile(0.99, d), null_median=abs_cos_quantile(0.5, d),
        permutation=_check_permutation(permutation, d),
    )


def _check_permutation(perm: PermutationCosine | None, d: int) -> PermutationCosine | None:
    if perm is None:
        return None
    if not isinstance(perm, PermutationCosine):
        raise ConfigError(f"permutation must be a PermutationCosine, got {type(perm).__name__}",
                          fix="pass the result of cosine_permutation_null(...)")
    if perm.d_model != d:
        raise DModelMismatchError(expected=d, actual=perm.d_model, what="permutation null")
    return perm


# -- the label-permutation null ------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PermutationCosine(ResultMixin):
    """Cosine of model A's class-mean difference with model B's direction, per layer, against
    the label-permutation null (A's labels shuffled, B's direction fixed).

    ``statistic`` is ``"|cos|"`` (``alternative="two-sided"``) or ``"cos"`` (``"greater"``); ``p``
    is ``(1 + #{null statistic >= observed}) / (1 + n_permutations)`` and ``null_median`` /
    ``null_q95`` / ``null_q99`` are quantiles of the null statistic, per layer. ``p_isotropic`` is
    the random-direction p-value of the same ``|cos|`` for comparison. NaN where a direction is
    zero (e.g. layer 0 at chat-template tokens). p-values are per layer: adjust for the grid with
    :func:`rdt_interp.analysis.stats.holm` (or pick a layer with
    :func:`rdt_interp.analysis.layer_pick.pick_layer`).
    """

    name_a: str
    name_b: str
    layers: tuple[int, ...]
    d_model: int
    n_pos: int
    n_neg: int
    cos: Float[np.ndarray, "layer"]
    p: Float[np.ndarray, "layer"]
    p_isotropic: Float[np.ndarray, "layer"]
    null_median: Float[np.ndarray, "layer"]
    null_q95: Float[np.ndarray, "layer"]
    null_q99: Float[np.ndarray, "layer"]
    statistic: str
    alternative: str
    n_permutations: int
    seed: int

    _arrays: ClassVar[tuple[str, ...]] = ("cos", "p", "p_isotropic", "null_median", "null_q95", "null_q99")
    _undefined: ClassVar[dict[str, str]] = {
        name: "cosine undefined: zero-norm direction (null entries)" for name in _arrays}


def cosine_permutation_null(
    x: Float[Array, "n *layer da"],
    y: Shaped[Array, "ny"],
    other: Float[Array, "*lb db"],
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: str = "two-sided",
    layers: Sequence[int] | None = None,
    name_a: str = "a",
    name_b: str = "b",
) -> PermutationCosine:
    """Cosine of ``mean(x[y]) - mean(x[~y])`` with ``other``, against shuffled labels.

    Parameters
    ----------
    x : array of float, shape (n, d) or (n, layer, d)
        Model A's activations (e.g. the VLA's residuals at one role, every layer).
    y : array of bool or 0/1, shape (n,)
        ``True`` / 1 = harmful. At least two samples per class.
    other : array of float, shape (d,) or (layer, d)
        Model B's direction per layer (e.g. the chat model's refusal directions), held fixed.
    n_permutations : int
        Shuffles of ``y`` (class sizes kept); the p-value cannot go below ``1 / (n + 1)``.
    seed : int
        Seeds the shuffles: the same seed gives the same null.
    alternative : {"two-sided", "greater"}
        Test ``|cos|`` (default; a direction's sign may be arbitrary) or the signed ``cos``.
    layers : sequence of int, optional
        Layer labels (default ``0..L-1``).
    name_a, name_b : str
        The models' names, for the record.

    Returns
    -------
    PermutationCosine
        Observed cosines, permutation and isotropic p-values, null quantiles, per layer.

    Raises
    ------
    ConfigError
        Fewer than two samples per class, NaN / inf activations or direction,
        ``n_permutations < 1``, every direction of ``other`` zero.
    DModelMismatchError
        ``x`` and ``other`` differ in width.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(40) < 20
    >>> r = torch.zeros(16); r[0] = 1.0
    >>> x = torch.randn(40, 16, generator=g) + 3.0 * y[:, None].float() * r
    >>> res = cosine_permutation_null(x, y, r, n_permutations=199, seed=0)
    >>> float(res.cos[0]) > 0.8, float(res.p[0]) == 1 / 200
    (True, True)
    """
    if alternative not in ("two-sided", "greater"):
        raise ConfigError(f"alternative must be two-sided or greater, got {alternative!r}")
    n_perm = check_n_permutations(n_permutations)
    t = check_activations(x)
    u = check_activations(as_tensor(other)[None], what="the other direction")[0]
    if t.shape[-1] != u.shape[-1]:
        raise DModelMismatchError(expected=int(u.shape[-1]), actual=int(t.shape[-1]), what="activations")
    if t.ndim == 2:
        t, u = t[:, None], u[None]
    if t.ndim != 3 or u.ndim != 2 or t.shape[1] != u.shape[0]:
        raise ConfigError(f"activations {tuple(as_tensor(x).shape)} and direction {tuple(as_tensor(other).shape)} "
                          "do not pair up", fix="pass x [n, d] with other [d], or x [n, layer, d] with other [layer, d]")
    n, n_layers, d = (int(v) for v in t.shape)
    if d < 2:
        raise ConfigError("directions need d_model >= 2")
    lab = check_two_classes(y, n=n)
    labels = tuple(range(n_layers)) if layers is None else tuple(int(v) for v in layers)
    if len(labels) != n_layers:
        raise ConfigError(f"{len(labels)} layer labels for {n_layers} layers")
    u_norm = u.to(torch.float64).norm(dim=-1)
    if bool((u_norm == 0).all()):
        raise ConfigError("every direction of the other model is zero")
    # Row 0: the true labels; rows 1..: the shuffles.
    w = mean_difference_weights(torch.cat([lab[None], permuted_labels(lab, n_perm, seed=seed)]))
    with threads_for(n * d * 4):
        cos = torch.stack([_layer_cosines(t[:, j], u[j], w) for j in range(n_layers)], dim=1)  # [1 + N, L]
    stat = cos.abs() if alternative == "two-sided" else cos
    obs, null = stat[0], stat[1:]
    defined = ~torch.isnan(obs) & ~torch.isnan(null).any(dim=0)
    nan = torch.full_like(obs, float("nan"))
    p = torch.where(defined, permutation_pvalue(obs, null), nan)
    q = torch.quantile(torch.nan_to_num(null), torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64), dim=0)
    q = torch.where(defined[None], q, nan[None])
    return PermutationCosine(
        name_a=name_a, name_b=name_b, layers=labels, d_model=d, n_pos=int(lab.sum()), n_neg=int((~lab).sum()),
        cos=cos[0].numpy(), p=p.numpy(), p_isotropic=abs_cos_pvalue(cos[0], d).reshape(n_layers),
        null_median=q[0].numpy(), null_q95=q[1].numpy(), null_q99=q[2].numpy(),
        statistic="|cos|" if alternative == "two-sided" else "cos", alternative=alternative,
        n_permutations=n_perm, seed=int(seed),
    )


def _layer_cosines(x: Float[Tensor, "n d"], u: Float[Tensor, "d"], w: Float[Tensor, "m n"]) -> Float[Tensor, "m"]:
    """``cos(w_k @ x, u)`` for every row ``w_k`` (rows sum to 0), in one product."""
    xc = x.to(torch.float64)
    xc = xc - xc.mean(dim=0)  # w sums to 0: the same differences, without cancellation
    un = u.to(torch.float64)
    norm_u = un.norm()
    if norm_u == 0:
        return torch.full((w.shape[0],), float("nan"), dtype=torch.float64)
    num = w @ (xc @ (un / norm_u))
    if xc.shape[0] <= xc.shape[1]:  # through the Gram matrix: [m, n] x [n, n]
        sq = ((w @ (xc @ xc.T)) * w).sum(dim=1)
    else:
        sq = (w @ xc).pow(2).sum(dim=1)
    norm = sq.clamp_min(0.0).sqrt()
    scale = float(xc.norm(dim=1).max())
    return torch.where(norm > 1e-10 * scale, num / norm.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.full_like(num, float("nan")))
