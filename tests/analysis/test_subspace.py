import math

import numpy as np
import pytest
import torch

from rdt_interp.analysis.subspace import (
    Spectrum,
    SubspaceComparison,
    compare_subspaces,
    orthonormal_basis,
    principal_angle_matrix,
    principal_angles,
    random_principal_angles,
    spectrum,
    top_subspace,
)
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.storage import to_json


def _e(i: int, d: int = 10) -> torch.Tensor:
    v = torch.zeros(d, dtype=torch.float64)
    v[i] = 1.0
    return v


def test_principal_angles_of_known_subspaces():
    theta = 0.3
    a = torch.stack([_e(0), _e(1)])
    b = torch.stack([_e(0) * 2.0, math.cos(theta) * _e(1) + math.sin(theta) * _e(2)])
    np.testing.assert_allclose(principal_angles(a, b).numpy(), [0.0, theta], atol=1e-7)
    assert float(principal_angles(a, torch.stack([_e(3), _e(4)])).min()) == pytest.approx(math.pi / 2)
    # A non-orthonormal basis of the same plane: all angles 0.
    np.testing.assert_allclose(principal_angles(a, torch.stack([_e(0) + _e(1), _e(0) - 3 * _e(1)])).numpy(),
                               [0.0, 0.0], atol=1e-7)
    with pytest.raises(DModelMismatchError):
        principal_angles(a, torch.randn(2, 11))
    with pytest.raises(ConfigError, match="dependent"):
        orthonormal_basis(torch.stack([_e(0), 2 * _e(0)]))


def test_random_angles_match_theory():
    # k = 1: cos^2 of a random direction with a fixed one has mean 1/d.
    d = 50
    ang = random_principal_angles(d, 1, 1, 4000, seed=0)
    assert float((torch.cos(ang) ** 2).mean()) == pytest.approx(1 / d, rel=0.1)
    # Random 5-planes in 4096 dims are nearly orthogonal.
    big = torch.rad2deg(random_principal_angles(4096, 5, 5, 50, seed=1))
    assert float(big.min()) > 80.0


def test_compare_subspaces_against_random_baseline(tmp_path):
    d, k = 200, 3
    gen = torch.Generator().manual_seed(0)
    shared = orthonormal_basis(torch.randn(k, d, generator=gen, dtype=torch.float64))
    noisy = shared + 0.05 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    res = compare_subspaces(shared, noisy, n_null=300, label_a="chat", label_b="vla")
    assert res.angles_deg.max() < 45 and res.p_mean_angle == pytest.approx(1 / 301)
    assert np.all(res.null_lo_deg <= res.null_mean_deg) and np.all(res.null_mean_deg <= res.null_hi_deg)
    unrelated = compare_subspaces(shared, torch.randn(k, d, generator=gen), n_null=300)
    assert unrelated.p_mean_angle > 0.01
    res.save(tmp_path / "sub.json")
    assert to_json(SubspaceComparison.load(tmp_path / "sub.json").to_dict()) == to_json(res.to_dict())


def test_spectrum_counts_planted_components_above_the_parallel_analysis_null(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n, d, rank = 300, 40, 3
    basis = orthonormal_basis(torch.randn(rank, d, generator=gen, dtype=torch.float64))
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 4.0, 3.0]) @ basis
    x = x + torch.randn(n, d, generator=gen, dtype=torch.float64)
    sp = spectrum(x, n_null=30, label="planted")
    assert sp.n_above_null == rank
    assert sp.explained.sum() == pytest.approx(1.0)
    assert np.all(np.diff(sp.explained) <= 1e-12)
    assert sp.rank_for(0.5) <= rank
    angles = principal_angles(top_subspace(x, rank), basis)
    assert float(torch.rad2deg(angles).max()) < 15
    sp.save(tmp_path / "sp.json")
    back = Spectrum.load(tmp_path / "sp.json")
    assert to_json(back.to_dict()) == to_json(sp.to_dict()) and back.n_above_null == rank
    # White noise: nothing above the null.
    assert spectrum(torch.randn(300, d, generator=gen), n_null=30).n_above_null <= 1


def test_principal_angle_matrix_is_symmetric_with_zero_diagonal():
    gen = torch.Generator().manual_seed(0)
    bases = torch.randn(3, 2, 30, generator=gen, dtype=torch.float64)
    bases[2] = bases[0] * 3.0
    m = principal_angle_matrix(bases)
    torch.testing.assert_close(m, m.T)
    assert torch.allclose(m.diagonal(), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert float(m[0, 2]) < 1e-5 and float(m[0, 1]) > 30
