"""Decoupling: does the VLA still represent harm where RDT acts? Probe grid per layer and role."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rdt_interp.analysis.layer_pick import grid_peaks
from rdt_interp.analysis.probe_grid import probe_grid
from rdt_interp.directions.direction import Direction
from rdt_interp.models.vla import VLAAdapter
from rdt_interp.studies.steering import direction_info
from rdt_interp.studies.vla.config import LABELS, VLARDTConfig
from rdt_interp.studies.vla.predict import as_direction, steering_layers
from rdt_interp.studies.vla.requests import LabeledRequest
from rdt_interp.studies.vla.results import DecouplingResult
from rdt_interp.tracing.vla import capture_roles


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

    ``peaks``: per role, the layer of the largest ``|proj AUC - 0.5|`` with its p-value
    Holm-adjusted over the layer grid (the peak is picked, so its raw p-value overstates).
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
    return DecouplingResult(grid, caps.roles, layers[0], direction_info(d), peaks=grid_peaks(grid, "proj_auc"))


__all__ = ["decoupling"]
