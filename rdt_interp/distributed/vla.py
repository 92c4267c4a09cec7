"""The VLA RDT study across processes: sweeps and the specificity null in shards, one merge.

Each function here is the data-parallel twin of one in
:mod:`rdt_interp.experiments.vla_rdt` and returns the same result (same JSON, up to the
wall-clock fields ``seconds``/``timings`` and the ``rows_run`` count):

* :func:`sharded_conditions` = ``_run_conditions`` (the alpha sweep and the target-mode sweep):
  shards are (split, condition, prompt batch), with the prompt batches ``predict`` runs (length
  sorted, ``batch_size``); rank 0 reassembles each condition's actions and computes the
  metrics exactly as the single-process sweep does.
* :func:`sharded_specificity` = ``direction_specificity``: the directions the specificity test
  evaluates (the real one, the random null in one call, each control) are listed by running
  the test once with a recording effect; shards are (prompt batch, direction group, direction
  chunk), with the chunks ``SteeringEffect`` runs (``specificity_rows`` rows per pass), and a
  rank prefills each of its prompt batches once and decodes all its chunks from that KV cache
  (decode-only RDT). Rank 0 runs the same specificity test on the merged per-prompt values.
* :func:`run_vla_rdt_distributed` = ``run_vla_rdt``: the same run directory (a run started
  with one process can be resumed with several and vice versa); decoupling (one capture pass
  plus CPU statistics) runs on rank 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rdt_interp.analysis.specificity import SpecificityResult, specificity_test
from rdt_interp.directions.direction import Direction
from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.plan import Shard, ShardPlan
from rdt_interp.distributed.shards import ShardData, run_sharded
from rdt_interp.errors import ConfigError
from rdt_interp.experiments.rundir import RunDir
from rdt_interp.experiments.vla_rdt import (
    LABELS,
    SPEC_METRIC_NAMES,
    ActionSet,
    DecouplingResult,
    LabeledRequest,
    SteeringEffect,
    SweepResult,
    VLARDTConfig,
    VLARDTResult,
    _direction_info,
    _subset,
    as_direction,
    choose_alpha,
    condition_metrics,
    decoupling,
    load_requests,
    predict,
    steering_layers,
    vla_rdt_figures,
)
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.tracing.vla import direction_chunks, mode_touches_prefill, steer_vla

Say = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def _request_digest(requests: Sequence[LabeledRequest | VLARequest]) -> list[Any]:
    out = []
    for r in requests:
        if isinstance(r, LabeledRequest):
            out.append([r.instruction, r.label, r.split, r.pair_id, r.image_seed])
        else:
            from rdt_interp.storage import digest_tensor

            out.append([r.instruction, digest_tensor(torch.as_tensor(r.image_array()))[:16]])
    return out


def _base_inputs(adapter: VLAAdapter, direction: Direction, config: VLARDTConfig) -> dict[str, Any]:
    return {"config": config.to_dict(), "model": adapter.digest(), "direction": _direction_info(direction)["digest"]}


# -- sweeps ----------------------------------------------------------------------------------------
def _condition_key(mode: str, alpha: float) -> str:
    return "none" if mode == "none" else f"{mode}@{alpha:g}"


def _chunks(reqs: Sequence[LabeledRequest], batch_size: int) -> list[list[int]]:
    """The prompt batches of :func:`~rdt_interp.experiments.vla_rdt.predict`: length-sorted."""
    order = sorted(range(len(reqs)), key=lambda i: (len(reqs[i].instruction), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _conditions_in_order(conditions: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    out, seen = [], set()
    for mode, alpha in [("none", 0.0), *conditions]:
        key = _condition_key(mode, alpha)
        if key not in seen:
            seen.add(key)
            out.append((mode, float(alpha)))
    return out


def conditions_plan(adapter: VLAAdapter, direction: Direction, requests: Sequence[LabeledRequest],
                    config: VLARDTConfig, conditions: Sequence[tuple[str, float]], splits: Sequence[str],
                    name: str = "conditions") -> ShardPlan:
    """Shards ``SPLIT-MODE@ALPHA-bNNNN``: one prompt batch of one condition (``none`` included)."""
    shards = []
    for split in splits:
        reqs = _subset(requests, split)
        if not reqs:
            raise ConfigError(f"no requests in split {split!r}", fix="raise n_pairs or val_fraction")
        for mode, alpha in _conditions_in_order(conditions):
            for c, rows in enumerate(_chunks(reqs, config.batch_size)):
                shards.append(Shard(f"{split}-{_condition_key(mode, alpha)}-b{c:04d}", float(len(rows)),
                                    {"split": split, "mode": mode, "alpha": alpha, "rows": rows}))
    inputs = {**_base_inputs(adapter, direction, config), "conditions": [list(c) for c in conditions],
              "splits": list(splits), "requests": _request_digest(requests)}
    return ShardPlan.build(name, shards, inputs)


def _prediction_file(store_dir: Path | None, split: str, key: str) -> Path | None:
    return None if store_dir is None else store_dir / f"{split}-{key}.safetensors"


def sharded_conditions(
    ctx: DistContext,
    run: RunDir,
    name: str,
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest],
    config: VLARDTConfig,
    conditions: Sequence[tuple[str, float]],
    splits: Sequence[str],
    *,
    store_dir: str | Path | None = None,
    say: Say | None = None,
) -> SweepResult:
    """Step ``name`` of ``run``: action metrics of every condition on every split, computed in
    shards over the ranks; the same :class:`SweepResult` as the single-process sweep.

    ``store_dir`` holds whole-condition predictions as the single-process run caches them
    (``SPLIT-KEY.safetensors``): shards are cut from them when present, and rank 0 writes the
    merged predictions there.
    """
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    store = Path(store_dir) if store_dir is not None else None

    def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
        s = shard.spec
        reqs = _subset(requests, s["split"])
        rows = list(s["rows"])
        whole = _prediction_file(store, s["split"], _condition_key(s["mode"], s["alpha"]))
        if whole is not None and whole.is_file():
            try:
                acts = ActionSet.load(whole)
                if len(acts) == len(reqs):
                    got = acts.rows(rows)
                    return {"ids": got.ids, "logits": got.logits}, {"rows": rows, "from": "predictions"}
            except Exception:  # unreadable cache: compute  # noqa: BLE001
                pass
        mode, alpha = s["mode"], float(s["alpha"])
        ivs = [] if mode == "none" else steer_vla(d, mode, alpha, layers, alpha_text=config.alpha_text_ratio * alpha,
                                                   include_image=config.include_image, d_model=adapter.d_model)
        acts = predict(adapter, [reqs[i] for i in rows], ivs, batch_size=config.batch_size,
                       backend=config.backend, constrain_actions=config.constrain_actions)
        return {"ids": acts.ids, "logits": acts.logits}, {"rows": rows}

    def merge(shards: dict[str, ShardData]) -> dict[str, Any]:
        out = []
        for split in splits:
            reqs = _subset(requests, split)
            chunks = _chunks(reqs, config.batch_size)

            def assemble(key: str, reqs: list[LabeledRequest] = reqs, chunks: list[list[int]] = chunks,
                         split: str = split) -> ActionSet:
                parts = [shards[f"{split}-{key}-b{c:04d}"][0] for c in range(len(chunks))]
                ids = torch.empty((len(reqs), *parts[0]["ids"].shape[1:]), dtype=parts[0]["ids"].dtype)
                logits = torch.empty((len(reqs), *parts[0]["logits"].shape[1:]), dtype=parts[0]["logits"].dtype)
                for rows, t in zip(chunks, parts, strict=True):
                    idx = torch.as_tensor(rows)
                    ids[idx] = t["ids"]
                    logits[idx] = t["logits"]
                acts = ActionSet(ids, logits)
                target = _prediction_file(store, split, key)
                if target is not None and not target.is_file():
                    acts.save(target)
                return acts

            base = assemble("none")
            for mode, alpha in _conditions_in_order(conditions):
                a_text = config.alpha_text_ratio * alpha
                acts = base if mode == "none" else assemble(_condition_key(mode, alpha))
                out.append(condition_metrics(adapter.action_tokenizer, acts, base, [r.label for r in reqs], config,
                                             mode=mode, alpha=alpha, alpha_text=a_text, split=split, layers=layers))
        return SweepResult(tuple(out), _direction_info(d), adapter.describe()).to_dict()

    value = run_sharded(ctx, run, name, lambda: conditions_plan(adapter, d, requests, config, conditions, splits, name),
                        compute, merge, say=say)
    return SweepResult.from_dict(value)


# -- specificity -----------------------------------------------------------------------------------
def _spec_kwargs(direction: Direction, config: VLARDTConfig) -> dict[str, Any]:
    """The arguments ``direction_specificity`` passes to ``specificity_test``."""
    return {"n_random": config.n_random, "batch_size": max(config.n_random, 1), "controls": {"-r": -direction.vector},
            "alternative": "two-sided" if config.specificity_metric == "mean_bin" else "greater",
            "n_boot": config.n_boot, "seed": config.seed}


class _CallRecorder:
    """An effect that notes the directions it is asked about (and returns distinct values)."""

    name = "call recorder"

    def __init__(self) -> None:
        self.calls: list[Tensor] = []

    def __call__(self, directions: Tensor) -> Tensor:
        self.calls.append(directions.detach().clone())
        return torch.arange(directions.shape[0], dtype=torch.float64) + len(self.calls)

    def bootstrap(self, direction: Tensor, n_boot: int, seed: int) -> Tensor:
        self.calls.append(direction[None].detach().clone())
        return torch.zeros(n_boot, dtype=torch.float64)


def effect_groups(direction: Direction, config: VLARDTConfig) -> list[Tensor]:
    """The direction batches ``[k, d]`` the specificity test evaluates, in order, without repeats
    (the real direction, asked for twice: for its effect and its bootstrap, appears once)."""
    rec = _CallRecorder()
    specificity_test(rec, direction.vector, **_spec_kwargs(direction, config))
    groups: list[Tensor] = []
    for call in rec.calls:
        if not any(g.shape == call.shape and torch.equal(g, call) for g in groups):
            groups.append(call)
    return groups


class _MergedEffect:
    """``SteeringEffect``'s ``__call__``/``bootstrap`` over per-prompt values computed earlier."""

    def __init__(self, groups: Sequence[Tensor], values: Sequence[Tensor], name: str) -> None:
        self.groups, self.values, self.name = list(groups), list(values), name

    def per_prompt(self, directions: Tensor) -> Tensor:
        for g, v in zip(self.groups, self.values, strict=True):
            if g.shape == directions.shape and torch.equal(g, directions.float()):
                return v
        raise ConfigError("the specificity test asked for directions that are not in the plan",
                          fix="this is a bug: the plan must list every call of specificity_test")

    def __call__(self, directions: Tensor) -> Tensor:
        return self.per_prompt(directions).mean(0)

    def bootstrap(self, direction: Tensor, n_boot: int, seed: int) -> Tensor:
        from rdt_interp.analysis.stats import bootstrap_distribution

        values = self.per_prompt(direction[None])[:, 0]
        return bootstrap_distribution(lambda v: v.mean(dim=0), values, n_boot=n_boot, seed=seed)


