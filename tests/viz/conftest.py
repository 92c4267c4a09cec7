"""Small saved results for the figure tests (computed once per session, a fraction of a second)."""

import pytest
import torch

from rdt_interp.analysis.alignment import align_directions
from rdt_interp.analysis.behaviour import action_metrics
from rdt_interp.analysis.probe_grid import probe_grid
from rdt_interp.analysis.probes import Labeled
from rdt_interp.analysis.specificity import (
    ProjectionAUC,
    label_shuffled_direction,
    specificity_test,
)
from rdt_interp.analysis.subspace import compare_subspaces, spectrum, top_subspace
from rdt_interp.models.action_tokenizer import ActionTokenizer


@pytest.fixture(scope="session")
def results():
    gen = torch.Generator().manual_seed(0)
    d, layers = 24, 6
    r = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    y = torch.arange(60) < 30
    x = torch.randn(60, layers, 2, d, generator=gen)
    x[:, :, 0] += (torch.linspace(0, 2, layers)[None, :, None] * y.float()[:, None, None]) * r
    data = Labeled(x, y, tuple(range(layers)), ("last(text)", "first(action)"), "val")
    grid = probe_grid(data, folds=3, n_boot=100, n_perm=100)
    dirs_a = torch.randn(layers, d, generator=gen)
    dirs_b = dirs_a + torch.linspace(3, 0.2, layers)[:, None] * torch.randn(layers, d, generator=gen)
    align = align_directions(dirs_a, dirs_b, name_a="chat", name_b="vla")
    flat = x[:, 5, 0]
    spec = specificity_test(ProjectionAUC(flat, y), r, n_random=200, n_boot=100,
                            controls={"-r": -r, "shuffled labels": label_shuffled_direction(flat, y)})
    sp = spectrum(flat, n_null=10, label="layer 5")
    sub = compare_subspaces(top_subspace(x[:30, 5, 0], 3), top_subspace(x[30:, 5, 0], 3), n_null=100,
                            label_a="harmful", label_b="harmless")
    tok = ActionTokenizer(vocab_size=600, n_bins=256)
    sweep = []
    for k, alpha in enumerate((0.0, 2.0, 4.0, 8.0)):
        logits = torch.randn(20, 7, 256, generator=gen)
        logits[..., 128] += 1.5 * k  # more mass on the zero-motion token as alpha grows
        sweep.append((alpha, action_metrics(tok, logits=logits, n_boot=100, label=f"a={alpha}")))
    return {"grid": grid, "align": align, "spec": spec, "spectrum": sp, "subspace": sub, "sweep": sweep}
