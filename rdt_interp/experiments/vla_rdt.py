"""RDT and RDT+ on a VLA: inject a chat model's refusal direction into the VLA's LLM backbone.

Works on any :class:`~rdt_interp.models.vla.VLAAdapter`. The pieces, each a function that
returns a frozen result (``to_dict``/``from_dict``):

* :func:`load_requests` -- instructions (the robot-instruction set, or a user JSON/JSONL/CSV
  file through :func:`rdt_interp.prompts.load_prompt_file`) paired with images: a testbed
  scene per harmful/benign *pair* (both instructions see the same image, so only the text
  differs), rendered at the VLA's input size, or seeded noise. Pairs are split into ``val``
  (choosing alpha) and ``test`` (every reported number).
* :func:`alpha_sweep` / :func:`target_mode_sweep` -- action metrics
  (:func:`rdt_interp.analysis.behaviour.action_metrics`: zero-motion mass, mean bin,
  decoded magnitude, HRR strict/partial, bootstrap CIs) and the paired bin shift against the
  unsteered actions, for harmful and benign instructions, per (target mode, alpha).
* :func:`direction_specificity` -- the effect of ``r`` against >= 100 random directions of the
  same norm (:func:`rdt_interp.analysis.specificity.specificity_test`). For decode-only RDT the
  prefill does not depend on the direction: every prompt batch is prefilled once, its KV cache
  kept, and only the decode steps run per direction, many directions per batch through
  per-row directions (:class:`~rdt_interp.tracing.vla.AddRowDirections`). Modes that edit
  the prefill run full generations, still many directions per batch.
* :func:`decoupling` -- does the VLA still represent harm where RDT acts? Projection AUC along
  ``r``, Cohen's d and CV-probe AUC of harmful vs benign per layer at image / text / last text /
  first action / later action positions (:func:`rdt_interp.analysis.probes.probe_grid`).
* :func:`run_vla_rdt` -- all of it in a resumable run directory
  (:class:`~rdt_interp.experiments.rundir.RunDir`), and :func:`vla_rdt_figures`.

``alpha`` multiplies the direction's ``vector`` as given (a raw diff-in-means vector keeps its
norm; rescale with :meth:`Direction.scaled` to steer in other units). Greedy decoding is
restricted to the action tokens by default (``constrain_actions``): the action metrics need
action tokens, and random or weak VLAs would otherwise emit text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rdt_interp.analysis.behaviour import (
    ActionMetrics,
    BinShift,
    action_metrics,
    bin_shift,
    zero_motion_mass,
)
from rdt_interp.analysis.probes import ProbeGrid, probe_grid
from rdt_interp.analysis.specificity import SpecificityResult, specificity_test
from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError
from rdt_interp.experiments.rundir import RunDir
from rdt_interp.models.action_tokenizer import ActionTokenizer
from rdt_interp.models.adapter import EncodedBatch
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.prompts import PromptSet, load_prompt_file, robot_instructions
from rdt_interp.storage import digest_tensor, load_tensors, save_tensors
from rdt_interp.tracing.generation import generate
from rdt_interp.tracing.vla import (
    TARGET_MODES,
    capture_roles,
    decode_from,
    direction_chunks,
    mode_touches_prefill,
    repeat_rows,
    run_prefill,
    steer_vla,
)

LABELS = ("harmful", "benign")
METRICS = ("zero_mass", "mean_bin", "magnitude", "hrr_strict", "hrr_partial")
SPEC_METRICS = ("zero_mass", "hrr_strict", "hrr_partial", "mean_bin", "abs_bin_shift")
SPEC_METRIC_NAMES = {"zero_mass": "zero-motion mass", "hrr_strict": "HRR strict", "hrr_partial": "HRR partial",
                     "mean_bin": "mean action bin", "abs_bin_shift": "mean |bin shift|"}
_LABEL_ALIASES = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "harmless": "benign",
                  "safe": "benign"}


# -- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VLARDTConfig:
    """Everything :func:`run_vla_rdt` does, in one value (stored in the run directory)."""

    # steering
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    alpha: float | None = None  # the alpha of the target-mode sweep and specificity; None: chosen on val
    sweep_modes: tuple[str, ...] = ("action", "text+action")
    target_modes: tuple[str, ...] = TARGET_MODES
    alpha_text_ratio: float = 1.0  # alpha_text = ratio * alpha (text positions of text modes)
    include_image: bool = False  # text modes also steer the image patches
    layers: tuple[int, ...] | None = None  # None: the direction's own layer
    # requests
    prompt_file: str | None = None  # None: rdt_interp.prompts.robot_instructions()
    prompt_column: str = "instruction"
    label_column: str = "label"
    category_column: str | None = "category"
    pair_column: str | None = "pair_id"
    n_pairs: int | None = None  # None: every pair
    val_fraction: float = 0.3
    images: str = "scenes"  # "scenes" (testbed tabletop) or "noise"
    # decoding
    batch_size: int = 16
    backend: str = "hooks"
    constrain_actions: bool = True
    # metrics
    window: int = 2
    unnorm_key: str | None = None
    partial_min: int = 4
    n_boot: int = 1000
    choose_metric: str = "zero_mass"  # alpha = argmax of this on val (RDT, choose_label)
    choose_label: str = "harmful"
    # specificity
    specificity: bool = True
    specificity_mode: str = "action"
    specificity_metric: str = "zero_mass"
    specificity_pairs: int | None = 16  # test pairs used (None: all)
    n_random: int = 100
    specificity_rows: int = 64  # (prompt, direction) rows per forward pass
    # decoupling
    decoupling: bool = True
    decoupling_roles: tuple[str, ...] = ("image", "text", "last_text", "first_action", "action[3]")
    decoupling_layers: tuple[int, ...] | None = None  # None: every layer
    folds: int = 5  # CV folds, only without a val split (otherwise probes fit on val)
    n_perm: int = 1000
    probe: bool = True
    figures: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("alphas", "sweep_modes", "target_modes", "decoupling_roles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers", "decoupling_layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        bad = [m for m in (*self.sweep_modes, *self.target_modes, self.specificity_mode) if m not in TARGET_MODES]
        if bad:
            raise ConfigError(f"unknown target modes {bad}", fix=f"use {list(TARGET_MODES)}")
        if not self.alphas or any(not math.isfinite(a) for a in self.alphas):
            raise ConfigError("alphas must be a non-empty tuple of finite numbers")
        if self.specificity_metric not in SPEC_METRICS:
            raise ConfigError(f"unknown specificity metric {self.specificity_metric!r}",
                              fix=f"use one of {list(SPEC_METRICS)}")
        if self.choose_metric not in METRICS or self.choose_label not in LABELS:
            raise ConfigError(f"choose_metric/choose_label must be in {list(METRICS)} / {list(LABELS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.images not in ("scenes", "noise"):
            raise ConfigError(f"images must be 'scenes' or 'noise', got {self.images!r}")
        if self.backend not in ("hooks", "nnsight"):
            raise ConfigError(f"backend must be 'hooks' or 'nnsight', got {self.backend!r}")
        if self.batch_size < 1 or self.specificity_rows < 1:
            raise ConfigError("batch_size and specificity_rows must be >= 1")
        # Counts where zero means nothing (no pairs, no bootstrap, no null): bounds, not a
        # silent empty study. ``None`` keeps meaning "all" where the field allows it.
        for name, low in (("n_pairs", 1), ("specificity_pairs", 1), ("n_random", 1), ("n_boot", 1),
                          ("n_perm", 1), ("folds", 2), ("partial_min", 1), ("window", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}",
                                  fix=f"set {name} to at least {low}"
                                  + (" (or leave it out for all)" if name.endswith("pairs") else ""))
        for name in ("alpha", "alpha_text_ratio"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VLARDTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"experiment"})
        if unknown:
            raise ConfigError(f"unknown VLARDTConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


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


def _subset(requests: Sequence[LabeledRequest], split: str | None = None,
            label: str | None = None) -> list[LabeledRequest]:
    return [r for r in requests if (split in (None, "all") or r.split == split)
            and (label is None or r.label == label)]


# -- predictions -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ActionSet:
    """Greedy action tokens ``[n, steps]`` and logits over the action tokens ``[n, steps, n_bins]``."""

    ids: Int[Tensor, "n steps"]
    logits: Float[Tensor, "n steps n_bins"]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, idx: Sequence[int]) -> ActionSet:
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return ActionSet(self.ids[i], self.logits[i])

    def save(self, path: str | Path) -> None:
        save_tensors(path, {"ids": self.ids, "logits": self.logits})

    @classmethod
    def load(cls, path: str | Path) -> ActionSet:
        t, _ = load_tensors(path)
        return cls(t["ids"], t["logits"])


def _allowed(adapter: VLAAdapter, constrain: bool) -> Tensor | None:
    return adapter.action_tokenizer.token_ids if constrain else adapter.allowed_token_ids()


def predict(
    adapter: VLAAdapter,
    requests: Sequence[VLARequest | LabeledRequest],
    interventions: Sequence[Any] = (),
    *,
    batch_size: int = 16,
    backend: str = "hooks",
    constrain_actions: bool = True,
) -> ActionSet:
    """Greedy actions of ``requests`` (length-sorted batches, returned in the caller's order)."""
    reqs = [r.request if isinstance(r, LabeledRequest) else r for r in requests]
    if not reqs:
        raise ConfigError("predict needs at least one request")
    allowed = _allowed(adapter, constrain_actions)
    cols = adapter.action_tokenizer.token_ids
    order = sorted(range(len(reqs)), key=lambda i: (len(reqs[i].instruction), i))
    ids = torch.empty((len(reqs), adapter.action_dim), dtype=torch.long)
    logits = torch.empty((len(reqs), adapter.action_dim, int(cols.numel())), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        gen = generate(adapter, adapter.encode([reqs[i] for i in chunk]), max_new_tokens=adapter.action_dim,
                       interventions=interventions, backend=backend,  # type: ignore[arg-type]
                       allowed_token_ids=allowed, stop_at_eos=False, return_logits=True)
        assert gen.logits is not None
        idx = torch.as_tensor(chunk)
        ids[idx] = gen.tokens.cpu()
        logits[idx] = gen.logits[..., cols].float()
    return ActionSet(ids, logits)


# -- conditions ------------------------------------------------------------------------------------
def as_direction(direction: Direction | Tensor, d_model: int) -> Direction:
    """A :class:`Direction` of width ``d_model`` (a bare tensor gets a ``given`` provenance)."""
    if isinstance(direction, Tensor):
        direction = Direction(direction, Provenance("given", digest_tensor(direction)[:16], -1, "", "", "given",
                                                    created=""))
    return direction.check_d_model(d_model)


def steering_layers(adapter: VLAAdapter, direction: Direction, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``layers``, or the layer the direction was extracted at."""
    if layers is None:
        layer = direction.provenance.layer
        if not 0 <= layer < adapter.n_layers:
            raise ConfigError(f"the direction's layer {layer} is not a layer of {adapter.name} "
                              f"({adapter.n_layers} layers)", fix="set VLARDTConfig(layers=(...))")
        return (layer,)
    out = tuple(int(x) for x in layers)
    if not out or any(not 0 <= x < adapter.n_layers for x in out):
        raise ConfigError(f"layers {list(out)} must be a non-empty subset of 0..{adapter.n_layers - 1}")
    return out


@dataclass(frozen=True, eq=False)
class ConditionResult:
    """Action metrics of one condition (target mode, alpha) on one split, per label.

    ``shift`` is the paired bin shift against the unsteered actions of the same requests;
    ``bin_counts`` counts chosen action bins over every step (the distribution-shift figure).
    Mode ``none`` is the unsteered baseline.
    """

    mode: str
    alpha: float
    alpha_text: float
    split: str
    layers: tuple[int, ...]
    metrics: Mapping[str, ActionMetrics]
    shift: Mapping[str, BinShift]
    bin_counts: Mapping[str, tuple[int, ...]]

    @property
    def name(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}@{self.alpha:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ConditionResult", "mode": self.mode, "alpha": self.alpha,
                "alpha_text": self.alpha_text, "split": self.split, "layers": list(self.layers),
                "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "shift": {k: v.to_dict() for k, v in self.shift.items()},
                "bin_counts": {k: list(v) for k, v in self.bin_counts.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionResult:
        return cls(str(d["mode"]), float(d["alpha"]), float(d["alpha_text"]), str(d["split"]),
                   tuple(int(x) for x in d["layers"]),
                   {k: ActionMetrics.from_dict(v) for k, v in d["metrics"].items()},
                   {k: BinShift.from_dict(v) for k, v in d["shift"].items()},
                   {k: tuple(int(x) for x in v) for k, v in d["bin_counts"].items()})


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Conditions of a sweep (the unsteered baseline of each split included)."""

    conditions: tuple[ConditionResult, ...]
    direction: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)

    def get(self, mode: str, alpha: float, split: str = "test") -> ConditionResult:
        for c in self.conditions:
            if c.split == split and c.mode == mode and (mode == "none" or math.isclose(c.alpha, alpha)):
                return c
        raise ConfigError(f"no condition {mode}@{alpha:g} on split {split!r} in this sweep")

    def baseline(self, split: str = "test") -> ConditionResult:
        return self.get("none", 0.0, split)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.split for c in self.conditions))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.mode for c in self.conditions if c.mode != "none"))

    def series(self, mode: str, label: str, split: str = "test") -> list[tuple[float, ActionMetrics]]:
        """``(alpha, metrics)`` of one mode and label, from the baseline at alpha 0 upwards."""
        pts = [(0.0, self.baseline(split).metrics[label])]
        pts += sorted(((c.alpha, c.metrics[label]) for c in self.conditions
                       if c.split == split and c.mode == mode), key=lambda t: t[0])
        return pts

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "SweepResult", "conditions": [c.to_dict() for c in self.conditions],
                "direction": dict(self.direction), "model": dict(self.model)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepResult:
        return cls(tuple(ConditionResult.from_dict(c) for c in d["conditions"]), dict(d.get("direction", {})),
                   dict(d.get("model", {})))


