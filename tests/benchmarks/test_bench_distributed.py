"""The distributed benchmark's CPU smoke run (two gloo ranks) produces a complete, consistent report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_gloo_run(tmp_path):
    out = tmp_path / "bd.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_distributed.py"), "--tiny", "--backend",
                           "gloo", "--nproc", "2", "--prompts", "8", "--run-root", str(tmp_path / "shards"),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NCCL_NVLS_ENABLE=0" in proc.stdout  # the launch line it printed
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["sweep"]["directions"] == 102 and r["sweep"]["prompts"] == 8
    assert r["sweep"]["pairs"] == 102 * 8
    assert r["merged_vs_1_plain"]["identical"] and r["merged_vs_1_sharded"]["identical"]
    assert r["shards_n_vs_1"]["bitwise_equal"] == r["shards_n_vs_1"]["shards"] == r["sweep"]["shards"]
    assert sum(r["per_rank_shards"]) == r["sweep"]["shards"]  # every shard computed once
    assert r["scaling_efficiency"] == pytest.approx(r["speedup"] / 2)
    mp = r["model_parallel"]
    assert mp["same_weights"] and mp["rdt_effect_max_abs_diff"] == 0.0 and mp["rdt_plus_tokens_equal"] == 1.0
    assert "| 2 devices, sharded (2 ranks)" in proc.stdout
