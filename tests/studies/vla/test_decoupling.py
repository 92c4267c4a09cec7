"""The decoupling step reports each role's peak layer with a p-value adjusted over the layer grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rdt_interp.analysis.layer_pick import LayerPick
from rdt_interp.analysis.stats import holm
from rdt_interp.storage import to_json
from rdt_interp.studies.vla import DecouplingResult, decoupling, load_requests

from .test_pipeline import _config, _direction

_RESULTS: dict[int, DecouplingResult] = {}


@pytest.fixture
def result(vla):
    if id(vla) not in _RESULTS:  # one grid per VLA family, shared by the tests below
        reqs = load_requests(vla, n_pairs=6, images="noise", val_fraction=0.5, seed=4)
        _RESULTS[id(vla)] = decoupling(vla, _direction(vla), reqs, _config(n_perm=50, decoupling_layers=(0, 1, 2)))
    return _RESULTS[id(vla)]


def test_peaks_are_the_largest_auc_distance_with_holm_over_layers(result):
    grid = result.grid
    assert set(result.peaks) == set(result.roles) and grid.layers == (0, 1, 2)
    for j, role in enumerate(grid.positions):
        pk = result.peaks[role]
        assert isinstance(pk, LayerPick) and pk.method == "holm" and pk.layers == grid.layers
        dist = np.abs(np.asarray(grid.proj_auc)[:, j] - 0.5)
        i = int(np.argmax(dist))  # lowest index on ties, as pick_layer
        assert pk.layer == grid.layers[i] and pk.score == pytest.approx(dist[i])
        p = np.asarray(grid.proj_p, dtype=np.float64)[:, j]
        assert pk.p == pytest.approx(p[i])
        adjusted = holm(p).numpy()
        np.testing.assert_allclose(pk.p_adjusted_all, adjusted)
        assert pk.p_adjusted == pytest.approx(adjusted[i]) and pk.p_adjusted >= pk.p
        assert pk.significant == (pk.p_adjusted <= 0.05)


def test_peaks_round_trip_and_old_results_still_load(result):
    d = json.loads(to_json(result.to_dict()))
    assert set(d["peaks"]) == set(result.roles)
    back = DecouplingResult.from_dict(d)
    assert to_json(back.to_dict()) == to_json(result.to_dict())
    for role, pk in result.peaks.items():
        assert back.peaks[role].layer == pk.layer
        np.testing.assert_allclose(back.peaks[role].p_adjusted_all, pk.p_adjusted_all)
    old = {k: v for k, v in d.items() if k != "peaks"}  # written before peaks were reported
    loaded = DecouplingResult.from_dict(old)
    assert loaded.peaks == {} and "peaks" not in loaded.to_dict()
    assert to_json(loaded.at_layer()) == to_json(result.at_layer())
