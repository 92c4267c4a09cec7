import math

import numpy as np
import pytest
import torch

from rdt_interp.analysis.probe_grid import (
    ProbeGrid,
    _crossfit_null,
    _within_fold_permutations,
    evaluate_selected,
    probe_grid,
    select_layer,
    transfer_auc,
)
from rdt_interp.analysis.probes import (
    Labeled,
    LinearProbe,
    class_mean_difference,
    fit_probe,
    position_names,
)
from rdt_interp.analysis.stats import auc, stratified_folds
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.storage import to_json
from rdt_interp.tracing.capture import Activations

D = 32
SIGNAL = (0.0, 0.0, 1.0, 2.5)  # class separation along the planted direction, per layer


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def planted(n_per_class: int, seed: int, *, split: str, direction: torch.Tensor | None = None,
            scale: float = 1.0) -> tuple[Labeled, torch.Tensor]:
    """Two classes that differ by SIGNAL[l] * r at layer l (position 'last'), nothing at 'noise'."""
    gen = torch.Generator().manual_seed(seed)
    r = direction if direction is not None else torch.nn.functional.normalize(
        torch.randn(D, generator=torch.Generator().manual_seed(99)), dim=0)
    n = 2 * n_per_class
    y = torch.arange(n) < n_per_class
    x = torch.randn(n, len(SIGNAL), 2, D, generator=gen)
    shift = torch.tensor(SIGNAL)[None, :, None] * y.float()[:, None, None]
    x[:, :, 0] += shift[..., 0, None] * r
    return Labeled(scale * x, y, (0, 1, 2, 3), ("last", "noise"), split), r


def test_projection_along_the_true_direction_has_the_theoretical_auc():
    data, r = planted(300, 0, split="val")
    g = probe_grid(data, directions=r, probe=False, n_boot=300, n_perm=300)
    for i, s in enumerate(SIGNAL):
        want = _phi(s / math.sqrt(2))
        assert g.proj_auc[i, 0] == pytest.approx(want, abs=0.05)
        assert g.proj_auc_lo[i, 0] <= g.proj_auc[i, 0] <= g.proj_auc_hi[i, 0]
        assert g.proj_d[i, 0] == pytest.approx(s, abs=0.25)
    # Exactly the AUC of the projections.
    assert g.proj_auc[3, 0] == pytest.approx(float(auc(data.cell(3, "last") @ r, data.y)))
    # No signal: the CI covers 0.5 and the p-value is large; strong signal: p at its floor.
    assert g.proj_auc_lo[0, 0] < 0.5 < g.proj_auc_hi[0, 0]
    assert g.proj_p[0, 0] > 0.05
    assert g.proj_p[3, 0] == pytest.approx(1 / 301)
    assert np.all(np.isnan(g.probe_auc))


def test_cross_fitted_and_cv_probe_find_the_signal_layers_only():
    data, _ = planted(60, 1, split="val")
    g = probe_grid(data, folds=4, n_boot=200, n_perm=200)
    assert "cross-fitted" in g.proj_source and "approximate CI" in g.proj_method
    assert "4-fold CV" in g.probe_source and "no p-value" in g.probe_method
    assert g.probe_auc[3, 0] > 0.9 and g.proj_auc[3, 0] > 0.9
    assert g.proj_p[3, 0] == pytest.approx(1 / 201) and g.proj_p[0, 0] > 0.05
    assert np.all(np.isnan(g.probe_p))  # CV p-values need re-fitting: not done unless asked
    for i in (0, 1):
        assert g.probe_auc_lo[i, 0] < 0.5 + 0.05 and g.probe_auc_hi[i, 0] > 0.5 - 0.05
    assert np.all(g.probe_auc[:, 1] < 0.75)  # the noise position carries nothing
    assert g.n_pos == g.n_neg == 60
    # Re-fitting permutation test of the CV probe, on two cells.
    small = probe_grid(data.select([0, 3], ["last"]), folds=4, n_boot=50, n_perm=50, n_perm_refit=19)
    assert small.probe_p[1, 0] == pytest.approx(1 / 20) and small.probe_p[0, 0] > 0.05
    assert "19 within-fold label permutations" in small.probe_method


