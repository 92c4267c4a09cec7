"""The defense Pareto figure and table, from a synthetic comparison with planted effects
(model-free: the runs on real adapters are in tests/studies/defenses/test_pipeline.py)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.models.action_tokenizer import ActionTokenizer
from rdt_interp.storage import to_json
from rdt_interp.studies.defenses import (
    DefenseCondition,
    DefensesConfig,
    DefensesResult,
    zero_motion_rate,
)
from rdt_interp.studies.vla import ActionSet, condition_metrics
from rdt_interp.viz.defenses import pareto_figure
from rdt_interp.viz.style import save_figure

TOK = ActionTokenizer(vocab_size=600, n_bins=256)
CFG = DefensesConfig(n_boot=100)
LABELS = ["harmful"] * 20 + ["benign"] * 20


def _actions(harm: float, benign: float) -> ActionSet:
    """Actions pulled towards the zero-motion bin: ``harm`` on harmful rows, ``benign`` on benign."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 7, 256, generator=g) * 2.0
    logits[:, :, 40] += 4.0
    cols = TOK.ids_to_bins(TOK.token_ids)
    pull = -((cols - TOK.zero_motion_bin).abs().float() / 20.0)
    strength = torch.tensor([harm] * 20 + [benign] * 20)
    logits += strength[:, None, None] * pull
    return ActionSet(TOK.token_ids[logits.argmax(-1)], logits)


@pytest.fixture(scope="module")
def result() -> DefensesResult:
    base = _actions(0.0, 0.0)
    plan = [("none", 0.0, 0.0, 0.0), ("adashield", 0.0, 1.0, 1.0), ("rdt", 1.0, 2.0, 2.0), ("rdt", 4.0, 8.0, 8.0),
            ("gated_rdt+", 1.0, 2.0, 0.0), ("gated_rdt+", 4.0, 8.0, 0.0)]
    conds = []
    for defense, strength, harm, benign in plan:
        acts = _actions(harm, benign)
        res = condition_metrics(TOK, acts, base, LABELS, CFG.metrics_config(), mode=defense, alpha=strength,
                                alpha_text=strength, split="test", layers=(3,))
        fired = {"harmful": 1.0, "benign": 0.0} if defense == "gated_rdt+" else {}
        still = {lab: zero_motion_rate(TOK, acts.ids[[i for i, x in enumerate(LABELS) if x == lab]], n_boot=100)
                 for lab in ("harmful", "benign")}
        conds.append(DefenseCondition(defense, strength, res, still, fired, None, 1.0))
    return DefensesResult(CFG, {"name": "toy"}, {"digest": "x"}, (3,), tuple(conds),
                          n_requests={"test/harmful": 20, "test/benign": 20})


def test_pareto_figure_places_every_condition(result, tmp_path):
    f = pareto_figure(json.loads(to_json(result.to_dict())))
    assert len(f.axes) == 3 and plt.get_fignums() == []
    texts = [t.get_text() for t in f.legends[0].get_texts()]
    assert texts == ["no defense", "AdaShield (prompt)", "RDT", "gated RDT+"]
    zm = f.axes[0]
    # the line through RDT's two strengths sits at their (benign |Δbin|, harmful zero mass)
    rdt = [c for c in result.conditions if c.defense == "rdt"]
    xs = [c.value("benign", "abs_shift")[0] for c in rdt]
    ys = [c.value("harmful", "zero_motion")[0] for c in rdt]
    found = [ln for ln in zm.get_lines() if np.allclose(ln.get_xdata(), xs) and np.allclose(ln.get_ydata(), ys)]
    assert found
    assert "benign: mean |Δbin|" in zm.get_xlabel() and zm.get_ylabel().startswith("harmful: zero-motion rate")
    other = pareto_figure(result, metrics=("hrr_strict",), cost="hrr_partial", width="column")
    assert len(other.axes) == 1 and other.axes[0].get_xlabel().startswith("benign: HRR partial")
    paths = save_figure(f, tmp_path / "pareto")
    assert all(p.stat().st_size > 5_000 for p in paths)
    with pytest.raises(ConfigError):
        pareto_figure(DefensesResult(CFG, {}, {}, (3,), ()))


def test_planted_effects_show_in_pareto_and_table(result):
    g4, r4 = result.get("gated_rdt+", 4.0), result.get("rdt", 4.0)
    assert g4.value("harmful", "zero_mass")[0] == pytest.approx(r4.value("harmful", "zero_mass")[0])
    none = result.get("none").value("harmful", "zero_motion")[0]
    assert g4.value("harmful", "zero_motion")[0] == r4.value("harmful", "zero_motion")[0] > none
    assert g4.value("benign", "abs_shift")[0] == 0.0 < r4.value("benign", "abs_shift")[0]
    front = result.pareto()
    assert "gated_rdt+@4" in front and "rdt@4" not in front and "adashield" not in front
    md = result.markdown()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(result.conditions)  # header + rows
    assert "gated RDT+ α=4 *" in md and "1.00 / 0.00" in md and "Gate on test" not in md
    rows = result.table_rows()
    assert rows[0]["key"] == "none" and rows[0]["benign/abs_shift"] == [0.0, 0.0, 0.0]
