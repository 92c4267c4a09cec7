"""Shard files in a run directory, and a sharded step: compute missing shards, merge on rank 0.

Layout of a sharded step ``NAME`` in a run directory (:class:`~rdt_interp.studies.rundir.RunDir`)::

    RUN/shards/NAME/<shard key>.safetensors   one per shard, written atomically by its rank
    RUN/shards/NAME/_ranks/rank-<r>.json      what rank r computed / found done in its last launch
    RUN/NAME.json                             the merged result (rank 0), as a single process writes it

A shard file holds tensors and, in its metadata, the plan digest and its key; a file that is
missing, does not pass its checksum or belongs to another plan is computed again. A run that
lost a rank (killed, out of memory, node preempted) is resumed by starting the same command
again, with any number of processes: finished shards are kept, only missing ones run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.plan import Shard, ShardPlan
from rdt_interp.errors import IntegrityError, RdtError
from rdt_interp.storage import atomic_write_json, load_tensors, read_json, save_tensors

log = logging.getLogger(__name__)

#: testing aid: ``RANK:N[:PLAN]`` makes rank RANK exit hard (status 86, no cleanup) after
#: computing N shards (of plan PLAN only, if given) in one launch
FAULT_ENV = "RDT_INTERP_FAULT"
FAULT_EXIT_CODE = 86

ShardData = tuple[dict[str, Tensor], dict[str, Any]]
Compute = Callable[[Shard], tuple[Mapping[str, Tensor], Mapping[str, Any]]]


class MissingShardsError(RdtError):
    """A merge found shards that no rank wrote (a rank died before finishing its share)."""


class ShardStore:
    """The shard files of one plan in ``root``."""

    def __init__(self, root: str | os.PathLike[str], plan: ShardPlan) -> None:
        self.root = Path(root)
        self.plan = plan

    def path(self, shard: Shard | str) -> Path:
        key = shard if isinstance(shard, str) else shard.key
        return self.root / f"{key}.safetensors"

    def load(self, shard: Shard | str) -> ShardData | None:
        """The shard's tensors and metadata, or ``None`` if it must be computed (missing,
        corrupted, or written for another plan)."""
        key = shard if isinstance(shard, str) else shard.key
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors, meta = load_tensors(path)
        except IntegrityError as exc:
            log.warning("shard %s is corrupted, computing it again (%s)", path, str(exc).splitlines()[0])
            return None
        if meta.get("plan") != self.plan.digest or meta.get("key") != key:
            log.warning("shard %s belongs to another plan, computing it again", path)
            return None
        return tensors, meta

    def done(self, shard: Shard | str) -> bool:
        return self.load(shard) is not None

    def save(self, shard: Shard, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        save_tensors(self.path(shard), tensors, {**dict(meta), "plan": self.plan.digest, "key": shard.key})

    def missing(self) -> list[Shard]:
        return [s for s in self.plan.shards if not self.done(s)]

    def load_all(self) -> dict[str, ShardData]:
        """Every shard of the plan; :class:`MissingShardsError` names those not written."""
        out: dict[str, ShardData] = {}
        missing = []
        for s in self.plan.shards:
            got = self.load(s)
            if got is None:
                missing.append(s.key)
            else:
                out[s.key] = got
        if missing:
            shown = ", ".join(missing[:8]) + (f", … (+{len(missing) - 8})" if len(missing) > 8 else "")
            raise MissingShardsError(
                f"{len(missing)} of {len(self.plan)} shards of {self.plan.name!r} are missing: {shown}",
                fix="a rank stopped early; run the same command again: only missing shards are computed")
        return out

    def report_path(self, rank: int) -> Path:
        return self.root / "_ranks" / f"rank-{rank}.json"


@dataclass(frozen=True)
class ShardReport:
    """What one rank did for a plan in this launch."""

    rank: int
    world_size: int
    assigned: tuple[str, ...]
    computed: tuple[str, ...]
    reused: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "assigned": list(self.assigned),
                "computed": list(self.computed), "reused": list(self.reused), "seconds": self.seconds}


def _fault(rank: int, plan: str) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise RdtError(f"{FAULT_ENV}={spec!r} is not RANK:N or RANK:N:PLAN")
    if int(parts[0]) != rank or (len(parts) == 3 and parts[2] != plan):
        return None
    return int(parts[1])


def compute_shards(ctx: DistContext, store: ShardStore, compute: Compute, *,
                   say: Callable[[str], None] | None = None) -> ShardReport:
    """Compute this rank's shards of ``store.plan`` that are not on disk yet, each written
    atomically as soon as it is done. No barrier: callers synchronise."""
    t0 = time.perf_counter()
    mine = store.plan.for_rank(ctx.rank, ctx.world_size)
    computed: list[str] = []
    reused: list[str] = []
    fail_after = _fault(ctx.rank, store.plan.name)
    todo = [s for s in mine if not store.done(s)]
    reused = [s.key for s in mine if s not in todo]
    if say is not None:
        say(f"[rank {ctx.rank}/{ctx.world_size}] {store.plan.name}: {len(todo)} shards to compute, "
            f"{len(reused)} already done, of {len(store.plan)} in the plan")
    for shard in todo:
        tensors, meta = compute(shard)
        store.save(shard, tensors, meta)
        computed.append(shard.key)
        if fail_after is not None and len(computed) >= fail_after:
            os._exit(FAULT_EXIT_CODE)  # simulated crash: no cleanup, no barrier
    report = ShardReport(ctx.rank, ctx.world_size, tuple(s.key for s in mine), tuple(computed), tuple(reused),
                         time.perf_counter() - t0)
    atomic_write_json(store.report_path(ctx.rank), report.to_dict())
    return report


def read_reports(store: ShardStore) -> list[dict[str, Any]]:
    """The per-rank reports of the last launch(es) that ran this plan, by rank."""
    d = store.root / "_ranks"
    if not d.is_dir():
        return []
    return [read_json(p) for p in sorted(d.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))]


def run_sharded(
    ctx: DistContext,
    run: Any,
    name: str,
    plan: Callable[[], ShardPlan] | ShardPlan,
    compute: Compute,
    merge: Callable[[dict[str, ShardData]], Any],
    *,
    say: Callable[[str], None] | None = None,
) -> Any:
    """A :class:`RunDir` step computed in shards by every rank and merged by rank 0.

    Returns the step's JSON value on every rank (read back from ``RUN/NAME.json``). A finished
    step is loaded, not recomputed; an unfinished one computes only its missing shards. Every
    rank must build the same plan (checked by digest).
    """
    done = ctx.broadcast(bool(run.done(name)))
    if done:
        if say is not None and ctx.is_main:
            say(f"[cached] {name}")
        return run.load(name)
    the_plan = plan() if callable(plan) else plan
    ctx.check_same(f"the shard plan of {name!r}", the_plan.digest)
    store = ShardStore(run.path / "shards" / name, the_plan)
    if say is not None and ctx.is_main:
        say(f"[run]    {name} ({len(the_plan)} shards over {ctx.world_size} ranks)")
    compute_shards(ctx, store, compute, say=say)
    ctx.barrier()
    if ctx.is_main:
        run.save(name, merge(store.load_all()))
    ctx.barrier()
    return run.load(name)


__all__ = ["FAULT_ENV", "FAULT_EXIT_CODE", "MissingShardsError", "ShardReport", "ShardStore", "compute_shards",
           "read_reports", "run_sharded"]
