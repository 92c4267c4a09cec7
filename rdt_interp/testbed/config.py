"""The testbed's training configuration: one frozen dataclass, validated like a study config.

Files (``train_config.json``, a manifest's ``train_config``) and command-line overrides go
through :func:`parse_train_config`, so a typo in a key or a value of the wrong type is one
:class:`~rdt_interp.errors.ConfigError` naming the key (:mod:`rdt_interp.schema`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from rdt_interp.errors import ConfigError
from rdt_interp.schema import strict_schema, validate
from rdt_interp.testbed.adapter import BASE_MODEL, TINY_BASE
from rdt_interp.testbed.model import LoRASpec, TestbedVLAConfig, VisionSpec

PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
Precision = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained delta (with the base model's weights).

    The defaults are the recipe of the committed delta (trained on one H200, ``device="cuda"``,
    ``precision="bfloat16"``); :func:`tiny_config` is the same pipeline at test size.
    """

    seed: int = 0
    base: str = BASE_MODEL  # or "tiny-qwen2" (tests)
    model: TestbedVLAConfig = field(default_factory=lambda: TestbedVLAConfig(
        VisionSpec(image_size=128, patch_size=16, hidden_size=192, depth=6, num_heads=3, mlp_dim=768),
        LoRASpec(rank=8, alpha=16.0)))
    # where and how: "cuda" trains in minutes, "cpu" in hours; bfloat16 is autocast over fp32
    # master weights (the frozen base stays fp32 so the delta adds onto the weights users load)
    device: str = "cpu"
    precision: Precision = "float32"
    workers: int = 1  # processes that generate demonstrations (deterministic for any number)
    # stage 1: vision pretraining on state regression
    vision_samples: int = 60_000
    vision_val_samples: int = 2_000
    vision_epochs: float = 6.0
    vision_batch: int = 256
    vision_lr: float = 1e-3
    vision_ckpt_every: int = 200
    # stage 2: behaviour cloning through the LLM, on fresh demonstrations
    train_samples: int = 150_000
    steps: int = 2_400
    batch_size: int = 64
    lr_vision: float = 5e-5  # the pretrained ViT moves slowly
    lr_projector: float = 1e-3
    lr_lora: float = 5e-4
    lr_rows: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # parallel scheduled sampling: each earlier action token is replaced by the model's own
    # teacher-forced prediction with this probability (ramped up over the first half), so the
    # later dimensions cannot lean on ground-truth earlier ones (greedy decoding never has them)
    scheduled_sampling: float = 0.25
    val_every: int = 300
    val_size: int = 2_048  # greedy validation samples (held-out val-split episodes)
    val_swap: int = 512  # of them, re-predicted with swapped images (does the policy look?)
    ckpt_every: int = 100
    threads: int = 1  # one thread per process is much faster than two on a shared 2-core box

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if not 0.0 <= self.scheduled_sampling < 1.0:
            raise ConfigError(f"scheduled_sampling must be in [0, 1), got {self.scheduled_sampling}")
        if self.val_swap > self.val_size:
            raise ConfigError(f"val_swap ({self.val_swap}) exceeds val_size ({self.val_size})")
        if min(self.train_samples, self.steps, self.batch_size, self.val_size, self.workers) < 1:
            raise ConfigError("train_samples, steps, batch_size, val_size and workers must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "training config") -> TrainConfig:
        """A saved configuration (``train_config.json``, a manifest's ``train_config``), older
        ones included: see :func:`parse_train_config`."""
        return parse_train_config(d, source=source)

    def replace(self, **overrides: Any) -> TrainConfig:
        """This configuration with some fields changed, validated (``--set`` on the command line)."""
        plain = {k: v.to_dict() if isinstance(v, TestbedVLAConfig) else v for k, v in overrides.items()}
        return parse_train_config({**self.to_dict(), **plain}, source="TrainConfig overrides", legacy=False)

    @property
    def vision_steps(self) -> int:
        return math.ceil(self.vision_epochs * self.vision_samples / self.vision_batch)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


strict_schema(TrainConfig, TestbedVLAConfig, VisionSpec, LoRASpec)

#: what the first testbed (manifest format 1, before these keys existed) did instead: one CPU
#: process in fp32, no weight decay, no scheduled sampling, no image swaps in validation, and
#: ``steps * batch_size`` training samples
LEGACY_TRAIN: dict[str, Any] = {"device": "cpu", "precision": "float32", "workers": 1, "weight_decay": 0.0,
                                "scheduled_sampling": 0.0, "val_swap": 0}
#: a model section without ``projector_norm`` describes a model without one
LEGACY_MODEL: dict[str, Any] = {"projector_norm": False}


def parse_train_config(data: Mapping[str, Any], *, source: str = "training config",
                       legacy: bool = True) -> TrainConfig:
    """Validate a training configuration; every unknown key or bad value is named.

    ``legacy=True`` (files): keys that older versions did not write mean what those versions
    did (:data:`LEGACY_TRAIN`, :data:`LEGACY_MODEL`), so every committed manifest still loads.
    """
    d = dict(data)
    if legacy:
        d = {**LEGACY_TRAIN, **d}
        if "train_samples" not in d and isinstance(d.get("steps"), int) and isinstance(d.get("batch_size"), int):
            d["train_samples"] = d["steps"] * d["batch_size"]
        if isinstance(d.get("model"), Mapping):
            d["model"] = {**LEGACY_MODEL, **d["model"]}
    return validate(TrainConfig, d, source=source,
                    fix="see the fields of TrainConfig in rdt_interp/testbed/config.py")


def tiny_config(seed: int = 0, **kw: Any) -> TrainConfig:
    """A configuration that trains a tiny random backbone in seconds (tests of the pipeline)."""
    base = TrainConfig(seed=seed, base=TINY_BASE,
                       model=TestbedVLAConfig(VisionSpec(64, 16, 32, 1, 2, 64), LoRASpec(rank=4, alpha=8.0)),
                       vision_samples=256, vision_val_samples=64, vision_epochs=2.0, vision_batch=64,
                       vision_ckpt_every=3, train_samples=48, steps=12, batch_size=4, warmup=2, val_every=6,
                       val_size=8, val_swap=4, ckpt_every=4, lr_lora=3e-3, lr_rows=3e-3)
    return base.replace(**kw) if kw else base
