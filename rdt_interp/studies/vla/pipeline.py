"""The VLA RDT study end to end: :func:`run_vla_rdt`, one pipeline for every executor.

Requests, alpha sweep (val + test), alpha choice, target-mode sweep, specificity, decoupling,
results and figures, each a cached step of a run directory. The pipeline is written once
against :class:`~rdt_interp.studies.executor.Executor`: in one process
(:class:`~rdt_interp.studies.executor.LocalExecutor`, the default) or sharded over ranks
(:class:`rdt_interp.distributed.executor.ShardedExecutor`); either way the same code chooses
alpha, picks the specificity pairs and computes every metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rdt_interp.analysis.specificity import SpecificityResult, specificity_test
from rdt_interp.directions.direction import Direction
from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.storage import digest_tensor
from rdt_interp.studies.executor import Executor, LocalExecutor
from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.steering import direction_info
from rdt_interp.studies.store import PredictionStore
from rdt_interp.studies.vla.config import VLARDTConfig
from rdt_interp.studies.vla.decoupling import decoupling
from rdt_interp.studies.vla.predict import as_direction, steering_layers
from rdt_interp.studies.vla.requests import (
    LabeledRequest,
    config_requests,
    request_counts,
    specificity_requests,
    subset,
)
from rdt_interp.studies.vla.results import DecouplingResult, SweepResult, VLARDTResult
from rdt_interp.studies.vla.specificity import (
    effect_name,
    specificity_effect,
    specificity_kwargs,
    specificity_of,
)
from rdt_interp.studies.vla.sweeps import choose_alpha, predict_conditions, sweep_metrics

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level


def _shuffled_info(shuffled: Tensor | None) -> dict[str, Any]:
    if shuffled is None:  # off: the identity of runs before the option
        return {}
    return {"shuffled": {"n": int(shuffled.shape[0]), "digest": digest_tensor(shuffled.float().cpu())[:16]}}


def run_identity(adapter: VLAAdapter, direction: Direction, config: VLARDTConfig,
                 shuffled: Tensor | None = None) -> dict[str, Any]:
    """What a run directory of the VLA study is for (its ``config.json``)."""
    info = direction_info(direction)
    return {"experiment": "vla_rdt", "config": config.to_dict(), "model": dict(adapter.describe()),
            "direction": {"digest": info["digest"], "norm": info["norm"], "rank": info["rank"]},
            **_shuffled_info(shuffled)}


def shard_identity(adapter: VLAAdapter, direction: Direction, config: VLARDTConfig,
                   shuffled: Tensor | None = None) -> dict[str, Any]:
    """What a shard of a run depends on (the weights by digest, not by name)."""
    return {"config": config.to_dict(), "model": adapter.digest(), "direction": direction_info(direction)["digest"],
            **_shuffled_info(shuffled)}


def check_shuffled(shuffled: Tensor | None, config: VLARDTConfig, d_model: int) -> Tensor | None:
    """``shuffled`` as ``[n_shuffled, d_model]`` float32 on the CPU, checked against
    ``config.n_shuffled`` (``None`` stays ``None``)."""
    if shuffled is None:
        if config.n_shuffled and config.specificity:
            raise ConfigError(f"the config asks for {config.n_shuffled} label-shuffled directions, "
                              "but none were passed",
                              fix="pass shuffled=label_shuffled_directions(x, y, config.n_shuffled) "
                                  "(run_study builds them), or set n_shuffled = 0")
        return None
    t = torch.as_tensor(shuffled).detach().float().cpu()
    if t.ndim != 2 or t.shape[1] != d_model:
        raise ConfigError(f"shuffled must be [n_shuffled, {d_model}], got shape {tuple(t.shape)}",
                          fix="pass label_shuffled_directions(x, y, n) of activations of the VLA's width")
    if config.n_shuffled and t.shape[0] != config.n_shuffled:
        raise ConfigError(f"{t.shape[0]} label-shuffled directions for n_shuffled = {config.n_shuffled}")
    return t


def conditions_step(
    ex: Executor, run: RunDir, name: str, adapter: VLAAdapter, direction: Direction,
    requests: Sequence[LabeledRequest], config: VLARDTConfig, conditions: Sequence[tuple[str, float]],
    splits: Sequence[str], *, store: PredictionStore, identity: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Step ``name`` of ``run``: the action metrics of every condition on every split, the
    predictions made by ``ex`` (the alpha sweep and the target-mode sweep are such steps)."""
    ident = identity if identity is not None else shard_identity(adapter, direction, config)
    return SweepResult.from_dict(ex.step(
        run, name, lambda got: sweep_metrics(adapter, direction, requests, config, *got).to_dict(),
        work=lambda: predict_conditions(adapter, direction, requests, config, conditions, splits, store=store,
                                        executor=ex, run=run, name=name, identity=ident)))


