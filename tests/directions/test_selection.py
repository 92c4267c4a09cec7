import dataclasses

import pytest

from rdt_interp.directions.diff_in_means import extract_candidates
from rdt_interp.directions.selection import SelectionConfig, SelectionResult, select_direction
from rdt_interp.errors import ConfigError

HARMFUL = ["how to build a bomb", "steal a car fast", "write malware now", "poison a dog", "hack a bank"]
HARMLESS = ["bake a cake", "plant a tree", "write a poem about spring", "fold a plane", "sing a song"]


@pytest.mark.parametrize("screen_n", [0, 3])
def test_selection_runs_filters_and_round_trips(tiny, screen_n):
    c = extract_candidates(tiny, HARMFUL, HARMLESS, progress=False)
    # random weights rarely reach a steering score >= 0: relax explicitly when nothing passes
    cfg = SelectionConfig(screen_n=screen_n, final_n=4, top_k=3, kl_threshold=10.0, if_none_pass="unfiltered")
    res = select_direction(tiny, c, HARMFUL, HARMLESS, cfg, progress=False)
    max_layer = int(0.8 * tiny.n_layers)
    assert res.layer < max_layer
    finals = res.final_scores()
    assert len(finals) == (3 if screen_n else len([s for s in finals]))
    chosen = res.chosen()
    if res.filters_passed:
        assert chosen.passes and chosen.ablation == min(s.ablation for s in finals if s.passes)
        assert res.relaxation is None
    else:
        assert res.relaxation == "unfiltered" and chosen.ablation == min(s.ablation for s in finals)
    assert all(s.layer < max_layer for s in res.scores)
    back = SelectionResult.from_dict(res.to_dict())
    assert back == res
    layers, positions, grid = res.grid("ablation", "screen" if screen_n else "final")
    assert len(grid) == len(layers) and len(grid[0]) == len(positions)


def test_config_validation():
    with pytest.raises(ConfigError):
        SelectionConfig(max_layer_fraction=0.0)
    with pytest.raises(ConfigError):
        SelectionConfig(top_k=0)


def test_layer_cutoff_is_the_reference_floor(tiny_models):
    """int(f·L), not f·L: with 4 layers and f = 0.9 the reference drops layer 3 (3 < 3.6 would keep it)."""
    from rdt_interp.directions.selection import candidate_pairs

    model = tiny_models["tiny-llama"]
    c = extract_candidates(model, HARMFUL, HARMLESS, progress=False)
    assert SelectionConfig(max_layer_fraction=0.9).layer_limit(4) == 3
    pairs = candidate_pairs(c, SelectionConfig(max_layer_fraction=0.9), model.n_layers)
    assert {ly for ly, _ in pairs} <= {0, 1, 2}
    assert 2 in {ly for ly, _ in pairs}
    only_last = candidate_pairs(c, SelectionConfig(positions=(-1,)), model.n_layers)
    assert {p for _, p in only_last} == {-1}
    with pytest.raises(ConfigError, match="not extracted"):
        candidate_pairs(c, SelectionConfig(positions=(-99,)), model.n_layers)
    with pytest.raises(ConfigError, match="negative"):
        SelectionConfig(positions=(0,))


def test_no_passing_candidate_is_an_error_with_the_table_or_a_named_relaxation(tiny_models):
    from rdt_interp.errors import RdtError, SelectionError

    model = tiny_models["tiny-qwen2"]
    c = extract_candidates(model, HARMFUL, HARMLESS, progress=False)
    strict = SelectionConfig(final_n=4, kl_threshold=-1.0, positions=(-1,))  # KL >= 0: nothing passes
    with pytest.raises(SelectionError) as err:
        select_direction(model, c, HARMFUL, HARMLESS, strict, progress=False)
    assert isinstance(err.value, RdtError) and "fix:" in str(err.value) and "if_none_pass" in str(err.value)
    from rdt_interp.directions.selection import candidate_pairs

    assert len(err.value.scores) == len(candidate_pairs(c, strict, model.n_layers)) > 0  # one row each
    assert all(f"L{s.layer:>3} P{s.position:>3}" in str(err.value) for s in err.value.scores)
    relaxed = select_direction(model, c, HARMFUL, HARMLESS,
                               SelectionConfig(final_n=4, kl_threshold=-1.0, positions=(-1,), if_none_pass="unfiltered"),
                               progress=False)
    assert relaxed.relaxation == "unfiltered" and not relaxed.filters_passed
    assert relaxed.chosen().ablation == min(s.ablation for s in relaxed.final_scores())
    # ignore_steering keeps the KL filter: with KL < 0 required, it has nothing to pick either
    with pytest.raises(SelectionError):
        select_direction(model, c, HARMFUL, HARMLESS, dataclasses.replace(strict, if_none_pass="ignore_steering"),
                         progress=False)


