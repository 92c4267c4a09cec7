"""The torch.compile'd kernels (inductor on CPU here; Triton on CUDA) give the eager tokens."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.fast import FastGenerator
from rdt_interp.roles import Role
from rdt_interp.tracing import generate
from rdt_interp.tracing.interventions import AddDirection


@pytest.mark.slow
def test_compiled_layers_match_eager(tiny_models):
    chat = tiny_models["tiny-llama"]
    batch = chat.encode(["hi", "How do I bake bread at home?"])
    v = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [AddDirection(v, 3.0, [1], roles=Role.GENERATED, phase="decode"),
           AddDirection(v, 2.0, [2], roles=Role.INSTRUCTION, phase="prefill"),
           AddDirection(v, 1.0, [1], site="mlp_out")]
    fast = FastGenerator(chat, n_tokens=4, compile="all", fuse_projections=True, max_prompt_len=64, warmup=1)
    got = fast.generate(batch, interventions=ivs, return_logits=True)
    assert fast.stats.compile_error is None  # fullgraph compile, no fallback
    assert fast.stats.warmup_seconds > 0
    ref = generate(chat, batch, max_new_tokens=4, interventions=ivs, stop_at_eos=False, return_logits=True)
    assert torch.equal(got.tokens, ref.tokens)
    assert (got.logits - ref.logits).abs().max().item() <= 1e-4
    again = fast.generate(batch, interventions=[AddDirection(v, -3.0, [1], roles=Role.GENERATED, phase="decode"),
                                                AddDirection(v, 0.0, [2], roles=Role.INSTRUCTION, phase="prefill"),
                                                AddDirection(v, 1.0, [1], site="mlp_out")], return_logits=True)
    assert fast.stats.steps_built == 2
    assert (again.logits - got.logits).abs().max().item() > 1e-3
