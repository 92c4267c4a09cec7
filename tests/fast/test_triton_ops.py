"""The Triton GEMV: where it is used, and what it computes (Triton's interpreter, on this CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdt_interp.errors import ConfigError
from rdt_interp.fast import FastGenerator, triton_ops
from rdt_interp.fast.triton_ops import GemvConfig

# run by the triton_interpreted fixture (a fresh process under Triton's interpreter)
_INTERPRETED = """
import json, sys
import torch, torch.nn.functional as F
from rdt_interp.fast.triton_ops import GemvConfig, gemv_launch
out = []
for n, k, cfg, bias, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = torch.empty(n, dtype=dtype)
    gemv_launch(x, w, b, y, GemvConfig(*cfg))
    ref = F.linear(x.double(), w.double(), None if b is None else b.double()).reshape(-1)
    out.append([float((y.double() - ref).abs().max()), float(ref.abs().max())])
print(json.dumps(out))
"""

CASES = [
    (64, 512, (4, 256, 4, 2), False),
    (32, 1024, (2, 512, 2, 3), True),
    (16, 1344, (8, 512, 4, 2), False),   # K not a multiple of block_k: a partial last tile
    (8, 200, (2, 256, 2, 2), True),      # K smaller than one tile
]


def test_gemv_kernel_computes_x_times_w_transposed(triton_interpreted):
    cases = [[*c, dt] for c in CASES for dt in ("float32", "bfloat16")]
    for (n, k, _cfg, _bias, dtype), (err, scale) in zip(cases, triton_interpreted(_INTERPRETED, cases), strict=True):
        # float32 accumulation; the output rounded once to the dtype
        tol = 1e-4 * scale if dtype == "float32" else 2 ** -7 * scale
        assert err <= tol, (n, k, dtype, err, scale)


@pytest.fixture
def spy(monkeypatch):
    calls: list[tuple[int, ...]] = []

    def fake_gemv(x, w, b):
        calls.append(tuple(w.shape))
        return F.linear(x, w, b)

    monkeypatch.setattr(triton_ops, "gemv", fake_gemv)
    monkeypatch.setattr(triton_ops, "GEMV_TUNED", {(8, 16): GemvConfig(2, 16, 1, 1)})
    return calls


def test_linear_takes_the_kernel_only_for_one_row_of_a_tuned_shape_when_enabled(spy):
    w, w_other = torch.randn(8, 16), torch.randn(4, 16)
    one, two = torch.randn(1, 1, 16), torch.randn(2, 1, 16)
    assert torch.equal(triton_ops.linear(one, w, None, True), F.linear(one, w))
    assert spy == [(8, 16)]
    for x, weight, enabled in ((two, w, True), (one, w_other, True), (one, w, False)):
        assert torch.equal(triton_ops.linear(x, weight, None, enabled), F.linear(x, weight))
    assert spy == [(8, 16)]  # rows > 1, an untuned shape, or disabled: the library


def test_kernel_is_never_chosen_on_cpu_or_in_float32():
    assert not triton_ops.usable(torch.device("cpu"), torch.bfloat16)
    assert not triton_ops.usable(torch.device("cpu"), torch.float32)


def test_asking_for_the_kernel_where_it_cannot_run_is_refused(tiny_models):
    chat = tiny_models["tiny-llama"]
    with pytest.raises(ConfigError, match="Hopper"):
        FastGenerator(chat, n_tokens=2, max_batch=1, triton_kernels=True)
    assert FastGenerator(chat, n_tokens=2, max_batch=1).describe()["triton_gemv"] is False
