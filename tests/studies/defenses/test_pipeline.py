"""The defense comparison on every VLA family: each defense runs, results are well formed and
consistent with one another, runs resume, figures and tables are written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rdt_interp.analysis.probes import LinearProbe
from rdt_interp.defenses.gate import HarmGate
from rdt_interp.defenses.prompting import DefensivePrompt
from rdt_interp.defenses.subspace import subspace_from_activations
from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError
from rdt_interp.storage import read_json
from rdt_interp.studies.defenses import (
    DEFENSES,
    DefenseContext,
    DefensesConfig,
    DefensesResult,
    closed_loop_success,
    condition_key,
    load_defenses,
    run_defenses,
    zero_motion_rate,
)
from rdt_interp.studies.vla import ActionSet, load_requests, predict

from ...vla_adapters import unit_direction


def _direction(vla) -> Direction:
    prov = Provenance("tiny-chat", "abc", 1, "post_instruction[-1]", "resid_pre", "diff_in_means", created="")
    return Direction(unit_direction(vla, 0.3, seed=7), prov)


def _subspace(vla):
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(vla.d_model, generator=g)
    h = torch.randn(12, vla.d_model, generator=g) * 0.1 + 0.3 * mu / mu.norm()
    hl = torch.randn(12, vla.d_model, generator=g) * 0.1
    return subspace_from_activations(h, hl, 2, layer=1, position="post_instruction[-1]", source={"name": "toy"})


def _config(**kw) -> DefensesConfig:
    base = dict(defenses=DEFENSES, alphas=(2.0,), guard_scales=(1.0,), n_pairs=6, val_fraction=0.5,
                images="noise", batch_size=8, n_boot=50, gate_folds=2, gate_target_fpr=0.2, figures=False)
    base.update(kw)
    return DefensesConfig(**base)


def test_every_defense_runs_and_results_agree(vla, tmp_path):
    cfg = _config(figures=True)
    res = run_defenses(vla, _direction(vla), cfg, tmp_path / "run", subspace=_subspace(vla), log=lambda m: None)
    keys = [c.key for c in res.conditions]
    assert keys == ["none", "adashield", "vlm_guard", "vlm_guard_clamp@1", "rdt@2", "rdt+@2", "gated_rdt+@2"]
    test = [r for r in load_requests(vla, n_pairs=6, val_fraction=0.5, images="noise") if r.split == "test"]
    assert res.n_requests["test/harmful"] == res.n_requests["test/benign"] == len(test) // 2
    none = res.get("none")
    for label in ("harmful", "benign"):
        assert none.value(label, "abs_shift")[0] == 0.0
        m = none.result.metrics[label]
        assert 0 <= m.zero_mass <= 1 and 0 <= m.hrr_partial <= 1 and m.n == len(test) // 2
        for c in res.conditions:
            v, lo, hi = c.value(label, "hrr_partial")
            assert lo - 1e-9 <= v <= hi + 1e-9
    store = tmp_path / "run" / "predictions"
    acts = {c.key: ActionSet.load(store / f"test-{c.key}.safetensors") for c in res.conditions if c.key != "none"}
    acts["none"] = ActionSet.load(store / "test-none.safetensors")
    # AdaShield is the undefended model on defended instructions
    plain = predict(vla, DefensivePrompt(cfg.defense_text).apply(test), batch_size=3)
    assert torch.equal(plain.ids, acts["adashield"].ids)
    # gated RDT+ = RDT+ on the rows the gate flagged, the undefended policy elsewhere
    scores = torch.tensor(read_json(tmp_path / "run" / "gate_test.json")["scores"])
    fired = scores > res.gate["threshold"]
    want = torch.where(fired[:, None], acts["rdt+@2"].ids, acts["none"].ids)
    assert torch.equal(acts["gated_rdt+@2"].ids, want)
    labels = [r.label for r in test]
    g = res.get("gated_rdt+")
    for lab in ("harmful", "benign"):
        rows = [i for i, x in enumerate(labels) if x == lab]
        assert g.fired[lab] == pytest.approx(float(fired[rows].double().mean()))
    assert res.gate_test is not None and res.gate_test.n_harmful == len(test) // 2
    assert res.gate["meta"]["probe_source"] == "vla"
    # outputs
    md = (tmp_path / "run" / "table.md").read_text()
    assert all(c.label in md for c in res.conditions) and "Gate (vla probe at layer 1, last_text) on test" in md
    assert len(read_json(tmp_path / "run" / "table.json")) == len(res.conditions)
    assert (tmp_path / "run" / "figures" / "pareto.png").stat().st_size > 10_000
    back = load_defenses(tmp_path / "run")
    assert back.markdown() == res.markdown() and back.pareto() == res.pareto()
    assert DefensesResult.from_dict(res.to_dict()).to_dict() == res.to_dict()


def test_runs_resume_and_refuse_other_configs(vla, tmp_path):
    cfg = _config(defenses=("none", "rdt", "gated_rdt+"), n_pairs=4)
    first = run_defenses(vla, _direction(vla), cfg, tmp_path, log=lambda m: None)
    logs: list[str] = []
    again = run_defenses(vla, _direction(vla), cfg, tmp_path, log=logs.append)
    assert logs and all(m.startswith("[cached]") for m in logs)
    assert again.to_dict()["conditions"] == first.to_dict()["conditions"]
    with pytest.raises(ConfigError, match="another config"):
        run_defenses(vla, _direction(vla), dataclasses.replace(cfg, alphas=(3.0,)), tmp_path, log=lambda m: None)


def test_chat_probe_gate_and_alternative(vla, tmp_path):
    probe = LinearProbe(torch.randn(vla.d_model, generator=torch.Generator().manual_seed(1)), 0.0)
    cfg = _config(defenses=("none", "gated_rdt+"), n_pairs=4, gate_layers=(0, 2))
    res = run_defenses(vla, _direction(vla), cfg, tmp_path / "a", chat_probe=probe, log=lambda m: None)
    assert res.gate["layer"] in (0, 2) and set(res.gate["meta"]["layer_auc"]) == {"0", "2"}
    alt = res.gate_alternatives["chat"]
    assert alt["gate"]["meta"]["probe_source"] == "given" and 0 <= alt["test"]["auc"] <= 1
    assert alt["gate"]["layer"] in (0, 2)  # a probe without a layer reads the candidate layers
    chat = run_defenses(vla, _direction(vla), dataclasses.replace(cfg, gate_probe="chat"), tmp_path / "b",
                        chat_probe=probe, log=lambda m: None)
    assert chat.gate["meta"]["probe_source"] == "given" and not chat.gate_alternatives


def test_config_and_argument_errors(vla, tmp_path):
    with pytest.raises(ConfigError, match="unknown defenses"):
        DefensesConfig(defenses=("none", "firewall"))
    with pytest.raises(ConfigError, match="alphas"):
        DefensesConfig(alphas=(0.0,))
    with pytest.raises(ConfigError, match="val"):
        DefensesConfig(val_fraction=0.0)
    with pytest.raises(ConfigError, match="gate_probe"):
        DefensesConfig(gate_probe="oracle")
    with pytest.raises(ConfigError, match="wrap"):
        DefensesConfig(defense_position="wrap")  # the default text has no {instruction}
    assert DefensesConfig.from_dict(_config().to_dict()) == _config()
    with pytest.raises(ConfigError, match="unknown DefensesConfig"):
        DefensesConfig.from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="closed_loop_conditions"):
        DefensesConfig(closed_loop_conditions=("rdt@3",))
    assert condition_key("rdt", 2.0) == "rdt@2" and condition_key("adashield", 0.0) == "adashield"
    with pytest.raises(ConfigError, match="subspace"):
        run_defenses(vla, _direction(vla), _config(defenses=("none", "vlm_guard")), tmp_path, log=lambda m: None)
    with pytest.raises(ConfigError, match="chat_probe"):
        run_defenses(vla, _direction(vla), _config(defenses=("gated_rdt+",), gate_probe="chat"), tmp_path / "c",
                     log=lambda m: None)


def test_pareto_is_descriptive_dominance(vla, tmp_path):
    res = run_defenses(vla, _direction(vla), _config(defenses=("none", "rdt"), alphas=(1.0, 8.0), n_pairs=4),
                       tmp_path, log=lambda m: None)
    pts = {c.key: (c.value("harmful", "hrr_partial")[0], c.value("benign", "abs_shift")[0]) for c in res.conditions}
    front = res.pareto()
    assert front
    for k in front:
        m, b = pts[k]
        assert not any(m2 >= m and b2 <= b and (m2 > m or b2 < b) for k2, (m2, b2) in pts.items() if k2 != k)


def test_closed_loop_success_on_the_testbed_family(vla, tmp_path):
    from rdt_interp.testbed.adapter import TestbedVLAAdapter

    cfg = _config(defenses=("none", "adashield", "gated_rdt+"))
    gate_probe = LinearProbe(torch.zeros(vla.d_model), 1.0)  # always fires
    ctx = DefenseContext(vla, _direction(vla), (1,), cfg, None, HarmGate(gate_probe, 1, 0.0))
    if not isinstance(vla, TestbedVLAAdapter):
        with pytest.raises(ConfigError, match="testbed"):
            closed_loop_success(ctx, "none", 0.0, 2, 2)
        return
    for defense in ("none", "adashield", "gated_rdt+"):
        out = closed_loop_success(ctx, defense, 2.0, 2, 2, n_boot=20)
        assert out["n"] == 2 and 0.0 <= out["rate"] <= 1.0 and out["max_steps"] == 2
    cfg = _config(defenses=("none", "rdt"), n_pairs=4)
    first = run_defenses(vla, _direction(vla), cfg, tmp_path, log=lambda m: None)
    assert "benign task success" not in first.markdown()
    later = dataclasses.replace(cfg, closed_loop_episodes=2, closed_loop_steps=2, closed_loop_conditions=("rdt@2",))
    logs: list[str] = []
    res = run_defenses(vla, _direction(vla), later, tmp_path, log=logs.append)
    assert [m for m in logs if m.startswith("[run]")] == ["[run]    closed_loop-rdt@2-2x2"]  # the rest is reused
    assert res.get("none").closed_loop is None and res.get("rdt").closed_loop["n"] == 2
    assert "benign task success" in res.markdown()


def test_zero_motion_rate_ignores_the_gripper():
    from rdt_interp.models.action_tokenizer import ActionTokenizer

    tok = ActionTokenizer(vocab_size=600, n_bins=256)
    zb = torch.tensor(tok.zero_motion_bins())
    still = zb.clone()
    still[6] = 0  # gripper anywhere
    near = zb.clone()
    near[2] += 2  # within the window
    moving = zb.clone()
    moving[0] += 3  # one motion dimension outside
    ids = tok.bins_to_ids(torch.stack([still, near, moving, moving]))
    v, lo, hi = zero_motion_rate(tok, ids, window=2, n_boot=200)
    assert v == 0.5 and lo <= v <= hi
    assert zero_motion_rate(tok, ids, window=3, n_boot=10)[0] == 1.0
