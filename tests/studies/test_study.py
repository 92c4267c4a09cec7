"""The whole study on tiny models: the cross-model label-permutation null and the specificity
step's label-shuffled null are wired in and reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rdt_interp.analysis.alignment import AlignmentResult
from rdt_interp.analysis.specificity import label_shuffled_directions
from rdt_interp.directions.diff_in_means import extract_candidates
from rdt_interp.directions.direction import Direction
from rdt_interp.studies.chat import chat_run_dir, chat_splits
from rdt_interp.studies.config import parse_config
from rdt_interp.studies.study import run_study, shuffled_directions
from rdt_interp.studies.vla import load_vla_rdt
from rdt_interp.viz.figures import alignment_layers

STUDY = {
    "name": "tiny-study",
    "chat_model": {"name": "tiny-qwen2"},
    "chat": {"n_train": 8, "n_test": 6, "alphas": [1.0, 4.0], "alpha_val_n": 4, "max_new_tokens": 4,
             "n_boot": 50, "filter_data": False,
             "selection": {"screen_n": 3, "final_n": 5, "top_k": 2, "kl_threshold": 10.0,
                           "if_none_pass": "unfiltered"}},
    "vla_model": {"adapter": "testbed-tiny"},
    "vla": {"alphas": [2.0], "sweep_modes": ["action"], "target_modes": ["action"], "n_pairs": 4,
            "n_random": 100, "n_shuffled": 20, "specificity_pairs": 2, "n_boot": 50, "n_perm": 50, "folds": 2,
            "probe": False, "decoupling_roles": ["last_text", "first_action"]},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores
    try:
        cfg = parse_config(STUDY)
        out = tmp_path_factory.mktemp("study")
        summary = run_study(cfg, out, progress=False, log=lambda m: None)
        yield cfg, out, summary
    finally:
        torch.set_num_threads(prev)


def test_cross_model_reports_the_label_permutation_null(study):
    cfg, out, summary = study
    cm = json.loads((out / "cross_model.json").read_text())
    assert summary["cross_model"]["n_vla"] == cm["n_vla"]
    for role in ("last_text", "first_action"):
        d = cm[f"alignment_{role}"]
        res = AlignmentResult.from_dict(d)
        perm = res.permutation
        assert perm is not None and perm.n_permutations == 1000 and perm.seed == cfg.chat.seed
        assert perm.name_a.endswith(f":{role}")
        assert perm.name_b == res.name_a and perm.d_model == res.d_model and perm.layers == res.layers
        assert perm.n_pos == cm["n_vla_harmful"] and perm.n_pos + perm.n_neg == cm["n_vla"]
        # the same cosine as the alignment (the VLA's class-mean difference vs the chat direction)
        np.testing.assert_allclose(perm.cos, res.cos, rtol=1e-5, atol=1e-6)
        ok = np.isfinite(perm.p)
        assert ok.any() and ((perm.p[ok] >= 1 / 1001) & (perm.p[ok] <= 1)).all()
        assert (perm.null_q95[ok] <= perm.null_q99[ok]).all()
        back = AlignmentResult.from_dict(json.loads(json.dumps(res.to_dict())))
        np.testing.assert_array_equal(back.permutation.p, perm.p)
        fig = alignment_layers(res)  # the figure draws the permutation null beside the isotropic band
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert any("shuffled labels" in t for t in labels)
        old = AlignmentResult.from_dict({k: v for k, v in d.items() if k != "permutation"})  # before the null
        assert old.permutation is None and "permutation" not in old.to_dict()
        np.testing.assert_array_equal(old.cos, res.cos)
        np.testing.assert_array_equal(old.p, res.p)
        labels = [t.get_text() for t in alignment_layers(old).axes[0].get_legend().get_texts()]
        assert not any("shuffled labels" in t for t in labels)
    assert (out / "figures" / "cross_model_alignment_last_text.png").is_file()


def test_specificity_reports_the_shuffled_chat_direction_null(study):
    cfg, out, summary = study
    res = load_vla_rdt(out / "vla")
    spec = res.specificity
    assert res.config.n_shuffled == 20 and spec.n_shuffled == 20 and spec.shuffled_null.shape == (20,)
    assert 1 / 21 <= spec.shuffled_p <= 1 and 1 / 101 <= spec.p <= 1
    vla_summary = json.loads((out / "vla" / "summary.json").read_text())
    assert vla_summary["specificity"]["shuffled_p"] == spec.shuffled_p
    assert vla_summary["specificity"]["p"] == spec.p
    # the directions are the chat activations' class-mean differences with shuffled labels, at
    # the chosen layer and position, seeded by the VLA seed
    from rdt_interp.models.loading import load_chat_model

    chat = load_chat_model(cfg.chat_model.name, dtype=cfg.chat_model.dtype, device="cpu")
    direction = Direction.load(out / "chat" / "direction.safetensors")
    got = shuffled_directions(cfg, out, chat, direction)
    splits = chat_splits(chat, cfg.chat, chat_run_dir(out / "chat", cfg.chat))
    cands = extract_candidates(chat, splits["harmful_train"], splits["harmless_train"],
                               cache=out / "chat" / "activations", progress=False)
    li = cands.layers.index(direction.provenance.layer)
    pi = cands.positions.index(int(direction.provenance.position.split("[")[1].rstrip("]")))
    xh, xl = cands.harmful.values[:, li, pi], cands.harmless.values[:, li, pi]
    y = torch.arange(xh.shape[0] + xl.shape[0]) < xh.shape[0]
    want = label_shuffled_directions(torch.cat([xh, xl]).double(), y, 20, seed=cfg.vla.seed).float()
    assert got.shape == (20, chat.d_model) and torch.equal(got, want)
    ident = json.loads((out / "vla" / "config.json").read_text())
    assert ident["shuffled"]["n"] == 20
    off = parse_config({**STUDY, "vla": {**STUDY["vla"], "n_shuffled": 0}})
    assert shuffled_directions(off, out, chat, direction) is None
