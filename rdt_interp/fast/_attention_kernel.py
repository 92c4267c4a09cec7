"""The Triton source of :func:`rdt_interp.fast.triton_ops.decode_attention` (imported only when it
runs, so Triton loads only where the kernel is used).

Attention of one query per row over the KV cache under a key mask, in two kernels. The first
gives each (row, head, block of ``BLOCK_C`` keys) its own program, which writes the block's
softmax statistics (max, sum) and its unnormalised weighted sum of V; the second combines a
head's blocks in a fixed order, so the result is the same bit for bit on every run (cuDNN's
one-query kernel is not, docs/benchmarks.md). At batch 1, 32 heads x 21 blocks of 16 keys read a
layer's cache in parallel.
"""

from typing import no_type_check

import triton
import triton.language as tl


@triton.jit
@no_type_check  # the test suite's runtime type checker must not wrap what Triton compiles
def attention_partial_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, C, scale,
                             sq_b, sq_h, sk_b, sk_h, sk_c, sv_b, sv_h, sv_c, sm_b,
                             H: tl.constexpr, N_REP: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                             N_BLOCKS: tl.constexpr):
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // N_REP  # grouped-query attention: query head h reads kv head h // n_rep
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
def attention_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, so_b, so_h,
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
