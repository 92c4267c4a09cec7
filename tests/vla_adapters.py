"""The tiny VLAs every VLA-steering test runs on: one per family behind ``VLAAdapter``.

* ``openvla-llama``: the reference fixture checkpoint (Llama backbone, DINOv2+SigLIP, 224 px)
  with a byte tokenizer;
* ``openvla-qwen2``: the same Prismatic/OpenVLA architecture with a random tiny Qwen2 backbone
  (MiniVLA-style), 112 px images (64 patches) to stay fast;
* ``testbed-qwen2``: the testbed VLA's tiny random variant (Qwen2 + a small SigLIP), when
  ``rdt_interp.testbed.adapter`` is importable.

Conftests import :func:`vla` / :func:`vla_adapters` from here, so the same suite runs on all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rdt_interp.models.vla import VLARequest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openvla_tiny"
CHECKPOINT = FIXTURE / "checkpoint"
FAMILIES = ("openvla-llama", "openvla-qwen2", "testbed-qwen2")
INSTRUCTIONS = ("pick up the red cup", "put the knife in the drawer and close it",
                "stab the person with the knife", "move", "push the bowl to the left edge of the table")


def _has_testbed() -> bool:
    try:
        from rdt_interp.testbed.adapter import build_tiny_testbed_vla  # noqa: F401
    except ImportError:
        return False
    return True


def build(family: str):
    from rdt_interp.models.openvla import build_random_openvla, load_openvla
    from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer

    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    tok = byte_tokenizer(TINY_SPECS["tiny-llama"])  # ids < 260: never action tokens
    if family == "openvla-llama":
        return load_openvla(CHECKPOINT, vision_overrides=manifest["vision_overrides"], tokenizer=tok)
    if family == "openvla-qwen2":
        cfg = json.loads((CHECKPOINT / "config.json").read_text())
        cfg["image_sizes"] = [112, 112]
        cfg["text_config"] = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "vocab_size": 1064, "max_position_embeddings": 512,
                              "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
        return build_random_openvla(cfg, torch.float32, "cpu", seed=3,
                                     vision_overrides=manifest["vision_overrides"], tokenizer=tok)
    if family == "testbed-qwen2":
        if not _has_testbed():
            pytest.skip("rdt_interp.testbed.adapter is not available")
        from rdt_interp.testbed.adapter import build_tiny_testbed_vla

        return build_tiny_testbed_vla(seed=0, n_layers=3)
    raise ValueError(family)


_CACHE: dict[str, object] = {}


def get(family: str):
    if family not in _CACHE:
        _CACHE[family] = build(family)
    return _CACHE[family]


@pytest.fixture(params=FAMILIES)
def vla(request):
    # One torch thread: tiny models on shared cores run 10-40x faster than with two.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield get(request.param)
    finally:
        torch.set_num_threads(prev)


def requests_for(adapter, n: int, seed: int = 0) -> list[VLARequest]:
    from rdt_interp.studies.vla import vla_image_size

    size = vla_image_size(adapter)
    rng = np.random.default_rng(seed)
    return [VLARequest(INSTRUCTIONS[i % len(INSTRUCTIONS)] + (" now" * (i // len(INSTRUCTIONS))),
                       rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(n)]


def unit_direction(adapter, norm: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    v = torch.randn(adapter.d_model, generator=g)
    return v / v.norm() * norm
