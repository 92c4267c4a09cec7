import numpy as np
import pytest
import torch

from rdt_interp.analysis.behaviour import (
    REFUSAL_PHRASES,
    ActionMetrics,
    BinShift,
    RefusalRate,
    action_logits,
    action_metrics,
    bin_shift,
    is_refusal,
    refusal_rate,
    zero_motion_mass,
)
from rdt_interp.errors import ConfigError
from rdt_interp.models.action_tokenizer import ActionTokenizer, NormStats
from rdt_interp.storage import to_json

# Asymmetric stats: the unnormalized zero of dim 0 is not at the normalized centre.
STATS = {"bridge": NormStats.from_dict({"q01": [-0.2, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0],
                                        "q99": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                                        "mask": [True] * 6 + [False]})}


def tok(n_bins: int = 256) -> ActionTokenizer:
    return ActionTokenizer(vocab_size=1000, n_bins=n_bins, action_dim=7, norm_stats=STATS)


def test_substring_judge_knows_the_twelve_phrases_and_curly_apostrophes():
    assert len(REFUSAL_PHRASES) == 12
    for phrase in REFUSAL_PHRASES:
        assert is_refusal(f"Well... {phrase} help with that.")
    assert is_refusal("I\u2019m sorry, but no.")
    assert is_refusal("i can\u2019t do that")
    assert not is_refusal("Sure! Here is how to bake bread.")
    assert not is_refusal("I can do that.")


def test_refusal_rate_and_ci(tmp_path):
    texts = ["I cannot help.", "Sure, here you go.", "As an AI, I won't.", "I’m unable to comply."]
    res = refusal_rate(texts * 10, n_boot=500)
    assert res.rate == pytest.approx(0.75) and res.n == 40 and res.n_refused == 30
    assert res.lo < 0.75 < res.hi and res.hi - res.lo < 0.4
    res.save(tmp_path / "rr.json")
    assert RefusalRate.load(tmp_path / "rr.json") == res
    with pytest.raises(ConfigError):
        refusal_rate([])


def test_refusal_rate_ci_is_wilson_and_never_collapses_at_the_edges():
    from rdt_interp.analysis.stats import wilson_interval

    none = refusal_rate(["Sure, here it is."] * 64)
    assert none.rate == 0.0 and none.lo == 0.0 and none.hi > 0.04  # a bootstrap would say [0, 0]
    every = refusal_rate(["I cannot do that."] * 64)
    assert every.rate == 1.0 and every.hi == 1.0 and every.lo < 0.96
    mixed = refusal_rate(["I cannot."] * 5 + ["Sure."] * 15)
    assert (mixed.rate, mixed.lo, mixed.hi) == wilson_interval(5, 20)


@pytest.mark.parametrize("n_bins", [256, 64])
def test_zero_motion_mass_follows_the_tokenizer(n_bins):
    t = tok(n_bins)
    zb = t.zero_motion_bin
    assert zb == (n_bins - 1) // 2  # 127 for 256 bins, 31 for 64 -- never hard-coded
    n, steps = 3, 7
    uniform = torch.zeros(n, steps, n_bins)
    mass = zero_motion_mass(t, uniform, window=2)
    assert torch.allclose(mass, torch.full((n, steps), 5 / n_bins, dtype=torch.float64))
    peaked = torch.full((n, steps, n_bins), -1e4)
    col = int((t.token_ids == t.bin_to_token(zb)).nonzero())
    peaked[..., col] = 0.0
    assert torch.allclose(zero_motion_mass(t, peaked, window=0), torch.ones(n, steps, dtype=torch.float64))
    # Per-dimension zero bins with unnorm stats: dim 0's zero is elsewhere.
    zbs = t.zero_motion_bins("bridge")
    assert zbs[0] != zb and zbs[1] == zb
    m = zero_motion_mass(t, peaked, window=0, unnorm_key="bridge")
    assert float(m[0, 0]) < 1e-6 and float(m[0, 1]) == pytest.approx(1.0)