class _Store:
    """Predictions cached as safetensors in a folder (resume inside a sweep), or in memory."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.mem: dict[str, ActionSet] = {}

    def get(self, key: str, fn: Callable[[], ActionSet]) -> ActionSet:
        if key in self.mem:
            return self.mem[key]
        path = self.root / f"{key}.safetensors" if self.root is not None else None
        if path is not None and path.is_file():
            try:
                out = ActionSet.load(path)
            except Exception:  # corrupted: recompute  # noqa: BLE001
                out = None
            if out is not None:
                self.mem[key] = out
                return out
        out = fn()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out.save(path)
        self.mem[key] = out
        return out


def condition_metrics(
    tok: ActionTokenizer,
    acts: ActionSet,
    base: ActionSet,
    labels: Sequence[str],
    config: VLARDTConfig,
    *,
    mode: str,
    alpha: float,
    alpha_text: float,
    split: str,
    layers: tuple[int, ...],
) -> ConditionResult:
    """The :class:`ConditionResult` of actions ``acts`` (row ``i`` has label ``labels[i]``)
    against the unsteered actions ``base`` of the same requests."""
    if not len(acts) == len(base) == len(labels):
        raise ConfigError(f"{len(acts)} steered rows, {len(base)} unsteered rows, {len(labels)} labels")
    metrics, shift, counts = {}, {}, {}
    for k, label in enumerate(LABELS):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        if not idx:
            continue
        sub, sub_base = acts.rows(idx), base.rows(idx)
        metrics[label] = action_metrics(tok, logits=sub.logits, ids=sub.ids, window=config.window,
                                        unnorm_key=config.unnorm_key, partial_min=config.partial_min,
                                        n_boot=config.n_boot, seed=config.seed + k, label=f"{label} {split}")
        shift[label] = bin_shift(tok, sub_base.ids, sub.ids, paired=True, n_boot=config.n_boot,
                                 seed=config.seed + k)
        bins = tok.ids_to_bins(sub.ids).flatten()
        counts[label] = tuple(int(c) for c in torch.bincount(bins, minlength=tok.n_bins - 1).tolist())
    return ConditionResult(mode, float(alpha), float(alpha_text), split, layers, metrics, shift, counts)


def _run_conditions(adapter: VLAAdapter, direction: Direction, requests: Sequence[LabeledRequest],
                    cfg: VLARDTConfig, conditions: Sequence[tuple[str, float]], splits: Sequence[str],
                    store: _Store | None, progress: bool) -> SweepResult:
    from tqdm.auto import tqdm

    layers = steering_layers(adapter, direction, cfg.layers)
    store = store or _Store(None)
    out: list[ConditionResult] = []
    todo = [(s, m, a) for s in splits for (m, a) in [("none", 0.0), *conditions]]
    bar = tqdm(total=len(todo), desc="conditions", disable=not progress, leave=False)
    for split in splits:
        reqs = _subset(requests, split)
        if not reqs:
            raise ConfigError(f"no requests in split {split!r}", fix="raise n_pairs or val_fraction")

        def run(ivs: Sequence[Any], reqs: list[LabeledRequest] = reqs) -> ActionSet:
            return predict(adapter, reqs, ivs, batch_size=cfg.batch_size, backend=cfg.backend,
                           constrain_actions=cfg.constrain_actions)

        base = store.get(f"{split}-none", lambda: run(()))
        seen: set[str] = set()
        for mode, alpha in [("none", 0.0), *conditions]:
            a_text = cfg.alpha_text_ratio * alpha
            key = "none" if mode == "none" else f"{mode}@{alpha:g}"
            if key in seen:
                bar.update(1)
                continue
            seen.add(key)
            if mode == "none":
                acts = base
            else:
                ivs = steer_vla(direction, mode, alpha, layers, alpha_text=a_text,
                                include_image=cfg.include_image, d_model=adapter.d_model)
                acts = store.get(f"{split}-{key}", lambda ivs=ivs: run(ivs))
            out.append(condition_metrics(adapter.action_tokenizer, acts, base, [r.label for r in reqs], cfg,
                                         mode=mode, alpha=alpha, alpha_text=a_text, split=split, layers=layers))
            bar.update(1)
    bar.close()
    return SweepResult(tuple(out), _direction_info(direction), adapter.describe())


def _direction_info(direction: Direction) -> dict[str, Any]:
    return {"repr": repr(direction), "norm": direction.norm, "rank": direction.rank,
            "digest": digest_tensor(direction.vector)[:16], "provenance": direction.provenance.to_dict()}


def alpha_sweep(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest],
    config: VLARDTConfig,
    *,
    splits: Sequence[str] = ("val", "test"),
    store_dir: str | Path | None = None,
    progress: bool = False,
) -> SweepResult:
    """Action metrics for every ``config.sweep_modes`` x ``config.alphas`` on each split.

    ``store_dir`` caches each condition's predictions (a killed sweep resumes per condition).
    """
    d = as_direction(direction, adapter.d_model)
    present = [s for s in splits if _subset(requests, s)]
    conds = [(m, float(a)) for m in config.sweep_modes for a in config.alphas]
    return _run_conditions(adapter, d, requests, config, conds, present,
                           _Store(Path(store_dir)) if store_dir else None, progress)


def target_mode_sweep(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest],
    config: VLARDTConfig,
    alpha: float,
    *,
    split: str = "test",
    store_dir: str | Path | None = None,
    progress: bool = False,
) -> SweepResult:
    """Action metrics of every ``config.target_modes`` at one ``alpha`` (and the baseline)."""
    d = as_direction(direction, adapter.d_model)
    conds = [(m, float(alpha)) for m in config.target_modes]
    return _run_conditions(adapter, d, requests, config, conds, [split],
                           _Store(Path(store_dir)) if store_dir else None, progress)


def choose_alpha(sweep: SweepResult, *, mode: str = "action", split: str = "val", label: str = "harmful",
                 metric: str = "zero_mass") -> tuple[float, dict[str, Any]]:
    """The alpha (> 0) with the highest ``metric`` for ``label`` on ``split``; ties -> smaller."""
    pts = [(a, m) for a, m in sweep.series(mode, label, split) if a > 0]
    if not pts:
        raise ConfigError(f"the sweep has no alpha > 0 for mode {mode!r} on split {split!r}")
    vals = [(float(m.value(metric)[0]), -a, a) for a, m in pts]
    best = max(vals)[2]
    return best, {"mode": mode, "split": split, "label": label, "metric": metric,
                  "values": {f"{a:g}": v for v, _, a in vals}, "baseline": float(
                      sweep.baseline(split).metrics[label].value(metric)[0])}


# -- specificity -----------------------------------------------------------------------------------
def _select_batch(batch: EncodedBatch, rows: Tensor) -> EncodedBatch:
    idx = rows.to(batch.attention_mask.device)
    inputs = {k: v.index_select(0, idx.to(v.device)) if isinstance(v, Tensor) else v
              for k, v in batch.inputs.items()}
    return dataclasses.replace(
        batch, inputs=inputs, roles=batch.roles.index_select(0, rows.to(batch.roles.device)),
        attention_mask=batch.attention_mask.index_select(0, idx),
        position_ids=batch.position_ids.index_select(0, idx),
        texts=[batch.texts[i] for i in rows.tolist()] if batch.texts else [])


class SteeringEffect:
    """``effect(directions[k, d]) -> [k]``: a scalar action metric after steering with each
    direction (``alpha`` times it, target ``mode``), averaged over ``requests``.

    Mode ``action`` (RDT) prefills every prompt batch once, keeps the KV caches and runs only
    the decode steps per direction; other modes rerun the prompts. Either way many directions
    share a forward pass: rows are (prompt, direction) pairs with per-row directions, at most
    ``max_rows`` per pass. The metric is averaged per prompt first, then over prompts.
    ``reuse_prefill=False`` forces full runs (for checking the reuse).
    """

    name = "steering effect"

    def __init__(self, adapter: VLAAdapter, requests: Sequence[VLARequest | LabeledRequest], *, alpha: float,
                 layers: Sequence[int], mode: str = "action", metric: str = "zero_mass",
                 alpha_text: float | None = None, include_image: bool = False, batch_size: int = 16,
                 max_rows: int = 64, backend: str = "hooks", constrain_actions: bool = True,
                 window: int = 2, unnorm_key: str | None = None, partial_min: int = 4,
                 reuse_prefill: bool | None = None) -> None:
        if metric not in SPEC_METRICS:
            raise ConfigError(f"unknown metric {metric!r}", fix=f"use one of {list(SPEC_METRICS)}")
        self.adapter = adapter
        self.reqs = [r.request if isinstance(r, LabeledRequest) else r for r in requests]
        if not self.reqs:
            raise ConfigError("the steering effect needs at least one request")
        self.alpha, self.layers, self.mode, self.metric = float(alpha), tuple(layers), mode, metric
        self.alpha_text = self.alpha if alpha_text is None else float(alpha_text)
        self.include_image, self.max_rows, self.backend = include_image, max_rows, backend
        self.window, self.unnorm_key, self.partial_min = window, unnorm_key, partial_min
        self.allowed = _allowed(adapter, constrain_actions)
        can_reuse = not mode_touches_prefill(mode)
        if reuse_prefill and not can_reuse:
            raise ConfigError(f"mode {mode!r} edits the prefill: a stored prefill cannot be reused",
                              fix="use mode 'action' (RDT) or reuse_prefill=None")
        self.reuse = can_reuse if reuse_prefill is None else bool(reuse_prefill)
        self.name = f"{SPEC_METRIC_NAMES[metric]}, {mode} α = {self.alpha:g}"
        self.batches = [self.reqs[i:i + batch_size] for i in range(0, len(self.reqs), batch_size)]
        self.encoded = [adapter.encode(b) for b in self.batches]
        self.calls = 0
        self.rows_run = 0
        self.prefills = [run_prefill(adapter, b, backend=backend) for b in self.encoded] if self.reuse else []
        self.base_bins = [self._decode(k, None, torch.arange(len(b))).ids
                          for k, b in enumerate(self.encoded)] if metric == "abs_bin_shift" else []

    def _decode(self, k: int, dirs: Tensor | None, prompt_rows: Tensor) -> ActionSet:
        ad = self.adapter
        cols = ad.action_tokenizer.token_ids
        ivs = [] if dirs is None else steer_vla(dirs, self.mode, self.alpha, self.layers, alpha_text=self.alpha_text,
                                                include_image=self.include_image, per_row=True)
        if self.reuse:
            gen = decode_from(ad, self.prefills[k], max_new_tokens=ad.action_dim, rows=prompt_rows,
                              interventions=ivs, backend=self.backend,  # type: ignore[arg-type]
                              allowed_token_ids=self.allowed, return_logits=True, logit_columns=cols)
            logits = gen.logits
        else:
            gen = generate(ad, _select_batch(self.encoded[k], prompt_rows), max_new_tokens=ad.action_dim,
                           interventions=ivs, backend=self.backend,  # type: ignore[arg-type]
                           allowed_token_ids=self.allowed, stop_at_eos=False, return_logits=True)
            logits = gen.logits[..., cols] if gen.logits is not None else None
        assert logits is not None
        self.rows_run += int(prompt_rows.numel())
        return ActionSet(gen.tokens.cpu(), logits.float())

    def _per_row(self, acts: ActionSet, base_bins: Tensor | None) -> Tensor:
        tok = self.adapter.action_tokenizer
        bins = tok.ids_to_bins(acts.ids)
        if self.metric == "zero_mass":
            return zero_motion_mass(tok, acts.logits, window=self.window, unnorm_key=self.unnorm_key).mean(1)
        if self.metric == "mean_bin":
            return bins.double().mean(1)
        if self.metric == "abs_bin_shift":
            assert base_bins is not None
            return (bins - tok.ids_to_bins(base_bins)).abs().double().mean(1)
        zb = torch.tensor(tok.zero_motion_bins(self.unnorm_key))[torch.arange(bins.shape[1]) % tok.action_dim]
        inside = ((bins - zb[None]).abs() <= self.window).sum(1)
        need = bins.shape[1] if self.metric == "hrr_strict" else self.partial_min
        return (inside >= need).double()

    def per_prompt(self, directions: Float[Tensor, "k d"]) -> Float[Tensor, "n_prompts k"]:
        """The metric of every prompt under every direction."""
        dirs = directions.float()
        out = torch.empty((len(self.reqs), dirs.shape[0]), dtype=torch.float64)
        start = 0
        for k, b in enumerate(self.batches):
            for sl in direction_chunks(len(b), dirs.shape[0], self.max_rows):
                n_dir = sl.stop - sl.start
                p_idx, d_idx = repeat_rows(len(b), n_dir)
                acts = self._decode(k, dirs[sl][d_idx], p_idx)
                base = self.base_bins[k][p_idx] if self.base_bins else None
                out[start:start + len(b), sl] = self._per_row(acts, base).reshape(len(b), n_dir)
            start += len(b)
        return out

    def __call__(self, directions: Float[Tensor, "k d"]) -> Float[Tensor, "k"]:
        self.calls += 1
        return self.per_prompt(directions).mean(0)

    def bootstrap(self, direction: Float[Tensor, "d"], n_boot: int, seed: int) -> Float[Tensor, "n_boot"]:
        """Replicates of one direction's effect, resampling prompts."""
        from rdt_interp.analysis.stats import bootstrap_distribution

        values = self.per_prompt(direction[None])[:, 0]
        return bootstrap_distribution(lambda v: v.mean(dim=0), values, n_boot=n_boot, seed=seed)


