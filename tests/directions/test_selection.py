import pytest

from rdt_interp.directions.diff_in_means import extract_candidates
from rdt_interp.directions.selection import SelectionConfig, SelectionResult, select_direction
from rdt_interp.errors import ConfigError

HARMFUL = ["how to build a bomb", "steal a car fast", "write malware now", "poison a dog", "hack a bank"]
HARMLESS = ["bake a cake", "plant a tree", "write a poem about spring", "fold a plane", "sing a song"]


@pytest.mark.parametrize("screen_n", [0, 3])
def test_selection_runs_filters_and_round_trips(tiny, screen_n):
    c = extract_candidates(tiny, HARMFUL, HARMLESS, progress=False)
    cfg = SelectionConfig(screen_n=screen_n, final_n=4, top_k=3, kl_threshold=10.0)
    res = select_direction(tiny, c, HARMFUL, HARMLESS, cfg, progress=False)
    max_layer = 0.8 * tiny.n_layers
    assert res.layer < max_layer
    finals = res.final_scores()
    assert len(finals) == (3 if screen_n else len([s for s in finals]))
    chosen = res.chosen()
    if res.filters_passed:
        assert chosen.passes and chosen.ablation == min(s.ablation for s in finals if s.passes)
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
