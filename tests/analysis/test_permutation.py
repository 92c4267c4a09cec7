import numpy as np
import pytest
import torch

from rdt_interp.analysis.permutation import (
    mean_difference_weights,
    permutation_pvalue,
    permuted_labels,
    shuffled_mean_differences,
)
from rdt_interp.analysis.probes import class_mean_difference
from rdt_interp.errors import ConfigError, RdtError


def test_permuted_labels_keep_class_sizes_and_are_seeded():
    y = torch.arange(10) < 3
    lab = permuted_labels(y, 4000, seed=7)
    assert lab.shape == (4000, 10) and lab.dtype == torch.bool
    assert bool((lab.sum(dim=1) == 3).all())
    # every sample is positive in 3/10 of the shuffles (sd of the mean is ~0.007)
    np.testing.assert_allclose(lab.double().mean(dim=0).numpy(), 0.3, atol=0.03)
    assert torch.equal(lab, permuted_labels(y, 4000, seed=7))
    assert torch.equal(lab[:100], permuted_labels(y, 100, seed=7))  # a longer run extends a shorter
    assert not torch.equal(lab, permuted_labels(y, 4000, seed=8))
    # not the identity stream: the shuffles are spread over all C(10, 3) = 120 subsets
    assert len({tuple(r.tolist()) for r in lab}) > 110


def test_shuffled_mean_differences_equal_the_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 3, 5, generator=g) * 4 + 100.0  # a large common offset: no cancellation
    y = torch.arange(13) % 3 == 0
    got = shuffled_mean_differences(x, y, 50, seed=2)
    assert got.shape == (50, 3, 5)
    for k, lab in enumerate(permuted_labels(y, 50, seed=2)):
        torch.testing.assert_close(got[k], class_mean_difference(x, lab), atol=2e-5, rtol=1e-5)
    w = mean_difference_weights(torch.stack([y, ~y]))
    torch.testing.assert_close(w.sum(dim=1), torch.zeros(2, dtype=torch.float64))


def test_permutation_pvalue_counts_ties_and_keeps_nan():
    null = torch.tensor([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5]], dtype=torch.float64)
    p = permutation_pvalue(torch.tensor([0.2, float("nan")], dtype=torch.float64), null)
    assert float(p[0]) == 3 / 4 and np.isnan(float(p[1]))
    assert float(permutation_pvalue(torch.tensor(9.0), torch.zeros(99))) == 1 / 100


@pytest.mark.parametrize("bad", [0, -3, True])
def test_n_permutations_is_validated(bad):
    with pytest.raises(ConfigError, match="n_permutations") as err:
        permuted_labels(torch.tensor([1, 1, 0, 0]), bad)
    assert "fix:" in str(err.value)


def test_inputs_are_validated_with_typed_errors():
    x = torch.randn(6, 4)
    with pytest.raises(ConfigError, match="at least 2 samples per class"):
        shuffled_mean_differences(x, torch.tensor([1, 0, 0, 0, 0, 0]), 10)
    with pytest.raises(ConfigError, match="single class"):
        shuffled_mean_differences(x, torch.zeros(6), 10)
    nan = x.clone()
    nan[4, 2] = float("nan")
    with pytest.raises(ConfigError, match="row 4"):
        shuffled_mean_differences(nan, torch.tensor([1, 1, 1, 0, 0, 0]), 10)
    with pytest.raises(RdtError, match="labels for"):
        shuffled_mean_differences(x, torch.tensor([1, 1, 0, 0]), 10)
