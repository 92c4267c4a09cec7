"""Job files for the distributed worker: which model each rank builds, which direction, what to run.

A job is a JSON or TOML file (``python -m rdt_interp.distributed.worker JOB --run-dir DIR``)::

    task = "vla_rdt"                 # vla_rdt | sweep | specificity | capture (or a list of them)

    [model]                          # every rank builds its own copy on its own device
    kind = "openvla-7b-random"       # a study config's vla_model.adapter name, or chat
    config = "openvla-7b"            # openvla-7b-random: "openvla-7b", a config.json path, or a table
    dtype = "bfloat16"
    seed = 0                         # same seed -> same weights on every rank (checked by digest)
    # path = "/ckpt/openvla-7b"      # openvla / testbed (trained delta) / chat (registry name or dir)
    # tokenizer = "byte"             # openvla-7b-random: byte-level stand-in (default) or a directory
    # devices_per_rank = 2           # model parallelism inside each rank (layers over 2 GPUs)

    [direction]
    path = "direction.safetensors"   # a saved Direction ...
    # random = { seed = 0, norm = 8.0, layer = 14 }   # ... or a seeded random one

    [vla]                            # the [vla] section of a study config (VLARDTConfig)
    alphas = [2.0, 4.0]

    [capture]                        # task "capture": a chat model captures prompts at a selector,
    split = "harmful_train"          # a VLA captures its requests by role
    n = 64
    layers = [10, 14]
    selector = "post_instruction[-1]"
    roles = ["last_text", "first_action"]
    batch_size = 16

Tasks ``sweep`` (the alpha sweep) and ``specificity`` (at ``vla.alpha``, which must be set) run
one step of the VLA study on their own; ``vla_rdt`` runs the whole study.

Every section is validated by the study config's schema check
(:func:`rdt_interp.studies.config.validate_section`: strict types, unknown keys refused), the
``[vla]`` section as the study config's own ``[vla]``; model kinds are the study config's
``vla_model.adapter`` names (``openvla-random``, the old name of ``openvla-7b-random``, is still
read).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rdt_interp.errors import ConfigError
from rdt_interp.studies.config import VLA_KINDS, Dtype, validate_section
from rdt_interp.studies.vla.config import VLARDTConfig

TASKS = ("vla_rdt", "sweep", "specificity", "capture")
MODEL_KINDS: tuple[str, ...] = (*VLA_KINDS, "chat")
#: names of model kinds that older job files use
KIND_ALIASES = {"openvla-random": "openvla-7b-random"}


@dataclass(frozen=True)
class JobModel:
    """``[model]``: what every rank builds (checked by :func:`validate_section`)."""

    kind: Literal["testbed", "testbed-tiny", "openvla", "openvla-7b-random", "chat"]
    config: str | dict[str, Any] = "openvla-7b"
    dtype: Dtype | None = None
    seed: int = 0
    path: str | None = None
    tokenizer: str | None = None
    vision_overrides: dict[str, Any] | None = None
    text_config: dict[str, Any] | None = None
    image_size: int | None = None
    devices_per_rank: int = 1
    constrain_actions: bool = False
    n_layers: int | None = None

    def __post_init__(self) -> None:
        if self.devices_per_rank < 1:
            raise ConfigError("model.devices_per_rank must be >= 1")


@dataclass(frozen=True)
class JobCapture:
    """``[capture]``: what task ``capture`` captures."""

    split: str = "harmful_train"
    file: str | None = None
    n: int | None = None
    layers: tuple[int, ...] | None = None
    selector: str = "last"
    site: str = "resid_pre"
    roles: tuple[str, ...] | None = None
    batch_size: int = 16
    backend: Literal["hooks", "nnsight"] = "hooks"


@dataclass(frozen=True)
class Job:
    tasks: tuple[str, ...]
    model: Mapping[str, Any]
    direction: Mapping[str, Any] = field(default_factory=dict)
    vla: Mapping[str, Any] = field(default_factory=dict)
    capture: Mapping[str, Any] = field(default_factory=dict)
    source: str = "job"

    def to_dict(self) -> dict[str, Any]:
        return {"task": list(self.tasks), "model": dict(self.model), "direction": dict(self.direction),
                "vla": dict(self.vla), "capture": dict(self.capture)}

    @property
    def devices_per_rank(self) -> int:
        return int(self.model.get("devices_per_rank", 1))


def parse_job(data: Mapping[str, Any], *, source: str = "job") -> Job:
    """Validate a job mapping; unknown keys and tasks are errors that name the key."""
    unknown = sorted(set(data) - {"task", "model", "direction", "vla", "capture"})
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}", fix="see docs/distributed.md for the job format")
    task = data.get("task", "vla_rdt")
    tasks = (task,) if isinstance(task, str) else tuple(task)
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ConfigError(f"{source}: unknown task(s) {bad or tasks}", fix=f"use one or more of {list(TASKS)}")
    model = dict(data.get("model") or {})
    if model.get("kind") in KIND_ALIASES:
        model["kind"] = KIND_ALIASES[model["kind"]]
    if model.get("kind") not in MODEL_KINDS:
        raise ConfigError(f"{source}: model.kind must be one of {list(MODEL_KINDS)}, got {model.get('kind')!r}")
    validate_section(JobModel, model, source=f"{source} [model]")
    cap = dict(data.get("capture") or {})
    validate_section(JobCapture, cap, source=f"{source} [capture]")
    vla = dict(data.get("vla") or {})
    if any(t in ("vla_rdt", "sweep", "specificity") for t in tasks):
        cfg = validate_section(VLARDTConfig, vla, source=f"{source} [vla]")  # the study config's [vla]
        if "specificity" in tasks and cfg.alpha is None:
            raise ConfigError(f"{source}: task 'specificity' needs vla.alpha", fix="set [vla] alpha = ...")
        if not data.get("direction"):
            raise ConfigError(f"{source}: the VLA tasks need a [direction] (path or random)")
    return Job(tasks, model, dict(data.get("direction") or {}), vla, cap, source)


def load_job(path: str | os.PathLike[str]) -> Job:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}") from None
    return parse_job(data, source=str(p))


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}", fix="use float32, bfloat16 or float16")
    return dt


def _openvla_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    from rdt_interp.models.openvla import openvla_7b_config

    src = spec.get("config", "openvla-7b")
    if isinstance(src, Mapping):
        cfg = json.loads(json.dumps(src))
    elif src == "openvla-7b":
        cfg = openvla_7b_config()
    else:
        cfg = json.loads(Path(src).read_text())
    if "text_config" in spec:
        cfg["text_config"] = {**cfg.get("text_config", {}), **dict(spec["text_config"])}
    if "image_size" in spec:
        cfg["image_sizes"] = [int(spec["image_size"])] * 2
    return cfg


def _tokenizer(spec: Mapping[str, Any]) -> Any:
    tok = spec.get("tokenizer", "byte")
    if tok == "byte":
        from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer

        return byte_tokenizer(TINY_SPECS["tiny-llama"])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok)


def build_model(spec: Mapping[str, Any], device: str | torch.device) -> Any:
    """The adapter ``spec`` describes, on ``device`` (each rank calls this with its own)."""
    kind = KIND_ALIASES.get(spec["kind"], spec["kind"])
    dev = torch.device(device)
    default = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype = _dtype(spec.get("dtype"), default)
    seed = int(spec.get("seed", 0))
    if kind == "openvla-7b-random":
        from rdt_interp.models.openvla import build_random_openvla

        return build_random_openvla(_openvla_config(spec), dtype, dev, seed, tokenizer=_tokenizer(spec),
                                    vision_overrides=spec.get("vision_overrides"),
                                    constrain_actions=bool(spec.get("constrain_actions", False)))
    if kind == "openvla":
        from rdt_interp.models.openvla import load_openvla

        if "path" not in spec:
            raise ConfigError("model.kind = 'openvla' needs model.path (the checkpoint directory)")
        tok = _tokenizer(spec) if "tokenizer" in spec else None
        return load_openvla(spec["path"], dtype=dtype, device=dev, tokenizer=tok,
                            vision_overrides=spec.get("vision_overrides"))
    if kind in ("testbed", "testbed-tiny"):
        from rdt_interp.testbed import adapter as tb

        ad = (tb.build_tiny_testbed_vla(seed, n_layers=int(spec.get("n_layers", 4))) if kind == "testbed-tiny"
              else tb.load_testbed_vla(spec.get("path")))
        ad.model.to(dev)
        if "dtype" in spec:
            ad.model.to(dtype)
        return ad
    from rdt_interp.models.loading import load_chat_model

    if "path" not in spec:
        raise ConfigError("model.kind = 'chat' needs model.path (a registry name, directory or hub id)")
    return load_chat_model(spec["path"], dtype=dtype, device=dev, seed=seed)


def build_direction(spec: Mapping[str, Any], adapter: Any) -> Any:
    """The direction a job names: ``path`` (a saved Direction) or ``random`` (seeded)."""
    from rdt_interp.directions.direction import Direction, Provenance

    if "path" in spec:
        return Direction.load(spec["path"], d_model=adapter.d_model)
    if "random" in spec:
        r = dict(spec["random"])
        gen = torch.Generator().manual_seed(int(r.get("seed", 0)))
        v = torch.randn(adapter.d_model, generator=gen)
        v = v / v.norm() * float(r.get("norm", 1.0))
        layer = int(r.get("layer", adapter.n_layers // 2))
        return Direction(v, Provenance("random", f"seed={int(r.get('seed', 0))}", layer, "", "resid_pre", "random",
                                       created=""))
    raise ConfigError("[direction] needs path = ... or random = {seed, norm, layer}")


__all__ = ["KIND_ALIASES", "MODEL_KINDS", "TASKS", "Job", "JobCapture", "JobModel", "build_direction", "build_model", "load_job", "parse_job"]