def specificity_plan(adapter: VLAAdapter, direction: Direction, requests: Sequence[LabeledRequest | VLARequest],
                     config: VLARDTConfig, alpha: float, name: str = "specificity") -> ShardPlan:
    """Shards ``bKKKK-gGGG-cCCC``: prompt batch K x direction group G x direction chunk C."""
    groups = effect_groups(direction, config)
    n = len(requests)
    shards = []
    for k, start in enumerate(range(0, n, config.batch_size)):
        n_b = min(config.batch_size, n - start)
        for g, group in enumerate(groups):
            for c, sl in enumerate(direction_chunks(n_b, int(group.shape[0]), config.specificity_rows)):
                shards.append(Shard(f"b{k:04d}-g{g:03d}-c{c:03d}", float(n_b * (sl.stop - sl.start)),
                                    {"batch": k, "group": g, "start": sl.start, "stop": sl.stop}))
    inputs = {**_base_inputs(adapter, direction, config), "alpha": float(alpha),
              "groups": [len(g) for g in groups], "requests": _request_digest(requests)}
    return ShardPlan.build(name, shards, inputs)


def sharded_specificity(
    ctx: DistContext,
    run: RunDir,
    name: str,
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest | VLARequest],
    config: VLARDTConfig,
    alpha: float,
    *,
    say: Say | None = None,
) -> SpecificityResult:
    """Step ``name`` of ``run``: ``direction_specificity`` computed in shards over the ranks."""
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    reqs = list(requests)
    if not reqs:
        raise ConfigError("the steering effect needs at least one request")
    batches = [reqs[i:i + config.batch_size] for i in range(0, len(reqs), config.batch_size)]
    groups = effect_groups(d, config)
    t0 = time.perf_counter()
    held: dict[int, SteeringEffect] = {}

    def effect_for(k: int) -> SteeringEffect:
        if k not in held:
            held.clear()  # one prefilled batch (its KV cache) at a time
            held[k] = SteeringEffect(
                adapter, batches[k], alpha=alpha, layers=layers, mode=config.specificity_mode,
                metric=config.specificity_metric, alpha_text=config.alpha_text_ratio * alpha,
                include_image=config.include_image, batch_size=config.batch_size, max_rows=config.specificity_rows,
                backend=config.backend, constrain_actions=config.constrain_actions, window=config.window,
                unnorm_key=config.unnorm_key, partial_min=config.partial_min)
        return held[k]

    def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
        s = shard.spec
        eff = effect_for(int(s["batch"]))
        before = eff.rows_run
        values = eff.per_prompt(groups[int(s["group"])][int(s["start"]):int(s["stop"])])
        return {"values": values}, {"rows_run": eff.rows_run - before}

    def merge(shards: dict[str, ShardData]) -> dict[str, Any]:
        plan = specificity_plan(adapter, d, reqs, config, alpha, name)
        blocks: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
        rows_run = 0
        for sh in plan.shards:
            t, meta = shards[sh.key]
            blocks.setdefault((sh.spec["group"], sh.spec["batch"]), []).append((sh.spec["start"], t["values"]))
            rows_run += int(meta.get("rows_run", 0))
        values = []
        for g in range(len(groups)):
            per_batch = [torch.cat([v for _, v in sorted(blocks[(g, k)], key=lambda x: x[0])], dim=1)
                         for k in range(len(batches))]
            values.append(torch.cat(per_batch, dim=0))
        mode, metric = config.specificity_mode, config.specificity_metric
        effect = _MergedEffect(groups, values, f"{SPEC_METRIC_NAMES[metric]}, {mode} α = {float(alpha):g}")
        labels = [getattr(r, "label", "unknown") for r in reqs]
        res = specificity_test(effect, d.vector, **_spec_kwargs(d, config), effect_name=effect.name, meta={
            "mode": mode, "alpha": float(alpha), "layers": list(layers), "metric": metric, "n_prompts": len(reqs),
            "n_harmful": labels.count("harmful"), "n_benign": labels.count("benign"),
            "prefill_reuse": not mode_touches_prefill(mode), "rows_per_pass": config.specificity_rows,
            "direction": _direction_info(d)})
        return dataclasses.replace(res, meta={**res.meta, "rows_run": rows_run,
                                              "seconds": time.perf_counter() - t0}).to_dict()

    value = run_sharded(ctx, run, name, lambda: specificity_plan(adapter, d, reqs, config, alpha, name), compute,
                        merge, say=say)
    return SpecificityResult.from_dict(value)


