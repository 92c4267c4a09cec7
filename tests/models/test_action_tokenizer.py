"""Property tests of the action tokenizer (OpenVLA's discretisation, as the reference decodes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdt_interp.errors import UnknownNameError
from rdt_interp.models.action_tokenizer import ActionTokenizer, NormStats

# per test, so other modules' hypothesis settings are left alone; deadline off: the first call of
# a torch op can be slow on a loaded machine
FAST = settings(max_examples=60, deadline=None)


@st.composite
def tokenizers(draw, with_stats: bool = False) -> ActionTokenizer:
    n_bins = draw(st.integers(3, 300))
    vocab = draw(st.integers(n_bins + 1, 40_000))
    dim = draw(st.integers(1, 8))
    stats = {}
    if with_stats:
        lo = np.array(draw(st.lists(st.floats(-5, 5), min_size=dim, max_size=dim)))
        width = np.array(draw(st.lists(st.floats(1e-3, 5), min_size=dim, max_size=dim)))
        mask = draw(st.lists(st.booleans(), min_size=dim, max_size=dim))
        stats["ds"] = NormStats.from_dict({"q01": lo.tolist(), "q99": (lo + width).tolist(), "mask": mask})
    return ActionTokenizer(vocab_size=vocab, n_bins=n_bins, action_dim=dim, norm_stats=stats)


@FAST
@given(tokenizers(), st.data())
def test_id_bin_normalized_id_round_trip(tok, data):
    # every action id but the lowest one survives id -> bin -> bin centre -> id
    ids = torch.tensor(data.draw(st.lists(st.integers(tok.vocab_size - tok.n_bins + 1, tok.vocab_size - 1),
                                          min_size=1, max_size=16)))
    bins = tok.ids_to_bins(ids)
    assert torch.equal(tok.bins_to_ids(bins), ids)
    assert torch.equal(tok.normalized_to_ids(tok.bins_to_normalized(bins)), ids)


@FAST
@given(tokenizers())
def test_the_lowest_action_id_decodes_like_its_neighbour(tok):
    # the reference clips bins to n_bins - 2 (there are n_bins - 1 centres)
    low = torch.tensor([tok.vocab_size - tok.n_bins])
    assert tok.ids_to_bins(low).item() == tok.n_bins - 2
    assert torch.equal(tok.decode(low), tok.decode(low + 1))


@FAST
@given(tokenizers(), st.lists(st.floats(allow_nan=False), min_size=1, max_size=32))
def test_bounds_any_action_maps_to_an_action_token_and_back_into_range(tok, values):
    ids = tok.normalized_to_ids(torch.tensor(values, dtype=torch.float64))
    assert bool(tok.is_action_token(ids).all())
    assert int(ids.min()) >= tok.vocab_size - tok.n_bins and int(ids.max()) <= tok.vocab_size - 1
    norm = tok.decode(ids)
    assert bool((norm > -1).all()) and bool((norm < 1).all())


@FAST
@given(tokenizers(), st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=16))
def test_bins_of_any_id_are_clipped_into_the_centre_range(tok, ids):
    bins = tok.ids_to_bins(torch.tensor(ids))
    assert int(bins.min()) >= 0 and int(bins.max()) <= tok.n_bins - 2


@FAST
@given(tokenizers(), st.lists(st.floats(-1, 1), min_size=1, max_size=32))
def test_encode_then_decode_is_within_one_bin(tok, values):
    a = torch.tensor(values, dtype=torch.float64)
    err = (tok.decode(tok.encode(a)) - a).abs()
    assert float(err.max()) <= 2.0 / (tok.n_bins - 1) + 1e-12


@FAST
@given(tokenizers(with_stats=True), st.data())
def test_unnormalize_and_normalize_are_inverse_where_masked(tok, data):
    st_ = tok.stats("ds")
    x = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=tok.action_dim, max_size=tok.action_dim)),
                     dtype=torch.float64)
    mask = torch.tensor(st_.mask)
    raw = tok.unnormalize(x, "ds")
    back = tok.normalize(raw, "ds")
    assert torch.allclose(back, x, atol=1e-9)
    # unmasked dimensions (e.g. the gripper) pass through unchanged, both ways
    assert torch.equal(raw[~mask], x[~mask])
    # masked dimensions land in [q01, q99]
    lo, hi = torch.tensor(st_.q01, dtype=torch.float64), torch.tensor(st_.q99, dtype=torch.float64)
    assert bool(((raw >= lo - 1e-9) & (raw <= hi + 1e-9))[mask].all())


@FAST
@given(tokenizers(with_stats=True), st.data())
def test_normalize_then_unnormalize_inside_the_quantiles(tok, data):
    st_ = tok.stats("ds")
    frac = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=tok.action_dim, max_size=tok.action_dim)),
                        dtype=torch.float64)
    lo, hi = torch.tensor(st_.q01, dtype=torch.float64), torch.tensor(st_.q99, dtype=torch.float64)
    a = lo + frac * (hi - lo)
    mask = torch.tensor(st_.mask)
    back = tok.unnormalize(tok.normalize(a, "ds"), "ds")
    assert torch.allclose(back[mask], a[mask], atol=1e-9)


@FAST
@given(tokenizers(with_stats=True), st.text(min_size=1, max_size=12))
def test_unknown_unnorm_key_lists_the_known_keys(tok, key):
    if key == "ds":
        return
    with pytest.raises(UnknownNameError) as info:
        tok.unnormalize(torch.zeros(tok.action_dim, dtype=torch.float64), key)
    assert isinstance(info.value, KeyError)
    assert info.value.known == ["ds"] and "ds" in str(info.value)
    with pytest.raises(UnknownNameError):
        tok.decode(torch.full((tok.action_dim,), tok.vocab_size - 1), key)


@FAST
@given(tokenizers())
def test_zero_motion_bin_is_the_centre_nearest_zero(tok):
    centres = tok.bin_centers
    zb = tok.zero_motion_bin
    assert abs(centres[zb]) == np.abs(centres).min()
    if tok.n_bins % 2 == 0:  # an odd number of centres: the middle one is 0
        assert zb == (tok.n_bins - 2) // 2 and abs(centres[zb]) < 1e-12
    assert tok.ids_to_bins(torch.tensor(tok.zero_motion_token_id)).item() == zb


@FAST
@given(tokenizers(with_stats=True))
def test_zero_motion_bins_per_dimension_minimise_the_unnormalized_value(tok):
    bins = tok.zero_motion_bins("ds")
    assert len(bins) == tok.action_dim
    centres = torch.as_tensor(tok.bin_centers, dtype=torch.float64)
    values = tok.unnormalize(centres[:, None].expand(-1, tok.action_dim), "ds").abs()
    for d, b in enumerate(bins):
        assert values[b, d] == values[:, d].min()
    assert tok.zero_motion_bins(None) == (tok.zero_motion_bin,) * tok.action_dim


def test_openvla_7b_vocabulary():
    # 32064 embedding rows = 32000 + 64 padding; action tokens are the last 256 of the 32000
    tok = ActionTokenizer.from_openvla_config({"text_config": {"vocab_size": 32064}, "pad_to_multiple_of": 64,
                                               "n_action_bins": 256, "norm_stats": {}})
    assert tok.vocab_size == 32000
    assert tok.token_ids[0].item() == 31744 and tok.token_ids[-1].item() == 31999
    assert tok.zero_motion_bin == 127 and tok.zero_motion_token_id == 31872
