"""The fast path's per-layer kernels, compiled by ``torch.compile`` or run eagerly, and the
stream and dynamo settings their warm-up and capture run under."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, no_type_check

import torch

from rdt_interp.fast.decoder import DecoderStack, decode_layer, head_logits, prefill_layer


class CompiledOrEager:
    """A compiled kernel that becomes its eager version for good if compiling or running it
    raises (a compiler problem on the target torch costs speed, not the run). Re-running
    eagerly is safe: a kernel only writes its outputs and the same cache slots."""

    def __init__(self, name: str, eager: Callable[..., Any], on_fail: Callable[[str, Exception], None],
                 **compile_kw: Any) -> None:
        self.name = name
        self.eager = eager
        self.compiled = torch.compile(eager, fullgraph=True, **compile_kw)
        self.on_fail = on_fail
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler/runtime failure of the compiled kernel
            self.failed = True
            self.on_fail(self.name, exc)
            return self.eager(*args)


class Kernels:
    """The per-layer functions, compiled or not.

    Each kind gets its own function object (not a ``functools.partial``, which dynamo would
    compile through one shared wrapper), so compiled variants are counted per kind.
    """

    def __init__(self, stack: DecoderStack, *, compile_decode: bool, compile_prefill: bool,
                 on_fail: Callable[[str, Exception], None], autotune: bool = False) -> None:
        spec, eps = stack.spec, stack.spec.final_eps

        @no_type_check
        def prefill(h, w, k_cache, v_cache, cos, sin, mask, adds):
            return prefill_layer(h, w, k_cache, v_cache, cos, sin, mask, adds, spec=spec)

        @no_type_check
        def decode(h, w, k_cache, v_cache, cos, sin, mask, slot, adds):
            return decode_layer(h, w, k_cache, v_cache, cos, sin, mask, slot, adds, spec=spec)

        @no_type_check
        def head(h_last, norm_w, lm_w, lm_b):
            return head_logits(h_last, norm_w, lm_w, lm_b, eps=eps, triton=spec.triton_gemv)

        # decode shapes are static per batch size; prefill shapes also vary with the bucket, so
        # let dynamo make the dimension that changed dynamic (a new bucket then needs no compile)
        self.prefill_layer = (CompiledOrEager("prefill layer", prefill, on_fail, dynamic=None)
                              if compile_prefill else prefill)
        # autotune: Inductor benchmarks its own (Triton) matmul kernels against cuBLAS for the
        # decode shapes; the steps are captured as CUDA graphs here, so not by Inductor
        dec_kw: dict[str, Any] = {"dynamic": False}
        if autotune:
            dec_kw["mode"] = "max-autotune-no-cudagraphs"
        self.decode_layer = (CompiledOrEager("decode layer", decode, on_fail, **dec_kw)
                             if compile_decode else decode)
        self.head = CompiledOrEager("LM head", head, on_fail, **dec_kw) if compile_decode else head
        self.compiled = compile_decode or compile_prefill


@contextlib.contextmanager
def stream_ctx(device: torch.device) -> Iterator[Any]:
    if device.type != "cuda":
        yield None
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield stream
    torch.cuda.current_stream(device).wait_stream(stream)


@contextlib.contextmanager
def dynamo_limits() -> Iterator[None]:
    """Room for one compiled variant per (batch size, bucket, steering sites) of a layer."""
    import torch._dynamo  # lazy: the compiler stack loads only when a layer is compiled

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(64, int(getattr(cfg, name)))}):
        yield