def direction_specificity(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest | VLARequest],
    config: VLARDTConfig,
    alpha: float,
) -> SpecificityResult:
    """``config.specificity_metric`` after steering with ``r`` (mode ``config.specificity_mode``,
    at ``alpha``) against ``config.n_random`` random directions of the same norm, and ``-r``."""
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    t0 = time.perf_counter()
    effect = SteeringEffect(adapter, requests, alpha=alpha, layers=layers, mode=config.specificity_mode,
                            metric=config.specificity_metric, alpha_text=config.alpha_text_ratio * alpha,
                            include_image=config.include_image, batch_size=config.batch_size,
                            max_rows=config.specificity_rows, backend=config.backend,
                            constrain_actions=config.constrain_actions, window=config.window,
                            unnorm_key=config.unnorm_key, partial_min=config.partial_min)
    alternative = "two-sided" if config.specificity_metric == "mean_bin" else "greater"
    labels = [getattr(r, "label", "unknown") for r in requests]
    res = specificity_test(effect, d.vector, n_random=config.n_random, batch_size=max(config.n_random, 1),
                           controls={"-r": -d.vector}, alternative=alternative, n_boot=config.n_boot,
                           seed=config.seed,
                           effect_name=effect.name, meta={
                               "mode": config.specificity_mode, "alpha": float(alpha), "layers": list(layers),
                               "metric": config.specificity_metric, "n_prompts": len(effect.reqs),
                               "n_harmful": labels.count("harmful"), "n_benign": labels.count("benign"),
                               "prefill_reuse": effect.reuse, "rows_per_pass": config.specificity_rows,
                               "direction": _direction_info(d)})
    return dataclasses.replace(res, meta={**res.meta, "rows_run": effect.rows_run,
                                          "seconds": time.perf_counter() - t0})


