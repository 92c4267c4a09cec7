"""Reading checkpoints: config validation, single-file and sharded safetensors, strict keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdt_interp.errors import CheckpointError, WeightMismatchError
from rdt_interp.models.openvla import OpenVLAConfig, load_openvla, openvla_7b_config

from .conftest import CHECKPOINT


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(CHECKPOINT / "model.safetensors")


def write_checkpoint(root, tensors, config=None, shards: int = 1):
    root.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else json.loads((CHECKPOINT / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, root / "model.safetensors")
        return root
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, root / name)
        weight_map.update(dict.fromkeys(part, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def load(path, manifest, **kw):
    return load_openvla(path, vision_overrides=manifest["vision_overrides"], **kw)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, weights, manifest, tiny_vla):
    root = write_checkpoint(tmp_path / "sharded", weights, shards=3)
    vla = load(root, manifest)
    ref = tiny_vla.model.state_dict()
    got = vla.model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_missing_shard_is_named(tmp_path, weights, manifest):
    root = write_checkpoint(tmp_path / "sharded", weights, shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load(root, manifest)


def test_missing_weight_is_listed(tmp_path, weights, manifest):
    key = "vision_backbone.featurizer.blocks.2.ls1.scale_factor"
    root = write_checkpoint(tmp_path / "c", {k: v for k, v in weights.items() if k != key})
    with pytest.raises(WeightMismatchError) as info:
        load(root, manifest)
    assert info.value.missing == [key] and not info.value.unexpected and not info.value.mismatched
    assert key in str(info.value)


def test_unexpected_weight_is_listed(tmp_path, weights, manifest):
    root = write_checkpoint(tmp_path / "c", {**weights, "projector.fc4.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightMismatchError) as info:
        load(root, manifest)
    assert info.value.unexpected == ["projector.fc4.weight"] and not info.value.missing


def test_wrong_shape_is_listed(tmp_path, weights, manifest):
    key = "vision_backbone.fused_featurizer.blocks.1.attn.qkv.weight"
    root = write_checkpoint(tmp_path / "c", {**weights, key: torch.zeros(121, 40)})
    with pytest.raises(WeightMismatchError) as info:
        load(root, manifest)
    assert info.value.mismatched and all(key in m for m in info.value.mismatched)
    assert not info.value.missing and not info.value.unexpected


def test_timm_layerscale_gamma_name_is_accepted(tmp_path, weights, manifest, tiny_vla):
    renamed = {k.replace(".scale_factor", ".gamma"): v for k, v in weights.items()}
    vla = load(write_checkpoint(tmp_path / "c", renamed), manifest)
    lam = vla.model.vision_backbone.featurizer.vit.encoder.layer[3].layer_scale2.lambda1
    assert torch.equal(lam, weights["vision_backbone.featurizer.blocks.3.ls2.scale_factor"])


def test_tiny_vits_without_overrides_explain_the_fix(tmp_path, weights):
    with pytest.raises(CheckpointError, match="vision_overrides") as info:
        load_openvla(CHECKPOINT)
    assert "embed_dim 1024 in config vs 48 in weights" in str(info.value)


@pytest.mark.parametrize("model_type", ["llama", "prismatic", None])
def test_not_an_openvla_config(tmp_path, weights, model_type):
    cfg = json.loads((CHECKPOINT / "config.json").read_text())
    cfg["model_type"] = model_type
    if model_type == "llama":  # a plain Llama directory
        cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64}
    root = write_checkpoint(tmp_path / "c", {"x": torch.zeros(1)}, config=cfg)
    with pytest.raises(CheckpointError, match="not an OpenVLA config") as info:
        load_openvla(root)
    if model_type == "llama":
        assert "load_chat_model" in str(info.value)


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_openvla(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_openvla(tmp_path / "empty")
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_openvla(tmp_path / "empty")


def test_unsupported_vision_backbone_lists_the_supported_ones():
    cfg = openvla_7b_config()
    cfg["vision_backbone_id"] = "clip-vit-l"
    with pytest.raises(CheckpointError, match="dinosiglip-vit-so-224px"):
        OpenVLAConfig.from_dict(cfg)


def test_bf16_load(tmp_path, manifest, expected):
    vla = load(CHECKPOINT, manifest, dtype=torch.bfloat16)
    assert {p.dtype for p in vla.model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        out = vla.model(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"])
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - expected["logits"]).abs().max().item() < 0.1
