"""Evaluation of a testbed VLA: lockstep rollouts, bin metrics, the sections and their file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rdt_interp.testbed.evaluate as ev
from rdt_interp.errors import ConfigError
from rdt_interp.models import load_chat_model
from rdt_interp.models.action_tokenizer import ActionTokenizer, NormStats
from rdt_interp.testbed.adapter import build_tiny_testbed_vla
from rdt_interp.testbed.dataset import split_tasks
from rdt_interp.testbed.sim import rollout

SMALL = ev.EvalConfig(n_bin_samples=12, n_episodes=3, max_steps=3, harmful_steps=2, chat_max_new_tokens=3,
                      batch_size=64, n_boot=50)


def image_policy(image: np.ndarray, instruction: str) -> np.ndarray:
    """Depends on the image and the instruction, so misaligned frames would show."""
    m = image.reshape(-1, 3).mean(0) / 255.0
    return np.array([0.04 * (m[0] - 0.5), 0.04 * (m[1] - 0.5), 0.02 * (len(instruction) % 3 - 1),
                     0.0, 0.0, 0.1 * (m[2] - 0.5), float(m[0] > 0.6)])


def test_lockstep_rollouts_equal_single_rollouts() -> None:
    tasks = [t for _, t in split_tasks("test", 5)]
    batched = ev.batched_rollouts(lambda ims, ins: np.stack([image_policy(i, s) for i, s in zip(ims, ins, strict=True)]),
                                  tasks, 7, image_size=64)
    for t, b in zip(tasks, batched, strict=True):
        one = rollout(image_policy, t, 7)
        assert b.n_steps == one.n_steps and b.success == one.success
        assert np.array_equal(b.actions, one.actions)
        assert b.final == one.final
        assert b.motion == one.motion


def test_bin_metrics_count_exact_near_and_non_action_tokens() -> None:
    tok = ActionTokenizer(vocab_size=600, n_bins=256)
    target = tok.bins_to_ids(torch.tensor([[10, 100, 200, 127, 127, 127, 250]] * 4))
    m = ev.bin_metrics(tok, target.clone(), target)
    assert m["exact"] == [1.0] * 7 and m["exact_all_dims"] == 1.0 and m["mean_abs_bin_diff"] == [0.0] * 7
    shifted = tok.bins_to_ids(tok.ids_to_bins(target) + 3)
    m = ev.bin_metrics(tok, shifted, target)
    assert m["exact"] == [0.0] * 7 and m["within_1"] == [0.0] * 7 and m["within_5"] == [1.0] * 7
    assert m["mean_abs_bin_diff"] == [3.0] * 7
    text = target.clone()
    text[:2, 0] = 5  # a text token is never right, whatever bin it would decode to
    m = ev.bin_metrics(tok, text, target)
    assert m["exact"][0] == 0.5 and m["action_token_rate"][0] == 0.5 and m["mean_abs_bin_diff"][0] == 0.0
    assert "sign" not in m  # no statistics to decode actions with


def test_sign_accuracy_compares_directions_of_decoded_actions() -> None:
    stats = {"q01": [-0.02] * 3 + [-0.15] * 3 + [0.0], "q99": [0.02] * 3 + [0.15] * 3 + [1.0],
             "mask": [True] * 6 + [False]}
    tok = ActionTokenizer(vocab_size=600, n_bins=256, norm_stats={ev.UNNORM_KEY: NormStats.from_dict(stats)})
    expert = torch.tensor([[0.02, -0.005, 0.0, 0.0, 0.0, 0.05, 1.0], [0.01, 0.0, -0.02, 0.0, 0.0, -0.1, 0.0]],
                          dtype=torch.float64)
    target = tok.encode(expert, ev.UNNORM_KEY)
    m = ev.bin_metrics(tok, target, target)
    assert m["sign"] == [1.0] * 7
    flipped = tok.encode(-expert + torch.tensor([0, 0, 0, 0, 0, 0, 1.0], dtype=torch.float64), ev.UNNORM_KEY)
    m = ev.bin_metrics(tok, flipped, target)
    # x, y, z, yaw change direction where they move (y and z stand still in one row each);
    # roll and pitch stay zero; the gripper flips open/closed
    assert m["sign"] == [0.0, 0.5, 0.5, 1.0, 1.0, 0.0, 0.0]


def test_sections_are_saved_and_not_recomputed(tmp_path, monkeypatch) -> None:
    vla = build_tiny_testbed_vla(0)
    chat = load_chat_model("tiny-qwen2")
    out = tmp_path / "eval.json"
    res = ev.evaluate(out, vla, SMALL, chat=chat, progress=False)
    saved = json.loads(out.read_text())
    assert set(ev.SECTIONS) <= set(saved) and saved["config"]["n_episodes"] == 3
    cl = res["closed_loop"]
    assert cl["vla"]["n"] == cl["zero_policy"]["n"] == cl["constant_bin"]["n"] == cl["vla_blank_image"]["n"] == 3
    assert cl["zero_policy"]["rate"] == 0.0 and cl["vla"]["interval"] == "wilson95"
    assert cl["zero_policy"]["lo"] == 0.0 and cl["zero_policy"]["hi"] > 0.4  # Wilson: not [0, 0] at 0/3
    assert len(cl["episodes"]) == 3 and sum(f["vla"]["n"] for f in cl["by_family"].values()) == 3
    assert len(cl["constant_bin_action"]["action"]) == 7
    assert len(res["bins"]["all"]["sign"]) == 7
    assert res["bins"]["all"]["n"] == 12 and len(res["bins"]["all"]["exact"]) == 7
    h = res["harmful"]
    assert h["n_pairs"] == 62 and h["first_step"]["harmful"]["zero_motion_rate"]["n"] == 62
    assert sum(h["categories"].values()) == 62
    assert res["chat"]["harmful"]["n"] == 147 and res["chat"]["harmful_grounded"]["n"] == 62
    assert all("completion" in c for c in res["chat"]["harmful_completions"])
    dep = res["image_dependence"]
    assert dep["n"] == 12 and len(dep["tokens_changed"]) == 7
    assert dep["own_image"]["exact"] == res["bins"]["all"]["exact"]  # same samples as "bins"

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(ev, "evaluate_bins", boom)
    again = ev.evaluate(out, vla, SMALL, chat=chat, progress=False)
    assert again["bins"] == saved["bins"]
    with pytest.raises(ConfigError, match="another evaluation configuration"):
        ev.evaluate(out, vla, ev.EvalConfig(n_episodes=4), chat=chat, progress=False)
    with pytest.raises(ConfigError, match="unknown sections"):
        ev.evaluate(tmp_path / "x.json", vla, SMALL, sections=["speed"], progress=False)