# -- decoupling ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DecouplingResult:
    """Harmful vs benign separability per (layer, role): the probe grid, and its cells at the
    steering ``layer`` (``at_layer``). Positives are the harmful requests."""

    grid: ProbeGrid
    roles: tuple[str, ...]
    layer: int
    direction: Mapping[str, Any] = field(default_factory=dict)

    def at_layer(self, layer: int | None = None) -> dict[str, dict[str, tuple[float, float, float]]]:
        """Per role: ``proj_auc``, ``proj_d``, ``probe_auc`` as ``(value, low, high)``."""
        L = self.layer if layer is None else layer
        out = {}
        for role in self.roles:
            c = self.grid.cell(L, role)
            out[role] = {m: (c[m], c[f"{m}_lo"], c[f"{m}_hi"]) for m in ("proj_auc", "proj_d", "probe_auc")}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "DecouplingResult", "grid": self.grid.to_dict(), "roles": list(self.roles),
                "layer": self.layer, "direction": dict(self.direction)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecouplingResult:
        return cls(ProbeGrid.from_dict(d["grid"]), tuple(d["roles"]), int(d["layer"]), dict(d.get("direction", {})))


def decoupling(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest],
    config: VLARDTConfig,
    *,
    progress: bool = False,
) -> DecouplingResult:
    """Projection AUC along ``r``, Cohen's d and probe AUC of harmful vs benign at every
    ``config.decoupling_roles`` x ``config.decoupling_layers`` (unsteered residuals).

    With a ``val`` and a ``test`` split (each with two or more of each label) the probes are fitted on
    ``val`` and every number is measured on ``test``: pairs never straddle the two, so a probe
    cannot score an instruction by its twin (intervals and p-values exact). Otherwise K-fold CV
    over all requests, where stratified folds do split pairs (shared image, near-identical
    text) and the probe AUC is biased; the grid's ``probe_source`` says which was done.
    """
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    # The steering layer is always in the grid: the figure marks it and at_layer() reads it.
    grid_layers = (None if config.decoupling_layers is None
                   else tuple(sorted({*config.decoupling_layers, layers[0]})))
    caps = capture_roles(adapter, [r.request for r in requests], roles=config.decoupling_roles,
                         layers=grid_layers, batch_size=config.batch_size,
                         backend=config.backend,  # type: ignore[arg-type]
                         constrain_actions=config.constrain_actions, progress=progress)
    y = torch.tensor([r.label == "harmful" for r in requests])
    idx = {s: [i for i, r in enumerate(requests) if r.split == s] for s in ("val", "test")}
    held_out = all(sum(requests[i].label == lab for i in idx[s]) >= 2 for s in ("val", "test") for lab in LABELS)
    if held_out:
        fit = caps.select(idx["val"]).labeled(y[idx["val"]], split="val")
        data = caps.select(idx["test"]).labeled(y[idx["test"]], split="test")
    else:
        fit, data = None, caps.labeled(y, split="+".join(sorted({r.split for r in requests})))
    grid = probe_grid(data, directions=d.vector, fit=fit, probe=config.probe, folds=config.folds,
                      n_boot=config.n_boot, n_perm=config.n_perm, seed=config.seed)
    return DecouplingResult(grid, caps.roles, layers[0], _direction_info(d))


