import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from rdt_interp.errors import ConfigError
from rdt_interp.storage import to_json
from rdt_interp.viz import figures
from rdt_interp.viz.style import new_figure, paper_style, save_figure


def _roundtrip(result):
    return json.loads(to_json(result.to_dict()))  # what a saved result reads back as


def _lines_with_label(ax, text):
    return [ln for ln in ax.get_lines() if text in str(ln.get_label())]


def test_probe_layers_draws_each_position_per_metric_from_a_dict(results):
    g = results["grid"]
    fig = figures.probe_layers(_roundtrip(g), labels={"last(text)": "last text"})
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    proj_ax, cv_ax = fig.axes
    (line,) = _lines_with_label(proj_ax, "last text")
    np.testing.assert_allclose(line.get_ydata(), g.proj_auc[:, 0])
    np.testing.assert_allclose(_lines_with_label(cv_ax, "first(action)")[0].get_ydata(), g.probe_auc[:, 1])
    assert any(np.allclose(ln.get_ydata(), 0.5) for ln in proj_ax.get_lines())  # chance line
    assert proj_ax.get_title() == "Projection AUC (cross-fitted)"
    assert cv_ax.get_title() == "Probe AUC (3-fold CV)"
    one = figures.probe_layers(g, metrics=("proj_auc",), positions=("first(action)",))
    assert len(one.axes) == 1 and one.get_size_inches()[0] == pytest.approx(3.35)
    assert plt.get_fignums() == []


def test_alignment_figures_show_the_null_band(results):
    r = results["align"]
    fig = figures.alignment_layers(_roundtrip(r))
    (ax,) = fig.axes
    (line,) = _lines_with_label(ax, "chat vs vla")
    np.testing.assert_allclose(line.get_ydata(), r.cos)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(r.null_q95) and band.min() == pytest.approx(-r.null_q95)
    mat = figures.alignment_matrix(r)
    np.testing.assert_allclose(mat.axes[0].images[0].get_array(), r.matrix)


def test_geometry_figures(results):
    sp, sub = results["spectrum"], results["subspace"]
    fig = figures.spectrum_plot([sp, _roundtrip(sp)], n_components=8)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), sp.explained[:8])
    fig2 = figures.principal_angles_plot(_roundtrip(sub))
    (line,) = _lines_with_label(fig2.axes[0], "harmful vs harmless")
    np.testing.assert_allclose(line.get_ydata(), sub.angles_deg)
    assert fig2.axes[0].get_ylim()[1] >= 90


def test_specificity_histogram_marks_real_direction_and_controls(results):
    s = results["spec"]
    fig = figures.specificity_plot(_roundtrip(s))
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.containers[0]]
    assert sum(heights) == s.n_random  # every null draw is in the histogram
    (real,) = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith("r (")]
    assert real.get_xdata()[0] == pytest.approx(s.real)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("-r (") for t in labels) and any("shuffled labels" in t for t in labels)
    assert any("p ≤ 0.005" in t for t in labels)  # the floor 1/(N+1) is shown as a bound


def test_action_figures(results, tmp_path):
    sweep = results["sweep"]
    fig = figures.action_sweep({"RDT": sweep, "random": [(a, _roundtrip(m)) for a, m in sweep]},
                               metrics=("zero_mass", "hrr_partial", "magnitude"))
    assert len(fig.axes) == 3
    (line,) = _lines_with_label(fig.axes[0], "RDT")
    np.testing.assert_allclose(line.get_xdata(), [0, 2, 4, 8])
    np.testing.assert_allclose(line.get_ydata(), [m.zero_mass for _, m in sweep])
    assert np.all(np.diff(line.get_ydata()) > 0)  # the planted trend is visible
    bars = figures.action_bars({"none": sweep[0][1], "text": sweep[2][1], "action": sweep[3][1]})
    ax = bars.axes[0]
    assert len(ax.patches) == 9  # 3 conditions x 3 metrics
    assert ax.patches[0].get_height() == pytest.approx(sweep[0][1].zero_mass)
    assert save_figure(bars, tmp_path / "bars")[1].stat().st_size > 1000
    with pytest.raises(ConfigError, match="unknown action metric"):
        figures.action_sweep(sweep, metrics=("speed",))


def test_panels_compose_into_given_axes(results):
    with paper_style():
        fig, axes = new_figure("page", 2.0, ncols=3)
    assert figures.specificity_plot(results["spec"], ax=axes[0]) is fig
    assert figures.alignment_layers(results["align"], ax=axes[1]) is fig
    assert figures.spectrum_plot(results["spectrum"], ax=axes[2]) is fig
    with pytest.raises(ConfigError, match="needs 2 axes"):
        figures.probe_layers(results["grid"], ax=axes[0])


def test_format_p():
    assert figures.format_p(1 / 1001, 1000) == "p ≤ 0.001"
    assert figures.format_p(0.0312) == "p = 0.031"
    assert figures.format_p(2e-7) == "p = 2e-7"
