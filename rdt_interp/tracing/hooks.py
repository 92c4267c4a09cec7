"""The fast path: the same edits and recordings as the nnsight path, through plain module hooks.

Use it as a context manager; hooks are registered once and read the current
:class:`StepContext` set by :meth:`HookRunner.forward`, so one registration serves a whole
generation (prefill and every decode step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from rdt_interp.tracing.interventions import Site, StepContext
from rdt_interp.tracing.runner import Runner, StopForward


class HookRunner(Runner):
    def __enter__(self) -> HookRunner:
        self._handles: list[RemovableHandle] = []
        self._ctx: StepContext | None = None
        self._stop_at: tuple[int, Site] | None = None
        ad = self.adapter
        for layer, site in self.sites():
            if site is Site.RESID_PRE:
                h = ad.layers[layer].register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
            elif site is Site.RESID_POST:
                h = ad.layers[layer].register_forward_hook(self._out_hook(layer, site))
            elif site is Site.ATTN_OUT:
                h = ad.attn_module(layer).register_forward_hook(self._out_hook(layer, site))
            else:
                h = ad.mlp_module(layer).register_forward_hook(self._out_hook(layer, site))
            self._handles.append(h)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _maybe_stop(self, layer: int, site: Site) -> None:
        if self._stop_at == (layer, site):
            raise StopForward

    def _pre_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            ctx = self._ctx
            if args:
                new = self.visit(args[0], layer, Site.RESID_PRE, ctx)
                args = (new, *args[1:])
            else:
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = self.visit(kwargs["hidden_states"], layer, Site.RESID_PRE, ctx)
            self._maybe_stop(layer, Site.RESID_PRE)
            return args, kwargs

        return hook

    def _out_hook(self, layer: int, site: Site):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            ctx = self._ctx
            if isinstance(output, tuple):
                output = (self.visit(output[0], layer, site, ctx), *output[1:])
            else:
                output = self.visit(output, layer, site, ctx)
            self._maybe_stop(layer, site)
            return output

        return hook

    def _run(self, kwargs: dict[str, Any], ctx: StepContext, need_output: bool) -> Any:
        if not hasattr(self, "_handles"):
            raise RuntimeError("use HookRunner as a context manager: `with HookRunner(...) as r:`")
        self._ctx = ctx
        self._stop_at = self.stop_after(ctx, need_output)
        try:
            return self.adapter.model(**kwargs)
        except StopForward:
            return None
        finally:
            self._ctx = None
