"""Residual captures across processes: the prompt batches of ``capture`` as shards.

:func:`sharded_capture` returns exactly what :func:`rdt_interp.tracing.capture.capture`
returns for the same arguments: shards are its length-sorted batches of ``batch_size`` prompts
(``bNNNN``), each rank captures its batches, and rank 0 puts the rows back in the caller's
order and writes ``RUN/NAME.safetensors`` (:meth:`Activations.save`); ``RUN/NAME.json`` marks
the step done. :func:`sharded_capture_roles` does the same for
:func:`rdt_interp.tracing.vla.capture_roles` (VLA residuals by role and phase).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.plan import Shard, ShardPlan
from rdt_interp.distributed.shards import ShardData, run_sharded
from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import ModelAdapter
from rdt_interp.roles import Selector
from rdt_interp.studies.rundir import RunDir
from rdt_interp.tracing.capture import Activations, _intervention_tag, _text_of, capture
from rdt_interp.tracing.interventions import Intervention, Site
from rdt_interp.tracing.vla import (
    DEFAULT_ROLES,
    RoleActivations,
    RoleSpec,
    capture_roles,
    parse_roles,
)


def _length_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _plan(name: str, batches: list[list[int]], inputs: dict[str, Any]) -> ShardPlan:
    return ShardPlan.build(name, [Shard(f"b{c:04d}", float(len(rows)), {"rows": rows})
                                  for c, rows in enumerate(batches)], inputs)


def sharded_capture(
    ctx: DistContext,
    run: RunDir,
    name: str,
    adapter: ModelAdapter,
    prompts: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    selector: str | Selector = "last",
    site: str | Site = Site.RESID_PRE,
    batch_size: int = 16,
    backend: str = "hooks",
    interventions: Sequence[Intervention] = (),
    say: Callable[[str], None] | None = None,
) -> Activations:
    """Step ``name`` of ``run``: ``capture(adapter, prompts, ...)`` computed in shards."""
    if not prompts:
        raise ConfigError("capture needs at least one prompt")
    texts = [_text_of(p) for p in prompts]
    batches = _length_batches(texts, batch_size)
    layer_list = list(range(adapter.n_layers)) if layers is None else [int(x) for x in layers]
    sel, st = str(Selector.parse(selector)), Site.parse(site).value
    inputs = {"model": adapter.digest(), "layers": layer_list, "selector": sel, "site": st, "texts": texts,
              "interventions": [_intervention_tag(iv) for iv in interventions], "backend": backend}

    def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
        rows = list(shard.spec["rows"])
        acts = capture(adapter, [prompts[i] for i in rows], layers=layer_list, selector=sel, site=st,
                       batch_size=batch_size, backend=backend, interventions=interventions,  # type: ignore[arg-type]
                       progress=False)
        return {"values": acts.values}, {"rows": rows}

    def merge(shards: dict[str, ShardData]) -> dict[str, Any]:
        parts = [shards[f"b{c:04d}"][0]["values"] for c in range(len(batches))]
        values = torch.empty((len(texts), *parts[0].shape[1:]), dtype=parts[0].dtype)
        for rows, v in zip(batches, parts, strict=True):
            values[torch.as_tensor(rows)] = v
        acts = Activations(values, tuple(layer_list), st, sel, list(texts), adapter.describe())
        acts.save(run.file(f"{name}.safetensors"))
        return {"kind": "Activations", "file": f"{name}.safetensors", "shape": list(values.shape),
                "layers": layer_list, "selector": sel, "site": st}

    run_sharded(ctx, run, name, lambda: _plan(name, batches, inputs), compute, merge, say=say)
    return Activations.load(run.file(f"{name}.safetensors"))


def sharded_capture_roles(
    ctx: DistContext,
    run: RunDir,
    name: str,
    adapter: Any,
    requests: Sequence[Any],
    *,
    roles: Sequence[str | RoleSpec] = DEFAULT_ROLES,
    layers: Sequence[int] | None = None,
    site: Site | str = Site.RESID_PRE,
    batch_size: int = 16,
    backend: str = "hooks",
    constrain_actions: bool = True,
    say: Callable[[str], None] | None = None,
) -> RoleActivations:
    """Step ``name`` of ``run``: ``capture_roles(adapter, requests, ...)`` computed in shards
    (rows and tensors in ``RUN/NAME.safetensors``)."""
    from rdt_interp.storage import load_tensors, save_tensors

    if not requests:
        raise ConfigError("capture_roles needs at least one request")
    specs = parse_roles(roles)
    texts = [getattr(r, "instruction", str(r)) for r in requests]
    batches = _length_batches(texts, batch_size)
    layer_list = list(range(adapter.n_layers)) if layers is None else [int(x) for x in layers]
    from rdt_interp.distributed.executor import _request_digest

    inputs = {"model": adapter.digest(), "roles": [s.name for s in specs], "layers": layer_list,
              "site": Site.parse(site).value, "requests": _request_digest(requests), "backend": backend,
              "constrain_actions": constrain_actions}

    def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
        rows = list(shard.spec["rows"])
        caps = capture_roles(adapter, [requests[i] for i in rows], roles=specs, layers=layer_list, site=site,
                             batch_size=batch_size, backend=backend,  # type: ignore[arg-type]
                             constrain_actions=constrain_actions)
        out = {f"role/{k}": caps.at(k).values for k in caps.roles}
        out["action_ids"] = caps.action_ids
        return out, {"rows": rows}

    def merge(shards: dict[str, ShardData]) -> dict[str, Any]:
        parts = [shards[f"b{c:04d}"][0] for c in range(len(batches))]
        full: dict[str, Tensor] = {}
        for key in parts[0]:
            full[key] = torch.empty((len(texts), *parts[0][key].shape[1:]), dtype=parts[0][key].dtype)
            for rows, p in zip(batches, parts, strict=True):
                full[key][torch.as_tensor(rows)] = p[key]
        save_tensors(run.file(f"{name}.safetensors"), full, {"texts": texts, "layers": layer_list,
                                                             "site": Site.parse(site).value,
                                                             "roles": [s.name for s in specs],
                                                             "model": adapter.describe()})
        return {"kind": "RoleActivations", "file": f"{name}.safetensors", "n": len(texts),
                "roles": [s.name for s in specs], "layers": layer_list}

    run_sharded(ctx, run, name, lambda: _plan(name, batches, inputs), compute, merge, say=say)
    tensors, meta = load_tensors(run.file(f"{name}.safetensors"))
    acts = {r: Activations(tensors[f"role/{r}"], tuple(meta["layers"]), meta["site"], r, list(meta["texts"]),
                           meta["model"]) for r in meta["roles"]}
    return RoleActivations(acts, tensors["action_ids"], tuple(meta["texts"]), meta["model"])


__all__ = ["sharded_capture", "sharded_capture_roles"]
