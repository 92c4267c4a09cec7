"""Fixtures for the OpenVLA tests: the reference fixture checkpoint and small random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "openvla_tiny"
CHECKPOINT = FIXTURE / "checkpoint"

WORDS = ("pick", "up", "the", "red", "cup", "and", "put", "it", "on", "the", "blue", "plate", "next",
         "to", "the", "small", "green", "bowl", "near", "the", "left", "edge", "of", "the", "wooden",
         "table")


def instructions(n: int) -> list[str]:
    """``n`` instructions of different lengths (1 .. len(WORDS) words)."""
    return [" ".join(WORDS[: 1 + (3 * i) % len(WORDS)]) for i in range(n)]


def random_images(n: int, seed: int, size: tuple[int, int] = (224, 224)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These models are tiny: a second torch thread buys nothing, and on a loaded machine its
    barrier waits cost more than the work (a single prediction took ~20x the CPU time with 2
    threads than with 1 while other jobs ran). Set per test module here and restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURE / "manifest.json").read_text())


@pytest.fixture(scope="session")
def expected() -> dict:
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="session")
def byte_tok():
    # byte ids are < 260, so they never collide with the fixture's action ids 744..999
    return byte_tokenizer(TINY_SPECS["tiny-llama"])


@pytest.fixture(scope="session")
def tiny_vla(manifest, byte_tok):
    from rdt_interp.models.openvla import load_openvla

    return load_openvla(CHECKPOINT, vision_overrides=manifest["vision_overrides"], tokenizer=byte_tok)


def fixture_config() -> dict:
    return json.loads((CHECKPOINT / "config.json").read_text())


@pytest.fixture(scope="session")
def midsize_vla(manifest):
    """Random OpenVLA with a 4-layer d=256 Llama and OpenVLA-7b's vocabulary (32064).

    Images are 112 px (64 patches) to keep CPU tests fast; the architecture is otherwise OpenVLA's.
    """
    from rdt_interp.models.openvla import build_random_openvla

    cfg = fixture_config()
    cfg["image_sizes"] = [112, 112]
    cfg["text_config"] = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
                          "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                          "vocab_size": 32064, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
    return build_random_openvla(cfg, torch.float32, "cpu", seed=7,
                                vision_overrides=manifest["vision_overrides"])