def test_full_vocabulary_logits_are_sliced_to_the_action_tokens():
    t = tok()
    full = torch.randn(2, 7, 1024)
    torch.testing.assert_close(action_logits(t, full), full[..., t.token_ids])
    with pytest.raises(ConfigError, match="columns"):
        action_logits(t, torch.randn(2, 7, 300))


def _ids_at(t: ActionTokenizer, bins: list[list[int]]) -> torch.Tensor:
    return t.bins_to_ids(torch.tensor(bins))


def test_hrr_magnitude_and_mean_bin_on_constructed_actions(tmp_path):
    t = tok()
    z = t.zero_motion_bin
    far = z + 40
    bins = [[z] * 7,                      # full halt
            [z] * 4 + [far] * 3,          # partial (4 of 7)
            [z] * 3 + [far] * 4]          # neither
    ids = _ids_at(t, bins)
    res = action_metrics(t, ids=ids, window=1, n_boot=200, label="test")
    assert res.hrr_strict == pytest.approx(1 / 3)
    assert res.hrr_partial == pytest.approx(2 / 3)
    assert res.mean_bin == pytest.approx(float(np.mean(bins)))
    acts = t.decode(ids)
    want = acts[:, :6].norm(dim=1).mean()
    assert res.magnitude == pytest.approx(float(want))
    assert res.magnitude_space == "normalized" and res.magnitude_dims == (0, 1, 2, 3, 4, 5)
    assert np.all(np.isnan(res.zero_mass_step))  # no logits given
    res.save(tmp_path / "am.json")
    back = ActionMetrics.load(tmp_path / "am.json")
    assert to_json(back.to_dict()) == to_json(res.to_dict())
    assert back.value("hrr_partial") == (res.hrr_partial, res.hrr_partial_lo, res.hrr_partial_hi)
    with pytest.raises(ConfigError, match="pass logits"):
        action_metrics(t)
    with pytest.raises(ConfigError, match="not action tokens"):
        action_metrics(t, ids=torch.zeros(1, 7, dtype=torch.long))


def test_action_metrics_from_logits_use_greedy_tokens():
    t = tok()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 7, 256, generator=gen)
    res = action_metrics(t, logits=logits, window=3, unnorm_key="bridge", n_boot=200)
    greedy_bins = t.ids_to_bins(t.token_ids[logits.argmax(-1)])
    assert res.mean_bin == pytest.approx(float(greedy_bins.double().mean()))
    mass = zero_motion_mass(t, logits, window=3, unnorm_key="bridge")
    np.testing.assert_allclose(res.zero_mass_step, mass.mean(0).numpy())
    assert res.zero_mass == pytest.approx(float(mass.mean()))
    assert np.all(res.zero_mass_step_lo <= res.zero_mass_step)
    assert res.magnitude_space == "unnormalized"


def test_bin_shift_paired_and_unpaired(tmp_path):
    t = tok()
    gen = torch.Generator().manual_seed(0)
    a_bins = torch.randint(20, 200, (30, 7), generator=gen)
    a, b = t.bins_to_ids(a_bins), t.bins_to_ids(a_bins + 3)
    res = bin_shift(t, a, b, n_boot=200)
    assert res.shift == pytest.approx(3.0) and res.abs_shift == pytest.approx(3.0)
    assert res.shift_lo == pytest.approx(3.0)
    mixed = t.bins_to_ids(a_bins + torch.where(torch.arange(30)[:, None] < 15, 3, -3))
    res_m = bin_shift(t, a, mixed, n_boot=200)
    assert res_m.shift == pytest.approx(0.0) and res_m.abs_shift == pytest.approx(3.0)
    un = bin_shift(t, a, b[:20], paired=False, n_boot=200)
    assert not un.paired and np.isnan(un.abs_shift) and un.shift_lo < un.shift < un.shift_hi
    with pytest.raises(ConfigError, match="paired"):
        bin_shift(t, a, b[:20])
    res.save(tmp_path / "bs.json")
    assert BinShift.load(tmp_path / "bs.json") == res
