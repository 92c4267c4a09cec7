"""Data parallelism end to end: torchrun with gloo processes on the CPU, a tiny VLA.

Two launches of the worker on the same job (the whole VLA study, then a role capture):

1. three ranks; rank 1 dies (hard exit, no cleanup) after writing 3 shards of the specificity
   step, and torchrun stops the other two;
2. the same command with two ranks: it must compute exactly the specificity shards that are
   missing, reuse the others, and finish.

The merged run directory must equal a single-process ``run_vla_rdt`` of the same config (same
JSON up to float tolerance, wall-clock fields aside), and the capture must equal
``capture_roles``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.distributed.capture import sharded_capture
from rdt_interp.distributed.context import single_process
from rdt_interp.distributed.launch import launch
from rdt_interp.distributed.shards import FAULT_ENV, FAULT_EXIT_CODE
from rdt_interp.distributed.vla import run_vla_rdt_distributed
from rdt_interp.models import load_chat_model
from rdt_interp.storage import read_json
from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.vla import ActionSet, VLARDTConfig, load_requests, run_vla_rdt
from rdt_interp.tracing.capture import capture
from rdt_interp.tracing.vla import capture_roles

from ..vla_adapters import CHECKPOINT, FIXTURE, build, unit_direction

REPO = Path(__file__).resolve().parents[2]
TEXT = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1064, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
VLA = dict(alphas=[2.0, 4.0], sweep_modes=["action"], target_modes=["action", "text+action"], n_pairs=4,
           val_fraction=0.5, images="noise", batch_size=3, n_boot=50, n_random=100, specificity_pairs=2,
           specificity_rows=16, decoupling_roles=["text", "last_text", "first_action"], decoupling_layers=[0, 1],
           folds=2, n_perm=50, probe=False, figures=False)
CAPTURE = {"roles": ["last_text", "first_action"], "layers": [0, 2], "batch_size": 3}
WALL_CLOCK = {"seconds", "rows_run", "timings"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny OpenVLA (Qwen2 backbone) the workers build from the job, and a direction file."""
    vla = build("openvla-qwen2")
    prov = Provenance("tiny-chat", "abc", 1, "post_instruction[-1]", "resid_pre", "diff_in_means", created="")
    d = Direction(unit_direction(vla, 0.3, seed=7), prov)
    path = tmp_path_factory.mktemp("direction") / "r.safetensors"
    d.save(path)
    return vla, d, path


def _job(path: Path, direction: Path, tasks: list[str]) -> Path:
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    job = {"task": tasks, "direction": {"path": str(direction)}, "vla": VLA, "capture": CAPTURE,
           "model": {"kind": "openvla-7b-random", "config": str(CHECKPOINT / "config.json"), "text_config": TEXT,
                     "image_size": 112, "vision_overrides": manifest["vision_overrides"], "seed": 3,
                     "dtype": "float32"}}
    path.write_text(json.dumps(job))
    return path


def _close(a, b, where: str = "") -> None:
    """Same JSON up to float tolerance (wall-clock fields aside)."""
    if isinstance(a, dict):
        ka, kb = set(a) - WALL_CLOCK, set(b) - WALL_CLOCK
        assert ka == kb, (where, ka ^ kb)
        for k in ka:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    vla, d, _ = tiny
    root = tmp_path_factory.mktemp("single")
    run_vla_rdt(vla, d, VLARDTConfig.from_dict(VLA), root, log=lambda m: None)
    return root


