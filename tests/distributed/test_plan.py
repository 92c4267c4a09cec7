"""Shard plans, their assignment to ranks, shard files, the launcher's command line, job files."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdt_interp.distributed.context import NCCL_SAFE_ENV, single_process
from rdt_interp.distributed.jobs import parse_job
from rdt_interp.distributed.launch import launch_env, torchrun_command
from rdt_interp.distributed.plan import Shard, ShardPlan, assign
from rdt_interp.distributed.shards import (
    MissingShardsError,
    ShardStore,
    compute_shards,
    read_reports,
    run_sharded,
)
from rdt_interp.errors import ConfigError
from rdt_interp.studies.rundir import RunDir


def _plan(costs, name="p", inputs=None) -> ShardPlan:
    return ShardPlan.build(name, [Shard(f"s{i:03d}", c, {"i": i}) for i, c in enumerate(costs)], inputs or {"x": 1})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=50.0), min_size=0, max_size=40), st.integers(1, 9))
def test_assignment_is_a_contiguous_cover_in_plan_order(costs, world):
    plan = _plan(costs)
    parts = assign(plan, world)
    assert len(parts) == world
    flat = [s.key for part in parts for s in part]
    assert flat == list(plan.keys)  # every shard once, order kept, contiguous runs by rank
    assert assign(plan, world) == parts  # deterministic
    total = sum(costs)
    if total > 0:
        biggest = max(costs)
        for part in parts:  # no rank carries more than its share plus one shard
            assert sum(s.cost for s in part) <= total / world + biggest + 1e-9


def test_equal_shards_split_evenly_and_plan_is_independent_of_world_size():
    plan = _plan([1.0] * 12)
    assert [len(p) for p in assign(plan, 3)] == [4, 4, 4]
    sizes = [len(p) for p in assign(plan, 5)]
    assert sum(sizes) == 12 and max(sizes) - min(sizes) <= 1
    assert [len(p) for p in assign(plan, 20)].count(0) == 8
    # what the shards are does not depend on who computes them
    assert _plan([1.0] * 12).digest == plan.digest


def test_plan_digest_covers_inputs_and_specs_and_keys_are_checked():
    a = _plan([1, 2, 3])
    assert _plan([1, 2, 3], inputs={"x": 2}).digest != a.digest
    b = ShardPlan.build("p", [Shard("s000", 1, {"i": 9}), *a.shards[1:]], {"x": 1})
    assert b.digest != a.digest
    with pytest.raises(ConfigError, match="repeats"):
        ShardPlan.build("p", [Shard("k"), Shard("k")], {})
    for bad in ("a/b", ".hidden", ""):
        with pytest.raises(ConfigError, match="cannot name a file"):
            Shard(bad)
    with pytest.raises(ConfigError, match="world_size"):
        assign(a, 0)


def test_shard_store_round_trip_corruption_and_foreign_plans(tmp_path, caplog):
    plan = _plan([1, 1, 1])
    store = ShardStore(tmp_path, plan)
    s0, s1, s2 = plan.shards
    store.save(s0, {"v": torch.arange(3.0)}, {"rows": [0, 1, 2]})
    store.save(s1, {"v": torch.ones(2)}, {})
    t, meta = store.load(s0)
    assert torch.equal(t["v"], torch.arange(3.0)) and meta["rows"] == [0, 1, 2] and meta["key"] == "s000"
    assert [s.key for s in store.missing()] == ["s002"]
    with pytest.raises(MissingShardsError, match="s002"):
        store.load_all()
    # a flipped byte in the data: detected by the checksum, the shard counts as missing
    raw = bytearray(store.path(s1).read_bytes())
    raw[-1] ^= 0xFF
    store.path(s1).write_bytes(bytes(raw))
    assert store.load(s1) is None and "corrupted" in caplog.text
    # a file written for another plan (other config) is not reused
    other = ShardStore(tmp_path, _plan([1, 1, 1], inputs={"x": 2}))
    assert other.load(s0) is None
    store.save(s2, {"v": torch.zeros(1)}, {})
    assert [s.key for s in store.missing()] == ["s001"]


def test_run_sharded_computes_only_missing_shards_and_caches_the_merge(tmp_path):
    plan = _plan([1, 2, 3, 4])
    ctx = single_process("cpu")
    run = RunDir(tmp_path / "run", {"k": 1})
    calls = []

    def compute(shard):
        calls.append(shard.key)
        return {"v": torch.tensor([float(shard.spec["i"])])}, {}

    def merge(shards):
        return {"sum": sum(float(t["v"]) for t, _ in shards.values())}

    assert run_sharded(ctx, run, "step", plan, compute, merge) == {"sum": 6.0}
    assert calls == list(plan.keys)
    store = ShardStore(run.path / "shards" / "step", plan)
    assert read_reports(store)[0]["computed"] == list(plan.keys)
    # the merged step is cached: nothing runs
    assert run_sharded(ctx, run, "step", plan, compute, merge) == {"sum": 6.0} and len(calls) == 4
    # lose the merge and one shard: only that shard runs again
    run.file("step.json").unlink()
    store.path("s002").unlink()
    calls.clear()
    assert run_sharded(ctx, run, "step", plan, compute, merge) == {"sum": 6.0}
    assert calls == ["s002"]
    rep = read_reports(store)[0]
    assert rep["computed"] == ["s002"] and sorted(rep["reused"]) == ["s000", "s001", "s003"]
    # rank 1 of 2 computes its share only (no process group needed for that part)
    ctx1 = single_process("cpu")
    ctx1.rank, ctx1.world_size = 1, 2
    store2 = ShardStore(tmp_path / "other", plan)
    calls.clear()
    compute_shards(ctx1, store2, compute)
    assert calls == [s.key for s in assign(plan, 2)[1]]


def test_torchrun_command_and_environment():
    cmd = torchrun_command(4, "rdt_interp.distributed.worker", ["job.toml", "--run-dir", "r"], "nccl")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4" and "--standalone" in cmd
    tail = cmd[cmd.index("-m", 3):]
    assert tail == ["-m", "rdt_interp.distributed.worker", "job.toml", "--run-dir", "r", "--backend", "nccl"]
    script = torchrun_command(2, "benchmarks/bench_distributed.py", ["--tiny"], "gloo")
    assert script[-2:] == ["benchmarks/bench_distributed.py", "--tiny"]  # scripts get their own flags
    env = launch_env(2, "nccl", env={"PATH": "/bin"})
    assert all(env[k] == v for k, v in NCCL_SAFE_ENV.items()) and env["OMP_NUM_THREADS"].isdigit()
    assert launch_env(2, env={"NCCL_NVLS_ENABLE": "1"})["NCCL_NVLS_ENABLE"] == "0"  # never on
    with pytest.raises(ConfigError):
        torchrun_command(0, "m")
    with pytest.raises(ConfigError, match="backend"):
        torchrun_command(2, "m", backend="mpi")


def test_job_files_are_validated():
    base = {"task": "capture", "model": {"kind": "chat", "path": "tiny-llama"}, "capture": {"split": "harmful_val"}}
    job = parse_job(base)
    assert job.tasks == ("capture",) and job.devices_per_rank == 1
    assert json.loads(json.dumps(job.to_dict()))["task"] == ["capture"]
    for bad, msg in [({**base, "extra": 1}, "unknown keys"), ({**base, "task": "train"}, "unknown task"),
                     ({**base, "model": {"kind": "gpt"}}, "model.kind"),
                     ({**base, "model": {"kind": "chat", "colour": 1}}, r"\[model\] is invalid:\n  colour: unknown key"),
                     ({**base, "capture": {"prompts": 3}}, r"\[capture\] is invalid:\n  prompts: unknown key"),
                     ({**base, "task": "vla_rdt"}, "direction"),
                     ({**base, "task": "specificity", "direction": {"random": {}}}, "vla.alpha"),
                     ({**base, "task": "sweep", "direction": {"random": {}}, "vla": {"colour": 1}}, "unknown")]:
        with pytest.raises(ConfigError, match=msg):
            parse_job(bad)
