"""Triton kernels for decode steps, registered as custom ops so a compiled layer calls them and a
CUDA graph captures them like any other kernel: a GEMV for batch-1 projections and a split-KV
attention for one query per row.

:func:`gemv` computes ``x @ W.T`` for one row. The library's GEMVs read the LLM's o and down
projections at 2.5-3.4 TB/s on an H200 and split K into partial sums that a second kernel adds
up; this kernel gives each program ``block_n`` whole rows of ``W`` (no partial sums leave it),
streams ``block_k`` tiles with Triton's software pipelining and accumulates in float32. Per shape
(out, in) it runs the tile configuration measured best on an H200 (``benchmarks/decode_kernels.py``);
shapes not in :data:`GEMV_TUNED` use ``F.linear``. At batch 1 it took the OpenVLA-7b decode step
from 4.80 to 4.41 ms (docs/benchmarks.md).

:func:`decode_attention` is SDPA for one query per row under a key mask, split over blocks of
the cache so that a batch-1 step runs hundreds of programs, with a fixed combine order so that it
repeats its output bit for bit. On an H200 at OpenVLA-7b shapes (336 cache slots) it takes
8.1 us per layer at batch 1 and 57 us at batch 32, against 23 / 105 us for SDPA's efficient
kernel, the repeatable one the eager decode loops use (docs/bench/attention_vision_h200.json).

Both apply to CUDA tensors in bf16/fp16 on a Hopper GPU (compute capability 9.x, where the
configurations were measured); everything else -- CPU, float32, other GPUs, more than one row
for the GEMV -- takes the library (``F.linear``, SDPA), so CPU runs and the float32 exactness
checks never touch Triton.
"""

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Shaped
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


# -- decode attention ----------------------------------------------------------------------------


class AttentionConfig(NamedTuple):
    block_c: int  # cache slots per program
    num_warps: int


def attention_config(batch: int, n_heads: int) -> AttentionConfig:
    """Blocks of 16 slots while there are few (row, head) pairs, so a step still runs hundreds
    of programs; 64 once there are many. Measured on an H200 at 32 heads and 336 slots: 16 slots
    8.1 us at batch 1 (64: 9.4), 64 slots 57 us at batch 32 (16: 69)."""
    return AttentionConfig(16, 2) if batch * n_heads < 512 else AttentionConfig(64, 2)


def attention_applies(head_dim: int) -> bool:
    """Whether :func:`decode_attention` takes a head of this size (a power of two up to 256)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@functools.cache
def _attention_kernels() -> Any:
    from rdt_interp.fast import _attention_kernel  # lazy: Triton loads only when used

    return _attention_kernel


def decode_attention_launch(
    q: Float[Tensor, "batch heads 1 head_dim"],
    k: Float[Tensor, "batch kv_heads slots head_dim"],
    v: Float[Tensor, "batch kv_heads slots head_dim"],
    valid: Shaped[Tensor, "batch slots"],
    scale: float,
    cfg: AttentionConfig,
) -> Float[Tensor, "batch heads 1 head_dim"]:
    """Softmax attention of ``q`` ``[b, H, 1, D]`` over ``k``/``v`` ``[b, Hkv, C, D]`` (head
    dimension contiguous) where ``valid`` ``[b, C]`` is true; ``[b, H, 1, D]`` in ``q``'s dtype.
    Every row needs at least one valid slot."""
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention needs the head dimension of k and v contiguous")
    kern = _attention_kernels()
    bsz, n_heads, _, d = q.shape
    n_kv, c = k.shape[1], k.shape[2]
    n_blocks = -(-c // cfg.block_c)
    valid = valid.contiguous()
    valid = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    m = torch.empty(bsz * n_heads * n_blocks, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(bsz * n_heads * n_blocks, d, dtype=torch.float32, device=q.device)
    kern.attention_partial_kernel[(bsz * n_heads, n_blocks)](
        q, k, v, valid, m, lsum, acc, c, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), valid.stride(0),
        H=n_heads, N_REP=n_heads // n_kv, D=d, BLOCK_C=cfg.block_c, N_BLOCKS=n_blocks, num_warps=cfg.num_warps)
    out = torch.empty(bsz, n_heads, 1, d, dtype=q.dtype, device=q.device)
    kern.attention_combine_kernel[(bsz * n_heads,)](
        m, lsum, acc, out, out.stride(0), out.stride(1),
        H=n_heads, D=d, N_BLOCKS=n_blocks, NB_POW2=1 << max(0, (n_blocks - 1).bit_length()), num_warps=4)
    return out


@torch.library.custom_op("rdt_interp::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
    """:func:`decode_attention_launch` with the configuration of :func:`attention_config`."""
    return decode_attention_launch(q, k, v, valid, scale, attention_config(q.shape[0], q.shape[1]))


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])