def specificity_step(
    ex: Executor, run: RunDir, name: str, adapter: VLAAdapter, direction: Direction,
    requests: Sequence[LabeledRequest | VLARequest], config: VLARDTConfig, alpha: float, *,
    identity: Mapping[str, Any] | None = None, shuffled: Tensor | None = None,
) -> SpecificityResult:
    """Step ``name`` of ``run``: :func:`~rdt_interp.studies.vla.direction_specificity` at
    ``alpha``, the steering effect evaluated by ``ex`` (``shuffled``: the label-shuffled null's
    directions, or ``None``)."""
    steering = config.steering(config.specificity_mode, alpha, steering_layers(adapter, direction, config.layers))
    ident = identity if identity is not None else shard_identity(adapter, direction, config, shuffled)
    kwargs = specificity_kwargs(direction, config, shuffled)

    def effect() -> tuple[Any, float]:
        t0 = time.perf_counter()
        eff = ex.effect(specificity_effect(adapter, config, steering), requests, batch_size=config.batch_size,
                        max_rows=config.specificity_rows,
                        test=lambda e: specificity_test(e, direction.vector, **kwargs),
                        about={"name": effect_name(config.specificity_metric, steering.mode, alpha),
                               "reuse": not steering.touches_prefill},
                        run=run, name=name, identity={**ident, "alpha": float(alpha)})
        return eff, t0

    return SpecificityResult.from_dict(ex.step(
        run, name, lambda got: specificity_of(got[0], direction, requests, config, steering, got[1],
                                              shuffled).to_dict(),
        work=effect))


def run_vla_rdt(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    config: VLARDTConfig,
    run_dir: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] = logger.info,
    executor: Executor | None = None,
    shuffled: Tensor | None = None,
) -> VLARDTResult:
    """Run (or resume) the VLA study in ``run_dir``: requests, alpha sweep (val + test), alpha
    choice, target-mode sweep, specificity, decoupling, figures.

    Each step's result is a JSON file in ``run_dir``; predictions are cached per condition in
    ``run_dir/predictions``. A killed run started again recomputes only unfinished work; a run
    directory of another config, model or direction is refused. ``executor`` runs the work
    (default: :class:`LocalExecutor` in this process, logging to ``log``); a run started with
    one executor can be resumed with another.

    ``shuffled`` (``[N, d]``, ``N >= 19``, e.g.
    :func:`~rdt_interp.analysis.specificity.label_shuffled_directions` of the chat activations
    the direction came from; ``None``: off) adds the label-shuffled null to the specificity
    step (``shuffled_p`` beside the random-direction ``p``, which does not change). With
    ``config.n_shuffled > 0`` it is required, with that many rows.
    """
    if not isinstance(adapter, VLAAdapter):
        raise ConfigError(f"{type(adapter).__name__} is not a VLAAdapter")
    ex = executor if executor is not None else LocalExecutor(log=log, progress=progress)
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    info = direction_info(d)
    shuf = check_shuffled(shuffled, config, adapter.d_model)
    run = ex.open_run(run_dir, run_identity(adapter, d, config, shuf))
    identity = shard_identity(adapter, d, config, shuf)

    requests = config_requests(adapter, config)
    listed = ex.step(run, "requests", lambda: [r.to_dict() for r in requests])
    if [x["instruction"] for x in listed] != [r.instruction for r in requests]:
        raise ConfigError(f"{run.path} holds other requests than this config makes (prompt file changed?)",
                          fix="choose a new run directory")
    store = PredictionStore(run.path / "predictions")

    def sweep_step(name: str, conditions: list[tuple[str, float]], splits: list[str]) -> SweepResult:
        return conditions_step(ex, run, name, adapter, d, requests, config, conditions, splits, store=store,
                               identity=identity)

    sweep = sweep_step("alpha_sweep", [(m, float(a)) for m in config.sweep_modes for a in config.alphas],
                       [s for s in ("val", "test") if subset(requests, s)])

    def do_choice() -> dict[str, Any]:
        if config.alpha is not None:
            return {"alpha": float(config.alpha), "how": "given in the config"}
        if not subset(requests, "val"):
            raise ConfigError("alpha is not given and there is no val split to choose it on",
                              fix="set VLARDTConfig(alpha=...) or val_fraction > 0")
        mode = "action" if "action" in config.sweep_modes else config.sweep_modes[0]
        alpha, how = choose_alpha(sweep, mode=mode, split="val", label=config.choose_label,
                                  metric=config.choose_metric)
        return {"alpha": alpha, "how": "argmax on val", **how}

    choice = ex.step(run, "alpha_choice", do_choice)
    alpha = float(choice["alpha"])
    targets = sweep_step("target_modes", [(m, alpha) for m in config.target_modes], ["test"])
    spec = None
    if config.specificity:
        spec = specificity_step(ex, run, "specificity", adapter, d, specificity_requests(requests, config), config,
                                alpha, identity=identity, shuffled=shuf)
    dec = None
    if config.decoupling:
        dec = DecouplingResult.from_dict(ex.step(run, "decoupling", lambda: decoupling(
            adapter, d, requests, config, progress=progress and ex.is_main).to_dict()))
    result = VLARDTResult(config, adapter.describe(), info, layers, alpha, choice, sweep, targets, spec, dec,
                          request_counts(requests), run.timings())

    def write() -> None:
        run.save("result", result.to_dict())
        run.save("summary", result.summary())
        if config.figures:
            from rdt_interp.viz.vla import vla_rdt_figures  # figures read the result types only

            vla_rdt_figures(result, run.path / "figures")

    ex.on_main(write)
    return result


__all__ = ["check_shuffled", "conditions_step", "run_identity", "run_vla_rdt", "shard_identity", "specificity_step"]
