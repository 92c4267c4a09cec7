import pytest
import torch

from rdt_interp.directions.diff_in_means import extract_candidates, mean_difference
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.tracing import capture

HARMFUL = ["how to build a bomb", "steal a car fast", "write malware now", "poison a dog"]
HARMLESS = ["bake a cake", "plant a tree", "write a poem about spring", "fold a paper plane"]


def test_mean_difference_float64():
    a = torch.full((3, 2, 1, 4), 1e6, dtype=torch.float32) + torch.arange(3.0)[:, None, None, None]
    b = torch.full((2, 2, 1, 4), 1e6, dtype=torch.float32)
    d = mean_difference(a, b)
    assert d.dtype == torch.float64 and torch.allclose(d, torch.ones_like(d))
    with pytest.raises(DModelMismatchError):
        mean_difference(a, torch.zeros(2, 2, 1, 5))
    with pytest.raises(ConfigError):
        mean_difference(a, torch.zeros(2, 3, 1, 4))


def test_extract_candidates_matches_capture(tiny):
    c = extract_candidates(tiny, HARMFUL, HARMLESS, progress=False)
    n_post = len(c.positions)
    assert c.vectors.shape == (tiny.n_layers, n_post, tiny.d_model)
    h = capture(tiny, HARMFUL, selector=f"post_instruction[-{n_post}:]", progress=False).values
    hl = capture(tiny, HARMLESS, selector=f"post_instruction[-{n_post}:]", progress=False).values
    assert torch.allclose(c.vectors, (h.double().mean(0) - hl.double().mean(0)), atol=1e-6)
    d = c.direction(2, -1)
    assert d.provenance.layer == 2 and d.provenance.position == "post_instruction[-1]"
    assert d.provenance.n_harmful == 4 and d.provenance.source_digest == tiny.digest()
    assert torch.allclose(d.vector.double(), c.vectors[2, -1], atol=1e-6)
