"""How aligned are two models' directions? Cosine per layer and layer x layer, against chance.

The null is the cosine between a fixed direction and a uniformly random one in ``d`` dimensions
(the same law as between two random directions): ``(cos + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)``,
so ``|cos|`` concentrates near ``1/sqrt(d)`` (about 0.012 for d = 4096). p-values and null
quantiles are analytic; :func:`sample_abs_cos_null` draws the same law for checks and plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp.analysis._result import ResultMixin
from rdt_interp.analysis.stats import Array, as_tensor
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

    _arrays: ClassVar[tuple[str, ...]] = ("cos", "p", "matrix", "matrix_p")
    _undefined: ClassVar[dict[str, str]] = {
        name: "cosine undefined: zero-norm direction (null entries)" for name in _arrays}


def align_directions(
    a: Float[Array, "la da"],
    b: Float[Array, "lb db"],
    *,
    layers_a: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
    name_a: str = "a",
    name_b: str = "b",
) -> AlignmentResult:
    """Compare per-layer direction sets ``a`` and ``b`` (e.g. chat vs VLA refusal directions).

    Layer labels default to ``0..L-1``; per-layer cosines use the labels both sets have.
    Different widths raise :class:`DModelMismatchError` (no implicit mapping between models).
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
    )
