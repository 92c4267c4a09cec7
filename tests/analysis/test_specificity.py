import numpy as np
import pytest
import torch

from rdt_interp.analysis.permutation import permuted_labels
from rdt_interp.analysis.probes import class_mean_difference
from rdt_interp.analysis.specificity import (
    ProjectionAUC,
    ProjectionCohenD,
    SpecificityResult,
    _norm_matched,
    label_shuffled_direction,
    label_shuffled_directions,
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


# -- the shuffled-label null -----------------------------------------------------------------------
def test_label_shuffled_directions_are_permuted_class_mean_differences():
    x, y, _ = planted(n=40)
    dirs = label_shuffled_directions(x, y, 30, seed=5)
    assert dirs.shape == (30, D)
    for k, lab in enumerate(permuted_labels(y, 30, seed=5)):
        torch.testing.assert_close(dirs[k], class_mean_difference(x, lab), atol=1e-5, rtol=1e-5)
    scaled = label_shuffled_directions(x, y, 30, seed=5, norm=2.5)
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((30,), 2.5))
    torch.testing.assert_close(scaled / 2.5, dirs / dirs.norm(dim=1, keepdim=True))
    assert torch.equal(dirs, label_shuffled_directions(x, y, 30, seed=5))
    assert not torch.equal(dirs, label_shuffled_directions(x, y, 30, seed=6))


def test_shuffled_null_is_added_beside_the_random_one_without_changing_it(tmp_path):
    x, y, r = planted()
    real = class_mean_difference(x, y)
    eff = ProjectionAUC(x, y)
    base = specificity_test(eff, real, n_random=200, n_boot=100, controls={"-r": -real}, seed=2)
    shuf = label_shuffled_directions(x, y, 60, seed=9)
    both = specificity_test(eff, real, n_random=200, n_boot=100, controls={"-r": -real}, seed=2, shuffled=shuf,
                            batch_size=25)
    for name in ("real", "real_lo", "real_hi", "p", "z", "z_lo", "z_hi"):
        assert getattr(both, name) == getattr(base, name)
    np.testing.assert_array_equal(both.null, base.null)
    assert {k: v for k, v in both.controls["-r"].items() if k != "p_shuffled"} == base.controls["-r"]
    # the second null: effects of the shuffled directions rescaled to the real norm (AUC is norm-free)
    assert both.n_shuffled == 60 and both.shuffled_null.shape == (60,)
    np.testing.assert_allclose(both.shuffled_null, eff(shuf).numpy(), atol=1e-12)
    assert both.shuffled_p == pytest.approx(1 / 61) and both.shuffled_z > 3
    assert both.controls["-r"]["p_shuffled"] == pytest.approx(1.0)
    # JSON: the old file is unchanged without the second null; with it, it round-trips
    assert not {"shuffled_null", "shuffled_p", "shuffled_z", "n_shuffled"} & set(base.to_dict())
    both.save(tmp_path / "s.json")
    back = SpecificityResult.load(tmp_path / "s.json")
    assert to_json(back.to_dict()) == to_json(both.to_dict())
    old = SpecificityResult.from_dict(base.to_dict())
    assert old.shuffled_null is None and np.isnan(old.shuffled_p) and old.n_shuffled == 0


def test_shuffled_null_p_is_uniform_when_the_direction_carries_nothing():
    # The direction is the class-mean difference of a split whose labels carry nothing; its effect
    # is measured on an independent split. It is then exchangeable with the shuffled-label
    # directions of its split, so the p-value against them is uniform (P(p <= 0.1) = 0.1 exactly;
    # Cohen's d, as AUC's ties with 60 samples would make it conservative).
    ps = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        scale = torch.linspace(0.2, 3.0, 12)  # anisotropic, as residual streams are
        x_fit, x_eval = torch.randn(30, 12, generator=g) * scale, torch.randn(60, 12, generator=g) * scale
        y_fit, y_eval = torch.arange(30) < 15, torch.arange(60) < 30
        res = specificity_test(ProjectionCohenD(x_eval, y_eval), class_mean_difference(x_fit, y_fit), n_random=100,
                               n_boot=0, seed=seed, shuffled=label_shuffled_directions(x_fit, y_fit, 99, seed=seed))
        ps.append(res.shuffled_p)
    ps = np.array(ps)
    assert np.mean(ps <= 0.1) == pytest.approx(0.1, abs=0.06)  # sd 0.021 over 200 runs
    assert np.mean(ps <= 0.5) == pytest.approx(0.5, abs=0.1)
    assert np.mean(ps) == pytest.approx(0.5, abs=0.06)


def test_shuffled_null_rejects_bad_input():
    x, y, r = planted(n=40)
    eff = ProjectionAUC(x, y)
    with pytest.raises(ConfigError, match="too few") as err:
        specificity_test(eff, r, n_random=100, shuffled=label_shuffled_directions(x, y, 5))
    assert "fix:" in str(err.value)
    with pytest.raises(ConfigError, match="n_shuffled, d"):  # (the tests' jaxtyping hook rejects it at the call)
        _norm_matched(label_shuffled_direction(x, y), D, 1.0)
    with pytest.raises(DModelMismatchError):
        specificity_test(eff, r, n_random=100, shuffled=torch.randn(30, D + 1))
    bad = torch.randn(30, D)
    bad[2, 3] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        specificity_test(eff, r, n_random=100, shuffled=bad)
    with pytest.raises(ConfigError, match="zero norm"):
        specificity_test(eff, r, n_random=100, shuffled=torch.zeros(30, D))
    with pytest.raises(ConfigError, match="per class"):
        label_shuffled_directions(x, torch.tensor([1] + [0] * 39), 10)
    with pytest.raises(ConfigError, match="n_permutations"):
        label_shuffled_directions(x, y, 0)
    xn = x.clone()
    xn[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="NaN or inf"):
        label_shuffled_directions(xn, y, 10)
