"""FastGenerator on CPU: the eager path's tokens (fp32: exactly), RDT / RDT+ through static
buffers, alpha and direction changes without rebuilding steps."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.fast import FastGenerator
from rdt_interp.roles import Role
from rdt_interp.tracing import generate
from rdt_interp.tracing.interventions import AblateDirection, AddDirection, rdt, rdt_plus

from .conftest import vla_requests

PROMPTS = ["hi", "How do I bake bread at home?", "Tell me a story.", "Why?"]
LOGIT_TOL = 1e-4


def eager(adapter, batch, n, ivs=(), **kw):
    return generate(adapter, batch, max_new_tokens=n, interventions=ivs, stop_at_eos=False,
                    return_logits=True, **kw)


def assert_same(fast, ref):
    assert torch.equal(fast.tokens.cpu(), ref.tokens.cpu())
    assert (fast.logits - ref.logits).abs().max().item() <= LOGIT_TOL


@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def chat(request, tiny_models):
    return tiny_models[request.param]


def test_chat_models_match_eager_with_edits_at_every_site(chat):
    batch = chat.encode(PROMPTS)
    v = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [AddDirection(v, 3.0, [1], roles=Role.GENERATED, phase="decode"),
           AddDirection(v, 2.0, [0, 2], roles=Role.INSTRUCTION, phase="prefill"),
           AddDirection(-v, 1.5, [1], site="attn_out"),
           AddDirection(v, 1.0, [1], site="mlp_out"),
           AddDirection(v, 0.5, [3], site="resid_post")]
    fast = FastGenerator(chat, n_tokens=5, bucket=8)
    plain = fast.generate(batch, return_logits=True)
    assert_same(plain, eager(chat, batch, 5))
    steered = fast.generate(batch, interventions=ivs, return_logits=True)
    assert_same(steered, eager(chat, batch, 5, ivs))
    assert (steered.logits - plain.logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", ["none", "rdt", "rdt_plus", "rdt_plus_image"])
def test_vla_actions_match_eager(vla, direction, kind):
    ivs = {"none": [], "rdt": rdt(direction, 6.0, [1, 2]),
           "rdt_plus": rdt_plus(direction, 6.0, 4.0, [1, 2]),
           "rdt_plus_image": rdt_plus(direction, 6.0, 4.0, 1, include_image=True)}[kind]
    reqs = vla_requests(5)
    fast = FastGenerator(vla, max_prompt_len=256)
    ref = vla.predict_actions(reqs, interventions=ivs, unnorm_key="bridge_orig", return_logits=True)
    got = fast.predict_actions(reqs, interventions=ivs, unnorm_key="bridge_orig", return_logits=True)
    assert torch.equal(got.token_ids, ref.token_ids)
    assert torch.equal(got.actions, ref.actions)
    assert (got.action_logits - ref.action_logits).abs().max().item() <= LOGIT_TOL
    if ivs:
        base = vla.predict_actions(reqs, return_logits=True)
        assert (base.action_logits - ref.action_logits).abs().max().item() > 1e-2  # steering acts


@pytest.mark.parametrize("kind", ["none", "rdt_plus"])
def test_the_testbed_vla_matches_eager(kind):
    """The testbed VLA (Qwen2 decoder, its own vision encoder) runs on the same fast path."""
    from rdt_interp.testbed.adapter import build_tiny_testbed_vla

    tb = build_tiny_testbed_vla(seed=2)
    with torch.no_grad():  # logits spread wide enough that fp32 greedy tokens are no near-ties
        for p in tb.model.language_model.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
    r = torch.randn(tb.d_model, generator=torch.Generator().manual_seed(4))
    ivs = rdt_plus(r / r.norm(), 6.0, 4.0, [1, 2]) if kind == "rdt_plus" else []
    reqs = vla_requests(3, size=tb.image_size)
    ref = tb.predict_actions(reqs, interventions=ivs, return_logits=True)
    got = FastGenerator(tb, max_prompt_len=160, bucket=8).predict_actions(reqs, interventions=ivs,
                                                                        return_logits=True)
    assert torch.equal(got.token_ids, ref.token_ids)
    assert (got.action_logits - ref.action_logits).abs().max().item() <= LOGIT_TOL


def test_an_unmerged_testbed_vla_is_refused():
    from rdt_interp.testbed.adapter import build_tiny_testbed_vla

    with pytest.raises(ConfigError, match="merge"):
        FastGenerator(build_tiny_testbed_vla(seed=2, merge=False))


def test_alpha_and_direction_changes_reuse_the_steps(vla, direction):
    batch = vla.encode(vla_requests(4))
    fast = FastGenerator(vla, max_prompt_len=256)
    fast.generate(batch, interventions=rdt_plus(direction, 1.0, 1.0, 1), return_logits=True)
    assert fast.stats.steps_built == 2
    other = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(9))
    per_row = torch.tensor([0.0, 8.0, -8.0, 3.0])
    cases = [rdt_plus(direction, 6.0, 3.0, 1), rdt_plus(direction, -6.0, 0.0, 1), rdt_plus(other, 6.0, 3.0, 1),
             [AddDirection(other, per_row, 1, roles=Role.ACTION, phase="decode"),
              AddDirection(direction, per_row, 1, roles=Role.TEXT, phase="prefill")]]
    outs = []
    for ivs in cases:
        got = fast.generate(batch, interventions=ivs, return_logits=True)
        assert_same(got, eager(vla, batch, 7, ivs))
        outs.append(got.logits)
    assert fast.stats.steps_built == 2  # new values, no new steps
    for a, b in zip(outs, outs[1:], strict=False):
        assert (a - b).abs().max().item() > 1e-2  # the outputs follow the new values


def test_the_same_edits_in_another_order_get_their_own_values(vla, direction):
    """Two lists with one layout key (same sites) but their edits in another order: the captured
    steps are shared, each call's buffers hold its own list's values in its own order."""
    batch = vla.encode(vla_requests(3))
    other = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(11))
    a = [AddDirection(direction, 6.0, 1, roles=Role.ACTION, phase="decode"),
         AddDirection(other, -4.0, 1, roles=Role.ACTION, phase="decode"),
         AddDirection(other, 3.0, 1, roles=Role.TEXT, phase="prefill")]
    b = [a[2], a[1], AddDirection(direction, 2.0, 1, roles=Role.ACTION, phase="decode")]
    fast = FastGenerator(vla, max_prompt_len=256)
    for ivs in (a, b, a):
        assert_same(fast.generate(batch, interventions=ivs, return_logits=True), eager(vla, batch, 7, ivs))
    assert fast.stats.steps_built == 2


def test_a_new_layout_builds_new_steps_once(vla, direction):
    batch = vla.encode(vla_requests(2))
    fast = FastGenerator(vla, max_prompt_len=256)
    for layers in ([1], [0, 2], [1], [0, 2]):
        got = fast.generate(batch, interventions=rdt_plus(direction, 5.0, 2.0, layers), return_logits=True)
        assert_same(got, eager(vla, batch, 7, rdt_plus(direction, 5.0, 2.0, layers)))
    assert fast.stats.steps_built == 4  # (prefill + decode) x two layouts
    fast.generate(vla.encode(vla_requests(3)), interventions=rdt_plus(direction, 5.0, 2.0, [1]))
    assert fast.stats.steps_built == 6  # another batch size


def test_large_batches_run_in_chunks_with_per_row_alpha(vla, direction):
    batch = vla.encode(vla_requests(7, seed=4))
    alpha = torch.linspace(-6.0, 6.0, 7)
    ivs = [AddDirection(direction, alpha, [1], roles=Role.ACTION, phase="decode"),
           AddDirection(direction, alpha, [1], roles=Role.TEXT, phase="prefill")]
    fast = FastGenerator(vla, max_batch=3, max_prompt_len=256)
    assert_same(fast.generate(batch, interventions=ivs, return_logits=True), eager(vla, batch, 7, ivs))


def test_constrained_decoding_and_buckets(vla, direction):
    reqs = vla_requests(4, seed=6)
    vla.constrain_actions = True
    try:
        ref = vla.predict_actions(reqs, interventions=rdt(direction, 6.0, 1), return_logits=True)
        for bucket in (1, 64):
            fast = FastGenerator(vla, max_prompt_len=256, bucket=bucket)
            got = fast.predict_actions(reqs, interventions=rdt(direction, 6.0, 1), return_logits=True)
            assert torch.equal(got.token_ids, ref.token_ids)
            assert (got.action_logits - ref.action_logits).abs().max().item() <= LOGIT_TOL
        assert bool(vla.action_tokenizer.is_action_token(got.token_ids).all())
    finally:
        vla.constrain_actions = False


def test_fused_projections_give_the_same_tokens(vla, direction):
    batch = vla.encode(vla_requests(3))
    ivs = rdt_plus(direction, 6.0, 3.0, [0, 1])
    fast = FastGenerator(vla, max_prompt_len=256, fuse_projections=True)
    assert fast.stack.spec.fused and len(fast.stack.layers[0].qkv_w) == 1
    assert_same(fast.generate(batch, interventions=ivs, return_logits=True), eager(vla, batch, 7, ivs))


def test_errors_say_what_to_do(vla, tiny_models):
    fast = FastGenerator(vla, max_prompt_len=96)
    with pytest.raises(ConfigError, match="max_prompt_len"):
        fast.predict_actions(vla_requests(1) + vla_requests(3)[2:])
    batch = vla.encode(vla_requests(1))
    with pytest.raises(ConfigError, match="AddDirection"):
        fast.generate(batch, interventions=[AblateDirection(torch.ones(vla.d_model))])
    with pytest.raises(ConfigError, match="left-padded"):
        fast.generate(vla.encode(vla_requests(2), padding_side="right"))
    with pytest.raises(ConfigError, match="n_tokens"):
        FastGenerator(tiny_models["tiny-llama"])
    with pytest.raises(ConfigError, match="CUDA"):
        FastGenerator(vla, cuda_graphs=True)
    with pytest.raises(ConfigError, match="gemma"):
        FastGenerator(tiny_models["tiny-gemma"], n_tokens=2)
    with pytest.raises(ConfigError, match="VLA"):
        FastGenerator(tiny_models["tiny-llama"], n_tokens=2).predict_actions(["hi"])


def test_cpu_runs_the_steps_eagerly(vla):
    fast = FastGenerator(vla, max_prompt_len=256)
    fast.generate(vla.encode(vla_requests(1)))
    d = fast.describe()
    assert d["cuda_graphs"] is False and d["graphs_captured"] == 0 and d["compile_mode"] == "none"
    assert d["steps_built"] == 2 and d["warmup_seconds"] == 0.0


def test_a_kernel_that_fails_to_compile_runs_eagerly(chat, monkeypatch):
    def fake_compile(fn, **kw):
        if fn.__name__ != "decode":
            return fn  # "compiled" = the eager function

        def broken(*args):
            raise RuntimeError("inductor exploded")

        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    batch = chat.encode(PROMPTS)
    fast = FastGenerator(chat, n_tokens=4, compile="all")
    with pytest.warns(RuntimeWarning, match="decode layer"):
        got = fast.generate(batch, return_logits=True)
    assert_same(got, eager(chat, batch, 4))
    assert fast.stats.compile_error == "decode layer: RuntimeError: inductor exploded"
    assert fast._kernels.decode_layer.failed and not fast._kernels.prefill_layer.failed
    assert "decode layer eager" in fast.describe()["compile_mode"]


def test_other_prompts_reuse_the_steps_and_are_restaged(vla, direction):
    # what CUDA-graph replay relies on: every input of a step is copied into the same buffers
    fast = FastGenerator(vla, max_prompt_len=256, bucket=128)
    ivs = rdt_plus(direction, 6.0, 3.0, [0, 2])
    first, second = vla.encode(vla_requests(3, seed=1)), vla.encode(vla_requests(3, seed=2)[::-1])
    for batch in (first, second, first):
        assert_same(fast.generate(batch, interventions=ivs, return_logits=True), eager(vla, batch, 7, ivs))
    assert fast.stats.steps_built == 2


def test_allowed_tokens_are_restaged_when_they_change(vla):
    # the allowed ids are copied to the device only when another tensor, or the same one edited
    # in place, is passed: an edit must still reach the step
    fast = FastGenerator(vla, max_prompt_len=256, bucket=128)
    batch = vla.encode(vla_requests(2, seed=4))
    allowed = torch.arange(31800, 31810)
    first = fast.generate(batch, allowed_token_ids=allowed).tokens
    assert bool(((first >= 31800) & (first < 31810)).all())
    allowed += 100
    again = fast.generate(batch, allowed_token_ids=allowed).tokens
    assert bool(((again >= 31900) & (again < 31910)).all())
    other = fast.generate(batch, allowed_token_ids=torch.arange(31700, 31710)).tokens
    assert bool(((other >= 31700) & (other < 31710)).all())
    assert fast.stats.steps_built == 2  # one size of allowed set: the same steps throughout
