"""The VLA study through LocalExecutor and through a 2-process gloo ShardedExecutor: identical.

Both run :func:`rdt_interp.studies.vla.run_vla_rdt` (one pipeline); the sharded run is started
with torchrun (gloo, CPU, one thread per rank, fp32 tiny testbed VLA) through the worker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rdt_interp.distributed.jobs import build_direction, build_model
from rdt_interp.distributed.launch import launch
from rdt_interp.distributed.shards import FAULT_ENV
from rdt_interp.storage import read_json
from rdt_interp.studies.executor import LocalExecutor
from rdt_interp.studies.store import ActionSet
from rdt_interp.studies.vla import VLARDTConfig, run_vla_rdt

REPO = Path(__file__).resolve().parents[2]
MODEL = {"kind": "testbed-tiny", "seed": 0, "dtype": "float32"}
DIRECTION = {"random": {"seed": 3, "norm": 0.5, "layer": 1}}
VLA = dict(alphas=[2.0, 8.0], sweep_modes=["action", "text+action"], n_pairs=4, val_fraction=0.5, images="noise",
           batch_size=3, n_boot=50, n_random=100, specificity_pairs=2, specificity_rows=64, decoupling=False,
           figures=False)
WALL_CLOCK = {"seconds", "rows_run", "timings"}


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def test_local_and_two_rank_sharded_runs_are_identical(tmp_path):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vla = build_model(MODEL, "cpu")
        local = run_vla_rdt(vla, build_direction(DIRECTION, vla), VLARDTConfig.from_dict(VLA), tmp_path / "local",
                            executor=LocalExecutor())
    finally:
        torch.set_num_threads(prev)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"task": "vla_rdt", "model": MODEL, "direction": DIRECTION, "vla": VLA}))
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | {"PYTHONPATH": str(REPO)}
    proc = launch(2, "rdt_interp.distributed.worker", [str(job), "--run-dir", str(tmp_path / "two"), "--threads", "1"],
                  "gloo", env=env, check=False, capture_output=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = tmp_path / "two" / "vla_rdt"
    assert (two / "shards" / "alpha_sweep").is_dir() and (two / "shards" / "specificity").is_dir()
    reports = list((two / "shards" / "specificity" / "_ranks").glob("rank-*.json"))
    assert len(reports) == 2 and all(read_json(p)["computed"] for p in reports)  # both ranks did work
    names = sorted(p.name for p in (tmp_path / "local").glob("*.json") if p.name != "timings.json")
    assert names == sorted(p.name for p in two.glob("*.json") if p.name != "timings.json")
    for name in names:
        assert _clean(read_json(tmp_path / "local" / name)) == _clean(read_json(two / name)), name
    preds = sorted((tmp_path / "local" / "predictions").glob("*.safetensors"))
    assert len(preds) == len(list((two / "predictions").glob("*.safetensors"))) > 0
    for pred in preds:
        a, b = ActionSet.load(pred), ActionSet.load(two / "predictions" / pred.name)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logits, b.logits), pred.name
    assert local.specificity is not None and local.alpha in (2.0, 8.0)

