"""The study pipelines over several processes: :class:`ShardedExecutor`.

A :class:`~rdt_interp.studies.executor.Executor` whose predictions and steering effects are
cut into shards, computed by every rank and merged by rank 0 (:func:`~.shards.run_sharded`),
while everything else a pipeline does (choosing alpha, the specificity pairs, every metric)
is the pipeline's own code, run once. ``run_vla_rdt(..., executor=ShardedExecutor(ctx))``
therefore returns what the single-process study returns, and writes the same run directory
(plus ``shards/``):

* :meth:`ShardedExecutor.run` -- shards ``SPLIT-MODE@ALPHA-bNNNN``: one prompt batch of one
  condition (the length-sorted batches :func:`~rdt_interp.studies.vla.predict` runs); rank 0
  puts each condition together and stores it in the run's
  :class:`~rdt_interp.studies.store.PredictionStore` (shards are cut from stored conditions);
* :meth:`ShardedExecutor.effect` -- shards ``bKKKK-gGGG-cCCC``: prompt batch x direction group
  x direction chunk. The direction groups are what the statistic asks for, listed by running
  it once over a recording stand-in; a rank prefills each of its prompt batches once and
  decodes all its chunks from that KV cache (decode-only RDT).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.plan import Shard, ShardPlan
from rdt_interp.distributed.shards import ShardData, ShardStore, compute_shards
from rdt_interp.errors import ConfigError
from rdt_interp.storage import digest_tensor, to_json
from rdt_interp.studies.executor import Condition, Predict
from rdt_interp.studies.rundir import RunDir, _roundtrip
from rdt_interp.studies.store import ActionSet, PredictionStore
from rdt_interp.studies.vla.requests import LabeledRequest
from rdt_interp.tracing.vla import direction_chunks

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level

Say = Callable[[str], None]


def _request_digest(requests: Sequence[Any]) -> list[Any]:
    out = []
    for r in requests:
        if isinstance(r, LabeledRequest):
            out.append([r.instruction, r.label, r.split, r.pair_id, r.image_seed])
        else:
            out.append([r.instruction, digest_tensor(torch.as_tensor(r.image_array()))[:16]])
    return out


def length_sorted_batches(requests: Sequence[Any], batch_size: int) -> list[list[int]]:
    """The prompt batches :func:`~rdt_interp.studies.vla.predict` runs: rows sorted by
    instruction length, ``batch_size`` at a time."""
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i].instruction), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class _CallRecorder:
    """A stand-in effect that notes the directions it is asked about (and returns distinct values)."""

    def __init__(self, about: Mapping[str, Any]) -> None:
        self.calls: list[Tensor] = []
        self.name = about.get("name", "call recorder")

    def __call__(self, directions: Tensor) -> Tensor:
        self.calls.append(directions.detach().clone())
        return torch.arange(directions.shape[0], dtype=torch.float64) + len(self.calls)

    def bootstrap(self, direction: Tensor, n_boot: int, seed: int) -> Tensor:
        self.calls.append(direction[None].detach().clone())
        return torch.zeros(n_boot, dtype=torch.float64)


def effect_groups(test: Callable[[Any], Any], about: Mapping[str, Any] | None = None) -> list[Tensor]:
    """The direction batches ``[k, d]`` ``test`` evaluates, in order, without repeats (the real
    direction, asked for twice -- for its effect and its bootstrap -- appears once)."""
    rec = _CallRecorder(about or {})
    test(rec)
    groups: list[Tensor] = []
    for call in rec.calls:
        if not any(g.shape == call.shape and torch.equal(g, call) for g in groups):
            groups.append(call)
    return groups


class MergedEffect:
    """A steering effect's ``__call__`` / ``bootstrap`` over per-prompt values computed in shards."""

    def __init__(self, groups: Sequence[Tensor], values: Sequence[Tensor], requests: Sequence[Any],
                 rows_run: int, about: Mapping[str, Any]) -> None:
        self.groups, self.values, self.reqs, self.rows_run = list(groups), list(values), list(requests), rows_run
        self.name = str(about.get("name", "steering effect"))
        self.reuse = bool(about.get("reuse", False))

    def per_prompt(self, directions: Tensor) -> Tensor:
        for g, v in zip(self.groups, self.values, strict=True):
            if g.shape == directions.shape and torch.equal(g, directions.float()):
                return v
        raise ConfigError("the statistic asked for directions that are not in the shard plan",
                          fix="this is a bug: the plan must list every call the statistic makes")

    def __call__(self, directions: Tensor) -> Tensor:
        return self.per_prompt(directions).mean(0)

    def bootstrap(self, direction: Tensor, n_boot: int, seed: int) -> Tensor:
        from rdt_interp.analysis.stats import bootstrap_distribution

        values = self.per_prompt(direction[None])[:, 0]
        return bootstrap_distribution(lambda v: v.mean(dim=0), values, n_boot=n_boot, seed=seed)