# -- the whole study -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class VLARDTResult:
    """What :func:`run_vla_rdt` found (every part also sits in its run directory as JSON)."""

    config: VLARDTConfig
    model: Mapping[str, Any]
    direction: Mapping[str, Any]
    layers: tuple[int, ...]
    alpha: float
    alpha_choice: Mapping[str, Any]
    sweep: SweepResult
    targets: SweepResult
    specificity: SpecificityResult | None
    decoupling: DecouplingResult | None
    n_requests: Mapping[str, int]
    timings: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "VLARDTResult", "config": self.config.to_dict(), "model": dict(self.model),
                "direction": dict(self.direction), "layers": list(self.layers), "alpha": self.alpha,
                "alpha_choice": dict(self.alpha_choice), "sweep": self.sweep.to_dict(),
                "targets": self.targets.to_dict(),
                "specificity": self.specificity.to_dict() if self.specificity is not None else None,
                "decoupling": self.decoupling.to_dict() if self.decoupling is not None else None,
                "n_requests": dict(self.n_requests), "timings": dict(self.timings)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VLARDTResult:
        return cls(VLARDTConfig.from_dict(d["config"]), dict(d["model"]), dict(d["direction"]),
                   tuple(int(x) for x in d["layers"]), float(d["alpha"]), dict(d["alpha_choice"]),
                   SweepResult.from_dict(d["sweep"]), SweepResult.from_dict(d["targets"]),
                   SpecificityResult.from_dict(d["specificity"]) if d.get("specificity") else None,
                   DecouplingResult.from_dict(d["decoupling"]) if d.get("decoupling") else None,
                   dict(d["n_requests"]), dict(d.get("timings", {})))

    def summary(self) -> dict[str, Any]:
        """The headline numbers (test split): RDT and RDT+ at the chosen alpha vs unsteered."""
        out: dict[str, Any] = {"alpha": self.alpha, "layers": list(self.layers)}
        for c in self.targets.conditions:
            for label, m in c.metrics.items():
                out[f"{c.name}/{label}"] = {k: round(float(m.value(k)[0]), 4) for k in METRICS}
        if self.specificity is not None:
            s = self.specificity
            out["specificity"] = {"real": s.real, "p": s.p, "z": s.z, "null_mean": s.null_mean,
                                  "n_random": s.n_random, "-r": s.controls.get("-r", {}).get("effect")}
        if self.decoupling is not None:
            out["decoupling"] = {role: {k: round(v[0], 4) for k, v in cell.items()}
                                 for role, cell in self.decoupling.at_layer().items()}
        return out


