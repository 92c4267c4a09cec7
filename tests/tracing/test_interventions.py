import pytest
import torch

from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.roles import Role
from rdt_interp.tracing import (
    AblateDirection,
    AddDirection,
    HookRunner,
    InterventionPlan,
    NNsightRunner,
    Site,
    StepContext,
    capture,
    generate,
    rdt,
    rdt_plus,
)

PROMPTS = ["hi", "How do I bake bread at home?", "Tell me a story about a brave toaster."]


def test_add_direction_math():
    h = torch.zeros(2, 3, 4)
    roles = torch.tensor([[int(Role.PAD), int(Role.TEXT), int(Role.ACTION)]] * 2)
    v = torch.tensor([1.0, 0, 0, 0])
    out = AddDirection(v, 2.0, 0, roles=Role.ACTION).apply(h, StepContext("prefill", roles))
    assert out[:, 2, 0].tolist() == [2.0, 2.0] and out[:, :2].abs().sum() == 0
    per_row = AddDirection(v, torch.tensor([1.0, 3.0]), 0).apply(h, StepContext("prefill", roles))
    assert per_row[:, 1, 0].tolist() == [1.0, 3.0] and per_row[:, 0].abs().sum() == 0  # pad untouched
    decode_only = AddDirection(v, 2.0, 0, phase="decode").apply(h, StepContext("prefill", roles))
    assert decode_only.abs().sum() == 0


def test_ablate_direction_math():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    r = torch.randn(8) * 3
    out = AblateDirection(r).apply(h, StepContext("prefill", torch.zeros(2, 5, dtype=torch.long)))
    assert torch.allclose(out @ (r / r.norm()), torch.zeros(2, 5), atol=1e-5)
    # Orthogonal part unchanged.
    u = r / r.norm()
    assert torch.allclose(out, h - (h @ u)[..., None] * u, atol=1e-5)
    basis = torch.randn(3, 8)
    out2 = AblateDirection(basis).apply(h, StepContext("prefill", torch.zeros(2, 5, dtype=torch.long)))
    assert torch.allclose(out2 @ basis.T, torch.zeros(2, 5, 3), atol=1e-4)


def test_plan_validation():
    with pytest.raises(DModelMismatchError, match="d_model=8"):
        InterventionPlan([AddDirection(torch.ones(8), 1.0, 0)], n_layers=2, d_model=4)
    with pytest.raises(ConfigError, match="out of range"):
        InterventionPlan([AddDirection(torch.ones(4), 1.0, 5)], n_layers=2, d_model=4)
    with pytest.raises(ConfigError, match="1-D"):
        AddDirection(torch.ones(2, 4), 1.0, 0)
    # Under the test suite's runtime type checks the Literal annotation fires first.
    with pytest.raises((ConfigError, TypeError), match="phase"):
        AddDirection(torch.ones(4), 1.0, 0, phase="always")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_direction_is_refused_by_every_intervention(bad):
    v = torch.ones(8)
    v[3] = bad
    for make in (lambda: AddDirection(v, 1.0, 0), lambda: AblateDirection(v),
                 lambda: AblateDirection(torch.stack([torch.ones(8), v])),
                 lambda: rdt(v, 2.0, [0]), lambda: rdt_plus(v, 2.0, 1.0, [0])):
        with pytest.raises(ConfigError, match="NaN/inf"):
            make()


def test_non_finite_alpha_is_refused():
    with pytest.raises(ConfigError, match="finite"):
        AddDirection(torch.ones(8), float("nan"), 0)
    with pytest.raises(ConfigError, match="NaN/inf"):
        AddDirection(torch.ones(8), torch.tensor([1.0, float("inf")]), 0)


def test_rdt_and_rdt_plus_values():
    r = torch.ones(4)
    (a,) = rdt(r, 3.0, [1, 2])
    assert a.roles == Role.ACTION and a.phase == "decode" and a.layers == (1, 2)
    ivs = rdt_plus(r, 3.0, 1.5, 2, include_image=True)
    assert ivs[1].roles == Role.TEXT | Role.IMAGE and ivs[1].phase == "prefill" and ivs[1].alpha == 1.5


def _ivs(m):
    g = torch.Generator().manual_seed(1)
    v, r = torch.randn(m.d_model, generator=g), torch.randn(m.d_model, generator=g)
    return [AddDirection(v, 2.0, [1], roles=Role.POST_INSTRUCTION | Role.GENERATED),
            AblateDirection(r, sites=(Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT)),
            AddDirection(v, -1.0, [2], site=Site.RESID_POST, phase="decode")]


def test_nnsight_and_hooks_give_identical_outputs(tiny):
    batch = tiny.encode(PROMPTS)
    ivs = _ivs(tiny)
    outs = []
    for runner_cls in (NNsightRunner, HookRunner):
        with runner_cls(tiny, ivs) as runner:
            out = runner.forward(tiny.prefill_kwargs(batch, use_cache=False), StepContext("prefill", batch.roles))
        outs.append(out.logits)
    assert torch.equal(outs[0], outs[1])
    with torch.inference_mode():
        base = tiny.model(**batch.inputs).logits
    assert not torch.allclose(base, outs[0])


def test_generation_identical_across_backends(tiny):
    batch = tiny.encode(PROMPTS)
    ivs = _ivs(tiny)
    a = generate(tiny, batch, max_new_tokens=5, interventions=ivs, backend="hooks", return_logits=True,
                 stop_at_eos=False)
    b = generate(tiny, batch, max_new_tokens=5, interventions=ivs, backend="nnsight", return_logits=True,
                 stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)


def test_ablation_leaves_no_component_in_residual(tiny):
    r = torch.randn(tiny.d_model)
    acts = capture(tiny, PROMPTS, selector="all(text)" if False else "last", site="resid_post",
                   interventions=[AblateDirection(r)], progress=False)
    u = r / r.norm()
    # resid_post of layer L = ablated resid_pre + ablated attn/mlp writes: orthogonal to r.
    assert (acts.values[:, :, 0] @ u).abs().max() < 1e-4
    base = capture(tiny, PROMPTS, selector="last", site="resid_post", progress=False)
    assert (base.values[:, :, 0] @ u).abs().max() > 1e-2


def test_add_at_layer_changes_only_later_layers(tiny):
    v = torch.randn(tiny.d_model)
    base = capture(tiny, PROMPTS, selector="last", progress=False)
    steered = capture(tiny, PROMPTS, selector="last", interventions=[AddDirection(v, 1.0, 2)], progress=False)
    assert torch.allclose(base.values[:, :2], steered.values[:, :2])
    assert torch.allclose(steered.values[:, 2, 0] - base.values[:, 2, 0], v.expand(3, -1), atol=1e-5)
    assert not torch.allclose(base.values[:, 3], steered.values[:, 3])


def test_per_row_alpha_matches_rows_alone(tiny):
    v = torch.randn(tiny.d_model) * 3
    batch = tiny.encode(PROMPTS)
    alphas = torch.tensor([0.0, 2.0, -1.0])
    together = generate(tiny, batch, max_new_tokens=4, interventions=[AddDirection(v, alphas, [1])],
                        stop_at_eos=False)
    for i, p in enumerate(PROMPTS):
        alone = generate(tiny, tiny.encode([p]), max_new_tokens=4,
                         interventions=[AddDirection(v, float(alphas[i]), [1])], stop_at_eos=False)
        assert torch.equal(together.tokens[i], alone.tokens[0])
