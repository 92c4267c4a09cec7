import pytest
import torch

from rdt_interp.errors import ConfigError, UnknownNameError
from rdt_interp.roles import ANY_REAL, Role, Selector, gather_positions, role_mask

T, INS, P, PAD = int(Role.TEXT | Role.TEMPLATE), int(Role.TEXT | Role.INSTRUCTION), \
    int(Role.TEXT | Role.POST_INSTRUCTION), int(Role.PAD)


def _roles(rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize(
    "spec,role,indices,pool",
    [
        ("last", ANY_REAL, (-1,), "none"),
        ("post_instruction[-1]", Role.POST_INSTRUCTION, (-1,), "none"),
        ("post_instruction[-3:]", Role.POST_INSTRUCTION, (-3, -2, -1), "none"),
        ("post_instruction[-3:-1]", Role.POST_INSTRUCTION, (-3, -2), "none"),
        ("action[0:2]", Role.ACTION, (0, 1), "none"),
        ("first(action)", Role.ACTION, (0,), "none"),
        ("last(text)", Role.TEXT, (-1,), "none"),
        ("action[2]", Role.ACTION, (2,), "none"),
        ("mean(image)", Role.IMAGE, None, "mean"),
        ("all(text)", Role.TEXT, None, "none"),
        ("post_instruction", Role.POST_INSTRUCTION, None, "none"),
        (" Last( TEXT ) ", Role.TEXT, (-1,), "none"),
    ],
)
def test_parse(spec, role, indices, pool):
    s = Selector.parse(spec)
    assert (s.role, s.indices, s.pool) == (role, indices, pool)


@pytest.mark.parametrize("spec", ["", "last(", "post_instruction[-1:-3]", "action[2:1]", "x[[1]]", "action[:2]"])
def test_parse_errors(spec):
    with pytest.raises(ConfigError):
        Selector.parse(spec)


def test_unknown_role_lists_known():
    with pytest.raises(UnknownNameError, match="post_instruction"):
        Selector.parse("first(actoin)")


def test_resolve_is_padding_invariant():
    # The same 5-token prompt, left- and right-padded, resolves to the same tokens.
    left = _roles([[PAD, PAD, T, INS, INS, P, P], [T, INS, INS, INS, INS, P, P]])
    right = _roles([[T, INS, INS, P, P, PAD, PAD], [T, INS, INS, INS, INS, P, P]])
    for spec in ["last", "post_instruction[-1]", "post_instruction[-2:]", "first(instruction)", "mean(instruction)"]:
        s = Selector.parse(spec)
        il, wl = s.resolve(left)
        ir, wr = s.resolve(right)
        # Row 0 is shifted by the two pads on the left.
        assert torch.equal(il[0][wl[0] > 0] - 2, ir[0][wr[0] > 0]), spec
        assert torch.equal(il[1], ir[1]), spec
    idx, _ = Selector.parse("last").resolve(right)
    assert idx.tolist() == [[4], [6]]


def test_resolve_mean_weights_sum_to_one():
    roles = _roles([[PAD, T, INS, INS, P], [T, INS, INS, INS, P]])
    idx, w = Selector.parse("mean(instruction)").resolve(roles)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert idx[0][w[0] > 0].tolist() == [2, 3]
    h = torch.arange(10, dtype=torch.float32).reshape(2, 5, 1).expand(2, 5, 3)
    out = gather_positions(h, idx, w, "mean")
    assert out.shape == (2, 1, 3)
    assert torch.allclose(out[0, 0], torch.full((3,), 2.5))
    assert torch.allclose(out[1, 0], torch.full((3,), 7.0))


def test_unequal_counts_need_pooling():
    roles = _roles([[PAD, T, INS, INS, P], [T, INS, INS, INS, P]])
    with pytest.raises(ConfigError, match="mean"):
        Selector.parse("all(instruction)").resolve(roles)


def test_too_few_positions_is_an_error():
    roles = _roles([[T, INS, P], [T, INS, P]])
    with pytest.raises(ConfigError, match="only 1"):
        Selector.parse("post_instruction[-2:]").resolve(roles)


def test_mask_and_role_mask_exclude_padding():
    roles = _roles([[PAD, T, INS, P]])
    assert role_mask(roles, ANY_REAL).tolist() == [[False, True, True, True]]
    assert Selector.parse("post_instruction").mask(roles).tolist() == [[False, False, False, True]]
    assert Selector.parse("last").mask(roles).tolist() == [[False, False, False, True]]