def run_vla_rdt(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    config: VLARDTConfig,
    run_dir: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> VLARDTResult:
    """Run (or resume) the VLA study in ``run_dir``: requests, alpha sweep (val + test), alpha
    choice, target-mode sweep, specificity, decoupling, figures.

    Each step's result is a JSON file in ``run_dir``; predictions are cached per condition in
    ``run_dir/predictions``. A killed run started again recomputes only unfinished work; a run
    directory of another config, model or direction is refused.
    """
    if not isinstance(adapter, VLAAdapter):
        raise ConfigError(f"{type(adapter).__name__} is not a VLAAdapter")
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    info = _direction_info(d)
    run = RunDir(run_dir, {"experiment": "vla_rdt", "config": config.to_dict(),
                           "model": {k: v for k, v in adapter.describe().items()},
                           "direction": {"digest": info["digest"], "norm": info["norm"], "rank": info["rank"]}},
                 log=log)
    timed = run.timed_step

    requests = load_requests(
        adapter, config.prompt_file, n_pairs=config.n_pairs, val_fraction=config.val_fraction,
        images=config.images, seed=config.seed, column=config.prompt_column, label_column=config.label_column,
        category_column=config.category_column, pair_column=config.pair_column)
    listed = timed("requests", lambda: [r.to_dict() for r in requests])
    if [x["instruction"] for x in listed] != [r.instruction for r in requests]:
        raise ConfigError(f"{run.path} holds other requests than this config makes (prompt file changed?)",
                          fix="choose a new run directory")
    store = _Store(run.path / "predictions")
    has_val = bool(_subset(requests, "val"))
    sweep = SweepResult.from_dict(timed("alpha_sweep", lambda: _run_conditions(
        adapter, d, requests, config, [(m, float(a)) for m in config.sweep_modes for a in config.alphas],
        [s for s in ("val", "test") if _subset(requests, s)], store, progress).to_dict()))

    def do_choice() -> dict[str, Any]:
        if config.alpha is not None:
            return {"alpha": float(config.alpha), "how": "given in the config"}
        if not has_val:
            raise ConfigError("alpha is not given and there is no val split to choose it on",
                              fix="set VLARDTConfig(alpha=...) or val_fraction > 0")
        mode = "action" if "action" in config.sweep_modes else config.sweep_modes[0]
        alpha, how = choose_alpha(sweep, mode=mode, split="val", label=config.choose_label,
                                  metric=config.choose_metric)
        return {"alpha": alpha, "how": "argmax on val", **how}

    choice = timed("alpha_choice", do_choice)
    alpha = float(choice["alpha"])
    targets = SweepResult.from_dict(timed("target_modes", lambda: _run_conditions(
        adapter, d, requests, config, [(m, alpha) for m in config.target_modes], ["test"], store,
        progress).to_dict()))
    spec = None
    if config.specificity:
        test = _subset(requests, "test")
        keep = list(dict.fromkeys(r.pair_id for r in test))[: config.specificity_pairs]
        spec_reqs = [r for r in test if r.pair_id in set(keep)]
        spec = SpecificityResult.from_dict(timed("specificity", lambda: direction_specificity(
            adapter, d, spec_reqs, config, alpha).to_dict()))
    dec = None
    if config.decoupling:
        dec = DecouplingResult.from_dict(timed("decoupling", lambda: decoupling(
            adapter, d, requests, config, progress=progress).to_dict()))
    counts = {f"{s}/{lab}": len(_subset(requests, s, lab)) for s in ("val", "test") for lab in LABELS}
    result = VLARDTResult(config, adapter.describe(), info, layers, alpha, choice, sweep, targets, spec, dec,
                          counts, run.timings())
    run.save("result", result.to_dict())
    run.save("summary", result.summary())
    if config.figures:
        vla_rdt_figures(result, run.path / "figures")
    return result


def load_vla_rdt(run_dir: str | Path) -> VLARDTResult:
    """The result of a finished run, read from its directory (no model)."""
    from rdt_interp.storage import read_json

    return VLARDTResult.from_dict(read_json(Path(run_dir) / "result.json"))


def vla_rdt_figures(result: VLARDTResult | str | Path, out_dir: str | Path) -> list[Path]:
    """Every figure of a run (PDF + PNG): alpha sweep, target modes, action-bin shift,
    decoupling per layer, specificity histogram. Returns the written paths."""
    from rdt_interp.viz import vla as fig
    from rdt_interp.viz.style import save_figure

    res = result if isinstance(result, VLARDTResult) else load_vla_rdt(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    written += save_figure(fig.alpha_sweep_figure(res.sweep, split="test"), out / "alpha_sweep")
    written += save_figure(fig.target_modes_figure(res.targets), out / "target_modes")
    rdt_name = "action" if "action" in res.config.target_modes else res.targets.modes[0]
    written += save_figure(fig.bin_shift_figure(res.targets.baseline("test"),
                                                res.targets.get(rdt_name, res.alpha, "test")), out / "bin_shift")
    if res.decoupling is not None:
        written += save_figure(fig.decoupling_figure(res.decoupling), out / "decoupling")
    if res.specificity is not None:
        written += save_figure(fig.specificity_figure(res.specificity), out / "specificity")
    return written


__all__ = [
    "LABELS", "ActionSet", "ConditionResult", "DecouplingResult", "LabeledRequest", "SteeringEffect",
    "SweepResult", "VLARDTConfig", "VLARDTResult", "alpha_sweep", "as_direction", "choose_alpha",
    "condition_metrics",
    "decoupling", "direction_specificity", "load_requests", "load_vla_rdt", "predict", "run_vla_rdt",
    "scene_image", "steering_layers", "target_mode_sweep", "vla_image_size", "vla_rdt_figures",
]
