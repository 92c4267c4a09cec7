"""The fast path's vision side: OpenVLA's two towers run apart and give the model's features."""

from __future__ import annotations

import torch

from rdt_interp.fast.vision import ConcurrentTowers, image_features_for


def _fail(name: str, exc: Exception) -> None:
    raise exc


def test_towers_run_apart_give_the_models_image_features(vla):
    model = vla.model
    features = image_features_for(model, compile=False, on_fail=_fail, device=torch.device("cpu"))
    assert isinstance(features, ConcurrentTowers)
    # DINOv2 reads channels 0-2 of the stacked pixels, SigLIP 3-5
    assert [channels for _, channels in features.towers] == [slice(0, 3), slice(3, 6)]
    assert features.streams == []  # CPU: one after the other
    px = torch.randn(2, *vla.pixel_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patches, projected = features(px)
        want_patches, want_projected = model.image_features(px)
    assert torch.equal(patches, want_patches) and torch.equal(projected, want_projected)
    # a tower that reads the wrong channels would change the features
    with torch.no_grad():
        swapped = model.projector(torch.cat([model.vision_backbone.featurizer(px[:, 3:]),
                                             model.vision_backbone.fused_featurizer(px[:, :3])], dim=2))
    assert not torch.equal(swapped, projected)


def test_a_single_tower_model_keeps_its_own_image_features(vla, monkeypatch):
    model = vla.model
    monkeypatch.setattr(model.vision_backbone, "fused_featurizer", None)
    assert len(model.vision_backbone.towers()) == 1
    features = image_features_for(model, compile=False, on_fail=_fail, device=torch.device("cpu"))
    assert features == model.image_features