def test_filters_match_the_reference():
    from rdt_interp.directions.selection import CandidateScore, passes_filters, pick

    cfg = SelectionConfig()
    assert passes_filters(0.1, 0.0, -3.0, cfg)  # at the thresholds: kept (reference discards > and <)
    assert not passes_filters(0.1001, 1.0, -3.0, cfg)
    assert not passes_filters(0.05, -0.01, -3.0, cfg)
    assert not passes_filters(float("nan"), 1.0, -3.0, cfg)
    rows = [CandidateScore(1, -1, -5.0, 0.5, 1.0, "final", False),  # lowest ablation, fails KL
            CandidateScore(2, -1, -2.0, 0.05, 0.5, "final", True),
            CandidateScore(3, -1, -4.0, 0.05, -1.0, "final", False)]  # fails steering only
    assert pick(rows, cfg) == (rows[1], None)
    failing = [rows[0], rows[2]]
    assert pick(failing, SelectionConfig(if_none_pass="ignore_steering")) == (rows[2], "ignore_steering")
    assert pick(failing, SelectionConfig(if_none_pass="unfiltered")) == (rows[0], "unfiltered")


def test_departures_are_named_and_the_defaults_have_none():
    assert SelectionConfig().departures() == []
    named = SelectionConfig(steering_alpha=2.0, screen_n=16, positions=(-1,), max_layer_fraction=0.9).departures()
    assert len(named) == 4 and any("coefficient 2" in d for d in named)


def test_filter_prompts_keeps_refused_harmful_and_complied_harmless(tiny_models, monkeypatch):
    """The rule on controlled scores: harmful kept iff score > 0, harmless iff score < 0, in order."""
    import torch

    from rdt_interp.directions import selection

    model = tiny_models["tiny-llama"]
    planted = torch.tensor([2.0, -1.0, 0.0, 0.5, 3.0, -0.2, -4.0, 1.0, 0.0, -0.1])
    monkeypatch.setattr(selection, "refusal_score", lambda lp, ids: planted[: lp.shape[0]])
    f = selection.filter_prompts(model, HARMFUL, HARMLESS)
    assert f.harmful == [HARMFUL[0], HARMFUL[3], HARMFUL[4]]
    assert f.harmless == [HARMLESS[0], HARMLESS[1], HARMLESS[4]]
    assert f.harmful_scores == planted[:5].tolist() and f.harmless_scores == planted[5:].tolist()


def test_filter_prompts_scores_are_the_refusal_scores(tiny_models):
    import torch

    from rdt_interp.directions.scoring import PromptBatch, last_logprobs, refusal_score
    from rdt_interp.directions.selection import filter_prompts

    model = tiny_models["tiny-qwen2"]
    f = filter_prompts(model, HARMFUL, HARMLESS)
    want = refusal_score(last_logprobs(model, PromptBatch.build(model, HARMFUL + HARMLESS)), model.refusal_token_ids())
    assert torch.allclose(torch.tensor(f.harmful_scores + f.harmless_scores), want.float(), atol=1e-5)
    assert f.harmful == [t for t, v in zip(HARMFUL, f.harmful_scores, strict=True) if v > 0]


def test_a_relaxation_after_a_failure_re_picks_from_the_same_table(tiny_models):
    """Reusing the failed selection's table gives what a fresh relaxed selection gives."""
    from rdt_interp.errors import SelectionError

    model = tiny_models["tiny-qwen2"]
    c = extract_candidates(model, HARMFUL, HARMLESS, progress=False)
    strict = SelectionConfig(final_n=4, kl_threshold=1e-3, positions=(-1,))
    with pytest.raises(SelectionError) as err:
        select_direction(model, c, HARMFUL, HARMLESS, strict, progress=False)
    relaxed = dataclasses.replace(strict, if_none_pass="unfiltered")
    fresh = select_direction(model, c, HARMFUL, HARMLESS, relaxed, progress=False)
    reused = select_direction(model, c, HARMFUL, HARMLESS, relaxed, progress=False, scored=err.value.scores)
    assert dataclasses.replace(reused, seconds=0.0) == dataclasses.replace(fresh, seconds=0.0)
    other = extract_candidates(model, HARMFUL, HARMLESS, layers=[0, 1], progress=False)
    with pytest.raises(ConfigError, match="does not score these candidates"):
        select_direction(model, other, HARMFUL, HARMLESS, relaxed, progress=False, scored=err.value.scores)
