"""The Triton kernels (GEMV, decode attention): where they are used, and what they compute
(Triton's interpreter, on this CPU)."""

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
    described = FastGenerator(chat, n_tokens=2, max_batch=1).describe()
    assert described["triton_gemv"] is False and described["triton_attention"] is False


_ATTENTION = """
import json, sys
import torch, torch.nn.functional as F
from rdt_interp.fast.triton_ops import AttentionConfig, decode_attention_launch
out = []
for b, h, hkv, c, d, block, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(c)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, h, 1, d), (b, hkv, c, d), (b, hkv, c, d)))
    valid = torch.ones(b, c, dtype=torch.bool)
    valid[:, c - 20:] = False          # slots not written yet
    valid[0, : min(67, c - 30)] = False  # left padding of one row, over whole blocks
    got = decode_attention_launch(q, k, v, valid, d ** -0.5, AttentionConfig(block, 2))
    again = decode_attention_launch(q, k, v, valid, d ** -0.5, AttentionConfig(block, 2))
    kk, vv = (t.repeat_interleave(h // hkv, 1).double() for t in (k, v))
    ref = F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=valid[:, None, None, :], scale=d ** -0.5)
    out.append([float((got.double() - ref).abs().max()), bool(torch.equal(got, again)), list(got.shape)])
print(json.dumps(out))
"""

# (batch, heads, kv heads, cache slots, head dim, block of slots): blocks that end past the
# cache, grouped-query heads, one block
_ATTENTION_CASES = [(2, 4, 4, 150, 16, 64), (3, 4, 2, 70, 32, 16), (1, 2, 2, 48, 64, 64)]


@pytest.mark.slow
def test_decode_attention_kernel_computes_masked_softmax_attention(triton_interpreted):
    cases = [[*c, dt] for c in _ATTENTION_CASES for dt in ("float32", "bfloat16")]
    for case, (err, repeats, shape) in zip(cases, triton_interpreted(_ATTENTION, cases), strict=True):
        # float32 statistics; a bf16 output is rounded once (|out| < 4 here)
        assert err <= (1e-5 if case[-1] == "float32" else 2 ** -6), (case, err)
        assert repeats and shape == [case[0], case[1], 1, case[4]]


def test_attention_blocks_shrink_when_few_heads_would_run():
    assert triton_ops.attention_config(1, 32).block_c == 16    # 32 (row, head) pairs
    assert triton_ops.attention_config(32, 32).block_c == 64   # 1024
    assert [triton_ops.attention_applies(d) for d in (8, 64, 96, 128, 256, 512)] == [
        False, True, False, True, True, False]


def test_decode_layers_take_the_attention_kernel_and_prefill_layers_do_not(monkeypatch, tiny_models):
    calls: list[tuple[int, ...]] = []

    def fake(q, k, v, valid, scale):  # the kernel's contract, by SDPA
        calls.append(tuple(q.shape))
        n_rep = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(n_rep, 1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale)

    chat = tiny_models["tiny-llama"]
    batch = chat.encode(["a short prompt", "another, longer prompt here"])
    want = FastGenerator(chat, n_tokens=3, max_batch=2).generate(batch, return_logits=True)
    monkeypatch.setattr(triton_ops, "decode_attention", fake)
    monkeypatch.setattr(triton_ops, "usable", lambda device, dtype: True)  # as on a Hopper GPU
    fast = FastGenerator(chat, n_tokens=3, max_batch=2)
    spec = fast.stack.spec
    assert spec.triton_attention and fast.describe()["triton_attention"]
    got = fast.generate(batch, return_logits=True)
    # two decode steps of every layer; the prefill kept SDPA
    assert calls == [(2, spec.n_heads, 1, spec.head_dim)] * (2 * spec.n_layers)
    assert torch.equal(got.tokens, want.tokens)
    assert (got.logits - want.logits).abs().max() <= 1e-5


def test_attention_launch_checks_shapes_before_any_kernel_runs():
    from jaxtyping import TypeCheckError

    q, valid = torch.randn(1, 2, 1, 16), torch.ones(1, 5, dtype=torch.bool)
    cfg = triton_ops.AttentionConfig(16, 2)
    with pytest.raises(TypeCheckError):  # head sizes differ
        triton_ops.decode_attention_launch(q, torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32), valid, 0.25, cfg)
    with pytest.raises(TypeCheckError):  # the mask covers other slots than the cache
        triton_ops.decode_attention_launch(q, torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), valid, 0.25, cfg)
