"""Reading OpenVLA safetensors checkpoints into :class:`OpenVLAModel`, strictly.

A load plan lists, for every tensor of the model, the checkpoint tensor(s) it comes from. The
plan is checked completely on the meta device first (every model tensor planned, every source
present, every checkpoint key used, every shape right) and only then are bytes read, so a
wrong checkpoint fails in seconds with a :class:`WeightMismatchError` that lists the keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from rdt_interp.errors import CheckpointError, WeightMismatchError
from rdt_interp.models.openvla.modeling import OpenVLAModel
from rdt_interp.models.openvla.vision import WeightAssign

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsCheckpoint:
    """Tensors of a single-file or sharded (``model.safetensors.index.json``) checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        self._files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index ({exc})") from None
            shards = {name: self.path / name for name in set(weight_map.values())}
            absent = sorted(str(p.name) for p in shards.values() if not p.is_file())
            if absent:
                raise CheckpointError(f"{self.path}: shards listed in {INDEX_NAME} are missing: {absent}",
                                      fix="finish the download (every model-0000x-of-0000y.safetensors)")
            self._files = {k: shards[v] for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as fh:
                self._files = dict.fromkeys(fh.keys(), single)
        else:
            has_bin = any(self.path.glob("*.bin"))
            raise CheckpointError(
                f"{self.path} has neither {SINGLE_NAME} nor {INDEX_NAME}",
                fix="convert the weights to safetensors" if has_bin else
                "point at the checkpoint directory that holds the *.safetensors weights",
            )
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for file, keys in self._by_file(self._files).items():
            with safe_open(file, framework="pt") as fh:
                present = set(fh.keys())
                lost = sorted(set(keys) - present)
                if lost:
                    raise CheckpointError(f"{file.name} lacks tensors its index promises: {lost[:8]}")
                for k in keys:
                    sl = fh.get_slice(k)
                    self._shapes[k] = tuple(sl.get_shape())
                    self._dtypes[k] = _st_dtype(sl.get_dtype())

    @staticmethod
    def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for k, f in files.items():
            out.setdefault(f, []).append(k)
        return out

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def meta(self, key: str) -> Tensor:
        return torch.empty(self._shapes[key], dtype=self._dtypes[key], device="meta")

    def read(self, keys: Iterable[str]) -> Iterable[tuple[str, Tensor]]:
        """Yield ``(key, tensor)`` file by file (each shard opened once)."""
        wanted = set(keys)
        for file, ks in self._by_file({k: self._files[k] for k in wanted}).items():
            with safe_open(file, framework="pt") as fh:
                for k in ks:
                    yield k, fh.get_tensor(k)


def _st_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
    return table.get(name, torch.float32)


def _direct_plan(module: nn.Module, src: str, dst: str) -> list[WeightAssign]:
    """Same names on both sides; a tied tensor may come from any of its names."""
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    return [WeightAssign(dst + names[0], (tuple(src + n for n in names),)) for names in aliases.values()]


def weight_plan(model: OpenVLAModel) -> list[WeightAssign]:
    """Checkpoint -> model for the whole OpenVLA (reference state-dict names on the left)."""
    return (
        model.vision_backbone.weight_plan("vision_backbone.", "vision_backbone.")
        + _direct_plan(model.projector, "projector.", "projector.")
        + _direct_plan(model.language_model, "language_model.", "language_model.")
    )


def _tied_alias_keys(model: nn.Module) -> dict[str, str]:
    """Every state-dict name -> the first name of the same tensor."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(t), name)
    return out


@torch.no_grad()
def load_weights(model: OpenVLAModel, ckpt: SafetensorsCheckpoint, *, where: str = "checkpoint") -> None:
    """Fill every tensor of ``model`` from ``ckpt``; raise :class:`WeightMismatchError` otherwise."""
    plan = weight_plan(model)
    targets = model.state_dict(keep_vars=True)
    canonical = _tied_alias_keys(model)
    available = ckpt.names()

    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    resolved: list[tuple[WeightAssign, tuple[str, ...]]] = []
    planned: set[str] = set()
    for a in plan:
        if a.target not in targets:
            raise CheckpointError(f"load plan names {a.target}, which the model does not have",
                                  fix="this transformers release is not supported by the OpenVLA loader")
        planned.add(canonical[a.target])
        names: list[str] = []
        for alts in a.sources:
            hit = next((n for n in alts if n in available), None)
            if hit is None:
                missing.append(alts[0])
            else:
                names.append(hit)
                used.update(n for n in alts if n in available)  # tied aliases count as used
        if len(names) != len(a.sources):
            continue
        metas = [ckpt.meta(n) for n in names]
        value = a.fn(*metas) if a.fn is not None else metas[0]
        want = tuple(targets[a.target].shape)
        if tuple(value.shape) != want:
            got = ", ".join(f"{n} {list(ckpt.shape(n))}" for n in names) or "synthesised"
            mismatched.append(f"{got} -> {a.target} needs {list(want)}")
            continue
        resolved.append((a, tuple(names)))
    unplanned = sorted({canonical[n] for n in targets} - planned)
    missing += [f"{n} (no checkpoint key maps to it)" for n in unplanned]
    unexpected = sorted(available - used)
    if missing or unexpected or mismatched:
        raise WeightMismatchError(missing=missing, unexpected=unexpected, mismatched=mismatched, where=where)

    # All checks passed: read each source once, shard by shard.
    needed = {n for _, names in resolved for n in names}
    cache: dict[str, Tensor] = {}
    pending = {i: set(names) for i, (_, names) in enumerate(resolved)}
    by_source: dict[str, list[int]] = {}
    for i, (_, names) in enumerate(resolved):
        for n in names:
            by_source.setdefault(n, []).append(i)
    for key, tensor in ckpt.read(needed):
        cache[key] = tensor
        for i in by_source[key]:
            pending[i].discard(key)
            if pending[i]:
                continue
            a, names = resolved[i]
            args = [cache[n] for n in names]
            value = a.fn(*args) if a.fn is not None else args[0]
            target = targets[a.target]
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        # free sources no later assignment needs (keeps host memory at ~one tensor for 7B loads)
        for n in [n for n in cache if all(not pending[i] for i in by_source[n])]:
            del cache[n]
    for a, names in resolved:
        if not names:  # synthesised values (e.g. the DINOv2 mask token)
            target = targets[a.target]
            target.copy_(a.fn().to(device=target.device, dtype=target.dtype))
