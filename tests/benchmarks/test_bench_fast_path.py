"""The fast-path benchmark's CPU smoke run produces a complete, consistent report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fast_path.py"


@pytest.mark.slow
def test_tiny_cpu_run(tmp_path, capsys):
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_fast_path", BENCH)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = tmp_path / "fast.json"
        mod.main(["--tiny", "--device", "cpu", "--out", str(out), "--reps", "2", "--warmup", "1",
                  "--agreement-singles", "2"])
    finally:
        sys.path.remove(str(BENCH.parent))
    r = json.loads(out.read_text())
    assert set(r["latency_ms"]) == {f"{v} b={b}" for v in ("eager", "eager+rdt+", "fast", "fast+rdt+")
                                    for b in (1, 32)}
    for agree in r["agreement"].values():  # fp32 on CPU: the fast path is the eager path's tokens
        assert agree["rows_identical"] == 1.0
    assert r["alpha_change"] == {"new_steps": 0, "new_graphs": 0}
    floor = r["floor"]["1"]
    assert floor["roofline_floor_s"] >= floor["bandwidth_floor_s"] > 0
    assert floor["forward_passes"] == 7
    assert "fast+RDT+ / bandwidth floor" in capsys.readouterr().out
