"""Spectra and subspace geometry: SVD spectra, explained variance, principal angles, and chance.

* :func:`spectrum` -- singular values / explained variance of a sample matrix, with a
  parallel-analysis null (each feature shuffled across samples on its own, which keeps every
  feature's variance and destroys their correlations): components above the null are structure.
* :func:`principal_angles` -- between two subspaces (e.g. chat rank-k vs VLA rank-k, or layer L
  vs L'); :func:`compare_subspaces` puts them against the angles of random k-subspaces of the
  same dimensions, which in high ``d`` are all close to 90 degrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp.analysis._result import ResultMixin
from rdt_interp.analysis.stats import Array, as_tensor, empirical_pvalue, threads_for
from rdt_interp.errors import ConfigError, DModelMismatchError


@dataclass(frozen=True, eq=False)
class Spectrum(ResultMixin):
    """Singular values and explained-variance ratios, with a parallel-analysis null band."""

    label: str
    n_samples: int
    d_model: int
    centered: bool
    singular_values: Float[np.ndarray, "k"]
    explained: Float[np.ndarray, "k"]
    null_explained_mean: Float[np.ndarray, "k"]
    null_explained_hi: Float[np.ndarray, "k"]
    n_null: int
    level: float
    seed: int

    _arrays: ClassVar[tuple[str, ...]] = (
        "singular_values", "explained", "null_explained_mean", "null_explained_hi")

    @property
    def cumulative(self) -> Float[np.ndarray, "k"]:
        return np.cumsum(self.explained)

    @property
    def n_above_null(self) -> int:
        """Leading components whose explained variance exceeds the null's upper quantile."""
        above = self.explained > self.null_explained_hi
        return int(np.argmin(above)) if not above.all() else int(above.size)

    def rank_for(self, fraction: float) -> int:
        """Components needed to explain ``fraction`` of the variance."""
        return int(np.searchsorted(self.cumulative, fraction - 1e-12) + 1)


