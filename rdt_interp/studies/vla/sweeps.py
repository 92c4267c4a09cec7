"""Action metrics per steering condition: the alpha sweep and the target-mode sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rdt_interp.analysis.behaviour import action_metrics, bin_shift
from rdt_interp.directions.direction import Direction
from rdt_interp.errors import ConfigError
from rdt_interp.models.action_tokenizer import ActionTokenizer
from rdt_interp.models.vla import VLAAdapter
from rdt_interp.studies.executor import Condition, Executor, LocalExecutor, sweep_conditions
from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.steering import direction_info
from rdt_interp.studies.store import ActionSet, PredictionStore
from rdt_interp.studies.vla.config import LABELS, VLARDTConfig
from rdt_interp.studies.vla.predict import as_direction, predict, steering_layers
from rdt_interp.studies.vla.requests import LabeledRequest, subset
from rdt_interp.studies.vla.results import ConditionResult, SweepResult


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



def run_conditions(
    adapter: VLAAdapter,
    direction: Direction,
    requests: Sequence[LabeledRequest],
    config: VLARDTConfig,
    conditions: Sequence[tuple[str, float]],
    splits: Sequence[str],
    *,
    store: PredictionStore | None = None,
    executor: Executor | None = None,
    run: RunDir | None = None,
    name: str = "conditions",
    identity: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Action metrics of the baseline and every ``(mode, alpha)`` on each split.

    The predictions come from ``executor`` (default: this process) through ``store``; the
    metrics are computed here, the same way for every executor.
    """
    ex = executor or LocalExecutor()
    conds, preds = predict_conditions(adapter, direction, requests, config, conditions, splits, store=store,
                                      executor=ex, run=run, name=name, identity=identity)
    return sweep_metrics(adapter, direction, requests, config, conds, preds)


def predict_conditions(
    adapter: VLAAdapter,
    direction: Direction,
    requests: Sequence[LabeledRequest],
    config: VLARDTConfig,
    conditions: Sequence[tuple[str, float]],
    splits: Sequence[str],
    *,
    store: PredictionStore | None = None,
    executor: Executor | None = None,
    run: RunDir | None = None,
    name: str = "conditions",
    identity: Mapping[str, Any] | None = None,
) -> tuple[list[Condition], dict[Condition, ActionSet]]:
    """The conditions of a sweep (baseline first, per split) and their predictions."""
    layers = steering_layers(adapter, direction, config.layers)
    by_split = {}
    for split in splits:
        by_split[split] = subset(requests, split)
        if not by_split[split]:
            raise ConfigError(f"no requests in split {split!r}", fix="raise n_pairs or val_fraction")
    conds = sweep_conditions(splits, conditions)

    def run_one(c: Condition, reqs: Sequence[LabeledRequest]) -> ActionSet:
        ivs = [] if c.mode == "none" else config.steering(c.mode, c.alpha, layers).interventions(
            direction, d_model=adapter.d_model)
        return predict(adapter, reqs, ivs, batch_size=config.batch_size, backend=config.backend,
                       constrain_actions=config.constrain_actions)

    ex = executor or LocalExecutor()
    preds = ex.run(conds, by_split, run_one, batch_size=config.batch_size, store=store or PredictionStore(None),
                   run=run, name=name, identity=identity)
    return conds, preds


def sweep_metrics(adapter: VLAAdapter, direction: Direction, requests: Sequence[LabeledRequest],
                  config: VLARDTConfig, conditions: Sequence[Condition],
                  predictions: Mapping[Condition, ActionSet]) -> SweepResult:
    """The :class:`SweepResult` of predicted conditions (each against its split's baseline)."""
    layers = steering_layers(adapter, direction, config.layers)
    out: list[ConditionResult] = []
    for c in conditions:
        reqs = subset(requests, c.split)
        base = predictions[Condition(c.split, "none")]
        spec = config.steering("action" if c.mode == "none" else c.mode, c.alpha, layers)  # none: alpha 0
        out.append(condition_metrics(adapter.action_tokenizer, predictions[c], base, [r.label for r in reqs], config,
                                     mode=c.mode, alpha=c.alpha, alpha_text=spec.alpha_text, split=c.split,
                                     layers=layers))
    return SweepResult(tuple(out), direction_info(direction), adapter.describe())


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
    present = [s for s in splits if subset(requests, s)]
    conds = [(m, float(a)) for m in config.sweep_modes for a in config.alphas]
    return run_conditions(adapter, d, requests, config, conds, present, store=PredictionStore(store_dir),
                          executor=LocalExecutor(progress=progress))


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
    return run_conditions(adapter, d, requests, config, conds, [split], store=PredictionStore(store_dir),
                          executor=LocalExecutor(progress=progress))


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


__all__ = ["alpha_sweep", "choose_alpha", "condition_metrics", "predict_conditions", "run_conditions",
           "sweep_metrics", "target_mode_sweep"]
