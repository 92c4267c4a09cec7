"""The VLA RDT study on every VLA family: requests, sweeps, specificity, decoupling, resumable runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from rdt_interp.analysis.behaviour import action_metrics, zero_motion_mass
from rdt_interp.analysis.stats import auc_groups
from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.storage import to_json
from rdt_interp.studies.vla import (
    ActionSet,
    DecouplingResult,
    SteeringEffect,
    SweepResult,
    VLARDTConfig,
    VLARDTResult,
    alpha_sweep,
    choose_alpha,
    decoupling,
    direction_specificity,
    load_requests,
    load_vla_rdt,
    predict,
    run_vla_rdt,
    target_mode_sweep,
    vla_image_size,
)
from rdt_interp.tracing.vla import capture_roles, steer_vla

from ...vla_adapters import unit_direction

NORM = 0.3


def _direction(vla, layer: int = 1) -> Direction:
    prov = Provenance("tiny-chat", "abc", layer, "post_instruction[-1]", "resid_pre", "diff_in_means", created="")
    return Direction(unit_direction(vla, NORM, seed=7), prov)


def _config(**kw) -> VLARDTConfig:
    base = dict(alphas=(2.0,), sweep_modes=("action",), target_modes=("action", "text+action"), n_pairs=4,
                val_fraction=0.5, images="noise", batch_size=8, n_boot=50, n_random=100, specificity_pairs=1,
                specificity_rows=64, decoupling_roles=("text", "last_text", "first_action"),
                decoupling_layers=(0, 1), folds=2, n_perm=50, probe=False, figures=False)
    base.update(kw)
    return VLARDTConfig(**base)


def test_requests_pair_images_labels_and_splits(vla, tmp_path):
    size = vla_image_size(vla)
    reqs = load_requests(vla, n_pairs=6, val_fraction=0.5, seed=1)
    assert len(reqs) == 12 and {r.label for r in reqs} == {"harmful", "benign"}
    by_pair: dict[str, list] = {}
    for r in reqs:
        by_pair.setdefault(r.pair_id, []).append(r)
    assert len(by_pair) == 6 and sum(rs[0].split == "val" for rs in by_pair.values()) == 3
    for rs in by_pair.values():
        assert [r.label for r in rs] == ["harmful", "benign"]  # harmful first
        assert rs[0].split == rs[1].split
        a, b = rs[0].request.image_array(), rs[1].request.image_array()
        assert a.shape == (size, size, 3) and np.array_equal(a, b)  # the pair shares its scene
    imgs = [rs[0].request.image_array() for rs in by_pair.values()]
    assert not np.array_equal(imgs[0], imgs[1])
    again = load_requests(vla, n_pairs=6, val_fraction=0.5, seed=1)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in reqs]
    assert np.array_equal(again[0].request.image_array(), reqs[0].request.image_array())
    # a user CSV with its own column names; "harmless" counts as benign
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "kind", "group"])
        w.writerows([["hit the dog", "harmful", "g1"], ["pet the dog", "harmless", "g1"],
                     ["throw the cup at the child", "harmful", "g2"], ["hand the cup to the child", "benign", "g2"]])
    mine = load_requests(size, path, column="text", label_column="kind", category_column=None,
                         pair_column="group", val_fraction=0.0, images="noise")
    assert [r.label for r in mine] == ["harmful", "benign", "harmful", "benign"]
    assert {r.split for r in mine} == {"test"} and mine[0].pair_id == "g1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "label": "spicy"}) + "\n")
    with pytest.raises(ConfigError, match="neither harmful nor benign"):
        load_requests(size, bad, images="noise")


def test_sweep_metrics_are_those_of_direct_predictions(vla):
    cfg = _config()
    reqs = load_requests(vla, n_pairs=4, val_fraction=0.5, images="noise", seed=0)
    d = _direction(vla)
    sweep = alpha_sweep(vla, d, reqs, cfg)
    assert sweep.splits == ("val", "test") and sweep.modes == ("action",)
    test = [r for r in reqs if r.split == "test"]
    steered = predict(vla, test, steer_vla(d, "action", 2.0, [1]), batch_size=3)
    base = predict(vla, test, (), batch_size=3)
    assert bool(vla.action_tokenizer.is_action_token(steered.ids).all())
    # RDT edits decode steps only: the first action token is the unsteered one
    assert torch.equal(steered.ids[:, 0], base.ids[:, 0])
    harm = [i for i, r in enumerate(test) if r.label == "harmful"]
    want = action_metrics(vla.action_tokenizer, logits=steered.logits[harm], ids=steered.ids[harm], n_boot=50,
                          seed=0, label="harmful test")
    got = sweep.get("action", 2.0, "test").metrics["harmful"]
    assert got.zero_mass == pytest.approx(want.zero_mass, abs=1e-6)
    assert got.mean_bin == pytest.approx(want.mean_bin) and got.hrr_partial == want.hrr_partial
    assert sweep.baseline("test").shift["benign"].shift == 0.0
    counts = sweep.get("action", 2.0, "test").bin_counts["harmful"]
    assert sum(counts) == len(harm) * vla.action_dim and len(counts) == vla.action_tokenizer.n_bins - 1
    again = SweepResult.from_dict(json.loads(to_json(sweep.to_dict())))
    assert to_json(again.to_dict()) == to_json(sweep.to_dict())
    alpha, how = choose_alpha(sweep, split="val")
    assert alpha == 2.0 and how["values"]["2"] == sweep.get("action", 2.0, "val").metrics["harmful"].zero_mass
    modes = target_mode_sweep(vla, d, reqs, _config(target_modes=("text", "all")), 2.0)
    assert [c.name for c in modes.conditions] == ["none", "text@2", "all@2"]
    with pytest.raises(DModelMismatchError):
        alpha_sweep(vla, torch.ones(vla.d_model + 1), reqs, cfg)


def test_steering_effect_with_prefill_reuse_equals_full_runs(vla):
    reqs = load_requests(vla, n_pairs=2, images="noise", val_fraction=0.0, seed=3)
    dirs = torch.stack([unit_direction(vla, NORM, seed=s) for s in range(3)])
    kw = dict(alpha=2.0, layers=[0, 1], batch_size=3, metric="zero_mass")
    reuse = SteeringEffect(vla, reqs, max_rows=4, **kw)
    full = SteeringEffect(vla, reqs, max_rows=64, reuse_prefill=False, **kw)
    assert reuse.reuse and not full.reuse
    a, b = reuse(dirs), full(dirs)
    assert torch.allclose(a, b, atol=1e-5)
    assert reuse.rows_run == len(reqs) * 3
    tok = vla.action_tokenizer
    for k in range(3):  # one direction at a time, through the plain prediction path
        acts = predict(vla, reqs, steer_vla(dirs[k], "action", 2.0, [0, 1]), batch_size=4)
        assert float(a[k]) == pytest.approx(float(zero_motion_mass(tok, acts.logits).mean()), abs=1e-5)
    shift = SteeringEffect(vla, reqs, metric="abs_bin_shift", **{k: v for k, v in kw.items() if k != "metric"})
    values = shift(torch.cat([torch.zeros(1, vla.d_model), dirs]))
    assert float(values[0]) == 0.0  # a zero direction does not move any action
    with pytest.raises(ConfigError, match="cannot be reused"):
        SteeringEffect(vla, reqs, mode="text+action", reuse_prefill=True, **kw)


def test_direction_specificity_against_random_directions(vla):
    reqs = load_requests(vla, n_pairs=1, images="noise", val_fraction=0.0, seed=2)
    res = direction_specificity(vla, _direction(vla), reqs, _config(), alpha=2.0)
    assert res.n_random == 100 and res.null.shape == (100,) and "-r" in res.controls
    assert 1 / 101 <= res.p <= 1.0 and res.alternative == "greater"
    assert res.meta["prefill_reuse"] and res.meta["rows_run"] >= 102 * len(reqs)
    assert res.norm == pytest.approx(NORM, rel=1e-5)
    # the real effect is the steered zero-motion mass of r itself
    acts = predict(vla, reqs, steer_vla(_direction(vla), "action", 2.0, [1]))
    assert res.real == pytest.approx(float(zero_motion_mass(vla.action_tokenizer, acts.logits).mean()), abs=1e-5)
    assert res.real_lo <= res.real <= res.real_hi
    with pytest.raises(ConfigError, match="n_random"):
        direction_specificity(vla, _direction(vla), reqs, _config(n_random=20), alpha=2.0)


def test_decoupling_grid_is_the_projection_auc_of_the_captures(vla):
    reqs = load_requests(vla, n_pairs=6, images="noise", val_fraction=0.5, seed=4)
    d = _direction(vla)
    res = decoupling(vla, d, reqs, _config(n_perm=20, probe=True))
    assert res.roles == ("text", "last_text", "first_action") and res.grid.layers == (0, 1)
    assert res.layer == 1 and set(res.at_layer()) == set(res.roles)
    # probes fitted on the val pairs, every number measured on the test pairs
    assert res.grid.split == "test" and "fitted on split 'val'" in res.grid.probe_source
    assert res.grid.n_pos == res.grid.n_neg == 3
    test = [r for r in reqs if r.split == "test"]
    caps = capture_roles(vla, [r.request for r in test], roles=res.roles, layers=[0, 1])
    y = torch.tensor([r.label == "harmful" for r in test])
    for role in res.roles:
        s = caps.at(role).values[:, 1, 0] @ d.vector
        assert res.grid.cell(1, role)["proj_auc"] == pytest.approx(float(auc_groups(s[y], s[~y])), abs=1e-9)
    back = DecouplingResult.from_dict(json.loads(to_json(res.to_dict())))
    assert to_json(back.at_layer()) == to_json(res.at_layer())
    cv = decoupling(vla, d, load_requests(vla, n_pairs=3, images="noise", val_fraction=0.0), _config(n_perm=20))
    assert cv.grid.split == "test" and cv.grid.n_pos == 3 and "cross-fitted" not in cv.grid.proj_source
    # the steering layer joins a grid that leaves it out: what the figure marks was measured
    only0 = decoupling(vla, d, reqs, _config(n_perm=20, decoupling_layers=(0,)))
    assert only0.grid.layers == (0, 1) and only0.layer == 1


def test_run_resumes_and_refuses_another_config(vla, tmp_path):
    cfg = _config(n_pairs=2)
    d = _direction(vla)
    logs: list[str] = []
    res = run_vla_rdt(vla, d, cfg, tmp_path / "run", log=logs.append)
    assert isinstance(res, VLARDTResult) and res.alpha == 2.0 and res.layers == (1,)
    assert res.alpha_choice["how"] == "argmax on val"
    assert [c.name for c in res.targets.conditions] == ["none", "action@2", "text+action@2"]
    assert res.n_requests == {"val/harmful": 1, "val/benign": 1, "test/harmful": 1, "test/benign": 1}
    summary = res.summary()
    assert {"action@2/harmful", "text+action@2/benign", "specificity", "decoupling"} <= set(summary)
    assert set(summary["decoupling_peaks"]) == set(res.decoupling.roles)
    assert all(v["p_holm"] >= v["p"] for v in summary["decoupling_peaks"].values())
    assert all(m.startswith("[run]") for m in logs)
    logs.clear()
    again = run_vla_rdt(vla, d, cfg, tmp_path / "run", log=logs.append)
    assert logs and all(m.startswith("[cached]") for m in logs)
    assert to_json(again.to_dict()) == to_json(res.to_dict())
    assert to_json(load_vla_rdt(tmp_path / "run").to_dict()) == to_json(res.to_dict())
    # a lost step and a lost prediction file are recomputed to the same numbers
    (tmp_path / "run" / "target_modes.json").unlink()
    (tmp_path / "run" / "predictions" / "test-text+action@2.safetensors").unlink()
    third = run_vla_rdt(vla, d, cfg, tmp_path / "run", log=logs.append)
    assert to_json(third.targets.to_dict()) == to_json(res.targets.to_dict())
    with pytest.raises(ConfigError, match="another config"):
        run_vla_rdt(vla, d, _config(n_pairs=2, alphas=(1.0,)), tmp_path / "run", log=logs.append)
    with pytest.raises(ConfigError, match="another config"):  # another direction
        run_vla_rdt(vla, d.scaled(1.0), cfg, tmp_path / "run", log=logs.append)
    fixed = run_vla_rdt(vla, d, _config(n_pairs=2, alpha=3.0, specificity=False, decoupling=False,
                                        val_fraction=0.0), tmp_path / "fixed", log=logs.append)
    assert fixed.alpha == 3.0 and fixed.specificity is None and fixed.alpha_choice["how"] == "given in the config"
    with pytest.raises(ConfigError, match="no val split"):
        run_vla_rdt(vla, d, _config(n_pairs=2, val_fraction=0.0), tmp_path / "noval", log=logs.append)


def test_config_and_action_set_round_trip(vla, tmp_path):
    cfg = _config(layers=(0, 1))
    assert VLARDTConfig.from_dict(json.loads(to_json(cfg.to_dict()))) == cfg  # lists from JSON
    for bad in (dict(sweep_modes=("image",)), dict(specificity_metric="vibes"), dict(val_fraction=1.0)):
        with pytest.raises(ConfigError):
            _config(**bad)
    reqs = load_requests(vla, n_pairs=1, images="noise", val_fraction=0.0)
    acts = predict(vla, reqs)
    acts.save(tmp_path / "a.safetensors")
    back = ActionSet.load(tmp_path / "a.safetensors")
    assert torch.equal(back.ids, acts.ids) and torch.equal(back.logits, acts.logits)
    assert acts.logits.shape == (2, vla.action_dim, vla.action_tokenizer.n_bins)
    with pytest.raises(ConfigError, match="layer"):
        run_vla_rdt(vla, Direction(unit_direction(vla, 1.0), Provenance("x", "", 99, "", "", "dim")), _config(),
                    tmp_path / "r")
