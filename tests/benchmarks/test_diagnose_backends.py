"""The backend diagnosis runs on CPU and reports each pair call by call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "diag.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "diagnose_backends.py"), "--tiny", "--device",
                           "cpu", "--batch", "3", "--out", str(out), *extra], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_both_paths_twice_agree_call_by_call_on_cpu(tmp_path):
    r = _run(tmp_path)
    assert set(r["pairs"]) == {"hooks_a vs hooks_b", "nnsight_a vs nnsight_b", "hooks_a vs nnsight_a"}
    for pair in r["pairs"].values():
        assert pair["tokens_equal"] and pair["first_differing"] is None
        assert pair["max_abs_diff_by_call"] == [0.0] * 7  # the prefill and 6 decode steps, all compared
        assert pair["state"][0] == {"thread": "main", "grad_enabled": False, "inference_mode": True}
    assert set(r["attention_kernels"]) == {"hooks", "nnsight"}
    assert r["attention_kernels"]["hooks"] == r["attention_kernels"]["nnsight"]


@pytest.mark.slow
def test_the_fast_path_replays_identically(tmp_path):
    r = _run(tmp_path, "--condition", "fast")
    assert r["tokens_equal"] and r["max_logit_diff_by_step"] == [0.0] * 7
