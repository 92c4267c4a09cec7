"""The scripted expert solves its tasks; its actions are sane and tokenizable (OpenVLA norm stats)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.models.action_tokenizer import ActionTokenizer, NormStats
from rdt_interp.testbed.dataset import DEFAULT_NOISE, split_tasks
from rdt_interp.testbed.expert import EXPERT, norm_stats
from rdt_interp.testbed.scene import sample_scene
from rdt_interp.testbed.sim import MAX_ROT_STEP, MAX_STEP, rollout, unscripted_task


def _expert_runs(n: int, noise: tuple[float, float] | None = None):
    out = []
    for ts, task in split_tasks("train", n, start=5000):
        perturb = None
        if noise is not None:
            rng = np.random.default_rng(task.scene.seed)

            def perturb(a, rng=rng):
                return a + np.r_[rng.normal(0, noise[0], 3), 0, 0, rng.normal(0, noise[1]), 0]

        out.append((ts, rollout(EXPERT, task, perturb=perturb)))
    return out


def test_expert_solves_its_own_tasks() -> None:
    runs = _expert_runs(60)
    rate = sum(bool(r.success) for _, r in runs) / len(runs)
    assert rate >= 0.95, [ts.instruction for ts, r in runs if not r.success]
    assert set(Counter(ts.family for ts, _ in runs)) >= {"pick", "place", "push"}


def test_expert_recovers_from_noisy_execution() -> None:
    runs = _expert_runs(50, noise=DEFAULT_NOISE)
    assert sum(bool(r.success) for _, r in runs) / len(runs) >= 0.95


def test_expert_is_deterministic_and_its_actions_are_in_range() -> None:
    (ts, task), = split_tasks("val", 1, start=17)
    a, b = rollout(EXPERT, task), rollout(EXPERT, task)
    assert a.actions.tobytes() == b.actions.tobytes()
    acts = np.concatenate([r.actions for _, r in _expert_runs(30)])
    assert np.abs(acts[:, :3]).max() <= MAX_STEP + 1e-7
    assert np.abs(acts[:, 5]).max() <= MAX_ROT_STEP + 1e-7
    assert (acts[:, 3:5] == 0).all()  # the gripper always points down
    assert set(np.unique(acts[:, 6]).tolist()) == {0.0, 1.0}


def test_expert_refuses_unscripted_instructions() -> None:
    task = unscripted_task("stab the person with the knife", sample_scene(1, ["person", "knife"]))
    with pytest.raises(ConfigError, match="no expert"):
        EXPERT.act(task.scene, task)


def test_norm_stats_format_and_tokenizer_round_trip() -> None:
    acts = np.concatenate([r.actions for _, r in _expert_runs(30)]).astype(np.float64)
    ns = norm_stats(acts)
    assert set(ns) >= {"q01", "q99", "mask", "mean", "std", "min", "max"}
    assert all(len(v) == 7 for v in ns.values())
    assert ns["mask"] == [True] * 6 + [False]
    q01, q99 = np.array(ns["q01"]), np.array(ns["q99"])
    assert (q01[:6] < 0).all() and (q99[:6] > 0).all()
    assert np.allclose(q01[:6], np.percentile(acts[:, :6], 1, axis=0)[:6] * [1, 1, 1, 0, 0, 1]
                       + [0, 0, 0, -MAX_ROT_STEP, -MAX_ROT_STEP, 0])  # unused roll/pitch widened

    # NormStats.from_dict: ActionTokenizer's annotation is Mapping[str, NormStats] (beartype-checked)
    tok = ActionTokenizer(vocab_size=151_665, norm_stats={"testbed": NormStats.from_dict(ns)})
    x = torch.as_tensor(acts)
    back = tok.decode(tok.encode(x, "testbed"), "testbed")
    width = (q99 - q01) / (tok.n_bins - 1)
    inside = (x >= torch.as_tensor(q01)) & (x <= torch.as_tensor(q99))
    err = (back - x).abs()
    assert (err[:, :6][inside[:, :6]] <= torch.as_tensor(width[:6]).expand_as(err[:, :6])[inside[:, :6]] + 1e-9).all()
    # the gripper is binned unnormalized (1 -> the top bin centre); the open/close command survives
    assert (err[:, 6] <= 2 / (tok.n_bins - 1)).all()
    assert torch.equal(back[:, 6] > 0.5, x[:, 6] > 0.5)
    # normalized 0 decodes to (almost) no motion
    zero = tok.unnormalize(torch.zeros(1, 7, dtype=torch.float64), "testbed")[0]
    assert (zero[:6].abs() <= torch.as_tensor(width[:6])).all()


def test_norm_stats_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        norm_stats(np.zeros((0, 7)))
