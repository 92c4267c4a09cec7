"""The Triton source of :func:`rdt_interp.fast.triton_ops.gemv` (imported only when it runs, so
Triton loads only where the kernel is used)."""

from typing import no_type_check

import triton
import triton.language as tl


@triton.jit
@no_type_check  # the test suite's runtime type checker must not wrap what Triton compiles
def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, K, stride_w,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[rows] = W[rows] @ x (+ b[rows])`` for this program's ``BLOCK_N`` rows of ``W``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_main = K - K % BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        x = tl.load(x_ptr + k0 + cols).to(tl.float32)
        w = tl.load(w_ptrs + k0).to(tl.float32)
        acc += w * x[None, :]
    if k_main < K:  # the last, partial tile (e.g. K = 11008 = 21.5 tiles of 512)
        ok = k_main + cols < K
        x = tl.load(x_ptr + k_main + cols, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k_main, mask=ok[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))
