"""The testbed VLA network: LoRA, action rows, merging, the delta, the multimodal layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rdt_interp.errors import ConfigError, WeightMismatchError
from rdt_interp.models.adapter import pad_sequences
from rdt_interp.testbed.model import (
    LoRALinear,
    LoRASpec,
    TestbedVLA,
    TestbedVLAConfig,
    VisionSpec,
    images_to_pixels,
)

VOCAB = 300
VISION = VisionSpec(image_size=32, patch_size=16, hidden_size=16, depth=1, num_heads=2, mlp_dim=32)


def tiny_lm(seed: int = 0) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


def make(seed: int = 0, *, randomize: bool = True, n_bins: int = 16, lm_seed: int = 0) -> TestbedVLA:
    m = TestbedVLA(tiny_lm(lm_seed), TestbedVLAConfig(VISION, LoRASpec(rank=2, alpha=4.0), n_bins=n_bins),
                   seed=seed)
    if randomize:  # a trained-looking delta: LoRA B and action rows away from their init
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for lora in m.lora_layers().values():
                lora.lora_B.normal_(0, 0.1, generator=g)
            m.action_embed.normal_(0, 0.5, generator=g)
            m.action_head.normal_(0, 0.5, generator=g)
    return m.eval()


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    seqs = [[1, 5, 7, 9, 290, 291], [1, 8, 290], [1, 4, 4, 4, 4, 4, 4, 295]]  # ids >= 284 are actions
    ids, _, mask = pad_sequences(seqs, [[0] * len(s) for s in seqs], 0, "left")
    px = images_to_pixels([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in seqs], 32)
    return ids, mask, px


def test_lora_starts_as_the_identity_and_merges_exactly() -> None:
    base = torch.nn.Linear(8, 6)
    ref = torch.nn.Linear(8, 6)
    ref.load_state_dict(base.state_dict())
    lora = LoRALinear(base, 2, 4.0, torch.Generator().manual_seed(0))
    x = torch.randn(5, 8)
    assert torch.equal(lora(x), ref(x))  # B = 0
    assert not base.weight.requires_grad and lora.lora_A.requires_grad and lora.lora_B.requires_grad
    with torch.no_grad():
        lora.lora_B.normal_()
    y = lora(x)
    assert not torch.allclose(y, ref(x))
    merged = lora.merged()
    assert torch.allclose(merged(x), y, atol=1e-5)


def test_lora_wraps_every_target_in_every_layer_and_freezes_the_backbone() -> None:
    m = make(randomize=False)
    names = sorted(m.lora_layers())
    assert len(names) == 2 * 7
    assert "model.layers.1.self_attn.q_proj" in names and "model.layers.0.mlp.down_proj" in names
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith(("vision.", "projector.", "projector_norm.", "action_")) or "lora_" in n for n in trainable)
    groups = m.trainable_parameters()
    assert sum(p.numel() for ps in groups.values() for p in ps) == sum(
        p.numel() for p in m.parameters() if p.requires_grad)
    only_qv = TestbedVLA(tiny_lm(), TestbedVLAConfig(VISION, LoRASpec(rank=2, targets=("q_proj", "v_proj"))))
    assert sorted({n.rsplit(".", 1)[1] for n in only_qv.lora_layers()}) == ["q_proj", "v_proj"]


def test_action_rows_overlay_until_merged_then_live_in_the_matrices() -> None:
    m = make()
    ids, mask, px = batch()
    with torch.no_grad():
        before = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        train_path = m.action_logits(ids, mask, px, n_last=3)
    assert torch.allclose(train_path, before[:, -3:], atol=1e-5)
    # the overlay really is used: the frozen matrices still hold the base rows
    assert not torch.equal(m.language_model.get_output_embeddings().weight[-16:], m.action_head)
    m.merge_()
    assert m.merged and m.action_embed is None and not m.lora_layers()
    with torch.no_grad():
        after = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert torch.allclose(after, before, atol=1e-5)
    # merged: the LLM is a plain Qwen2ForCausalLM; text-only calls through it agree with ours
    with torch.no_grad():
        plain = m.language_model(input_ids=ids, attention_mask=mask).logits
        ours = m(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(plain, ours, atol=1e-5)


def test_gradients_reach_exactly_the_trained_parts() -> None:
    m = make().train()
    ids, mask, px = batch()
    logits = m.action_logits(ids, mask, px, n_last=2)
    logits.logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the input action rows get gradient only for the action ids that occur as inputs
    used = sorted({i - 284 for i in ids.flatten().tolist() if i >= 284})
    rows = (m.action_embed.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert rows == used


def test_patches_go_after_each_rows_first_real_token() -> None:
    m = make()
    ids, mask, px = batch()
    embeds, mm_mask, pos = m.multimodal_inputs(ids, mask, px)
    n = VISION.num_patches
    assert embeds.shape == (3, ids.shape[1] + n, 32)
    _, projected = m.image_features(px)
    tok = m.embed(ids)
    for row in range(3):
        first = int(mask[row].argmax())
        assert torch.equal(embeds[row, first], tok[row, first])
        assert torch.equal(embeds[row, first + 1: first + 1 + n], projected[row])
        assert torch.equal(embeds[row, first + 1 + n:], tok[row, first + 1:])
        assert pos[row, first].item() == 0 and pos[row, -1].item() == int(mask[row].sum()) + n - 1
        assert mm_mask[row, :first].sum() == 0


def test_delta_round_trip_and_strict_loading() -> None:
    a, b = make(seed=0), make(seed=1)
    ids, mask, px = batch()
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        assert not torch.allclose(la, b(input_ids=ids, attention_mask=mask, pixel_values=px).logits)
        b.load_delta_(a.delta_state_dict())
        assert torch.equal(la, b(input_ids=ids, attention_mask=mask, pixel_values=px).logits)
    state = a.delta_state_dict()
    assert set(state) >= {"action_embed", "action_head", "projector.fc1.weight",
                          "language_model.model.layers.0.self_attn.q_proj.lora_A"}
    bad = dict(state)
    bad.pop("action_head")
    bad["extra"] = torch.zeros(1)
    with pytest.raises(WeightMismatchError, match="missing.*action_head"):
        b.load_delta_(bad)
    with pytest.raises(WeightMismatchError, match="wrong shape"):
        b.load_delta_({**state, "action_head": torch.zeros(3, 3)})
    a.merge_()
    with pytest.raises(ConfigError, match="merged"):
        a.delta_state_dict()


def test_construction_is_deterministic_in_the_seed() -> None:
    a, b, c = make(seed=3, randomize=False), make(seed=3, randomize=False), make(seed=4, randomize=False)
    sa, sb, sc = a.delta_state_dict(), b.delta_state_dict(), c.delta_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["projector.fc1.weight"], sc["projector.fc1.weight"])
    vit = [k for k in sa if k.startswith("vision.") and k.endswith("patch_embedding.weight")]
    assert len(vit) == 1 and not torch.equal(sa[vit[0]], sc[vit[0]])
    # building does not touch the global RNG
    lm = tiny_lm()
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    TestbedVLA(lm, TestbedVLAConfig(VISION, LoRASpec(rank=2)), seed=5)
    assert torch.equal(torch.rand(1), x)


def test_errors_name_the_fix() -> None:
    m = make()
    ids, mask, px = batch()
    with pytest.raises(ConfigError, match="one image per prompt"):
        m(input_ids=ids, attention_mask=mask, pixel_values=px[:2])
    with pytest.raises(ConfigError, match="text-level mask"):
        m(input_ids=ids, attention_mask=torch.ones(3, ids.shape[1] + 4, dtype=torch.long), pixel_values=px)
    with pytest.raises(ConfigError, match="patch_size"):
        VisionSpec(image_size=30, patch_size=16)
    with pytest.raises(ConfigError, match="choose from"):
        LoRASpec(targets=("qkv",))
    with pytest.raises(ConfigError, match="HxWx3"):
        images_to_pixels([np.zeros((4, 4), dtype=np.uint8)], 32)


def test_images_are_scaled_to_minus_one_one_and_resized() -> None:
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[..., 0] = 255
    px = images_to_pixels([img], 32)
    assert px.shape == (1, 3, 32, 32)
    assert torch.allclose(px[0, 0], torch.ones(32, 32)) and torch.allclose(px[0, 1], -torch.ones(32, 32))


def test_config_round_trips_through_a_dict() -> None:
    cfg = TestbedVLAConfig(VISION, LoRASpec(rank=3, alpha=5.0, targets=("q_proj", "v_proj")), n_bins=32)
    assert TestbedVLAConfig.from_dict(cfg.to_dict()) == cfg
