"""The torch.compile'd kernels (inductor on CPU here; Triton on CUDA) give the eager tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# The suite's runtime type checker wraps the annotated vision forwards, which torch.compile cannot
# trace (the fast path then runs the towers eagerly, as it should): compiled towers are checked in
# a process without that checker.
_VISION = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from conftest import build_tiny_vla, vla_requests
from rdt_interp.fast import FastGenerator
from rdt_interp.tracing import rdt_plus
torch.set_num_threads(1)
vla = build_tiny_vla()
v = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(1))
ivs = rdt_plus(v / v.norm(), 4.0, 2.0, [1])
reqs = vla_requests(2)
fast = FastGenerator(vla, compile="all", max_prompt_len=160, bucket=8, warmup=1)
got = fast.predict_actions(reqs, interventions=ivs, unnorm_key="bridge_orig", return_logits=True)
ref = vla.predict_actions(reqs, interventions=ivs, unnorm_key="bridge_orig", return_logits=True)
print(json.dumps({"compile_error": fast.stats.compile_error,
                  "towers_compiled": [type(t).__name__ for t, _ in fast._image_features.towers],
                  "tokens_equal": bool(torch.equal(got.token_ids, ref.token_ids)),
                  "max_logit_diff": float((got.action_logits - ref.action_logits).abs().max())}))
"""


@pytest.mark.slow
def test_compiled_vision_towers_give_the_eager_actions():
    here = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-c", _VISION, str(here)], capture_output=True, text=True,
                         cwd=here.parents[1], timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["compile_error"] is None and got["towers_compiled"] == ["CompiledOrEager"] * 2
    assert got["tokens_equal"]
    assert got["max_logit_diff"] <= 1e-3
