"""Shared fixtures. Unit tests use tiny random models built in-process (seeded, no download);
tests marked ``real_model`` load the offline Qwen2.5-Coder-0.5B-Instruct (cached after the first
load in the user cache directory)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
