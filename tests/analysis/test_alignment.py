import math

import numpy as np
import pytest
import torch

from rdt_interp.analysis.alignment import (
    AlignmentResult,
    abs_cos_pvalue,
    abs_cos_quantile,
    align_directions,
    cosine_matrix,
    cosine_similarity,
    sample_abs_cos_null,
)
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.storage import to_json


def _rotated(a: torch.Tensor, angle: float, seed: int) -> torch.Tensor:
    """Rows at exactly ``angle`` (radians) from the rows of ``a``."""
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = a / a.norm(dim=1, keepdim=True)
    perp = noise - (noise * u).sum(1, keepdim=True) * u
    perp = perp / perp.norm(dim=1, keepdim=True)
    return math.cos(angle) * u + math.sin(angle) * perp


@pytest.mark.parametrize("d", [3, 40, 4096])
def test_analytic_null_matches_random_unit_vectors(d):
    gen = torch.Generator().manual_seed(d)
    a = torch.randn(20000, d if d < 100 else 64, generator=gen, dtype=torch.float64)
    if d >= 100:  # the chi-square construction, checked against direct vectors at d = 64 below
        c = sample_abs_cos_null(d, 20000, seed=1)
    else:
        b = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        c = cosine_similarity(a, b).abs()
    for q in (0.5, 0.9, 0.99):
        assert float(torch.quantile(c, q)) == pytest.approx(abs_cos_quantile(q, d), rel=0.04, abs=2e-3)
    # p-values of null draws are uniform.
    p = abs_cos_pvalue(c, d)
    assert np.mean(p <= 0.05) == pytest.approx(0.05, abs=0.01)


def test_sampled_null_equals_direct_sampling_in_law():
    d = 64
    gen = torch.Generator().manual_seed(5)
    direct = cosine_similarity(torch.randn(20000, d, generator=gen), torch.randn(20000, d, generator=gen)).abs()
    sampled = sample_abs_cos_null(d, 20000, seed=3)
    qs = torch.tensor([0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(sampled, qs), torch.quantile(direct, qs), atol=4e-3, rtol=0)
    assert abs_cos_quantile(0.5, 4096) < 0.02  # |cos| of random 4096-d directions is tiny


def test_alignment_recovers_planted_cosines_and_rejects_chance():
    d, L = 512, 6
    a = torch.randn(L, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.55, math.pi / 2], dtype=torch.float64)
    b = torch.stack([_rotated(a[i:i + 1], float(angles[i]), 100 + i)[0] for i in range(L)])
    res = align_directions(a, b, name_a="chat", name_b="vla")
    np.testing.assert_allclose(res.cos, np.cos(angles.numpy()), atol=1e-9)
    assert res.layers == tuple(range(L))
    assert np.all(res.p[:3] < 1e-10)
    assert res.p[-1] > 0.9  # orthogonal: |cos| = 0
    np.testing.assert_allclose(np.diag(res.matrix), res.cos)
    assert res.matrix.shape == (L, L)
    assert res.null_q95 == pytest.approx(abs_cos_quantile(0.95, d))
    assert res.null_median < res.null_q95 < res.null_q99


def test_alignment_uses_shared_layer_labels_and_refuses_other_widths(tmp_path):
    a = torch.randn(4, 16)
    b = torch.randn(3, 16)
    res = align_directions(a, b, layers_a=(0, 1, 2, 3), layers_b=(2, 3, 4))
    assert res.layers == (2, 3)
    assert res.cos[0] == pytest.approx(float(cosine_similarity(a[2], b[0])))
    assert res.matrix.shape == (4, 3)
    res.save(tmp_path / "align.json")
    assert to_json(AlignmentResult.load(tmp_path / "align.json").to_dict()) == to_json(res.to_dict())
    with pytest.raises(DModelMismatchError):
        align_directions(torch.randn(2, 16), torch.randn(2, 17))
    with pytest.raises(DModelMismatchError):
        cosine_matrix(torch.randn(2, 16), torch.randn(2, 17))
    with pytest.raises(ConfigError, match="zero norm"):
        align_directions(torch.zeros(1, 16), torch.randn(1, 16))
    # A zero direction among others (layer 0 at template tokens) has no cosine, not an error.
    a0 = a.clone()
    a0[0] = 0.0
    res0 = align_directions(a0, b, layers_a=(0, 1, 2, 3), layers_b=(0, 1, 2))
    assert np.isnan(res0.cos[0]) and np.isnan(res0.p[0]) and np.isfinite(res0.cos[1:]).all()


def test_zero_norm_layer_is_null_with_a_reason_in_json(tmp_path):
    import json

    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    a[0] = 0.0  # layer 0 over template tokens: every prompt has the same embedding
    res = align_directions(a, b)
    res.save(tmp_path / "a.json")
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text
    d = json.loads(text)
    assert d["cos"][0] is None and d["matrix"][0] == [None, None, None] and d["cos"][1] is not None
    assert d["undefined"]["cos"].startswith("cosine undefined: zero-norm direction")
    back = AlignmentResult.load(tmp_path / "a.json")
    assert np.isnan(back.cos[0]) and np.allclose(back.cos[1:], res.cos[1:])
    assert "undefined" not in json.loads(to_json(align_directions(b, b).to_dict()))
