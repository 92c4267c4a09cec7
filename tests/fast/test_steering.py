"""Steering layouts (structure) and buffers (values)."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.fast.steering import SteeringBuffers, SteeringLayout
from rdt_interp.roles import Role
from rdt_interp.tracing.interventions import (
    AblateDirection,
    AddDirection,
    StepContext,
    rdt,
    rdt_plus,
)

D = 8


def layout(ivs, role=Role.ACTION) -> SteeringLayout:
    return SteeringLayout.of(ivs, n_layers=4, d_model=D, generated_role=role)


def test_rdt_plus_puts_one_edit_per_phase_at_its_layers():
    lay = layout(rdt_plus(torch.ones(D), 2.0, 1.0, [1, 3]))
    assert lay.decode_key == ((1, "resid_pre"), (3, "resid_pre"))
    assert lay.prefill_key == ((1, "resid_pre"), (3, "resid_pre"))
    assert layout(rdt(torch.ones(D), 2.0, 2)).prefill_key == ()


def test_the_key_ignores_values_but_not_structure():
    a = layout(rdt_plus(torch.ones(D), 2.0, 1.0, 2))
    w = -torch.arange(D, dtype=torch.float32)
    b = layout([AddDirection(w, 7.0, 2, roles=Role.ACTION, phase="decode"),
                AddDirection(w, torch.tensor([1.0, 2.0]), 2, roles=Role.TEXT, phase="prefill")])
    assert a.key == b.key
    assert layout(rdt_plus(torch.ones(D), 2.0, 1.0, 1)).key != a.key
    assert layout(rdt_plus(torch.ones(D), 2.0, 1.0, 2) + rdt(torch.ones(D), 1.0, 2)).key != a.key


def test_slots_follow_the_eager_plans_order():
    v = torch.ones(D)
    ivs = [AddDirection(v, 1.0, [3, 0], site="mlp_out"), AddDirection(v, 2.0, [0], site="resid_pre"),
           AddDirection(v, 3.0, [0], site="mlp_out")]
    lay = layout(ivs)
    assert [(s.layer, s.site.value, s.index) for s in lay.decode] == [
        (0, "resid_pre", 1), (0, "mlp_out", 0), (0, "mlp_out", 2), (3, "mlp_out", 0)]


def test_decode_slots_need_the_generated_role():
    ivs = [AddDirection(torch.ones(D), 1.0, 0, roles=Role.TEXT, phase="both")]
    assert layout(ivs).decode == () and len(layout(ivs).prefill) == 1
    assert len(layout(ivs, role=Role.TEXT).decode) == 1


def test_invalid_interventions_are_refused():
    with pytest.raises(ConfigError, match="AddDirection"):
        layout([AblateDirection(torch.ones(D))])
    with pytest.raises(DModelMismatchError):
        layout(rdt(torch.ones(D + 1), 1.0, 0))
    with pytest.raises(ConfigError, match="out of range"):
        layout(rdt(torch.ones(D), 1.0, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [3.3, torch.tensor([0.7, -1.9])])
def test_buffers_hold_exactly_what_the_eager_edit_adds(dtype, alpha):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(D, generator=g)
    ivs = [AddDirection(v, alpha, [1], roles=Role.ACTION, phase="decode"),
           AddDirection(v, alpha, [1], roles=Role.TEXT, phase="prefill")]  # rdt_plus, per-row alpha
    roles = torch.tensor([[int(Role.PAD), int(Role.BOS | Role.TEXT), int(Role.IMAGE), int(Role.TEXT)],
                          [int(Role.BOS | Role.TEXT), int(Role.IMAGE), int(Role.TEXT), int(Role.TEXT)]])
    buf = SteeringBuffers(layout(ivs), max_batch=3, max_len=6, d_model=D, dtype=dtype, device=torch.device("cpu"))
    buf.fill(ivs, 2)
    h = torch.randn(2, 4, D, generator=g).to(dtype)
    (scale, vec), = buf.compute(2, roles)[(1, ivs[1].site)]
    eager = ivs[1].apply(h, StepContext("prefill", roles))
    assert torch.equal(h + scale[:, :, None] * vec, eager)
    assert scale[0, 0] == 0 and scale[0, 2] == 0  # padding and image untouched (text only)
    step = torch.randn(2, 1, D, generator=g).to(dtype)
    (add,) = buf.decode_sites(2)[(1, ivs[0].site)]
    gen = torch.full((2, 1), int(Role.ACTION))
    assert torch.equal(step + add, ivs[0].apply(step, StepContext("decode", gen, 1)))


def test_padding_is_steered_only_when_asked():
    v = torch.ones(D)
    roles = torch.tensor([[int(Role.PAD), int(Role.TEXT)]])
    for role, expected in ((Role.TEXT, [0.0, 2.0]), (Role.TEXT | Role.PAD, [2.0, 2.0])):
        ivs = [AddDirection(v, 2.0, [0], roles=role, phase="prefill")]
        buf = SteeringBuffers(layout(ivs), max_batch=1, max_len=2, d_model=D, dtype=torch.float32,
                              device=torch.device("cpu"))
        buf.fill(ivs, 1)
        (scale, _), = buf.compute(1, roles)[(0, ivs[0].site)]
        assert scale[0].tolist() == expected


def test_fill_copies_a_direction_only_when_it_changed():
    v = torch.ones(D)
    ivs = rdt_plus(v, 2.0, 1.0, [1])
    buf = SteeringBuffers(layout(ivs), max_batch=2, max_len=4, d_model=D, dtype=torch.float32,
                          device=torch.device("cpu"))
    buf.fill(ivs, 2)
    buf.vec[0].zero_()  # a stale buffer: the same direction tensor is not copied again ...
    buf.fill(ivs, 2)
    assert buf.vec[0].eq(0).all()
    ivs[0].direction.mul_(3.0)  # ... an in-place edit of it is (its version changed) ...
    buf.fill(ivs, 2)
    assert buf.vec[0].eq(3.0).all()
    other = rdt_plus(torch.full((D,), 5.0), -1.5, 1.0, [1])  # ... and so is another tensor
    buf.fill(other, 2)
    assert buf.vec[0].eq(5.0).all() and buf.alpha[0].eq(-1.5).all()


def test_per_row_alpha_must_match_the_batch():
    ivs = [AddDirection(torch.ones(D), torch.tensor([1.0, 2.0, 3.0]), 0, roles=Role.TEXT, phase="prefill")]
    buf = SteeringBuffers(layout(ivs), max_batch=4, max_len=3, d_model=D, dtype=torch.float32,
                          device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="per-row alpha"):
        buf.fill(ivs, 2)
