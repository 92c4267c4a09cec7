"""Labelled VLA requests: instructions paired with images, split by pair into val and test."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLARequest
from rdt_interp.prompts import PromptSet, load_prompt_file, robot_instructions
from rdt_interp.studies.vla.config import _LABEL_ALIASES, LABELS, VLARDTConfig


# -- requests --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LabeledRequest:
    """A request with its label (``harmful``/``benign``), category, pair and split."""

    request: VLARequest
    label: str
    category: str
    pair_id: str
    split: str
    image_seed: int

    @property
    def instruction(self) -> str:
        return self.request.instruction

    def to_dict(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "label": self.label, "category": self.category,
                "pair_id": self.pair_id, "split": self.split, "image_seed": self.image_seed}


def vla_image_size(adapter: Any) -> int:
    """The square image size a VLA's processor expects (224 for OpenVLA)."""
    for get in (lambda a: a.image_size, lambda a: a.config.image_size, lambda a: a.processor.image_size):
        try:
            size = get(adapter)
        except AttributeError:
            continue
        if isinstance(size, int) and size > 0:
            return size
    return 224


def scene_image(instructions: Sequence[str], seed: int, size: int) -> np.ndarray:
    """A testbed tabletop holding the objects ``instructions`` name (when the testbed has them),
    rendered at ``size`` pixels; deterministic in ``(instructions, seed, size)``."""
    from rdt_interp.testbed.dataset import ground_instruction
    from rdt_interp.testbed.scene import render, sample_scene

    required: list[str] = []
    for text in instructions:
        required.extend(ground_instruction(text) or ())
    try:
        scene = sample_scene(seed, tuple(dict.fromkeys(required)))
    except ConfigError:  # too many named objects to place: a scene without them
        scene = sample_scene(seed)
    return render(scene, size)


@functools.lru_cache(maxsize=1)
def _robot_instructions() -> PromptSet:
    return robot_instructions()  # a frozen PromptSet: safe to share between calls


def _normalize_label(label: str, where: str) -> str:
    key = label.strip().lower()
    if key not in _LABEL_ALIASES:
        raise ConfigError(f"{where}: label {label!r} is neither harmful nor benign",
                          fix="label rows harmful / benign (or harmless), or pass label_column=")
    return _LABEL_ALIASES[key]


def load_requests(
    image_size: int | Any,
    prompts: PromptSet | str | Path | None = None,
    *,
    n_pairs: int | None = None,
    val_fraction: float = 0.3,
    images: str = "scenes",
    seed: int = 0,
    column: str = "instruction",
    label_column: str | None = "label",
    category_column: str | None = "category",
    pair_column: str | None = "pair_id",
) -> list[LabeledRequest]:
    """Labelled requests, pair by pair (a pair's instructions share one image and one split).

    ``image_size``: pixels, or an adapter (:func:`vla_image_size`). ``prompts``: a
    :class:`PromptSet`, a JSON/JSONL/CSV file (read with the column mapping), or ``None`` for the
    robot-instruction set. Rows without a pair id form their own pair. ``n_pairs`` pairs are
    sampled (seeded); ``val_fraction`` of them go to ``val``, the rest to ``test``.
    """
    size = image_size if isinstance(image_size, int) else vla_image_size(image_size)
    if prompts is None:
        ps = _robot_instructions()
    elif isinstance(prompts, PromptSet):
        ps = prompts
    else:
        ps = load_prompt_file(prompts, column=column, label_column=label_column,
                              category_column=category_column, pair_column=pair_column)
    groups: dict[str, list[Any]] = {}
    for i, p in enumerate(ps):
        groups.setdefault(p.pair_id or f"row-{i}", []).append(p)
    keys = list(groups)
    rng = random.Random(seed)
    if n_pairs is not None:
        if n_pairs < 1:
            raise ConfigError("n_pairs must be >= 1")
        keys = [keys[i] for i in sorted(rng.sample(range(len(keys)), min(n_pairs, len(keys))))]
    shuffled = keys[:]
    rng.shuffle(shuffled)
    n_val = int(round(val_fraction * len(keys)))
    val = set(shuffled[:n_val])
    out: list[LabeledRequest] = []
    for k, key in enumerate(keys):
        members = sorted(groups[key], key=lambda p: _normalize_label(p.label, ps.name) != "harmful")
        image_seed = seed * 100_003 + k
        texts = [p.instruction for p in members]
        if images == "scenes":
            img = scene_image(texts, image_seed, size)
        elif images == "noise":
            img = np.random.default_rng(image_seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        else:
            raise ConfigError(f"images must be 'scenes' or 'noise', got {images!r}")
        for p in members:
            out.append(LabeledRequest(VLARequest(p.instruction, img), _normalize_label(p.label, ps.name),
                                      p.category, key, "val" if key in val else "test", image_seed))
    labels = {r.label for r in out}
    if labels != set(LABELS):
        raise ConfigError(f"the prompts have labels {sorted(labels)}; RDT needs harmful and benign ones")
    return out


def subset(requests: Sequence[LabeledRequest], split: str | None = None,
            label: str | None = None) -> list[LabeledRequest]:
    return [r for r in requests if (split in (None, "all") or r.split == split)
            and (label is None or r.label == label)]


def config_requests(adapter: Any, config: VLARDTConfig) -> list[LabeledRequest]:
    """The requests a config names (:func:`load_requests` with its prompt file, columns and split)."""
    return load_requests(
        adapter, config.prompt_file, n_pairs=config.n_pairs, val_fraction=config.val_fraction,
        images=config.images, seed=config.seed, column=config.prompt_column, label_column=config.label_column,
        category_column=config.category_column, pair_column=config.pair_column)


def specificity_requests(requests: Sequence[LabeledRequest], config: VLARDTConfig) -> list[LabeledRequest]:
    """The test requests of the first ``config.specificity_pairs`` test pairs."""
    test = subset(requests, "test")
    keep = set(list(dict.fromkeys(r.pair_id for r in test))[: config.specificity_pairs])
    return [r for r in test if r.pair_id in keep]


def request_counts(requests: Sequence[LabeledRequest]) -> dict[str, int]:
    """``{"val/harmful": n, ...}``: requests per split and label."""
    return {f"{s}/{lab}": len(subset(requests, s, lab)) for s in ("val", "test") for lab in LABELS}


__all__ = ["LabeledRequest", "config_requests", "load_requests", "request_counts", "scene_image",
           "specificity_requests", "subset", "vla_image_size"]
