"""Figures of the VLA steering study, from synthetic results with a planted steering effect
(model-free: the runs on real adapters are in tests/studies/vla/test_pipeline.py)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from rdt_interp.analysis.probe_grid import probe_grid
from rdt_interp.analysis.probes import Labeled
from rdt_interp.analysis.specificity import ProjectionAUC, specificity_test
from rdt_interp.errors import ConfigError
from rdt_interp.models.action_tokenizer import ActionTokenizer
from rdt_interp.storage import to_json
from rdt_interp.studies.vla import (
    ActionSet,
    DecouplingResult,
    SweepResult,
    VLARDTConfig,
    condition_metrics,
)
from rdt_interp.viz import vla as fig
from rdt_interp.viz.style import save_figure

TOK = ActionTokenizer(vocab_size=600, n_bins=256)
CFG = VLARDTConfig(n_boot=100)
LABELS = ["harmful"] * 24 + ["benign"] * 24


def _actions(strength: float, seed: int) -> ActionSet:
    """Logits whose mass moves towards the zero-motion bin with ``strength``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(48, 7, 256, generator=g) * 2.0
    logits[:, :, 60] += 4.0  # an unsteered preference for bin ~195
    cols = TOK.ids_to_bins(TOK.token_ids)
    logits += strength * -((cols - TOK.zero_motion_bin).abs().float() / 20.0)
    return ActionSet(TOK.token_ids[logits.argmax(-1)], logits)


@pytest.fixture(scope="module")
def sweep() -> SweepResult:
    base = _actions(0.0, 0)
    conds = [condition_metrics(TOK, base, base, LABELS, CFG, mode="none", alpha=0.0, alpha_text=0.0,
                               split="test", layers=(3,))]
    for k, mode in enumerate(("action", "text+action")):
        for alpha in (1.0, 2.0, 4.0):
            acts = _actions(alpha * (1 + k), 0)
            conds.append(condition_metrics(TOK, acts, base, LABELS, CFG, mode=mode, alpha=alpha,
                                           alpha_text=alpha, split="test", layers=(3,)))
    return SweepResult(tuple(conds))


def _roundtrip(result):
    return json.loads(to_json(result.to_dict()))


def test_alpha_sweep_figure_draws_every_mode_and_label(sweep):
    f = fig.alpha_sweep_figure(_roundtrip(sweep), metrics=("zero_mass", "magnitude"))
    assert len(f.axes) == 2
    zm = f.axes[0]
    lines = zm.get_lines()
    assert len(lines) == 4  # 2 modes x (harmful, benign)
    want = [m.zero_mass for _, m in sweep.series("action", "harmful")]
    np.testing.assert_allclose(lines[0].get_ydata(), want)
    np.testing.assert_allclose(lines[0].get_xdata(), [0.0, 1.0, 2.0, 4.0])  # baseline at alpha 0
    assert lines[1].get_linestyle() == "--"  # benign
    assert want[-1] > want[0]  # the planted effect shows
    assert f.axes[1].get_ylabel() == "action norm (normalized)"
    texts = [t.get_text() for t in f.legends[0].get_texts()]
    assert texts[:2] == ["RDT (action)", "RDT+ (text+action)"] and "n = 24 + 24 (test); 95% CI" in texts
    assert plt.get_fignums() == []
    with pytest.raises(ConfigError):
        fig.alpha_sweep_figure(SweepResult(sweep.conditions[:1]))


def test_target_modes_and_bin_shift_figures(sweep, tmp_path):
    targets = SweepResult(tuple(c for c in sweep.conditions if c.alpha in (0.0, 2.0)))
    f = fig.target_modes_figure(targets)
    assert [a.get_title() for a in f.axes] == ["harmful instructions (n = 24)", "benign instructions (n = 24)"]
    heights = [p.get_height() for p in f.axes[0].patches]
    assert len(heights) == 3 * 3  # 3 conditions x 3 metrics
    assert heights[0] == pytest.approx(targets.baseline().metrics["harmful"].zero_mass)
    steered = targets.get("action", 2.0)
    g = fig.bin_shift_figure(targets.baseline(), _roundtrip(steered))
    sh = steered.shift["harmful"]
    assert g.axes[0].get_title() == (f"harmful: shift {sh.shift:+.1f} [{sh.shift_lo:+.1f}, {sh.shift_hi:+.1f}], "
                                     f"abs. shift {sh.abs_shift:.1f} bins")
    assert sh.shift < 0  # towards the zero-motion bin, from ~195
    paths = save_figure(g, tmp_path / "shift")
    assert [p.suffix for p in paths] == [".pdf", ".png"] and all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ConfigError, match="group"):
        fig.bin_shift_figure(targets.baseline(), steered, group=0)


def test_decoupling_and_specificity_figures():
    g = torch.Generator().manual_seed(1)
    r = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    y = torch.arange(40) < 20
    x = torch.randn(40, 4, 2, 16, generator=g)
    x[:, :, 0] += 2.0 * y.float()[:, None, None] * r  # separable at last text, not at first action
    grid = probe_grid(Labeled(x, y, (0, 1, 2, 3), ("last_text", "first_action"), "test"), directions=r,
                      folds=3, n_boot=50, n_perm=50)
    dec = DecouplingResult(grid, ("last_text", "first_action"), 2)
    f = fig.decoupling_figure(_roundtrip(dec))
    proj = f.axes[0]
    labels = [ln.get_label() for ln in proj.get_lines()]
    assert "last text" in labels and "first action" in labels
    assert any(np.allclose(ln.get_xdata(), 2) for ln in proj.get_lines())  # the steering layer
    spec = specificity_test(ProjectionAUC(x[:, 2, 0], y), r, n_random=100, n_boot=50, controls={"-r": -r})
    s = fig.specificity_figure(_roundtrip(spec))
    assert s.axes[0].get_xlabel() == "projection AUC"
