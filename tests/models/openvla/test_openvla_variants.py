"""Real OpenVLA-7b shapes, random weights, single-ViT variants and a Qwen2 LLM backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdt_interp.models.openvla import (
    OpenVLAConfig,
    build_random_openvla,
    load_openvla,
    openvla_7b_config,
)
from rdt_interp.models.openvla.modeling import build_empty_model
from rdt_interp.models.vla import VLARequest

from .conftest import CHECKPOINT, fixture_config, instructions, random_images

VISION_TOL = 1e-6


def test_openvla_7b_config_has_the_real_shapes():
    cfg = OpenVLAConfig.from_dict(openvla_7b_config())
    model = build_empty_model(cfg, dtype=torch.bfloat16, device="meta")  # no memory used
    sd = model.state_dict()
    assert sd["projector.fc1.weight"].shape == (8704, 2176)
    assert sd["projector.fc2.weight"].shape == (4096, 8704)
    assert sd["projector.fc3.weight"].shape == (4096, 4096)
    dino = model.vision_backbone.featurizer
    siglip = model.vision_backbone.fused_featurizer
    assert (dino.spec.embed_dim, dino.spec.depth, dino.spec.num_heads, dino.spec.mlp_dim) == (1024, 24, 16, 4096)
    assert (siglip.spec.embed_dim, siglip.spec.depth, siglip.spec.num_heads, siglip.spec.mlp_dim) == (1152, 27, 16, 4304)
    assert dino.vit.config.num_register_tokens == 4 and dino.spec.num_patches == siglip.spec.num_patches == 256
    lm = model.language_model
    assert lm.config.vocab_size == 32064 and lm.config.hidden_size == 4096
    assert lm.config.num_hidden_layers == 32 and lm.config.intermediate_size == 11008
    # Llama-2-7b has 6,738,415,616 parameters; OpenVLA pads the vocabulary by 64 rows (in and out)
    assert sum(p.numel() for p in lm.parameters()) == 6_738_415_616 + 2 * 64 * 4096


def test_random_weights_are_seeded_and_flagged(manifest):
    a = build_random_openvla(fixture_config(), torch.float32, "cpu", seed=1, vision_overrides=manifest["vision_overrides"])
    b = build_random_openvla(fixture_config(), torch.float32, "cpu", seed=1, vision_overrides=manifest["vision_overrides"])
    c = build_random_openvla(fixture_config(), torch.float32, "cpu", seed=2, vision_overrides=manifest["vision_overrides"])
    assert a.random_weights and a.describe()["random_weights"]
    assert a.digest() == b.digest() != c.digest()
    params = {k: v.detach() for k, v in a.model.named_parameters()}
    assert torch.equal(params["language_model.model.norm.weight"], torch.ones(64))
    assert float(params["projector.fc1.bias"].abs().max()) == 0.0
    assert 0.015 < float(params["projector.fc2.weight"].std()) < 0.025
    # buffers computed in constructors survive the meta-device build
    rope = a.model.language_model.model.rotary_emb.inv_freq
    assert rope.dtype == torch.float32 and torch.isfinite(rope).all() and rope[0] == 1.0
    pred = a.predict_actions([VLARequest("pick up the cup", random_images(1, 0)[0])])
    assert pred.token_ids.shape == (1, 7)


def _single_vit_checkpoint(tmp_path, which: str):
    """The fixture's DINOv2 or SigLIP alone, with a 2-layer gelu-mlp projector (random)."""
    w = load_file(CHECKPOINT / "model.safetensors")
    cfg = fixture_config()
    src = "vision_backbone.featurizer." if which == "dinov2" else "vision_backbone.fused_featurizer."
    timm_id = cfg["timm_model_ids"][0 if which == "dinov2" else 1]
    dim = 48 if which == "dinov2" else 40
    out = {k: v for k, v in w.items() if k.startswith("language_model.")}
    out.update({"vision_backbone.featurizer." + k[len(src):]: v for k, v in w.items() if k.startswith(src)})
    g = torch.Generator().manual_seed(0)
    out.update({"projector.fc1.weight": torch.randn(64, dim, generator=g) * 0.1, "projector.fc1.bias": torch.zeros(64),
                "projector.fc2.weight": torch.randn(64, 64, generator=g) * 0.1, "projector.fc2.bias": torch.zeros(64)})
    cfg.update(vision_backbone_id="dinov2-vit-l" if which == "dinov2" else "siglip-vit-so400m",
               timm_model_ids=[timm_id], image_sizes=[224], timm_override_act_layers=[None],
               use_fused_vision_backbone=False, arch_specifier="no-align+gelu-mlp")
    root = tmp_path / which
    root.mkdir()
    (root / "config.json").write_text(json.dumps(cfg))
    save_file(out, root / "model.safetensors")
    return root, timm_id


