import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from rdt_interp.analysis import stats
from rdt_interp.analysis.stats import (
    as_labels,
    auc,
    auc_groups,
    benjamini_hochberg,
    bootstrap_ci,
    bootstrap_distribution,
    cohens_d,
    empirical_pvalue,
    holm,
    mean_ci,
    permutation_test,
    stratified_folds,
    zscore,
)
from rdt_interp.errors import ConfigError


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_auc_matches_sklearn_with_ties_over_many_columns():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=101)
    scores = rng.integers(0, 6, size=(101, 40)).astype(np.float32)  # many ties
    got = auc(scores, y).numpy()
    want = np.array([roc_auc_score(y, scores[:, k]) for k in range(40)])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_auc_edge_cases():
    y = torch.tensor([1, 1, 0, 0])
    assert float(auc(torch.tensor([3.0, 4.0, 1.0, 2.0]), y)) == 1.0
    assert float(auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), y)) == 0.0
    assert float(auc(torch.ones(4), y)) == 0.5


def test_auc_of_gaussian_shift_is_phi_of_delta_over_sqrt2():
    gen = torch.Generator().manual_seed(1)
    n, delta = 4000, 1.0
    pos = torch.randn(n, generator=gen) + delta
    neg = torch.randn(n, generator=gen)
    assert float(auc_groups(pos, neg)) == pytest.approx(_phi(delta / math.sqrt(2)), abs=0.015)


def test_auc_rejects_nan_and_single_class():
    with pytest.raises(ConfigError):
        auc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([1, 0, 1]))
    with pytest.raises(ConfigError, match="single class"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ConfigError, match="0/1"):
        as_labels(torch.tensor([0, 2, 1]))


def test_cohens_d_recovers_the_planted_shift():
    gen = torch.Generator().manual_seed(2)
    pos = torch.randn(5000, 3, generator=gen) * 2.0 + torch.tensor([0.0, 1.0, 3.0])
    neg = torch.randn(5000, 3, generator=gen) * 2.0
    np.testing.assert_allclose(cohens_d(pos, neg).numpy(), [0.0, 0.5, 1.5], atol=0.05)


def test_percentile_ci_covers_the_true_mean_about_95_percent():
    # 400 independent data sets of n = 60 as columns: one vectorized bootstrap.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, 400, generator=gen, dtype=torch.float64) + 2.0
    _, lo, hi = mean_ci(x, n_boot=1000, seed=0)
    coverage = float(((lo <= 2.0) & (hi >= 2.0)).double().mean())
    assert 0.89 <= coverage <= 0.98  # the percentile CI of a mean undercovers slightly at n = 60


def test_bootstrap_is_seeded_and_independent_of_chunking(monkeypatch):
    x = torch.randn(50, 3)
    a = bootstrap_distribution(lambda v: v.mean(0), x, n_boot=300, seed=7)
    b = bootstrap_distribution(lambda v: v.mean(0), x, n_boot=300, seed=7)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 200)  # forces many chunks
    c = bootstrap_distribution(lambda v: v.mean(0), x, n_boot=300, seed=7)
    d = bootstrap_distribution(lambda v: v.mean(0), x, n_boot=300, seed=8)
    assert a.shape == (300, 3)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c)  # same resamples; float reductions may differ in the last ulp
    assert not torch.equal(a, d)


def test_stratified_bootstrap_keeps_group_sizes():
    pos, neg = torch.ones(10), torch.zeros(30)
    est, lo, hi = bootstrap_ci(lambda p, q: p.shape[0] / (p.shape[0] + q.shape[0]) * torch.ones(p.shape[1]),
                               pos, neg, n_boot=50)
    assert float(est) == float(lo) == float(hi) == 0.25


def test_permutation_pvalues_are_uniform_under_the_null_and_small_under_signal():
    gen = torch.Generator().manual_seed(4)
    y = torch.arange(40) < 20
    null_scores = torch.randn(40, 300, generator=gen)
    _, p = permutation_test(auc_groups, null_scores, y, n_perm=200, seed=1, alternative="greater")
    frac = float((p <= 0.05).double().mean())
    assert 0.01 <= frac <= 0.10
    assert float(p.mean()) == pytest.approx(0.5, abs=0.06)
    separated = torch.where(y, 1.0, 0.0)[:, None] + 0.01 * torch.randn(40, 1, generator=gen)
    obs, p_sig = permutation_test(auc_groups, separated, y, n_perm=200, seed=1)
    assert float(obs) == 1.0
    assert float(p_sig) == pytest.approx(1 / 201)


def test_empirical_pvalue_has_the_plus_one_correction():
    null = torch.linspace(0, 1, 99)
    assert float(empirical_pvalue(torch.tensor(2.0), null, "greater")) == pytest.approx(1 / 100)
    assert float(empirical_pvalue(torch.tensor(-1.0), null, "greater")) == 1.0
    assert float(empirical_pvalue(torch.tensor(-1.0), null, "less")) == pytest.approx(1 / 100)
    # two-sided around 0.5: 0.0 and 1.0 are equally extreme (2 of 99 hits, ties included).
    assert float(empirical_pvalue(torch.tensor(1.0), null, "two-sided", center=0.5)) == pytest.approx(3 / 100)
    with pytest.raises(ConfigError):
        empirical_pvalue(torch.tensor(1.0), null, "bigger")


def test_zscore_and_holm():
    null = torch.tensor([-1.0, 0.0, 1.0])
    assert float(zscore(torch.tensor(2.0), null)) == pytest.approx(2.0)
    p = torch.tensor([0.01, 0.04, 0.03, 0.5])
    # Holm: sorted p * (m - rank), running max: .04, .09, .09, .5
    np.testing.assert_allclose(holm(p).numpy(), [0.04, 0.09, 0.09, 0.5])


