"""Rank-k refusal subspaces from the per-prompt contrast matrix, with a norm-safe steering vector.

The contrast matrix has one row per harmful prompt: its activation minus the harmless mean.
Its top right-singular vectors span the subspace; the spectrum says how much of the contrast
each direction carries.

Steering with a rank-k subspace needs one vector. Summing k unit singular vectors gives a
vector of norm sqrt(k): an effect that grows with k is then an artifact of the norm, not of the
subspace (the seed study's rank-k result was exactly that). Here the steering vector is always
rescaled to a fixed norm (by default the norm of the diff-in-means vector), whatever k is;
``norm="none"`` must be asked for by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError

Weighting = Literal["projection", "equal"]
NormRule = Literal["mean_diff", "unit", "none"]


@dataclass(frozen=True, eq=False)
class ContrastSubspace:
    basis: Float[Tensor, "k d"]  # orthonormal rows, sign-aligned with the mean difference
    singular_values: Float[Tensor, "r"]  # full spectrum of the contrast matrix
    mean_diff: Float[Tensor, "d"]

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def explained_variance_ratio(self) -> Float[Tensor, "r"]:
        s2 = self.singular_values.double() ** 2
        return (s2 / s2.sum()).float()

    def steering_vector(self, *, weighting: Weighting = "projection", norm: NormRule = "mean_diff"
                        ) -> Float[Tensor, "d"]:
        """One vector for the subspace, with a norm that does not grow with k.

        ``weighting="projection"``: the mean difference projected onto the subspace;
        ``"equal"``: the sign-aligned sum of basis vectors. ``norm="mean_diff"`` rescales to
        ``||mean_diff||``, ``"unit"`` to 1, ``"none"`` leaves it (``equal`` then has norm sqrt(k)).
        """
        b = self.basis.double()
        m = self.mean_diff.double()
        if weighting == "projection":
            v = (b @ m) @ b
        elif weighting == "equal":
            v = b.sum(0)
        else:
            raise ConfigError(f"unknown weighting {weighting!r}", fix="use 'projection' or 'equal'")
        if norm == "none":
            return v.float()
        target = m.norm() if norm == "mean_diff" else torch.tensor(1.0, dtype=torch.float64)
        if norm not in ("mean_diff", "unit"):
            raise ConfigError(f"unknown norm rule {norm!r}", fix="use 'mean_diff', 'unit' or 'none'")
        return (v / v.norm().clamp(min=1e-12) * target).float()


def contrast_subspace(
    harmful: Float[Tensor, "n1 d"], harmless: Float[Tensor, "n0 d_b"], k: int
) -> ContrastSubspace:
    """Top-``k`` right singular vectors of ``harmful - mean(harmless)``."""
    if harmful.ndim != 2 or harmless.ndim != 2 or harmful.shape[1] != harmless.shape[1]:
        raise ConfigError(f"need [n, d] activations of one width, got {tuple(harmful.shape)} "
                          f"and {tuple(harmless.shape)}")
    max_k = min(harmful.shape)
    if not 1 <= k <= max_k:
        raise ConfigError(f"k={k} must be between 1 and min(n_harmful, d)={max_k}")
    mu0 = harmless.double().mean(0)
    contrast = harmful.double() - mu0
    _, s, vh = torch.linalg.svd(contrast, full_matrices=False)
    mean_diff = harmful.double().mean(0) - mu0
    basis = vh[:k]
    # Singular vectors have arbitrary sign: orient each with the mean difference.
    signs = torch.sign(basis @ mean_diff)
    signs[signs == 0] = 1
    basis = basis * signs[:, None]
    return ContrastSubspace(basis.float(), s.float(), mean_diff.float())


def subspace_direction(
    base: Direction,
    harmful: Float[Tensor, "n1 d"],
    harmless: Float[Tensor, "n0 d"],
    k: int,
    *,
    weighting: Weighting = "projection",
    norm: NormRule = "mean_diff",
) -> Direction:
    """A rank-k :class:`Direction` (steering vector + ablation basis) at ``base``'s layer/position."""
    sub = contrast_subspace(harmful, harmless, k)
    vec = sub.steering_vector(weighting=weighting, norm=norm)
    prov = replace(base.provenance, method="svd_rank_k", rank=k,
                   normalization=f"{weighting}/{norm}",
                   extra={**base.provenance.extra,
                          "explained_variance_topk": sub.explained_variance_ratio[:k].tolist()})
    return Direction(vec, prov, sub.basis)


def random_direction(d: int, *, norm: float, generator: torch.Generator | None = None,
                     provenance: Provenance | None = None) -> Direction:
    v = torch.randn(d, generator=generator, dtype=torch.float64)
    v = (v / v.norm() * norm).float()
    prov = provenance or Provenance("random", "", -1, "", "", "random")
    return Direction(v, replace(prov, method="random", normalization=f"norm={norm:.6g}"))
