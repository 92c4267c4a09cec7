"""Kernel candidates for the batch-1 decode step, measured by ``decode_kernels.py`` before any of
them goes into ``rdt_interp.fast`` (a candidate that loses is deleted, as the one-program-per-head
attention kernel was in issue 18).

``split_kv_attention``: attention of one query per row over the KV cache under a key mask, in
two Triton kernels. The first gives each (row, head, block of ``block_c`` keys) its own program,
which writes the block's softmax statistics (max, sum) and its unnormalised weighted sum of V;
the second combines a head's blocks in a fixed order. At batch 1, 32 heads x 6 blocks = 192
programs read the 5.5 MB of one layer's cache in parallel (the dropped kernel had 32 programs
walk it serially); the fixed combine order keeps it repeatable, which cuDNN's one-query kernel
is not (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
@no_type_check
def _partial_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, C, scale,
                    sq_b, sq_h, sk_b, sk_h, sk_c, sv_b, sv_h, sv_c, sm_b,
                    H: tl.constexpr, N_REP: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                    N_BLOCKS: tl.constexpr):
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // N_REP
    d = tl.arange(0, D)
    c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    inb = c < C
    q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32)
    ok = (tl.load(valid_ptr + b * sm_b + c, mask=inb, other=0) != 0) & inb
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + c[:, None] * sk_c + d[None, :], mask=inb[:, None], other=0.0)
    s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
    s = tl.where(ok, s, float("-inf"))
    m = tl.max(s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a block with no valid key: weights 0
    p = tl.exp(s - m_safe)
    v = tl.load(v_ptr + b * sv_b + hk * sv_h + c[:, None] * sv_c + d[None, :], mask=inb[:, None], other=0.0)
    acc = tl.sum(p[:, None] * v.to(tl.float32), axis=0)
    out = bh * N_BLOCKS + blk
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, tl.sum(p, axis=0))
    tl.store(acc_ptr + out * D + d, acc)


@triton.jit
@no_type_check
def _combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, so_b, so_h,
                    H: tl.constexpr, D: tl.constexpr, N_BLOCKS: tl.constexpr, NB_POW2: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    j = tl.arange(0, NB_POW2)
    has = j < N_BLOCKS
    m = tl.load(m_ptr + bh * N_BLOCKS + j, mask=has, other=float("-inf"))
    lsum = tl.load(l_ptr + bh * N_BLOCKS + j, mask=has, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (bh * N_BLOCKS + j)[:, None] * D + d[None, :], mask=has[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * lsum, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, *,
                       block_c: int = 64, num_warps: int = 4) -> Tensor:
    """``q`` ``[b, H, 1, D]``; ``k``/``v`` ``[b, Hkv, C, D]`` (head dimension contiguous, ``D`` a
    power of two); ``valid`` ``[b, C]`` (bool or uint8, true = attend). Returns ``[b, H, 1, D]``."""
    bsz, n_heads, _, d = q.shape
    n_kv, c = k.shape[1], k.shape[2]
    n_blocks = triton.cdiv(c, block_c)
    valid = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    m = torch.empty(bsz * n_heads * n_blocks, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(bsz * n_heads * n_blocks, d, dtype=torch.float32, device=q.device)
    _partial_kernel[(bsz * n_heads, n_blocks)](
        q, k, v, valid, m, lsum, acc, c, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), valid.stride(0),
        H=n_heads, N_REP=n_heads // n_kv, D=d, BLOCK_C=block_c, N_BLOCKS=n_blocks, num_warps=num_warps)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _combine_kernel[(bsz * n_heads,)](
        m, lsum, acc, out, out.stride(0), out.stride(1),
        H=n_heads, D=d, N_BLOCKS=n_blocks, NB_POW2=triton.next_power_of_2(n_blocks), num_warps=4)
    return out
