import pytest
import torch

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.directions.subspace import contrast_subspace, random_direction, subspace_direction
from rdt_interp.errors import ConfigError


def _data(d=32, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[0] = 3.0
    shift[1] = 1.0
    harmful = torch.randn(n, d, generator=g) + shift
    harmless = torch.randn(n, d, generator=g)
    return harmful, harmless


def test_top_direction_recovers_planted_shift():
    h, hl = _data()
    sub = contrast_subspace(h, hl, 3)
    b = sub.basis
    assert torch.allclose(b @ b.T, torch.eye(3), atol=1e-5)
    planted = torch.tensor([3.0, 1.0] + [0.0] * 30)
    cos = float(b[0] @ planted / planted.norm())
    assert cos > 0.9  # sign-aligned with the mean difference
    evr = sub.explained_variance_ratio
    assert abs(float(evr.sum()) - 1) < 1e-5 and evr[0] > evr[1]


@pytest.mark.parametrize("weighting", ["projection", "equal"])
def test_steering_norm_does_not_grow_with_k(weighting):
    h, hl = _data()
    norms = [float(contrast_subspace(h, hl, k).steering_vector(weighting=weighting).norm()) for k in (1, 2, 4, 8, 16)]
    md = float((h.mean(0) - hl.mean(0)).norm())
    assert max(abs(n - md) for n in norms) < 1e-4 * md + 1e-5


def test_unnormalized_equal_sum_grows_like_sqrt_k():
    # The artifact the default protects against, reproduced only when asked for by name.
    h, hl = _data()
    n4 = float(contrast_subspace(h, hl, 4).steering_vector(weighting="equal", norm="none").norm())
    n16 = float(contrast_subspace(h, hl, 16).steering_vector(weighting="equal", norm="none").norm())
    assert abs(n16 / n4 - 2.0) < 1e-4


def test_subspace_direction_and_errors():
    h, hl = _data()
    base = Direction(h.mean(0) - hl.mean(0), Provenance("m", "", 2, "last", "resid_pre", "diff_in_means"))
    d = subspace_direction(base, h, hl, 4)
    assert d.rank == 4 and d.provenance.method == "svd_rank_k" and abs(d.norm - base.norm) < 1e-3
    assert len(d.provenance.extra["explained_variance_topk"]) == 4
    with pytest.raises(ConfigError):
        contrast_subspace(h, hl, 0)
    with pytest.raises(ConfigError):
        contrast_subspace(h, hl[:, :5], 2)
    # Literal annotations are checked first under the test suite's runtime type checks.
    with pytest.raises((ConfigError, TypeError)):
        contrast_subspace(h, hl, 2).steering_vector(norm="l3")


def test_random_direction_matched_norm():
    g = torch.Generator().manual_seed(0)
    r = random_direction(64, norm=7.0, generator=g)
    assert abs(r.norm - 7.0) < 1e-5 and r.provenance.method == "random"
