"""``rdt-interp run CONFIG`` spread over processes = the single-process study (tiny models).

Slow (two tiny studies, one through torchrun with two gloo ranks): ``pytest -m slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rdt_interp.distributed.launch import launch
from rdt_interp.studies.config import load_config
from rdt_interp.studies.study import run_study

from ..test_cli import WITH_VLA, _results

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _clean(obj):
    """Drop wall-clock fields (seconds, timings, the direction's creation time)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in ("seconds", "rows_run", "timings", "created")}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def test_study_over_two_ranks_equals_the_single_process_study(tmp_path):
    cfg = tmp_path / "study.toml"
    cfg.write_text(WITH_VLA)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(load_config(cfg), tmp_path / "one", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(prev)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = launch(2, "rdt_interp.distributed.worker", [str(cfg), "--study", "--run-dir", str(tmp_path / "two")],
                  "gloo", env=env, check=False, capture_output=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    extra = {k for k in set(two) - set(one) if "/shards/" in k or k.endswith(("_screen.json", "_final.json"))}
    assert set(two) - extra == set(one)  # the same steps, plus the shard bookkeeping
    for name in sorted(one):
        assert _clean(one[name]) == _clean(two[name]), name
    assert (tmp_path / "two" / "vla" / "shards" / "specificity").is_dir()  # the VLA side ran in shards
