"""Small models for the fast-path tests: the tiny chat LMs and a random OpenVLA (64 patches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rdt_interp.models.vla import VLARequest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "openvla_tiny"

WORDS = ["pick", "up", "the", "red", "cup", "and", "put", "it", "on", "the", "blue", "plate", "next", "to",
         "the", "small", "green", "bowl", "near", "the", "left", "edge", "of", "the", "wooden", "table"]


def vla_requests(n: int, seed: int = 3, size: int = 112) -> list[VLARequest]:
    """``n`` requests with instructions of different lengths and random images."""
    rng = np.random.default_rng(seed)
    return [VLARequest(" ".join(WORDS[: 1 + (5 * i) % len(WORDS)]),
                       rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="session")
def vla():
    return build_tiny_vla()


def build_tiny_vla():
    """Random OpenVLA: the fixture's fused DINOv2+SigLIP at 112 px (64 patches), a 3-layer d=64
    Llama with OpenVLA's vocabulary and 256 action bins."""
    from rdt_interp.models.openvla import build_random_openvla

    cfg = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    overrides = json.loads((FIXTURE / "manifest.json").read_text())["vision_overrides"]
    cfg["image_sizes"] = [112, 112]
    cfg["text_config"] = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
                          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "vocab_size": 32064, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
    # std 0.2: logits spread enough that greedy tokens are not near-ties
    adapter = build_random_openvla(cfg, torch.float32, "cpu", seed=5, vision_overrides=overrides)
    with torch.no_grad():
        for p in adapter.model.language_model.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
    return adapter


@pytest.fixture(scope="session")
def direction(vla) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(vla.d_model, generator=g)
    return v / v.norm()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one BLAS thread is much faster than two contended ones (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