def test_refit_null_reproduces_the_cross_fitted_statistic_and_is_calibrated():
    data, _ = planted(40, 2, split="val")
    g = probe_grid(data, folds=4, probe=False, n_boot=10, n_perm=10)
    folds = stratified_folds(data.y, 4, 0)
    n = data.x.shape[0]
    again = _crossfit_null(data.x.reshape(n, 8, D), data.y[None], folds)  # the observed labels
    np.testing.assert_allclose(again.numpy().reshape(4, 2), g.proj_auc, atol=1e-6)
    # Centred: a common offset (real residual streams have a large mean) changes nothing.
    shifted = Labeled(data.x + 50.0 * torch.randn(D, generator=torch.Generator().manual_seed(1)), data.y,
                      data.layers, data.positions, "val")
    np.testing.assert_allclose(probe_grid(shifted, folds=4, probe=False, n_boot=10, n_perm=10).proj_auc,
                               g.proj_auc, atol=2e-3)
    perms = _within_fold_permutations(data.y, folds, 50, 0)
    for _, te in folds:  # per-fold class counts are kept
        assert torch.equal(perms[:, te].sum(1), data.y[te].sum().expand(50))
    # Pure noise, 64 cells: p-values are not too small too often.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, 2, 16, generator=gen) + 2.0
    noise = Labeled(x, torch.arange(40) < 20, tuple(range(32)), ("a", "b"), "val")
    p = probe_grid(noise, folds=4, probe=False, n_boot=10, n_perm=200).proj_p
    assert np.mean(p < 0.05) <= 0.12 and 0.3 < np.mean(p) < 0.7


def test_held_out_probe_and_direction_from_a_fit_split_are_exact():
    train, _ = planted(60, 12, split="train")
    test, _ = planted(60, 13, split="test")
    g = probe_grid(test, fit=train, n_boot=200, n_perm=200)
    assert g.probe_source.startswith("logistic regression fitted on split 'train'")
    assert g.probe_method.startswith("exact") and g.proj_method.startswith("exact")
    assert g.probe_auc[3, 0] > 0.9 and g.probe_p[3, 0] == pytest.approx(1 / 201)
    assert g.probe_auc_lo[0, 0] < 0.5 < g.probe_auc_hi[0, 0]
    want = float(auc(fit_probe(train, 3, "last").decision_function(test.cell(3, "last")), test.y))
    assert g.probe_auc[3, 0] == pytest.approx(want)


def test_a_layer_without_information_gives_chance_not_an_error():
    # resid_pre of layer 0 at chat-template tokens: the same vector for every prompt.
    data, _ = planted(20, 5, split="val")
    x = data.x.clone()
    x[:, 0] = 1.5
    const = Labeled(x, data.y, data.layers, data.positions, "val")
    for g in (probe_grid(const, folds=4, n_boot=50, n_perm=50),
              probe_grid(const, fit=planted(20, 6, split="train")[0], probe=False, n_boot=50, n_perm=50)):
        np.testing.assert_array_equal(g.proj_auc[0], [0.5, 0.5])
        np.testing.assert_array_equal(g.proj_p[0], [1.0, 1.0])
        assert g.proj_auc[3, 0] > 0.8


def test_cv_probe_is_honest_where_an_in_sample_probe_is_not():
    # d >> n and no signal at all: the in-sample probe separates perfectly, CV does not.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 1, 1, 300, generator=gen)
    data = Labeled(x, torch.arange(40) < 20, (0,), ("last",), "val")
    in_sample = fit_probe(data, 0)
    assert float(auc(in_sample.decision_function(x[:, 0, 0]), data.y)) == 1.0
    g = probe_grid(data, folds=4, n_boot=200, n_perm=200)
    assert g.probe_auc[0, 0] < 0.75 and g.probe_auc_lo[0, 0] < 0.5


def test_direction_from_a_separate_fit_split_and_split_guards():
    train, _ = planted(80, 3, split="train")
    val, _ = planted(80, 4, split="val")
    g = probe_grid(val, fit=train, probe=False, n_boot=100, n_perm=100)
    assert g.proj_source == "class-mean difference of split 'train'"
    want = float(auc(val.cell(3, "last") @ class_mean_difference(train.x, train.y)[3, 0], val.y))
    assert g.proj_auc[3, 0] == pytest.approx(want)
    with pytest.raises(ConfigError, match="split"):
        probe_grid(val, fit=val, probe=False)
    # A given direction for the projection, the fit split for the probe.
    both = probe_grid(val.select([3]), fit=train.select([3]), directions=torch.ones(D), n_boot=20, n_perm=20)
    assert both.proj_source == "given" and "fitted on split 'train'" in both.probe_source
    with pytest.raises(DModelMismatchError):
        probe_grid(val, directions=torch.ones(D + 1), probe=False)


