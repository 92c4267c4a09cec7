import json
import math

import numpy as np
import pytest
import torch

from rdt_interp.analysis.alignment import (
    AlignmentResult,
    PermutationCosine,
    abs_cos_pvalue,
    abs_cos_quantile,
    align_directions,
    cosine_matrix,
    cosine_permutation_null,
    cosine_similarity,
    sample_abs_cos_null,
)
from rdt_interp.analysis.permutation import permuted_labels
from rdt_interp.analysis.probes import class_mean_difference
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


# -- the label-permutation null --------------------------------------------------------------------
def _mean_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.double()[y].mean(0) - x.double()[~y].mean(0)  # float64 (class_mean_difference is float32)


def _brute_null(x: torch.Tensor, y: torch.Tensor, other: torch.Tensor, n_perm: int, seed: int) -> np.ndarray:
    """cos(class-mean difference under each shuffle, other), one shuffle at a time."""
    out = []
    for lab in permuted_labels(y, n_perm, seed=seed):
        diff = _mean_diff(x, lab)
        out.append(cosine_similarity(diff, other.double()).numpy())
    return np.stack(out)  # [n_perm, *layer]


@pytest.mark.parametrize("n,d", [(12, 40), (40, 6)])  # through the Gram matrix, and directly
def test_permutation_null_equals_the_loop_over_shuffles(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, d, generator=g) + 50.0  # a common offset, as in a residual stream
    y = torch.arange(n) < n // 3
    other = torch.randn(3, d, generator=g)
    res = cosine_permutation_null(x, y, other, n_permutations=60, seed=4, layers=(5, 6, 7))
    null = np.abs(_brute_null(x, y, other, 60, 4))
    obs = cosine_similarity(_mean_diff(x, y), other.double()).numpy()
    np.testing.assert_allclose(res.cos, obs, atol=1e-9)
    np.testing.assert_allclose(res.p, (1 + (null >= np.abs(obs) - 1e-12).sum(0)) / 61)
    np.testing.assert_allclose(res.null_q95, np.quantile(null, 0.95, axis=0), atol=1e-9)
    np.testing.assert_allclose(res.null_median, np.quantile(null, 0.5, axis=0), atol=1e-9)
    np.testing.assert_allclose(res.p_isotropic, abs_cos_pvalue(obs, d))
    assert res.layers == (5, 6, 7) and (res.n_pos, res.n_neg, res.n_permutations) == (n // 3, n - n // 3, 60)
    signed = cosine_permutation_null(x[:, 0], y, other[0], n_permutations=60, seed=4, alternative="greater")
    s_null = _brute_null(x[:, 0], y, other[0], 60, 4)
    assert signed.statistic == "cos"
    assert signed.p[0] == pytest.approx((1 + (s_null >= obs[0] - 1e-12).sum()) / 61)


def _fine_tune_like(seed: int, n: int = 30, d: int = 50, signal: float = 0.0):
    """Activations with one dominant direction v; the other model's direction is close to v (a
    fine-tune shares its parent's high-variance directions). Labels carry ``signal`` along it."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    y = torch.arange(n) < n // 2
    x = torch.randn(n, d, generator=g) + 8.0 * torch.randn(n, 1, generator=g) * v
    x = x + signal * y[:, None].float() * v
    other = v + 0.3 * torch.randn(d, generator=g) / d**0.5
    return x, y, other


def test_permutation_p_is_uniform_under_the_null_where_the_isotropic_p_is_not():
    p_perm, p_iso = [], []
    for seed in range(300):
        x, y, other = _fine_tune_like(seed)
        res = cosine_permutation_null(x, y, other, n_permutations=199, seed=seed)
        p_perm.append(res.p[0])
        p_iso.append(res.p_isotropic[0])
    p_perm, p_iso = np.array(p_perm), np.array(p_iso)
    # Exchangeable under the null: P(p <= 0.1) = 20/200 exactly; 300 datasets give sd 0.017.
    assert np.mean(p_perm <= 0.1) == pytest.approx(0.10, abs=0.05)
    assert np.mean(p_perm <= 0.5) == pytest.approx(0.50, abs=0.09)
    assert np.mean(p_perm) == pytest.approx(0.5, abs=0.05)
    # The isotropic null calls most of these null datasets aligned: it is too lenient here.
    assert np.mean(p_iso <= 0.1) > 0.5


def test_permutation_p_is_small_when_the_labels_carry_the_shared_direction():
    x, y, other = _fine_tune_like(0, n=40, signal=8.0)
    res = cosine_permutation_null(x, y, other, n_permutations=499, seed=0)
    assert res.cos[0] > 0.5 and res.p[0] == 1 / 500 and res.null_q99[0] < res.cos[0]


def test_permutation_null_is_seeded_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y, other = torch.randn(20, 2, 8, generator=g), torch.arange(20) % 2 == 0, torch.randn(2, 8, generator=g)
    other[0] = 0.0  # no direction at layer 0: NaN, written as null with a reason
    a = cosine_permutation_null(x, y, other, n_permutations=100, seed=3, name_a="vla", name_b="chat")
    b = cosine_permutation_null(x, y, other, n_permutations=100, seed=3, name_a="vla", name_b="chat")
    c = cosine_permutation_null(x, y, other, n_permutations=100, seed=4)
    assert to_json(a.to_dict()) == to_json(b.to_dict())
    assert a.null_q95[1] != c.null_q95[1] and a.cos[1] == c.cos[1]
    assert np.isnan(a.cos[0]) and np.isnan(a.p[0]) and np.isnan(a.null_q95[0]) and np.isfinite(a.p[1])
    a.save(tmp_path / "perm.json")
    text = (tmp_path / "perm.json").read_text()
    assert "NaN" not in text
    assert to_json(PermutationCosine.load(tmp_path / "perm.json").to_dict()) == to_json(a.to_dict())
    # carried by the alignment result; absent from its JSON when not given (old files unchanged)
    dirs_a = class_mean_difference(x, y)
    plain = align_directions(dirs_a, other)
    assert "permutation" not in plain.to_dict()
    both = align_directions(dirs_a, other, permutation=a)
    back = AlignmentResult.from_dict(json.loads(to_json(both.to_dict())))
    assert isinstance(back.permutation, PermutationCosine)
    assert to_json(back.to_dict()) == to_json(both.to_dict())
    assert to_json({k: v for k, v in both.to_dict().items() if k != "permutation"}) == to_json(plain.to_dict())
    with pytest.raises(DModelMismatchError):
        align_directions(torch.randn(2, 9), torch.randn(2, 9), permutation=a)


def test_permutation_null_rejects_bad_input_with_typed_errors():
    x, y, other = torch.randn(10, 8), torch.arange(10) < 5, torch.randn(8)
    with pytest.raises(ConfigError, match="at least 2 samples per class") as err:
        cosine_permutation_null(x, torch.tensor([1] + [0] * 9), other)
    assert "fix:" in str(err.value)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        cosine_permutation_null(bad, y, other)
    with pytest.raises(ConfigError, match="NaN"):
        cosine_permutation_null(x, y, torch.full((8,), float("inf")))
    with pytest.raises(ConfigError, match="n_permutations"):
        cosine_permutation_null(x, y, other, n_permutations=0)
    with pytest.raises(DModelMismatchError):
        cosine_permutation_null(x, y, torch.randn(9))
    with pytest.raises(ConfigError, match="pair up"):
        cosine_permutation_null(torch.randn(10, 3, 8), y, torch.randn(2, 8))
    with pytest.raises(ConfigError, match="zero"):
        cosine_permutation_null(x, y, torch.zeros(8))
    with pytest.raises(ConfigError, match="alternative"):
        cosine_permutation_null(x, y, other, alternative="less")