@pytest.mark.parametrize("which", ["dinov2", "siglip"])
def test_single_vit_variants_match_the_reference_features(tmp_path, manifest, expected, byte_tok, which):
    root, timm_id = _single_vit_checkpoint(tmp_path, which)
    vla = load_openvla(root, vision_overrides={timm_id: manifest["vision_overrides"][timm_id]}, tokenizer=byte_tok)
    assert vla.model.vision_backbone.fused_featurizer is None and not hasattr(vla.model.projector, "fc3")
    assert vla.processor.channels == 3
    px = expected["pixel_values"][:, :3] if which == "dinov2" else expected["pixel_values"][:, 3:]
    ref = expected["vision_patches"][..., :48] if which == "dinov2" else expected["vision_patches"][..., 48:]
    with torch.inference_mode():
        patches, projected = vla.model.image_features(px)
    assert (patches - ref).abs().max().item() <= VISION_TOL
    assert projected.shape == (1, 256, 64)
    pred = vla.predict_actions([VLARequest("pick up the cup", random_images(1, 5)[0])])
    assert pred.token_ids.shape == (1, 7)


def qwen2_config() -> dict:
    cfg = fixture_config()
    cfg["text_config"] = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "vocab_size": 1064, "max_position_embeddings": 512, "tie_word_embeddings": True,
                          "rms_norm_eps": 1e-6}
    return cfg


def test_qwen2_backbone_builds_saves_loads_and_batches(tmp_path, manifest, byte_tok):
    rand = build_random_openvla(qwen2_config(), torch.float32, "cpu", seed=3,
                                vision_overrides=manifest["vision_overrides"], tokenizer=byte_tok)
    lm = rand.model.language_model
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tying survives the meta build
    assert rand.layers_path == "language_model.model.layers" and rand.n_layers == 2
    # a checkpoint in the reference layout: the fixture's ViTs, our projector and Qwen2 (tied: no lm_head)
    w = {k: v for k, v in load_file(CHECKPOINT / "model.safetensors").items() if k.startswith("vision_backbone.")}
    w.update({f"projector.{k}": v.clone() for k, v in rand.model.projector.state_dict().items()})
    w.update({f"language_model.{k}": v.clone() for k, v in lm.state_dict().items() if k != "lm_head.weight"})
    root = tmp_path / "qwen2-vla"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(qwen2_config()))
    save_file(w, root / "model.safetensors")
    vla = load_openvla(root, vision_overrides=manifest["vision_overrides"], tokenizer=byte_tok)
    assert vla.model.language_model.lm_head.weight is vla.model.language_model.model.embed_tokens.weight
    rand.model.vision_backbone.load_state_dict(vla.model.vision_backbone.state_dict())
    reqs = [VLARequest(i, im) for i, im in zip(instructions(4), random_images(4, 9), strict=True)]
    a = vla.predict_actions(reqs, return_logits=True)
    b = rand.predict_actions(reqs, return_logits=True)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.action_logits, b.action_logits)
    for row, r in enumerate(reqs[:2]):
        one = vla.predict_actions([r], return_logits=True)
        assert one.token_ids[0].tolist() == a.token_ids[row].tolist()
        assert (one.action_logits[0] - a.action_logits[row]).abs().max().item() <= 1e-4
