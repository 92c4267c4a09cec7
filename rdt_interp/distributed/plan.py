"""Shard plans: a step's work cut into shards, and which rank computes which.

A shard is one unit of work with a stable key (``test-action@2-b0003``: split, condition,
prompt batch; ``b0002-g001-c004``: prompt batch, direction group, direction chunk). The shards
follow the batches the single-process code runs, so a shard computes exactly what the
single-process run computes for those rows, and merging shards gives its result.

* What the shards are depends only on the config (not on the number of processes): shard
  files written by a run with 2 ranks serve a resumed run with 3, or with 1.
* Which rank computes which shards depends only on the plan and the world size:
  :func:`assign` cuts the shard list, in plan order, into ``world_size`` contiguous runs of
  about equal cost (contiguous, so a rank touches few prompt batches and prefills each once).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rdt_interp.errors import ConfigError
from rdt_interp.storage import digest_strings, to_json


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``key`` names its file, ``cost`` weighs it for balancing, ``spec`` says
    what to compute (JSON-able)."""

    key: str
    cost: float | int = 1.0
    spec: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key or any(c in self.key for c in "/\\\0") or self.key.startswith("."):
            raise ConfigError(f"shard key {self.key!r} cannot name a file")
        if not self.cost >= 0:
            raise ConfigError(f"shard {self.key}: cost must be >= 0, got {self.cost}")
        object.__setattr__(self, "cost", float(self.cost))


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one step, in order, and a digest of everything that determines them."""

    name: str
    shards: tuple[Shard, ...]
    digest: str

    def __post_init__(self) -> None:
        keys = [s.key for s in self.shards]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ConfigError(f"plan {self.name!r} repeats shard keys {dup[:5]}")

    @classmethod
    def build(cls, name: str, shards: Sequence[Shard], inputs: Any) -> ShardPlan:
        """A plan whose digest covers ``inputs`` (the config, model and data digests: anything
        that changes what a shard holds) and every shard's key and spec."""
        parts = [f"plan-v1:{name}", json.dumps(json.loads(to_json(inputs)), sort_keys=True)]
        parts += [f"{s.key}={json.dumps(json.loads(to_json(dict(s.spec))), sort_keys=True)}" for s in shards]
        return cls(name, tuple(shards), digest_strings(parts))

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.shards)

    def for_rank(self, rank: int, world_size: int) -> tuple[Shard, ...]:
        return assign(self, world_size)[rank]


def assign(plan: ShardPlan, world_size: int) -> list[tuple[Shard, ...]]:
    """Contiguous runs of ``plan.shards``, one per rank, of about equal total cost.

    Rank ``r`` gets the shards whose cost midpoint falls in ``[r, r+1) * total / world_size``:
    deterministic, every shard exactly once, order kept. With more ranks than shards some
    ranks get nothing.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    total = sum(s.cost for s in plan.shards)
    out: list[list[Shard]] = [[] for _ in range(world_size)]
    if total <= 0:  # all free: spread by count
        for i, s in enumerate(plan.shards):
            out[min(world_size - 1, i * world_size // max(len(plan.shards), 1))].append(s)
        return [tuple(x) for x in out]
    acc = 0.0
    for s in plan.shards:
        mid = acc + s.cost / 2
        acc += s.cost
        out[min(world_size - 1, int(mid * world_size / total))].append(s)
    return [tuple(x) for x in out]


__all__ = ["Shard", "ShardPlan", "assign"]
