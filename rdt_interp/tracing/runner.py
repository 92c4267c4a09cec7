"""What a forward pass does at each site: apply the plan's edits, then record.

Two runners implement it — :class:`rdt_interp.tracing.session.NNsightRunner` (research path,
nnsight) and :class:`rdt_interp.tracing.hooks.HookRunner` (fast path, plain module hooks) —
and share :meth:`Runner.visit`, so both compute exactly the same thing.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from rdt_interp.models.adapter import ModelAdapter
from rdt_interp.tracing.interventions import (
    SITE_ORDER,
    Intervention,
    InterventionPlan,
    Site,
    StepContext,
)
from rdt_interp.tracing.recorder import Recorder


class StopForward(Exception):
    """Raised inside a forward pass once everything that was asked for has been recorded."""


class Runner(abc.ABC):
    def __init__(
        self,
        adapter: ModelAdapter,
        interventions: Sequence[Intervention] | InterventionPlan = (),
        recorders: Sequence[Recorder] = (),
    ) -> None:
        self.adapter = adapter
        self.plan = (
            interventions
            if isinstance(interventions, InterventionPlan)
            else InterventionPlan(interventions, adapter.n_layers, adapter.d_model)
        )
        self.recorders = list(recorders)
        for rec in self.recorders:
            for layer in rec.layers:
                if not 0 <= layer < adapter.n_layers:
                    raise IndexError(f"layer {layer} out of range (model has {adapter.n_layers})")

    def sites(self) -> list[tuple[int, Site]]:
        wanted = set(self.plan.sites())
        for rec in self.recorders:
            wanted.update(rec.sites())
        return sorted(wanted, key=lambda ls: (ls[0], SITE_ORDER[ls[1]]))

    def visit(self, h: Tensor, layer: int, site: Site, ctx: StepContext) -> Tensor:
        h = self.plan.apply(h, layer, site, ctx)
        for rec in self.recorders:
            if rec.site == site and layer in rec.layers and rec.wants(ctx):
                rec.record(h, layer, ctx)
        return h

    def stop_after(self, ctx: StepContext, need_output: bool) -> tuple[int, Site] | None:
        """The last site to run when only recordings are needed (enables early stopping)."""
        if need_output or self.plan:
            return None
        active = [s for rec in self.recorders if rec.wants(ctx) for s in rec.sites()]
        if not active:
            return None
        return max(active, key=lambda ls: (ls[0], SITE_ORDER[ls[1]]))

    def forward(self, kwargs: dict[str, Any], ctx: StepContext, *, need_output: bool = True) -> Any:
        """Run ``adapter.model(**kwargs)`` with edits and recordings; ``None`` if stopped early.
        A decode step runs under :func:`repeatable_decode_attention`."""
        if ctx.phase != "decode":
            return self._run(kwargs, ctx, need_output)
        with repeatable_decode_attention(self.adapter.device):
            return self._run(kwargs, ctx, need_output)

    @abc.abstractmethod
    def _run(self, kwargs: dict[str, Any], ctx: StepContext, need_output: bool) -> Any:
        """The forward pass itself, as this runner applies edits and recordings."""


@contextlib.contextmanager
def repeatable_decode_attention(device: torch.device) -> Iterator[None]:
    """SDPA without the cuDNN backend, on CUDA, for a decode step.

    cuDNN's kernel for one query per row under a key mask is not run-to-run repeatable: on an
    H200, two identical batch-32 generations differed from the first decode step on (layer 0),
    while the efficient and math backends gave identical runs, and deterministic-algorithms mode
    did not catch it (``benchmarks/diagnose_backends.py``, docs/benchmarks.md). This was the
    "hooks vs nnsight" token difference at batch 32. Prefill passes keep every backend (their
    outputs were identical run to run)."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = [b for b, on in ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
                               (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
                               (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled())) if on]
    with sdpa_kernel(allowed or [SDPBackend.MATH]):
        yield