# -- the whole study -------------------------------------------------------------------------------
def main_step(ctx: DistContext, run: RunDir, name: str, fn: Callable[[], Any]) -> Any:
    """A step that rank 0 computes (``RunDir.step``) while the others wait; its value on every rank."""
    if not ctx.broadcast(bool(run.done(name))) and ctx.is_main:
        run.step(name, fn)
    ctx.barrier()
    return run.load(name)


def run_vla_rdt_distributed(
    ctx: DistContext,
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    config: VLARDTConfig,
    run_dir: str | Path,
    *,
    progress: bool = False,
    log: Say = print,
) -> VLARDTResult:
    """``run_vla_rdt`` on every rank of ``ctx`` (each with its own copy of the model): the
    sweeps and the specificity null in shards, the rest on rank 0. Same run directory layout
    and files; returns the result on every rank (rank 0 writes it)."""
    if not isinstance(adapter, VLAAdapter):
        raise ConfigError(f"{type(adapter).__name__} is not a VLAAdapter")
    say = log if ctx.is_main else _quiet
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    info = _direction_info(d)
    ctx.check_same("the model weights (digest)", adapter.digest())
    ctx.check_same("the direction (digest)", info["digest"])
    run_config = {"experiment": "vla_rdt", "config": config.to_dict(),
                  "model": {k: v for k, v in adapter.describe().items()},
                  "direction": {"digest": info["digest"], "norm": info["norm"], "rank": info["rank"]}}
    run = ctx.main_first(lambda: RunDir(run_dir, run_config, log=say))
    timings: dict[str, float] = run.load("timings") if run.done("timings") else {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        done = ctx.broadcast(bool(run.done(name)))
        t = time.perf_counter()
        out = fn()
        if not done and ctx.is_main:
            timings[name] = time.perf_counter() - t
            run.save("timings", timings)
        return out

    requests = load_requests(
        adapter, config.prompt_file, n_pairs=config.n_pairs, val_fraction=config.val_fraction,
        images=config.images, seed=config.seed, column=config.prompt_column, label_column=config.label_column,
        category_column=config.category_column, pair_column=config.pair_column)
    listed = timed("requests", lambda: main_step(ctx, run, "requests", lambda: [r.to_dict() for r in requests]))
    if [x["instruction"] for x in listed] != [r.instruction for r in requests]:
        raise ConfigError(f"{run.path} holds other requests than this config makes (prompt file changed?)",
                          fix="choose a new run directory")
    store = run.path / "predictions"
    has_val = bool(_subset(requests, "val"))
    sweep_conds = [(m, float(a)) for m in config.sweep_modes for a in config.alphas]
    sweep_splits = [s for s in ("val", "test") if _subset(requests, s)]
    sweep = timed("alpha_sweep", lambda: sharded_conditions(
        ctx, run, "alpha_sweep", adapter, d, requests, config, sweep_conds, sweep_splits, store_dir=store, say=say))

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

    choice = timed("alpha_choice", lambda: main_step(ctx, run, "alpha_choice", do_choice))
    alpha = float(choice["alpha"])
    targets = timed("target_modes", lambda: sharded_conditions(
        ctx, run, "target_modes", adapter, d, requests, config, [(m, alpha) for m in config.target_modes], ["test"],
        store_dir=store, say=say))
    spec = None
    if config.specificity:
        test = _subset(requests, "test")
        keep = list(dict.fromkeys(r.pair_id for r in test))[: config.specificity_pairs]
        spec_reqs = [r for r in test if r.pair_id in set(keep)]
        spec = timed("specificity", lambda: sharded_specificity(
            ctx, run, "specificity", adapter, d, spec_reqs, config, alpha, say=say))
    dec = None
    if config.decoupling:
        dec = DecouplingResult.from_dict(timed("decoupling", lambda: main_step(ctx, run, "decoupling", lambda: decoupling(
            adapter, d, requests, config, progress=progress and ctx.is_main).to_dict())))
    counts = {f"{s}/{lab}": len(_subset(requests, s, lab)) for s in ("val", "test") for lab in LABELS}
    result = VLARDTResult(config, adapter.describe(), info, layers, alpha, choice, sweep, targets, spec, dec,
                          counts, dict(timings))
    if ctx.is_main:
        run.save("result", result.to_dict())
        run.save("summary", result.summary())
        if config.figures:
            vla_rdt_figures(result, run.path / "figures")
    ctx.barrier()
    return result


__all__ = ["conditions_plan", "effect_groups", "main_step", "run_vla_rdt_distributed", "sharded_conditions",
           "sharded_specificity", "specificity_plan"]
