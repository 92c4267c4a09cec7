import math

import numpy as np
import pytest
import torch

from rdt_interp.analysis.layer_pick import LayerPick, _vector, grid_peaks, pick_layer
from rdt_interp.analysis.probe_grid import probe_grid
from rdt_interp.analysis.probes import Labeled
from rdt_interp.analysis.stats import holm
from rdt_interp.errors import ConfigError
from rdt_interp.storage import to_json


def test_pick_by_hand():
    pick = pick_layer([0.2, 0.01, 0.04], scores=[0.6, 0.9, 0.8], layers=[4, 8, 12])
    assert (pick.layer, pick.index, pick.score, pick.p) == (8, 1, 0.9, 0.01)
    # Holm over 3: .01 * 3 = .03, .04 * 2 = .08, .2 * 1 = .2
    assert pick.p_adjusted == pytest.approx(0.03) and pick.significant
    np.testing.assert_allclose(pick.p_adjusted_all, [0.2, 0.03, 0.08])
    layer, p_adj, every = pick
    assert layer == 8 and p_adj == pick.p_adjusted and every is pick.p_adjusted_all
    bh = pick_layer([0.2, 0.01, 0.04], scores=[0.6, 0.9, 0.8], method="bh")
    np.testing.assert_allclose(bh.p_adjusted_all, [0.2, 0.03, 0.06])
    assert bh.layer == 1  # default labels 0..L-1


def test_pick_rules():
    # no scores: the smallest p; ties: the first layer; lower is better on request
    assert pick_layer(torch.tensor([0.3, 0.02, 0.02, 0.5])).layer == 1
    assert pick_layer([0.1, 0.1, 0.1], scores=[0.7, 0.9, 0.9]).index == 1
    assert pick_layer([0.1, 0.2, 0.3], scores=[3.0, 1.0, 2.0], higher_is_better=False).index == 1
    # the adjusted p of the pick is not the raw one: 0.04 at one of 10 layers is not significant
    pick = pick_layer([0.04] + [0.5] * 9, scores=np.array([0.9] + [0.5] * 9))
    assert pick.p == 0.04 and pick.p_adjusted == pytest.approx(0.4) and not pick.significant


def test_nan_layers_are_neither_picked_nor_counted():
    nan = float("nan")
    pick = pick_layer([nan, 0.01, 0.2], scores=[nan, 0.8, 0.7], layers=[0, 4, 8])
    assert pick.layer == 4 and pick.p_adjusted == pytest.approx(0.02)  # m = 2
    assert math.isnan(pick.p_adjusted_all[0])
    back = LayerPick.from_dict(pick.to_dict())
    assert back.layer == 4 and math.isnan(back.p_adjusted_all[0])
    assert "NaN" not in to_json(pick.to_dict())
    # a layer with a score but no p-value may be picked; its adjusted p is then undefined
    assert math.isnan(pick_layer([nan, 0.3], scores=[0.9, 0.1]).p_adjusted)


def test_holm_adjusted_pick_controls_the_false_positive_rate_and_the_raw_pick_does_not():
    # 2000 grids of 20 null layers (uniform p-values); the pick is the best-scoring layer.
    rng = np.random.default_rng(0)
    raw = adjusted = 0
    for _ in range(2000):
        p = rng.uniform(size=20)
        pick = pick_layer(p, scores=1.0 - p)
        raw += pick.p <= 0.05
        adjusted += pick.significant
    assert raw / 2000 > 0.5  # 1 - 0.95^20 = 0.64
    assert adjusted / 2000 == pytest.approx(0.049, abs=0.015)  # 1 - (1 - 0.05/20)^20


def test_bad_grids_are_config_errors():
    with pytest.raises(ConfigError, match="at least one layer"):
        pick_layer([])
    with pytest.raises(ConfigError, match="one score per layer"):
        pick_layer([0.1, 0.2], scores=[0.5])
    with pytest.raises(ConfigError, match="distinct"):
        pick_layer([0.1, 0.2], layers=[3, 3])
    with pytest.raises(ConfigError, match="1-D"):  # (the tests' jaxtyping hook rejects it at the call)
        _vector(torch.full((2, 3), 0.1), "p_values")
    with pytest.raises(ConfigError, match="every entry is NaN"):
        pick_layer([float("nan")] * 3)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        pick_layer([0.1, 2.0])
    with pytest.raises(ConfigError, match="holm"):
        pick_layer([0.1], method="bonferroni")
    np.testing.assert_allclose(pick_layer([0.1, 0.2]).p_adjusted_all, holm([0.1, 0.2]).numpy())


def test_grid_peaks_pick_per_role_and_adjust_over_layers():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) < 30
    x = torch.randn(60, 5, 2, 8, generator=g)
    x[:, 3, 0, 0] -= 1.5 * y.float()  # role "a": the classes differ at layer 3, AUC below 0.5
    grid = probe_grid(Labeled(x, y, (0, 4, 8, 12, 16), ("a", "b"), "test"), directions=torch.eye(8)[0],
                      folds=3, n_boot=10, n_perm=199)
    peaks = grid_peaks(grid)
    assert set(peaks) == {"a", "b"}
    a = peaks["a"]
    assert a.layer == 12 and a.significant and a.score == pytest.approx(abs(grid.proj_auc[3, 0] - 0.5))
    np.testing.assert_allclose(a.p_adjusted_all, holm(grid.proj_p[:, 0]).numpy())
    assert a.p_adjusted == pytest.approx(min(1.0, 5 * grid.proj_p[3, 0]))
    assert not peaks["b"].significant  # no signal in role b: its best layer is chance after Holm
    assert grid_peaks(grid, "proj_d")["a"].layer == 12
    probe = grid_peaks(grid, "probe_auc")["a"]  # K-fold probes without refits have no p-value
    assert probe.layer == int(grid.layers[int(np.argmax(grid.probe_auc[:, 0]))]) and math.isnan(probe.p_adjusted)
    with pytest.raises(ConfigError, match="proj_auc"):
        grid_peaks(grid, "auc")