def test_stratified_folds_are_disjoint_and_balanced():
    y = np.array([1] * 12 + [0] * 18)
    folds = stratified_folds(y, 3, seed=0)
    test_idx = np.concatenate([te for _, te in folds])
    assert sorted(test_idx.tolist()) == list(range(30))
    for tr, te in folds:
        assert not set(tr) & set(te)
        assert y[te].sum() == 4
    with pytest.raises(ConfigError, match="per class"):
        stratified_folds(np.array([1, 1, 0, 0, 0]), 3, seed=0)


def test_wilson_interval_known_values_and_edges():
    from rdt_interp.analysis.stats import wilson_interval

    # 0/n and n/n: the percentile bootstrap collapses to a point, Wilson does not
    rate, lo, hi = wilson_interval(0, 128)
    assert (rate, lo) == (0.0, 0.0) and hi == pytest.approx(1.96**2 / (128 + 1.96**2), rel=1e-3)
    rate, lo, hi = wilson_interval(128, 128)
    assert (rate, hi) == (1.0, 1.0) and 1 - lo == pytest.approx(1.96**2 / (128 + 1.96**2), rel=1e-3)
    # a textbook value (Newcombe 1998, 81/263: 0.2553-0.3662)
    rate, lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    # 0/1 outcomes give the same as their count; a wider level gives a wider interval
    flags = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert wilson_interval(flags, 6) == wilson_interval(4, 6)
    assert wilson_interval([True, False, True, True, False, True], 6) == wilson_interval(4, 6)
    lo99, hi99 = wilson_interval(4, 6, level=0.99)[1:]
    assert lo99 < wilson_interval(4, 6)[1] and hi99 > wilson_interval(4, 6)[2]


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (0, 0)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    from rdt_interp.analysis.stats import wilson_interval

    with pytest.raises(ConfigError):
        wilson_interval(k, n)
    with pytest.raises(ConfigError, match="0/1"):
        wilson_interval(torch.tensor([0.0, 0.5]), 2)
    with pytest.raises(ConfigError, match="outcomes for n"):
        wilson_interval(torch.tensor([0.0, 1.0]), 3)


# -- multiple comparisons --------------------------------------------------------------------------
def _holm_step_down(p: list[float], alpha: float) -> set[int]:
    """Holm's procedure as written: test the sorted p-values against alpha / (m - i); stop at
    the first that fails."""
    m = len(p)
    rejected: set[int] = set()
    for i, j in enumerate(sorted(range(m), key=lambda k: (p[k], k))):
        if p[j] > alpha / (m - i):
            break
        rejected.add(j)
    return rejected


def _bh_step_up(p: list[float], q: float) -> set[int]:
    """Benjamini-Hochberg as written: the largest k with p_(k) <= k q / m; reject the k smallest."""
    m = len(p)
    order = sorted(range(m), key=lambda k: (p[k], k))
    k_max = max((i + 1 for i, j in enumerate(order) if p[j] <= (i + 1) * q / m), default=0)
    return set(order[:k_max])


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.5]
    # Holm: sorted .01 .03 .04 .5 times 4 3 2 1 = .04 .09 .08 .5, running max .04 .09 .09 .5
    np.testing.assert_allclose(holm(p).numpy(), [0.04, 0.09, 0.09, 0.5])
    # BH: sorted times 4/1 4/2 4/3 4/4 = .04 .06 .0533 .5, running min from the top: .04 .0533 .0533 .5
    np.testing.assert_allclose(benjamini_hochberg(p).numpy(), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    # capped at 1, shape kept, numpy in
    out = holm(np.array([[0.3, 0.6], [0.9, 0.2]]))
    assert out.shape == (2, 2) and float(out.max()) == 1.0
    np.testing.assert_allclose(out.numpy(), [[0.9, 1.0], [1.0, 0.8]])


def test_holm_and_bh_agree_with_the_procedures_they_adjust():
    rng = np.random.default_rng(0)
    for trial in range(200):
        m = int(rng.integers(1, 25))
        p = rng.uniform(0, 1, m) ** rng.uniform(1, 6)  # many small ones
        if trial % 5 == 0:
            p[: m // 2] = p[0]  # ties
        h, b = holm(torch.tensor(p)).numpy(), benjamini_hochberg(torch.tensor(p)).numpy()
        assert np.all(h >= p - 1e-15) and np.all(b >= p - 1e-15) and np.all(b <= h + 1e-15)
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.2, 0.5):
            assert set(np.flatnonzero(h <= alpha)) == _holm_step_down(p.tolist(), alpha)
            assert set(np.flatnonzero(b <= alpha)) == _bh_step_up(p.tolist(), alpha)


def test_holm_and_bh_against_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(1).uniform(0, 0.2, 30)
    np.testing.assert_allclose(holm(p).numpy(), multitest.multipletests(p, method="holm")[1])
    np.testing.assert_allclose(benjamini_hochberg(p).numpy(), multitest.multipletests(p, method="fdr_bh")[1])


def test_holm_leaves_missing_tests_out_of_the_family():
    p = torch.tensor([0.01, float("nan"), 0.04, 0.03, 0.5])
    out = holm(p)
    assert math.isnan(float(out[1]))
    np.testing.assert_allclose(out[[0, 2, 3, 4]].numpy(), [0.04, 0.09, 0.09, 0.5])  # m = 4, not 5
    assert math.isnan(float(benjamini_hochberg(p)[1]))
    assert holm(torch.tensor([])).numel() == 0
    for bad in ([0.1, 1.5], [-0.01], [float("inf")]):
        with pytest.raises(ConfigError, match=r"\[0, 1\]"):
            holm(bad)
        with pytest.raises(ConfigError, match=r"\[0, 1\]"):
            benjamini_hochberg(bad)
