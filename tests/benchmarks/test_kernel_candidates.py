"""The split-KV attention candidate computes SDPA's result (Triton's interpreter, on this CPU)."""

from __future__ import annotations

import pytest

# run by the triton_interpreted fixture (a fresh process under Triton's interpreter)
_SCRIPT = """
import json, sys
import torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from kernel_candidates import split_kv_attention
out = []
for b, h, hkv, c, d, block, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(c)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, h, 1, d), (b, hkv, c, d), (b, hkv, c, d)))
    valid = torch.ones(b, c, dtype=torch.bool)
    valid[:, c - 20:] = False          # slots not written yet
    valid[0, : min(67, c - 30)] = False  # left padding of one row, over whole blocks
    got = split_kv_attention(q, k, v, valid, d ** -0.5, block_c=block)
    kk, vv = (t.repeat_interleave(h // hkv, 1).float() for t in (k, v))
    ref = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=valid[:, None, None, :], scale=d ** -0.5)
    out.append(float((got.float() - ref).abs().max()))
print(json.dumps(out))
"""

CASES = [(2, 4, 4, 150, 16, 64), (3, 4, 2, 70, 32, 16), (1, 2, 2, 336, 64, 64)]


@pytest.mark.slow
def test_split_kv_attention_matches_sdpa(triton_interpreted):
    cases = [[*c, dt] for c in CASES for dt in ("float32", "bfloat16")]
    for case, err in zip(cases, triton_interpreted(_SCRIPT, cases), strict=True):
        assert err <= (1e-5 if case[-1] == "float32" else 2e-2), (case, err)
