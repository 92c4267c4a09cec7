"""A Triton GEMV for batch-1 decode steps, registered as a custom op so a compiled layer calls
it and a CUDA graph captures it like any other kernel.

:func:`gemv` computes ``x @ W.T`` for one row. The library's GEMVs read the LLM's o and down
projections at 2.5-3.4 TB/s on an H200 and split K into partial sums that a second kernel adds
up; this kernel gives each program ``block_n`` whole rows of ``W`` (no partial sums leave it),
streams ``block_k`` tiles with Triton's software pipelining and accumulates in float32. Per shape
(out, in) it runs the tile configuration measured best on an H200 (``benchmarks/decode_kernels.py``);
shapes not in :data:`GEMV_TUNED` use ``F.linear``. At batch 1 it took the OpenVLA-7b decode step
from 4.80 to 4.41 ms (docs/benchmarks.md).

It applies to CUDA tensors in bf16/fp16 on a Hopper GPU (compute capability 9.x, where the
configurations were measured); everything else -- CPU, float32, other GPUs, more than one row --
takes ``F.linear``, so CPU runs and the float32 exactness checks never touch Triton.
"""

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: (out_features, in_features) -> tiles; measured on an H200 (OpenVLA-7b / Llama-2-7b shapes).
#: Each is on a plateau: the next configurations were within 1-2% (docs/bench/gemv_sweep_h200.json).
GEMV_TUNED: dict[tuple[int, int], GemvConfig] = {
    (12288, 4096): GemvConfig(4, 1024, 4, 2),   # fused q/k/v
    (4096, 4096): GemvConfig(2, 1024, 4, 2),    # o
    (22016, 4096): GemvConfig(4, 1024, 4, 2),   # fused gate/up
    (4096, 11008): GemvConfig(2, 512, 2, 3),    # down
    (32064, 4096): GemvConfig(4, 1024, 4, 2),   # LM head (OpenVLA vocabulary)
    (32000, 4096): GemvConfig(4, 1024, 4, 2),   # LM head (Llama-2 vocabulary)
}


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no Triton kernel
        return False
    return torch.cuda.is_available()


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel applies to a model on ``device`` in ``dtype`` (decided once, outside
    any traced code: a CUDA Hopper GPU, 16-bit weights, Triton importable)."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and triton_available()
            and _hopper(device.index if device.index is not None else torch.cuda.current_device()))


# -- GEMV ----------------------------------------------------------------------------------------


@functools.cache
def _gemv_kernel() -> Any:
    from rdt_interp.fast._gemv_kernel import gemv_kernel  # lazy: Triton loads only when used

    return gemv_kernel


def gemv_launch(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor, cfg: GemvConfig) -> None:
    """Write ``x @ w.T + b`` for one contiguous row ``x`` into ``out`` (``[N]``, ``N % block_n == 0``)."""
    n, k = w.shape
    _gemv_kernel()[(n // cfg.block_n,)](
        x, w, b if b is not None else w, out, k, w.stride(0),
        HAS_BIAS=b is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@torch.library.custom_op("rdt_interp::gemv", mutates_args=())
def gemv(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x, w, b)`` for a one-row ``x`` (``[..., K]``) by the Triton kernel."""
    out = torch.empty(w.shape[0], dtype=x.dtype, device=x.device)
    gemv_launch(x.contiguous(), w, b, out, GEMV_TUNED[(w.shape[0], w.shape[1])])
    return out.reshape(*x.shape[:-1], w.shape[0])


@gemv.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear(x: Tensor, w: Tensor, b: Tensor | None, enabled: bool) -> Tensor:
    """``F.linear``, by :func:`gemv` for one row of a tuned shape when ``enabled`` (see
    :func:`usable`). The choice depends on shapes only, static in a compiled step."""
    if (enabled and x.numel() == x.shape[-1] and (w.shape[0], w.shape[1]) in GEMV_TUNED
            and w.is_contiguous() and x.dtype == w.dtype and (b is None or b.dtype == x.dtype)):
        return gemv(x, w, b)
    return F.linear(x, w, b)