class ShardedExecutor:
    """Runs a study pipeline on every rank of ``ctx``: predictions and effects in shards.

    Every rank calls the pipeline with its own copy of the model; steps that are not sharded
    run on rank 0 while the others wait, and every rank gets each step's value. A run started
    with one process count can be resumed with another (finished shards are kept).

    Parameters
    ----------
    ctx
        This process's place in the process group (:func:`~.context.init_distributed`).
    log
        Where rank 0's messages go (the other ranks say nothing).

    Examples
    --------
    One process is a world of one (no process group), the same code as under ``torchrun``:

    >>> import tempfile
    >>> from rdt_interp.distributed.context import single_process
    >>> ex = ShardedExecutor(single_process("cpu"), log=None)
    >>> run = ex.open_run(tempfile.mkdtemp(), {"experiment": "demo"})
    >>> ex.step(run, "answer", lambda: {"x": 42})
    {'x': 42}
    """

    def __init__(self, ctx: DistContext, *, log: Say | None = logger.info) -> None:
        self.ctx = ctx
        self._log = log if ctx.is_main else None

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    def open_run(self, path: str | Path, identity: Mapping[str, Any]) -> RunDir:
        self.ctx.check_same("the run's identity (config, model, direction)", to_json(dict(identity)))
        return self.ctx.main_first(lambda: RunDir(path, dict(identity), log=self._log))

    def step(self, run: RunDir, name: str, fn: Callable[..., Any], *, work: Callable[[], Any] | None = None) -> Any:
        import time

        if self.ctx.broadcast(bool(run.done(name))):
            self.say(f"[cached] {name}")
            return run.load(name)
        t = time.perf_counter()
        got = work() if work is not None else None  # every rank takes part in the work
        if self.is_main:
            self.say(f"[run]    {name}")
            run.save(name, _roundtrip(fn() if work is None else fn(got)))
            run.save("timings", run.timings() | {name: time.perf_counter() - t})
        self.ctx.barrier()
        return run.load(name)

    def on_main(self, fn: Callable[[], Any]) -> None:
        self.ctx.on_main(fn)

    def _sharded(self, run: RunDir | None, name: str, plan: ShardPlan,
                 compute: Callable[[Shard], tuple[Mapping[str, Tensor], Mapping[str, Any]]]) -> dict[str, ShardData]:
        """Compute the missing shards of ``plan`` over the ranks; every shard, on rank 0 (else {})."""
        if run is None:
            raise ConfigError("a sharded executor needs the run directory (run=) to keep its shards")
        self.ctx.check_same(f"the shard plan of {name!r}", plan.digest)
        store = ShardStore(run.path / "shards" / name, plan)
        self.say(f"[run]    {name} ({len(plan)} shards over {self.ctx.world_size} ranks)")
        compute_shards(self.ctx, store, compute, say=self.say if self.is_main else None)
        self.ctx.barrier()
        return store.load_all() if self.is_main else {}

    def run(self, conditions: Sequence[Condition], requests: Mapping[str, Sequence[Any]], predict: Predict, *,
            batch_size: int, store: PredictionStore, run: RunDir | None = None, name: str = "conditions",
            identity: Mapping[str, Any] | None = None) -> dict[Condition, ActionSet]:
        """Predictions of every condition (on rank 0; an empty dict on the others)."""
        batches = {split: length_sorted_batches(reqs, batch_size) for split, reqs in requests.items()}
        shards = [Shard(f"{c.store_key}-b{b:04d}", float(len(rows)),
                        {"split": c.split, "mode": c.mode, "alpha": c.alpha, "rows": rows})
                  for c in conditions for b, rows in enumerate(batches[c.split])]
        inputs = {**dict(identity or {}), "conditions": [[c.split, c.mode, c.alpha] for c in conditions],
                  "requests": {s: _request_digest(r) for s, r in requests.items()}}
        plan = ShardPlan.build(name, shards, json.loads(to_json(inputs)))

        def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
            s = shard.spec
            c, reqs, rows = Condition(s["split"], s["mode"], float(s["alpha"])), requests[s["split"]], list(s["rows"])
            whole = store.load(c.store_key, n_rows=len(reqs))
            if whole is not None:
                got = whole.rows(rows)
                return {"ids": got.ids, "logits": got.logits}, {"rows": rows, "from": "predictions"}
            acts = predict(c, [reqs[i] for i in rows])
            return {"ids": acts.ids, "logits": acts.logits}, {"rows": rows}

        done = self._sharded(run, name, plan, compute)
        out: dict[Condition, ActionSet] = {}
        if self.is_main:
            for c in conditions:
                n = len(requests[c.split])
                parts = [(rows, ActionSet(done[f"{c.store_key}-b{b:04d}"][0]["ids"],
                                          done[f"{c.store_key}-b{b:04d}"][0]["logits"]))
                         for b, rows in enumerate(batches[c.split])]
                cached = store.load(c.store_key, n_rows=n)
                if cached is None:
                    cached = ActionSet.assemble(n, parts)
                    store.save(c.store_key, cached)
                out[c] = cached
        self.ctx.barrier()
        return out

    def effect(self, make: Callable[[Sequence[Any]], Any], requests: Sequence[Any], *, batch_size: int,
               max_rows: int, test: Callable[[Any], Any], about: Mapping[str, Any] | None = None,
               run: RunDir | None = None, name: str = "effect", identity: Mapping[str, Any] | None = None) -> Any:
        """The effect's per-prompt values for every direction ``test`` asks for, merged on rank
        0 (``None`` on the others)."""
        reqs = list(requests)
        if not reqs:
            raise ConfigError("the steering effect needs at least one request")
        batches = [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]
        groups = effect_groups(test, about)
        shards = []
        for k, b in enumerate(batches):
            for g, group in enumerate(groups):
                for c, sl in enumerate(direction_chunks(len(b), int(group.shape[0]), max_rows)):
                    shards.append(Shard(f"b{k:04d}-g{g:03d}-c{c:03d}", float(len(b) * (sl.stop - sl.start)),
                                        {"batch": k, "group": g, "start": sl.start, "stop": sl.stop}))
        inputs = {**dict(identity or {}), "groups": [len(g) for g in groups],
                  "group_digests": [digest_tensor(g)[:16] for g in groups], "requests": _request_digest(reqs)}
        plan = ShardPlan.build(name, shards, json.loads(to_json(inputs)))
        held: dict[int, Any] = {}

        def effect_for(k: int) -> Any:
            if k not in held:
                held.clear()  # one prefilled batch (its KV cache) at a time
                held[k] = make(batches[k])
            return held[k]

        def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
            s = shard.spec
            eff = effect_for(int(s["batch"]))
            before = eff.rows_run
            values = eff.per_prompt(groups[int(s["group"])][int(s["start"]):int(s["stop"])])
            return {"values": values}, {"rows_run": eff.rows_run - before}

        done = self._sharded(run, name, plan, compute)
        held.clear()
        if not self.is_main:
            return None
        blocks: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
        rows_run = 0
        for sh in plan.shards:
            t, meta = done[sh.key]
            blocks.setdefault((sh.spec["group"], sh.spec["batch"]), []).append((sh.spec["start"], t["values"]))
            rows_run += int(meta.get("rows_run", 0))
        values = [torch.cat([torch.cat([v for _, v in sorted(blocks[(g, k)], key=lambda x: x[0])], dim=1)
                             for k in range(len(batches))], dim=0) for g in range(len(groups))]
        return MergedEffect(groups, values, reqs, rows_run, about or {})


__all__ = ["MergedEffect", "ShardedExecutor", "effect_groups", "length_sorted_batches"]
