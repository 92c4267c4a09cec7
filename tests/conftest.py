"""Shared fixtures. Unit tests use tiny random models built in-process (seeded, no download);
tests marked ``real_model`` load the offline Qwen2.5-Coder-0.5B-Instruct (cached after the first
load in the user cache directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def triton_interpreted() -> Callable[[str, Any], Any]:
    """Run ``script`` (it reads ``sys.argv[1]`` as JSON, prints its result as JSON on its last line)
    under Triton's interpreter on this CPU, in a fresh process from the repository root: the
    interpreter must be chosen before Triton is first imported, which torch may already have done
    here."""
    pytest.importorskip("triton")

    def run(script: str, payload: Any) -> Any:
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], capture_output=True, text=True,
                              cwd=REPO, timeout=600,
                              env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    return run


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models():
    from rdt_interp.models import load_chat_model

    return {name: load_chat_model(name) for name in ("tiny-llama", "tiny-qwen2", "tiny-gemma")}


@pytest.fixture(params=["tiny-llama", "tiny-qwen2", "tiny-gemma"])
def tiny(request, tiny_models):
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def qwen():
    from rdt_interp.models import load_chat_model

    return load_chat_model("qwen2.5-coder-0.5b-instruct")