def test_layer_selection_uses_validation_and_reports_test():
    train, _ = planted(60, 5, split="train")
    val, _ = planted(60, 6, split="val")
    test, _ = planted(60, 7, split="test")
    val_grid = probe_grid(val, fit=train, probe=False, n_boot=100, n_perm=100)
    assert select_layer(val_grid, metric="proj_auc") == (3, "last")
    test_grid = probe_grid(test, fit=train, probe=False, n_boot=100, n_perm=100)
    with pytest.raises(ConfigError, match="refusing to select"):
        select_layer(test_grid, metric="proj_auc")
    with pytest.raises(ConfigError):
        evaluate_selected(test, val, fit=train)  # val/test swapped
    sel = evaluate_selected(val, test, fit=train, metric="proj_auc", n_boot=100, n_perm=100)
    assert (sel.layer, sel.position, sel.test_split) == (3, "last", "test")
    assert sel.test_value == pytest.approx(test_grid.proj_auc[3, 0])
    assert sel.test_lo <= sel.test_value <= sel.test_hi
    assert sel.n_candidates == 8


def test_probe_grid_round_trips_through_json(tmp_path):
    data, _ = planted(20, 8, split="val")
    g = probe_grid(data, folds=3, n_boot=50, n_perm=50)
    g.save(tmp_path / "grid.json")
    back = ProbeGrid.load(tmp_path / "grid.json")
    assert to_json(back.to_dict()) == to_json(g.to_dict())
    assert back.layers == g.layers and back.positions == g.positions
    assert back.cell(3, "last")["probe_auc"] == g.cell(3, "last")["probe_auc"]
    with pytest.raises(ConfigError, match="not a ProbeGrid"):
        ProbeGrid.from_dict({**g.to_dict(), "kind": "Spectrum"})


def test_linear_probe_saves_loads_and_transfers_across_models(tmp_path):
    chat, r = planted(100, 9, split="train")
    probe = fit_probe(chat, 3, "last")
    assert probe.d_model == D and probe.layer == 3 and probe.converged
    assert float(torch.nn.functional.cosine_similarity(probe.direction, r, dim=0)) > 0.8
    probe.save(tmp_path / "probe.safetensors")
    back = LinearProbe.load(tmp_path / "probe.safetensors")
    x = chat.cell(3, "last")
    torch.testing.assert_close(back.decision_function(x), probe.decision_function(x))
    assert LinearProbe.from_dict(probe.to_dict()).bias == probe.bias

    # "VLA": same direction, other noise and another overall scale -> transfers.
    vla, _ = planted(100, 10, split="test", direction=r, scale=7.0)
    res = transfer_auc(probe, vla, n_boot=200, n_perm=200)
    assert res.auc > 0.9 and res.p < 0.01 and res.target["layer"] == 3
    assert res.auc_lo <= res.auc <= res.auc_hi
    # A model whose contrast lies along an orthogonal direction -> chance.
    ortho = torch.nn.functional.normalize(r.flip(0) - (r.flip(0) @ r) * r, dim=0)
    other, _ = planted(100, 11, split="test", direction=ortho)
    res_o = transfer_auc(probe, other.cell(3, "last"), other.y, n_boot=200, n_perm=200)
    assert res_o.auc_lo < 0.5 < res_o.auc_hi or abs(res_o.auc - 0.5) < 0.12
    # Another width is refused.
    wide = torch.randn(10, D + 8)
    with pytest.raises(DModelMismatchError):
        transfer_auc(probe, wide, torch.arange(10) < 5)


def test_labeled_from_activations_names_positions_by_role():
    vals = torch.randn(6, 2, 3, 8)
    pos = Activations(vals, (4, 9), "resid_pre", "post_instruction[-3:]")
    neg = Activations(vals[:4] + 1.0, (4, 9), "resid_pre", "post_instruction[-3:]")
    data = Labeled.from_classes(pos, neg, split="train")
    assert data.layers == (4, 9)
    assert data.positions == ("post_instruction[-3]", "post_instruction[-2]", "post_instruction[-1]")
    assert (data.n_pos, data.n_neg) == (6, 4)
    last_text = Labeled.from_classes(vals[:, :, 2], vals[:, :, 1], split="train", layers=(4, 9),
                                     positions=("last(text)",))
    first_act = Labeled.from_classes(vals[:, :, 0], vals[:, :, 0], split="train", layers=(4, 9),
                                     positions=("first(action)",))
    both = Labeled.stack_positions(last_text, first_act)
    assert both.positions == ("last(text)", "first(action)") and both.x.shape == (12, 2, 2, 8)
    torch.testing.assert_close(both.cell(9, "first(action)")[:6], vals[:, 1, 0])
    assert position_names("first(action)", 1) == ("first(action)",)
    with pytest.raises(DModelMismatchError):
        Labeled.from_classes(torch.randn(3, 2, 8), torch.randn(3, 2, 9), split="x")
    with pytest.raises(ConfigError, match="layer 5"):
        data.cell(5, "post_instruction[-1]")