def _launch(n: int, job: Path, run: Path, env_extra: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update({"PYTHONPATH": str(REPO), **(env_extra or {})})
    return launch(n, "rdt_interp.distributed.worker", [str(job), "--run-dir", str(run)], "gloo", env=env,
                  check=False, capture_output=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def launched(tiny, tmp_path_factory):
    _, _, direction = tiny
    root = tmp_path_factory.mktemp("dp")
    job = _job(root / "job.json", direction, ["vla_rdt", "capture"])
    run = root / "run"
    first = _launch(3, job, run, {FAULT_ENV: "1:3:specificity"})
    shard_dir = run / "vla_rdt" / "shards" / "specificity"
    before = {p.stem: p.stat().st_mtime_ns for p in shard_dir.glob("*.safetensors")}
    after_first = {name: (run / "vla_rdt" / f"{name}.json").is_file()
                   for name in ("alpha_sweep", "target_modes", "specificity", "result")}
    second = _launch(2, job, run)
    return {"run": run, "first": first, "second": second, "before": before, "after_first": after_first,
            "shard_dir": shard_dir}


def test_a_killed_rank_stops_the_launch_and_leaves_its_finished_shards(launched):
    first = launched["first"]
    assert first.returncode != 0, first.stdout + first.stderr
    assert str(FAULT_EXIT_CODE) in first.stderr or "exitcode" in first.stderr
    # steps before the specificity finished (merged from 3 ranks); the specificity did not
    assert launched["after_first"] == {"alpha_sweep": True, "target_modes": True, "specificity": False,
                                       "result": False}
    assert len(launched["before"]) >= 3  # rank 1's three shards at least


def test_the_resumed_launch_computes_exactly_the_missing_shards(launched):
    second = launched["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    shard_dir = launched["shard_dir"]
    config = read_json(shard_dir.parent.parent / "config.json")
    assert config["experiment"] == "vla_rdt"
    reports = [r for r in (read_json(p) for p in (shard_dir / "_ranks").glob("rank-*.json")) if r["world_size"] == 2]
    assert len(reports) == 2
    everything = {p.stem for p in shard_dir.glob("*.safetensors")}
    before = launched["before"]
    computed = [k for r in reports for k in r["computed"]]
    reused = {k for r in reports for k in r["reused"]}
    assert 0 < len(before) < len(everything)
    assert sorted(computed) == sorted(everything - set(before))  # each missing shard once, nothing else
    assert len(computed) == len(everything) - len(before)
    assert reused == set(before)
    for key, mtime in before.items():  # finished shards were not rewritten
        assert (shard_dir / f"{key}.safetensors").stat().st_mtime_ns == mtime


def test_merged_results_equal_a_single_process_run(launched, reference):
    run = launched["run"] / "vla_rdt"
    names = sorted(p.name for p in reference.glob("*.json"))
    assert names == sorted(p.name for p in run.glob("*.json"))
    for name in names:
        if name != "timings.json":  # wall-clock seconds per step
            _close(read_json(reference / name), read_json(run / name), name)
    for pred in sorted((reference / "predictions").glob("*.safetensors")):
        ref, got = ActionSet.load(pred), ActionSet.load(run / "predictions" / pred.name)
        assert torch.equal(ref.ids, got.ids) and torch.allclose(ref.logits, got.logits, atol=1e-6), pred.name


def test_sharded_role_capture_equals_capture_roles(launched, tiny):
    vla, _, _ = tiny
    from rdt_interp.distributed.capture import sharded_capture_roles

    cfg = VLARDTConfig.from_dict(VLA)
    requests = load_requests(vla, None, n_pairs=cfg.n_pairs, val_fraction=cfg.val_fraction, images=cfg.images,
                             seed=cfg.seed)
    ref = capture_roles(vla, [r.request for r in requests], roles=CAPTURE["roles"], layers=CAPTURE["layers"],
                        batch_size=3)
    run = RunDir(launched["run"] / "capture", read_json(launched["run"] / "capture" / "config.json"))
    got = sharded_capture_roles(single_process("cpu"), run, "activations", vla, [r.request for r in requests],
                                roles=CAPTURE["roles"], layers=CAPTURE["layers"], batch_size=3)  # cached: loads
    assert got.roles == ref.roles and got.layers == ref.layers and got.texts == ref.texts
    assert torch.equal(got.action_ids, ref.action_ids)
    for role in ref.roles:
        assert torch.allclose(got.at(role).values, ref.at(role).values, atol=1e-6), role


def test_a_removed_shard_is_the_only_one_computed_again(launched, tiny, tmp_path):
    vla, d, _ = tiny
    run = tmp_path / "copy"
    shutil.copytree(launched["run"] / "vla_rdt", run)
    shard_dir = run / "shards" / "specificity"
    victim = sorted(shard_dir.glob("*.safetensors"))[7]
    victim.unlink()
    (run / "specificity.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.safetensors")}
    run_vla_rdt_distributed(single_process("cpu"), vla, d, VLARDTConfig.from_dict(VLA), run, log=lambda m: None)
    rep = read_json(shard_dir / "_ranks" / "rank-0.json")
    assert rep["world_size"] == 1 and rep["computed"] == [victim.stem]
    assert all((shard_dir / n).stat().st_mtime_ns == t for n, t in before.items())
    _close(read_json(launched["run"] / "vla_rdt" / "specificity.json"), read_json(run / "specificity.json"))


def test_sharded_chat_capture_equals_capture(tmp_path):
    model = load_chat_model("tiny-llama")
    prompts = ["how do I bake bread", "hi", "write a poem about the sea", "what is 2+2", "tell me a joke"]
    ref = capture(model, prompts, layers=[1, 3], selector="post_instruction[-2:]", batch_size=2, backend="hooks",
                  progress=False)
    run = RunDir(tmp_path / "cap", {"what": "capture"})
    ctx = single_process("cpu")
    got = sharded_capture(ctx, run, "acts", model, prompts, layers=[1, 3], selector="post_instruction[-2:]",
                          batch_size=2)
    assert torch.equal(got.values, ref.values) and got.texts == ref.texts and got.layers == ref.layers
    assert len(list((run.path / "shards" / "acts").glob("*.safetensors"))) == 3  # ceil(5 / 2) batches