def _explained(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    s = torch.linalg.svdvals(x)
    var = s**2
    total = var.sum()
    return s[:k], (var / total)[:k] if total > 0 else torch.zeros(k, dtype=var.dtype)


def spectrum(
    x: Float[Array, "n d"],
    *,
    center: bool = True,
    n_components: int | None = None,
    n_null: int = 50,
    seed: int = 0,
    level: float = 0.95,
    label: str = "",
) -> Spectrum:
    """SVD spectrum of ``x`` (rows = samples) and its parallel-analysis null.

    ``n_null`` shuffles cost one SVD each (0 skips the null; its arrays are then NaN).
    """
    with threads_for(int(np.prod(x.shape))):
        return _spectrum(as_tensor(x, dtype=torch.float64), center, n_components, n_null, seed, level,
                         label)


def _spectrum(t: Float[Tensor, "n d"], center: bool, n_components: int | None, n_null: int,
              seed: int, level: float, label: str) -> Spectrum:
    n, d = t.shape
    if n < 2:
        raise ConfigError("a spectrum needs at least two samples")
    if center:
        t = t - t.mean(dim=0, keepdim=True)
    k = min(n, d) if n_components is None else min(n_components, n, d)
    s, ev = _explained(t, k)
    if n_null > 0:
        gen = torch.Generator().manual_seed(seed)
        nulls = []
        for _ in range(n_null):
            perm = torch.rand((n, d), generator=gen).argsort(dim=0)
            nulls.append(_explained(t.gather(0, perm), k)[1])
        null = torch.stack(nulls)
        mean, hi = null.mean(dim=0), torch.quantile(null, level, dim=0)
    else:
        mean = hi = torch.full((k,), float("nan"), dtype=torch.float64)
    return Spectrum(label=label, n_samples=n, d_model=d, centered=center,
                    singular_values=s.numpy(), explained=ev.numpy(), null_explained_mean=mean.numpy(),
                    null_explained_hi=hi.numpy(), n_null=n_null, level=level, seed=seed)


def top_subspace(x: Float[Array, "n d"], k: int, *, center: bool = True) -> Float[Tensor, "k d"]:
    """Orthonormal rows spanning the top-``k`` right singular vectors of ``x``."""
    t = as_tensor(x, dtype=torch.float64)
    if not 1 <= k <= min(t.shape):
        raise ConfigError(f"k={k} must be in [1, {min(t.shape)}] for a {tuple(t.shape)} matrix")
    if center:
        t = t - t.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(t, full_matrices=False)
    return vh[:k]


def orthonormal_basis(a: Float[Array, "k d"]) -> Float[Tensor, "k d"]:
    """Orthonormal rows spanning the rows of ``a`` (QR); rank-deficient input is refused."""
    t = as_tensor(a, dtype=torch.float64)
    q, r = torch.linalg.qr(t.T)
    diag = r.diagonal().abs()
    if bool((diag <= 1e-10 * max(float(diag.max()), 1e-300)).any()):
        raise ConfigError(f"the {t.shape[0]} vectors are linearly dependent",
                          fix="drop redundant vectors or use top_subspace() to pick a basis")
    return q.T


def principal_angles(a: Float[Array, "ka da"], b: Float[Array, "kb db"]) -> Float[Tensor, "k"]:
    """Principal angles (radians, ascending) between ``span(a)`` and ``span(b)``; ``k = min(ka, kb)``."""
    x, y = as_tensor(a, dtype=torch.float64), as_tensor(b, dtype=torch.float64)
    if x.shape[-1] != y.shape[-1]:
        raise DModelMismatchError(expected=int(x.shape[-1]), actual=int(y.shape[-1]), what="subspace")
    qa, qb = orthonormal_basis(x), orthonormal_basis(y)
    cos = torch.linalg.svdvals(qa @ qb.T).clamp(-1.0, 1.0)
    return torch.arccos(cos).sort().values


def random_principal_angles(
    d: int, ka: int, kb: int, n: int, *, seed: int = 0, chunk: int = 64
) -> Float[Tensor, "n k"]:
    """Principal angles (radians) between random ``ka``- and ``kb``-subspaces of ``R^d``.

    By rotation invariance one subspace can be fixed to the first ``ka`` coordinates, so only
    the other is drawn (Gaussian ``[d, kb]``, QR).
    """
    if not (1 <= ka <= d and 1 <= kb <= d and n >= 1):
        raise ConfigError(f"need 1 <= ka, kb <= d and n >= 1, got d={d}, ka={ka}, kb={kb}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        q, _ = torch.linalg.qr(torch.randn(m, d, kb, generator=gen, dtype=torch.float64))
        cos = torch.linalg.svdvals(q[:, :ka, :]).clamp(-1.0, 1.0)
        out.append(torch.arccos(cos).sort(dim=1).values)
    return torch.cat(out)


@dataclass(frozen=True, eq=False)
class SubspaceComparison(ResultMixin):
    """Principal angles between two subspaces with the random-subspace baseline (degrees).

    ``p_mean_angle`` is the empirical p-value (+1 corrected) of a mean angle at least as small
    as observed under random subspaces; ``p_first_angle`` the same for the smallest angle.
    """

    label_a: str
    label_b: str
    d_model: int
    k_a: int
    k_b: int
    angles_deg: Float[np.ndarray, "k"]
    null_mean_deg: Float[np.ndarray, "k"]
    null_lo_deg: Float[np.ndarray, "k"]
    null_hi_deg: Float[np.ndarray, "k"]
    p_mean_angle: float
    p_first_angle: float
    n_null: int
    level: float
    seed: int

    _arrays: ClassVar[tuple[str, ...]] = ("angles_deg", "null_mean_deg", "null_lo_deg", "null_hi_deg")


def compare_subspaces(
    a: Float[Array, "*ka da"],
    b: Float[Array, "*kb db"],
    *,
    n_null: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    label_a: str = "a",
    label_b: str = "b",
) -> SubspaceComparison:
    """Principal angles of ``span(a)`` vs ``span(b)`` against random subspaces of the same sizes."""
    with threads_for(int(np.prod(a.shape)) * 16):
        return _compare_subspaces(as_tensor(a, dtype=torch.float64), as_tensor(b, dtype=torch.float64),
                                  n_null, seed, level, label_a, label_b)


def _compare_subspaces(x: Tensor, y: Tensor, n_null: int, seed: int, level: float, label_a: str,
                       label_b: str) -> SubspaceComparison:
    if x.ndim == 1:
        x = x[None]
    if y.ndim == 1:
        y = y[None]
    angles = torch.rad2deg(principal_angles(x, y))
    d, ka, kb = int(x.shape[-1]), int(x.shape[0]), int(y.shape[0])
    null = torch.rad2deg(random_principal_angles(d, ka, kb, n_null, seed=seed))
    a_ = (1.0 - level) / 2.0
    q = torch.quantile(null, torch.tensor([a_, 1.0 - a_], dtype=torch.float64), dim=0)
    p_mean = empirical_pvalue(angles.mean(), null.mean(dim=1), "less")
    p_first = empirical_pvalue(angles[0], null[:, 0], "less")
    return SubspaceComparison(
        label_a=label_a, label_b=label_b, d_model=d, k_a=ka, k_b=kb, angles_deg=angles.numpy(),
        null_mean_deg=null.mean(dim=0).numpy(), null_lo_deg=q[0].numpy(), null_hi_deg=q[1].numpy(),
        p_mean_angle=float(p_mean), p_first_angle=float(p_first), n_null=n_null, level=level, seed=seed,
    )


def principal_angle_matrix(
    bases: Float[Array, "layer k d"], *, reduce: str = "mean"
) -> Float[Tensor, "layer layer"]:
    """Angle (degrees) between every pair of per-layer subspaces: mean or smallest (``first``)."""
    t = as_tensor(bases, dtype=torch.float64)
    if reduce not in ("mean", "first"):
        raise ConfigError(f"reduce must be mean or first, got {reduce!r}")
    L = t.shape[0]
    out = torch.zeros(L, L, dtype=torch.float64)
    qs = [orthonormal_basis(t[i]) for i in range(L)]
    for i in range(L):
        for j in range(i, L):
            ang = torch.rad2deg(torch.arccos(torch.linalg.svdvals(qs[i] @ qs[j].T).clamp(-1, 1)).sort().values)
            out[i, j] = out[j, i] = ang.mean() if reduce == "mean" else ang[0]
    return out
