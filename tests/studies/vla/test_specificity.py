"""The VLA specificity step with the label-shuffled null (shuffled=) beside the random-direction null."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rdt_interp.analysis.specificity import SpecificityResult, label_shuffled_directions
from rdt_interp.errors import ConfigError
from rdt_interp.storage import to_json
from rdt_interp.studies.vla import direction_specificity, load_requests, load_vla_rdt, run_vla_rdt

from .test_pipeline import _config, _direction

RANDOM_FIELDS = ("real", "real_lo", "real_hi", "p", "z", "null", "n_random", "norm", "alternative")


def _shuffled(vla, n: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, vla.d_model, generator=g, dtype=torch.float64)
    y = torch.arange(24) < 12
    return label_shuffled_directions(x, y, n, seed=1)


def _same_random_null(a: SpecificityResult, b: SpecificityResult) -> None:
    for name in RANDOM_FIELDS:
        va, vb = getattr(a, name), getattr(b, name)
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb)
        else:
            assert va == vb or (va != va and vb != vb), name  # NaN == NaN here
    for ctl, vals in a.controls.items():
        assert {k: vals[k] for k in ("effect", "p", "z")} == {k: b.controls[ctl][k] for k in ("effect", "p", "z")}


def test_shuffled_null_adds_its_p_and_leaves_the_random_null_alone(vla):
    reqs = load_requests(vla, n_pairs=1, images="noise", val_fraction=0.0, seed=2)
    d = _direction(vla)
    off = direction_specificity(vla, d, reqs, _config(), alpha=2.0)
    on = direction_specificity(vla, d, reqs, _config(), alpha=2.0, shuffled=_shuffled(vla))
    _same_random_null(off, on)
    assert off.shuffled_null is None and off.n_shuffled == 0 and "shuffled_p" not in off.to_dict()
    assert on.n_shuffled == 20 and on.shuffled_null.shape == (20,)
    # "greater": (1 + #{shuffled effect >= real}) / (1 + N)
    assert on.shuffled_p == pytest.approx((1 + int((on.shuffled_null >= on.real).sum())) / 21)
    assert "p_shuffled" in on.controls["-r"] and "p_shuffled" not in off.controls["-r"]
    back = SpecificityResult.from_dict(json.loads(to_json(on.to_dict())))
    assert to_json(back.to_dict()) == to_json(on.to_dict())
    with pytest.raises(ConfigError, match="too few"):
        direction_specificity(vla, d, reqs, _config(), alpha=2.0, shuffled=_shuffled(vla, 5))


def test_run_reports_the_shuffled_p_and_refuses_a_missing_or_other_null(vla, tmp_path):
    d = _direction(vla)
    base = dict(n_pairs=2, decoupling=False)
    off = run_vla_rdt(vla, d, _config(**base), tmp_path / "off", log=lambda m: None)
    shuf = _shuffled(vla)
    on = run_vla_rdt(vla, d, _config(**base, n_shuffled=20), tmp_path / "on", log=lambda m: None, shuffled=shuf)
    # only the specificity step gains fields: every other number is the same
    assert to_json(on.sweep.to_dict()) == to_json(off.sweep.to_dict())
    assert to_json(on.targets.to_dict()) == to_json(off.targets.to_dict()) and on.alpha == off.alpha
    _same_random_null(off.specificity, on.specificity)
    assert off.specificity.shuffled_null is None and on.specificity.n_shuffled == 20
    s_on, s_off = on.summary()["specificity"], off.summary()["specificity"]
    assert s_on["shuffled_p"] == on.specificity.shuffled_p and s_on["p"] == s_off["p"]
    assert "shuffled_p" not in s_off and "n_shuffled" not in off.config.to_dict()
    loaded = load_vla_rdt(tmp_path / "on")
    assert loaded.config.n_shuffled == 20 and loaded.specificity.shuffled_p == on.specificity.shuffled_p
    assert to_json(loaded.to_dict()) == to_json(on.to_dict())
    with pytest.raises(ConfigError, match="label-shuffled"):  # the config asks for them: none passed
        run_vla_rdt(vla, d, _config(**base, n_shuffled=20), tmp_path / "none", log=lambda m: None)
    with pytest.raises(ConfigError, match="n_shuffled = 20"):
        run_vla_rdt(vla, d, _config(**base, n_shuffled=20), tmp_path / "rows", log=lambda m: None,
                    shuffled=_shuffled(vla, 25))
    with pytest.raises(ConfigError, match="another config"):  # other shuffled directions, same run dir
        run_vla_rdt(vla, d, _config(**base, n_shuffled=20), tmp_path / "on", log=lambda m: None,
                    shuffled=_shuffled(vla) * 2.0)
