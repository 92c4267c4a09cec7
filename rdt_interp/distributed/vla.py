"""The VLA RDT study across processes: the study's own pipeline with a :class:`ShardedExecutor`.

Nothing here re-implements the study: :func:`run_vla_rdt_distributed` is
:func:`rdt_interp.studies.vla.run_vla_rdt` with ``executor=ShardedExecutor(ctx)``, and
:func:`sharded_conditions` / :func:`sharded_specificity` are the pipeline's own sweep and
specificity steps run with it (for jobs that run one step alone). Results equal the
single-process study's (up to the wall-clock fields ``seconds``/``timings`` and the
``rows_run`` count); a run started with one process can be resumed with several and vice versa.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from rdt_interp.analysis.specificity import SpecificityResult
from rdt_interp.directions.direction import Direction
from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.executor import ShardedExecutor
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.store import PredictionStore
from rdt_interp.studies.vla import (
    LabeledRequest,
    SweepResult,
    VLARDTConfig,
    VLARDTResult,
    as_direction,
    run_vla_rdt,
)
from rdt_interp.studies.vla.pipeline import conditions_step, specificity_step

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level

Say = Callable[[str], None]


def run_vla_rdt_distributed(
    ctx: DistContext,
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    config: VLARDTConfig,
    run_dir: str | Path,
    *,
    progress: bool = False,
    log: Say = logger.info,
    shuffled: Tensor | None = None,
) -> VLARDTResult:
    """``run_vla_rdt`` on every rank of ``ctx`` (each with its own copy of the model): the
    sweeps and the specificity null in shards, the rest on rank 0. Same run directory layout
    and files; returns the result on every rank (rank 0 writes it). ``shuffled``: as in
    ``run_vla_rdt`` (the same on every rank)."""
    return run_vla_rdt(adapter, direction, config, run_dir, progress=progress, log=log,
                       executor=ShardedExecutor(ctx, log=log), shuffled=shuffled)


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
    """Step ``name`` of ``run``: action metrics of every condition on every split, predicted in
    shards over the ranks (the study's own sweep step); ``store_dir`` holds the predictions."""
    d = as_direction(direction, adapter.d_model)
    return conditions_step(ShardedExecutor(ctx, log=say), run, name, adapter, d, requests, config, conditions,
                           splits, store=PredictionStore(store_dir))


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
    """Step ``name`` of ``run``: ``direction_specificity`` with the effect computed in shards."""
    d = as_direction(direction, adapter.d_model)
    return specificity_step(ShardedExecutor(ctx, log=say), run, name, adapter, d, requests, config, float(alpha))


__all__ = ["run_vla_rdt_distributed", "sharded_conditions", "sharded_specificity"]
