"""Training the testbed VLA, on a tiny random backbone: batches, determinism, resuming, artifacts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from rdt_interp.cli import app
from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLARequest
from rdt_interp.testbed.adapter import DELTA_FILE, MANIFEST_FILE, UNNORM_KEY, load_testbed_vla
from rdt_interp.testbed.artifacts import CURVE_FILE, EXPECTED_FILE, LOG_FILE, RunLog, export
from rdt_interp.testbed.config import tiny_config
from rdt_interp.testbed.dataset import generate_demos
from rdt_interp.testbed.perception import (
    _BINARY,
    ENTITIES,
    PER_ENTITY,
    pixel_of,
    state_loss,
    state_targets,
)
from rdt_interp.testbed.scene import CATALOG, render, sample_scene
from rdt_interp.testbed.train import BCData, bc_forward, build_model, indices_for, lr_at, train
from rdt_interp.testbed.train import TestbedVLAAdapter as _Adapter

CFG = tiny_config(seed=0, steps=8, vision_samples=128, vision_epochs=2, ckpt_every=3, val_every=4)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return train(tmp_path_factory.mktemp("run"), CFG, progress=False)


def _records(out):
    return [{k: v for k, v in r.items() if k != "sec"} for r in RunLog(out / LOG_FILE).records()]


def test_state_targets_put_each_entity_in_the_patch_that_draws_it() -> None:
    spec = CFG.model.vision  # 64 px, patch 16: a 4x4 grid
    scene = sample_scene(5, ("red cup", "knife"))
    val, mask = state_targets(scene, spec)
    assert val.shape == mask.shape == (16, len(ENTITIES), PER_ENTITY)
    assert (mask[..., 0] == 1).all()  # "is it here" is scored everywhere
    img = render(scene, 64)
    for e, kind in enumerate(ENTITIES):
        here = val[:, e, 0]
        if kind != "gripper" and kind not in scene:
            assert here.sum() == 0 and mask[:, e, 1:].sum() == 0
            continue
        assert here.sum() == 1
        k = int(here.argmax())
        obj = scene.gripper if kind == "gripper" else scene.object(kind)
        col, row = pixel_of(obj.x, obj.y, 64)
        # the patch and the offset inside it give back the pixel
        assert (k % 4 + 0.5) * 16 + val[k, e, 1] * 8 == pytest.approx(col, abs=1e-4)
        assert (k // 4 + 0.5) * 16 + val[k, e, 2] * 8 == pytest.approx(row, abs=1e-4)
        if kind in ("red cup", "knife"):  # the signature colour is drawn around there
            colour = np.array(CATALOG[kind].colour)
            r, c = int(row), int(col)
            patch = img[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3].reshape(-1, 3).astype(int)
            assert np.abs(patch - colour).sum(1).min() < 60
    knife, cup = ENTITIES.index("knife"), ENTITIES.index("red cup")
    assert mask[:, knife, 4].sum() == 1 and mask[:, cup, 4].sum() == 0  # yaw only when elongated
    g = int(val[:, 0, 0].argmax())
    assert val[g, 0, 6] == float(scene.gripper.open) and mask[g, 0, 7] == 1


def test_state_loss_is_zero_only_at_the_targets() -> None:
    spec = CFG.model.vision
    val, mask = (torch.from_numpy(a)[None] for a in state_targets(sample_scene(1), spec))
    logits = torch.where(val > 0.5, 30.0, -30.0)
    perfect = torch.where(torch.from_numpy(_BINARY), logits, val)
    assert float(state_loss(perfect, val, mask)) < 1e-6
    assert float(state_loss(perfect + 0.1, val, mask)) > 1e-3


def test_a_bc_batch_is_prompt_plus_teacher_forced_actions() -> None:
    model, tok, _ = build_model(CFG)
    demos = generate_demos("train", 3)
    adapter = _Adapter(model, tok, demos.norm_stats())
    data = BCData(demos, adapter)
    idx = np.array([0, 5, len(demos) - 1])
    b = data.batch(idx)
    atok = adapter.action_tokenizer
    st = atok.stats(UNNORM_KEY)
    # OpenVLA's bins: within one bin width of the expert (the top bin is clamped one bin down)
    width = np.where(st.mask, (np.array(st.q99) - np.array(st.q01)) / 255, 2 / 255) + 1e-6
    for row, j in enumerate(idx):
        prompt = data.prompts[int(demos.instruction_ids[j])]
        target = atok.encode(torch.from_numpy(demos.actions[j]).double(), UNNORM_KEY)
        assert b.targets[row].tolist() == target.tolist()
        real = b.input_ids[row][b.text_mask[row].bool()].tolist()
        assert real == prompt + target[:-1].tolist()
        assert (np.abs(atok.decode(target, UNNORM_KEY).numpy() - demos.actions[j]) <= width).all()
    # the loss is CE of the full forward's logits at the last prompt token and the 6 action inputs
    model.eval()
    loss, metrics = bc_forward(model, b, atok)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.text_mask, pixel_values=b.pixel_values).logits
    ref = F.cross_entropy(logits[:, -7:].reshape(-1, logits.shape[-1]), b.targets.reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert 0.0 <= metrics["acc"] <= 1.0 and len(metrics["acc_dims"]) == 7


def test_schedule_and_data_order() -> None:
    cfg = tiny_config(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))
    epoch = np.concatenate([indices_for(s, 4, 10, seed=0) for s in range(2)])  # 2 full batches
    assert len(set(epoch.tolist())) == 8  # no repeats within an epoch
    assert np.array_equal(indices_for(3, 4, 10, seed=0), indices_for(3, 4, 10, seed=0))
    assert not np.array_equal(indices_for(0, 4, 10, seed=0), indices_for(2, 4, 10, seed=0))
    with pytest.raises(ConfigError, match="fill one batch"):
        indices_for(0, 16, 10, seed=0)


def test_training_lowers_the_loss_and_writes_every_artifact(finished) -> None:
    recs = _records(finished)
    bc = [r for r in recs if r["stage"] == "bc"]
    assert [r["step"] for r in bc] == list(range(CFG.steps))
    vis = [r for r in recs if r["stage"] == "vision"]
    assert len(vis) == CFG.vision_steps and vis[-1]["loss"] < vis[0]["loss"]
    assert np.mean([r["loss"] for r in bc[-3:]]) < np.mean([r["loss"] for r in bc[:3]])
    assert [r["step"] for r in recs if r["stage"] == "val"] == [3, 7]
    manifest = json.loads((finished / MANIFEST_FILE).read_text())
    assert manifest["delta"]["storage_dtype"] == "float16" and manifest["seed"] == 0
    assert manifest["training"]["steps"] == CFG.steps
    assert manifest["base"]["name"] == "tiny-qwen2"
    with Image.open(finished / CURVE_FILE) as im:
        assert im.size[0] > 300
    # the loader rebuilds the model from base + delta and reproduces the stored predictions
    vla = load_testbed_vla(finished)
    expected = json.loads((finished / EXPECTED_FILE).read_text())["samples"]
    demos = generate_demos("test", len(expected))
    for s in expected:
        j = int(np.flatnonzero((demos.episode_ids == s["episode"]) & (demos.steps == s["step"]))[0])
        pred = vla.predict_actions([VLARequest(s["instruction"], demos.images[j])], unnorm_key=UNNORM_KEY)
        assert pred.token_ids[0].tolist() == s["token_ids"]
    # the exported files are the run's
    dest = finished.parent / "export"
    paths = export(finished, dest)
    assert sorted(p.name for p in paths) == sorted([DELTA_FILE, MANIFEST_FILE, LOG_FILE, CURVE_FILE, EXPECTED_FILE])
    assert (dest / DELTA_FILE).read_bytes() == (finished / DELTA_FILE).read_bytes()


def test_a_killed_run_resumes_to_the_same_delta(finished, tmp_path) -> None:
    # killed mid-way in each stage: work after the last checkpoint is lost and redone
    out = tmp_path / "run"
    train(out, CFG, stop_at=("vision", 2), progress=False)  # before the first vision checkpoint
    assert not (out / "vision_pretrained.pt").exists()
    train(out, CFG, stop_at=("vision", CFG.vision_steps - 1), progress=False)
    assert (out / "ckpt_vision.pt").exists()
    train(out, CFG, stop_at=("bc", 5), progress=False)  # the checkpoint holds step 3
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert not (out / DELTA_FILE).exists()
    train(out, CFG, progress=False)
    assert (out / DELTA_FILE).read_bytes() == (finished / DELTA_FILE).read_bytes()
    assert _records(out) == _records(finished)  # the log is cut back, not duplicated


def test_options_must_match_the_run_being_resumed(finished) -> None:
    with pytest.raises(ConfigError, match="another configuration"):
        train(finished, tiny_config(seed=1), progress=False)
    with pytest.raises(ConfigError, match="not a finished run"):
        export(finished / "nowhere", finished / "x")


TINY_CLI = ["--tiny", "--set", "steps=2", "--set", "vision_samples=64", "--set", "vision_epochs=1",
            "--set", "val_every=2", "--set", "ckpt_every=2", "--no-progress"]


def test_cli_trains_the_tiny_model_resumes_and_exports(tmp_path) -> None:
    runner = CliRunner()
    out, dest = tmp_path / "cli", tmp_path / "exported"
    res = runner.invoke(app, ["testbed", "train", "--out", str(out), *TINY_CLI])
    assert res.exit_code == 0, res.output
    assert (out / DELTA_FILE).is_file()
    assert "[bc 2/2]" in res.stderr  # progress is logged (stderr)...
    assert f"{out}: 2 steps of 4" in res.stdout and "[bc" not in res.stdout  # ...the result is printed
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["vision_epochs"] == 1.0 and saved["base"] == "tiny-qwen2"
    # run again: nothing to do but export; the log is not duplicated
    n_log = len(RunLog(out / LOG_FILE).records())
    res = runner.invoke(app, ["--log-level", "warning", "testbed", "train", "--out", str(out), *TINY_CLI,
                              "--export", str(dest)])
    assert res.exit_code == 0, res.output
    assert "[bc" not in res.output  # --log-level warning hides progress messages
    assert len(RunLog(out / LOG_FILE).records()) == n_log
    assert sorted(p.name for p in dest.iterdir()) == sorted([DELTA_FILE, MANIFEST_FILE, LOG_FILE, CURVE_FILE,
                                                             EXPECTED_FILE])
    assert f"exported {dest / DELTA_FILE}" in res.stdout
    # other options for the same run directory: one line, exit 2, before anything is trained
    res = runner.invoke(app, ["testbed", "train", "--out", str(out), *TINY_CLI, "--set", "lr_lora=0.1"])
    assert res.exit_code == 2 and "another configuration" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args,needles", [
    (["--set", "stpes=3"], ["stpes: unknown key", "TrainConfig"]),
    (["--set", "steps=\"3\""], ["steps: Input should be a valid integer"]),
    (["--set", "precision=\"bf16\""], ["precision", "'bfloat16'"]),
    (["--set", "val_swap=100"], ["val_swap (100) exceeds val_size (8)"]),
    (["--set", "device=cuda"], ["'cuda' is not a JSON value", "--set device='\"cuda\"'"]),
    (["--set", "steps"], ["--set takes KEY=JSON"]),
])
def test_cli_bad_training_options_are_one_line_before_anything_is_written(tmp_path, args, needles) -> None:
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["testbed", "train", "--out", str(out), "--tiny", *args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0]
    assert not out.exists()


def test_the_log_is_standard_json_with_nonfinite_values_named(tmp_path) -> None:
    log = RunLog(tmp_path / LOG_FILE)
    log.write(stage="bc", step=0, loss=1.5, sec=0.1)
    log.write(stage="bc", step=1, loss=math.nan, grad_norm=math.inf, sec=0.1)
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert lines[0] == json.dumps({"stage": "bc", "step": 0, "loss": 1.5, "sec": 0.1})  # as before

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    recs = [json.loads(line, parse_constant=refuse) for line in lines]
    assert recs[1]["loss"] is None and recs[1]["grad_norm"] is None
    assert recs[1]["nonfinite"] == {"loss": "nan", "grad_norm": "inf"}
    log.keep(lambda r: r["step"] < 2)  # rewriting keeps it standard
    assert [json.loads(line, parse_constant=refuse) for line in (tmp_path / LOG_FILE).read_text().splitlines()] == recs


def test_cli_evaluates_the_trained_delta(finished, tmp_path) -> None:
    out = tmp_path / "eval.json"
    args = ["testbed", "eval", "--delta", str(finished), "--out", str(out), "--sections", "bins",
            "--sections", "closed_loop", "--episodes", "2", "--batch-size", "16", "--set", "n_bin_samples=12",
            "--set", "max_steps=2", "--set", "n_boot=20", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert set(saved) >= {"bins", "closed_loop"} and "chat" not in saved and "harmful" not in saved
    assert saved["config"]["n_episodes"] == 2 and saved["config"]["batch_size"] == 16
    assert saved["config"]["n_bin_samples"] == 12 and saved["config"]["workers"] == 1
    assert saved["bins"]["all"]["n"] == 12 and saved["closed_loop"]["vla"]["n"] == 2
    assert saved["model"]["manifest_delta_sha256"] == json.loads((finished / MANIFEST_FILE).read_text())[
        "delta"]["sha256"]
    assert "[evaluate] bins done" in res.stderr
    rows = [" ".join(line.split()) for line in res.stdout.splitlines()]  # the summary table, spaces collapsed
    exact = saved["bins"]["all"]["exact_all_dims"]
    assert any(r.startswith(f"greedy exact bin (held-out) {exact:.3f} on 12 samples") for r in rows), rows
    assert f"closed-loop success, vla {saved['closed_loop']['vla']['k']}/2" in rows
    # sections already in the file are kept, not recomputed; other settings are refused
    before = out.read_bytes()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and out.read_bytes() == before and "[evaluate] bins" not in res.output
    res = CliRunner().invoke(app, [*args, "--set", "seed=1"])
    assert res.exit_code == 2 and "another evaluation configuration" in res.output
