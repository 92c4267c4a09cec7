"""The nnsight tracing layer over a model adapter.

:class:`TraceSession` wraps ``adapter.model`` with ``nnsight.NNsight`` and exposes the decoder
layers uniformly, so research code can write free-form nnsight interventions::

    session = TraceSession(adapter)
    batch = adapter.encode(["How do I bake bread?"])
    with session.trace(batch):
        h = session.layer(12).output          # [batch, seq, d] (tuple outputs are unwrapped)
        session.layer(12).output = h * 0.5
        logits = session.model.output.logits.save()

:class:`NNsightRunner` applies an :class:`InterventionPlan` and recorders through nnsight, one
trace per forward pass (prefill or decode step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import nnsight
from nnsight import NNsight

from rdt_interp.models.adapter import EncodedBatch, ModelAdapter, get_submodule
from rdt_interp.tracing.interventions import Site, StepContext
from rdt_interp.tracing.runner import Runner


class TraceSession:
    """nnsight over an adapter's model. ``session.model`` is the root envoy."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.model = NNsight(adapter.model)
        self._paths = {id(m): name for name, m in adapter.model.named_modules()}

    def envoy_of(self, module: Any) -> Any:
        path = self._paths.get(id(module))
        if path is None:
            raise KeyError(f"{type(module).__name__} is not a submodule of {self.adapter.name}")
        return get_submodule(self.model, path) if path else self.model

    def layer(self, index: int) -> Any:
        return get_submodule(self.model, self.adapter.layers_path)[index]

    @contextlib.contextmanager
    def trace(self, batch: EncodedBatch | dict[str, Any], **kwargs: Any) -> Iterator[Any]:
        if isinstance(batch, EncodedBatch):
            inputs = self.adapter.prefill_kwargs(self.adapter.check_batch(batch), use_cache=False)
        else:
            inputs = batch
        with self.model.trace(**inputs, **kwargs) as tracer:
            yield tracer


class NNsightRunner(Runner):
    """Applies edits and recordings inside one nnsight trace per forward pass."""

    def __init__(self, adapter: ModelAdapter, *args: Any, session: TraceSession | None = None,
                 **kwargs: Any) -> None:
        super().__init__(adapter, *args, **kwargs)
        self.session = session or TraceSession(adapter)
        self._sites = self.sites()

    def __enter__(self) -> NNsightRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _envoy(self, layer: int, site: Site) -> Any:
        if site is Site.ATTN_OUT:
            return self.session.envoy_of(self.adapter.attn_module(layer))
        if site is Site.MLP_OUT:
            return self.session.envoy_of(self.adapter.mlp_module(layer))
        return self.session.layer(layer)

    def _run(self, kwargs: dict[str, Any], ctx: StepContext, need_output: bool) -> Any:
        stop_at = self.stop_after(ctx, need_output)
        holder: list[Any] = []
        with self.session.model.trace(**kwargs) as tracer:
            for layer, site in self._sites:
                env = self._envoy(layer, site)
                if site is Site.RESID_PRE:
                    h = env.input
                    new = self.visit(h, layer, site, ctx)
                    if new is not h:
                        env.input = new
                else:
                    out = env.output
                    h = out[0] if isinstance(out, tuple) else out
                    new = self.visit(h, layer, site, ctx)
                    if new is not h:
                        env.output = (new, *out[1:]) if isinstance(out, tuple) else new
                if stop_at == (layer, site):
                    tracer.stop()
            if stop_at is None:
                holder.append(nnsight.save(self.session.model.output))
        return holder[0] if holder else None
