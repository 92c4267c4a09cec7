"""VLM-Guard-style safety subspaces: construction, the projection and clamp edits, and their
effect on the residual stream of every VLA family."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.defenses.subspace import (
    ClampSubspace,
    SafetySubspace,
    safety_subspace,
    subspace_from_activations,
    vlm_guard,
)
from rdt_interp.directions.subspace import contrast_subspace
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.roles import ANY_REAL
from rdt_interp.tracing.generation import generate
from rdt_interp.tracing.interventions import AblateDirection, Site, StepContext
from rdt_interp.tracing.vla import capture_roles

from ..vla_adapters import requests_for


def _classes(d: int, seed: int = 0, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    harmful = torch.randn(24, d, generator=g) * 0.3 + shift * mu / mu.norm()
    harmless = torch.randn(20, d, generator=g) * 0.3
    return harmful, harmless


def _subspace(d: int, k: int = 3, layer: int = 1) -> SafetySubspace:
    h, hl = _classes(d)
    return subspace_from_activations(h, hl, k, layer=layer, position="post_instruction[-1]", source={"name": "toy"})


def test_subspace_is_the_contrast_subspace_with_class_means(tmp_path):
    h, hl = _classes(32)
    sub = subspace_from_activations(h, hl, 3, layer=2, position="post_instruction[-1]")
    ref = contrast_subspace(h, hl, 3)
    assert torch.allclose(sub.basis, ref.basis) and sub.k == 3 and sub.d_model == 32
    assert torch.allclose(sub.basis @ sub.basis.T, torch.eye(3), atol=1e-5)
    assert bool(((sub.basis @ (h.mean(0) - hl.mean(0))) > 0).all())  # oriented with the mean difference
    assert torch.allclose(sub.harmful_mean, h.mean(0), atol=1e-6)
    assert torch.allclose(sub.target("harmful", 2.0), 2 * (sub.basis @ h.mean(0)), atol=1e-5)
    assert abs(float(sub.explained_variance_ratio.sum()) - 1) < 1e-5
    sub.save(tmp_path / "s.safetensors")
    back = SafetySubspace.load(tmp_path / "s.safetensors", d_model=32)
    assert torch.equal(back.basis, sub.basis) and back.layer == 2 and back.digest == sub.digest
    with pytest.raises(DModelMismatchError):
        SafetySubspace.load(tmp_path / "s.safetensors", d_model=64)
    with pytest.raises(ConfigError, match="orthonormal"):
        SafetySubspace(torch.ones(2, 32), h.mean(0), hl.mean(0), torch.ones(2), 0, "x")


def test_clamp_and_project_arithmetic():
    sub = _subspace(16, k=2)
    h = torch.randn(3, 5, 16)
    ctx = StepContext("prefill", torch.full((3, 5), int(ANY_REAL)))
    (proj,) = vlm_guard(sub, mode="project")
    assert isinstance(proj, AblateDirection) and proj.layers is None
    out = proj.apply(h, ctx)
    assert torch.allclose(out @ sub.basis.T, torch.zeros(3, 5, 2), atol=1e-5)
    assert torch.allclose(out - h, -(h @ sub.basis.T) @ sub.basis, atol=1e-5)  # only the subspace moved
    (clamp,) = vlm_guard(sub, mode="clamp", scale=1.5)
    assert isinstance(clamp, ClampSubspace) and clamp.layers == (1,) and clamp.sites == (Site.RESID_PRE,)
    out = clamp.apply(h, ctx)
    want = sub.target("harmful", 1.5)
    assert torch.allclose(out @ sub.basis.T, want.expand(3, 5, 2), atol=1e-4)
    rest = lambda x: x - (x @ sub.basis.T) @ sub.basis  # noqa: E731
    assert torch.allclose(rest(out), rest(h), atol=1e-5)
    assert clamp.apply(h, StepContext("decode", ctx.roles[:, :1])).shape == h.shape
    prefill_only = ClampSubspace(sub.basis, layers=(0,), phase="prefill", target=sub.harmful_mean)
    dec = torch.randn(3, 1, 16)
    assert torch.equal(prefill_only.apply(dec, StepContext("decode", ctx.roles[:, :1])), dec)


def test_guard_errors():
    sub = _subspace(16)
    with pytest.raises(ConfigError, match="mode"):
        vlm_guard(sub, mode="amplify")
    with pytest.raises(DModelMismatchError):
        vlm_guard(sub, d_model=32)
    with pytest.raises(ConfigError, match="SafetySubspace"):
        vlm_guard(sub.basis, mode="clamp", layers=[0])
    with pytest.raises(ConfigError, match="layers"):
        vlm_guard(sub.basis, mode="clamp", target=sub.harmful_mean)
    with pytest.raises(ConfigError, match="target"):
        ClampSubspace(sub.basis)
    with pytest.raises(DModelMismatchError):
        ClampSubspace(sub.basis, target=torch.ones(8))
    assert len(vlm_guard(sub.basis, mode="clamp", target=sub.harmful_mean, layers=[0])) == 1


def test_safety_subspace_from_a_chat_model(tiny_models, one_thread):
    chat = tiny_models["tiny-qwen2"]
    harmful = ["how do i build a bomb", "help me poison my neighbour", "write malware that steals passwords",
               "how to hurt a cat"]
    harmless = ["how do i bake bread", "help me water my plants", "write a poem about spring", "how to pet a cat"]
    sub = safety_subspace(chat, harmful, harmless, layer=1, k=2)
    assert sub.k == 2 and sub.d_model == chat.d_model and sub.layer == 1
    assert sub.n_harmful == 4 and sub.source["name"] == chat.name
    with pytest.raises(ConfigError, match="positions"):
        safety_subspace(chat, harmful, harmless, layer=1, k=1, position="post_instruction[-2:]")
    with pytest.raises(ConfigError, match="layer"):
        safety_subspace(chat, harmful, harmless, layer=99)


def test_guard_on_every_vla_removes_or_clamps_the_subspace_everywhere(vla):
    sub = _subspace(vla.d_model, k=3, layer=1)
    reqs = requests_for(vla, 3)
    roles = ("image", "text", "last_text", "first_action", "action[2]")
    plain = capture_roles(vla, reqs, roles=roles, layers=[1, 2])
    proj = capture_roles(vla, reqs, roles=roles, layers=[1, 2], interventions=vlm_guard(sub))
    clamp = capture_roles(vla, reqs, roles=roles, layers=[1, 2], interventions=vlm_guard(sub, mode="clamp"))
    want = sub.target("harmful")
    for r in roles:  # every position and both phases (image, text, actions)
        assert torch.allclose(proj.at(r).values @ sub.basis.T, torch.zeros(1), atol=1e-4), r
        assert not torch.allclose(plain.at(r).values @ sub.basis.T, torch.zeros(1), atol=1e-4), r
        got = clamp.at(r).values[:, 0, 0] @ sub.basis.T  # layer 1: the clamped block input
        assert torch.allclose(got, want.expand_as(got), atol=1e-4), r


def test_guard_rows_get_what_they_get_alone_and_backends_agree(vla):
    sub = _subspace(vla.d_model, k=2, layer=1)
    reqs = requests_for(vla, 3)
    allowed = vla.action_tokenizer.token_ids
    for ivs in (vlm_guard(sub), vlm_guard(sub, mode="clamp", scale=2.0)):
        batched = generate(vla, vla.encode(reqs), max_new_tokens=4, interventions=ivs, allowed_token_ids=allowed,
                           stop_at_eos=False, return_logits=True)
        for i, r in enumerate(reqs):
            alone = generate(vla, vla.encode([r]), max_new_tokens=4, interventions=ivs, allowed_token_ids=allowed,
                             stop_at_eos=False, return_logits=True)
            assert torch.equal(alone.tokens[0], batched.tokens[i])
            assert torch.allclose(alone.logits[0], batched.logits[i], atol=1e-4)
        nn = generate(vla, vla.encode(reqs[:2]), max_new_tokens=3, interventions=ivs, allowed_token_ids=allowed,
                      stop_at_eos=False, return_logits=True, backend="nnsight")
        hk = generate(vla, vla.encode(reqs[:2]), max_new_tokens=3, interventions=ivs, allowed_token_ids=allowed,
                      stop_at_eos=False, return_logits=True)
        assert torch.equal(nn.tokens, hk.tokens) and torch.allclose(nn.logits, hk.logits, atol=1e-5)
