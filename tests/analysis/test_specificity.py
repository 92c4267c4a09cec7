import numpy as np
import pytest
import torch

from rdt_interp.analysis.probes import class_mean_difference
from rdt_interp.analysis.specificity import (
    ProjectionAUC,
    ProjectionCohenD,
    SpecificityResult,
    label_shuffled_direction,
    random_directions,
    specificity_test,
)
from rdt_interp.analysis.stats import auc, cohens_d
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.storage import to_json

D = 48


def planted(n: int = 200, signal: float = 1.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    y = torch.arange(n) < n // 2
    x = torch.randn(n, D, generator=gen) + signal * y.float()[:, None] * r
    return x, y, r


def test_projection_effects_match_the_scalar_statistics():
    x, y, r = planted()
    dirs = random_directions(7, D, norm=3.0, seed=1)
    assert torch.allclose(dirs.norm(dim=1), torch.full((7,), 3.0))
    eff = ProjectionAUC(x, y)
    want = torch.stack([auc(x @ v, y) for v in dirs])
    torch.testing.assert_close(eff(dirs), want)
    d_eff = ProjectionCohenD(x.numpy(), y.numpy())  # numpy in, same numbers
    torch.testing.assert_close(d_eff(dirs[:2]), torch.stack([cohens_d((x @ v)[y], (x @ v)[~y]) for v in dirs[:2]]))
    with pytest.raises(DModelMismatchError):
        eff(torch.randn(2, D + 1))


def test_real_direction_beats_random_ones_and_controls_behave(tmp_path):
    x, y, r = planted()
    eff = ProjectionAUC(x, y)
    controls = {"-r": -r, "shuffled labels": label_shuffled_direction(x, y, seed=3)}
    res = specificity_test(eff, 5.0 * r, n_random=500, controls=controls, n_boot=300)
    assert res.n_random == 500 and res.null.shape == (500,)
    assert res.real == pytest.approx(float(auc(x @ r, y)))
    assert res.p == pytest.approx(1 / 501)  # the +1 correction: never 0
    assert res.z > 4
    assert res.real_lo <= res.real <= res.real_hi and res.real_lo > res.null_quantile(0.99)
    assert abs(res.null_mean - 0.5) < 0.02  # random directions separate nothing on average
    assert res.controls["-r"]["effect"] == pytest.approx(1 - res.real)
    assert res.controls["-r"]["p"] > 0.99
    assert res.controls["shuffled labels"]["p"] > 0.01
    assert res.norm == pytest.approx(5.0, rel=1e-5)
    res.save(tmp_path / "spec.json")
    back = SpecificityResult.load(tmp_path / "spec.json")
    assert to_json(back.to_dict()) == to_json(res.to_dict())
    np.testing.assert_array_equal(back.null, res.null)


def test_a_random_direction_is_not_specific():
    x, y, _ = planted(signal=0.0, seed=4)
    ps = [specificity_test(ProjectionAUC(x, y), random_directions(1, D, seed=100 + k)[0],
                           n_random=200, seed=k, n_boot=0, alternative="two-sided").p for k in range(12)]
    assert min(ps) > 0.01
    assert float(np.mean(ps)) == pytest.approx(0.5, abs=0.2)


def test_null_is_seeded_independent_of_batch_size_and_uses_the_matched_norm():
    x, y, r = planted()
    seen = []

    def effect(dirs):
        seen.append(dirs.norm(dim=1))
        return dirs[:, 0].double()  # a scale-dependent effect: first coordinate

    a = specificity_test(effect, 2.0 * r, n_random=130, batch_size=7, n_boot=0)
    b = specificity_test(effect, 2.0 * r, n_random=130, batch_size=1000, n_boot=0)
    np.testing.assert_array_equal(a.null, b.null)
    assert np.isnan(a.real_lo)  # a plain function cannot bootstrap
    norms = torch.cat(seen)
    assert torch.allclose(norms, torch.full_like(norms, 2.0), atol=1e-5)


def test_bad_inputs_raise_typed_errors():
    x, y, r = planted()
    eff = ProjectionAUC(x, y)
    with pytest.raises(ConfigError, match="n_random"):
        specificity_test(eff, r, n_random=50)
    with pytest.raises(ConfigError, match="effect returned"):
        specificity_test(lambda d: d.sum().double(), r, n_random=100)
    with pytest.raises(ConfigError, match="zero norm"):
        specificity_test(eff, torch.zeros(D), n_random=100)
    with pytest.raises(DModelMismatchError):
        specificity_test(eff, r, n_random=100, controls={"other layer": torch.ones(D + 2)})


def test_label_shuffled_direction_is_a_permuted_class_mean_difference():
    x, y, _ = planted()
    c = label_shuffled_direction(x, y, seed=0)
    assert c.shape == (D,)
    assert not torch.allclose(c, class_mean_difference(x, y))
    torch.testing.assert_close(c, label_shuffled_direction(x, y, seed=0))
