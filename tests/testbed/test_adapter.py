"""The tiny testbed VLA end to end through the adapter interface: roles, batching, both backends."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import get_submodule
from rdt_interp.models.vla import VLARequest
from rdt_interp.roles import Role
from rdt_interp.testbed.adapter import UNNORM_KEY, build_tiny_testbed_vla
from rdt_interp.testbed.scene import render, sample_scene
from rdt_interp.tracing.generation import generate
from rdt_interp.tracing.interventions import AddDirection

INSTRUCTIONS = ["open the gripper", "pick up the red cup",
                "put the sponge in the blue bowl", "push the hot pot to the left",
                "move the knife into the drawer"]


@pytest.fixture(scope="module")
def vla():
    return build_tiny_testbed_vla(0)


@pytest.fixture(scope="module")
def requests_():
    imgs = [render(sample_scene(100 + i)) for i in range(len(INSTRUCTIONS))]
    return [VLARequest(ins, img) for ins, img in zip(INSTRUCTIONS, imgs, strict=True)]


def test_tiny_variant_is_cheap_complete_and_seeded(vla) -> None:
    t0 = time.perf_counter()
    again = build_tiny_testbed_vla(0)
    assert time.perf_counter() - t0 < 1.0
    assert again.digest() == vla.digest() != build_tiny_testbed_vla(1).digest()
    assert vla.random_weights and vla.n_layers == 4 and vla.d_model == 64
    assert get_submodule(vla.model, vla.layers_path) is vla.layers
    mods = set(map(id, vla.model.modules()))
    assert id(vla.final_norm) in mods and id(vla.lm_head) in mods
    tok = vla.action_tokenizer
    assert tok.token_ids.tolist() == list(range(528 - 256, 528))
    assert int(tok.token_ids.min()) >= len(vla.tokenizer)  # no text token is an action token
    assert vla.describe()["num_patches"] == 16


def test_roles_cover_bos_patches_template_instruction_post_and_pads(vla, requests_) -> None:
    batch = vla.encode(requests_[:2])  # "open the gripper" is shorter: its row is padded
    n = vla.num_patches
    ids = batch.inputs["input_ids"]
    for row, req in enumerate(requests_[:2]):
        roles = batch.roles[row].tolist()
        real = [i for i, r in enumerate(roles) if not r & Role.PAD]
        first = real[0]
        assert all(roles[i] == int(Role.PAD) for i in range(first))
        assert roles[first] == int(Role.BOS | Role.TEXT | Role.TEMPLATE)
        assert roles[first + 1: first + 1 + n] == [int(Role.IMAGE)] * n
        text_ids = ids[row][ids.shape[1] - (len(real) - n):].tolist()
        text_roles = [r for r in roles[first:] if not r & Role.IMAGE]
        assert len(text_ids) == len(text_roles)

        def span(role: Role, ids=text_ids, roles=text_roles) -> str:
            return vla.tokenizer.decode([t for t, r in zip(ids, roles, strict=True) if r & role])

        assert span(Role.TEMPLATE) == "<|endoftext|>In: What action should the robot take to "
        assert span(Role.INSTRUCTION) == req.instruction
        assert span(Role.POST_INSTRUCTION) == "?\nOut: "  # with OpenVLA's trailing token
        assert all(r & Role.TEXT for r in text_roles)
    assert int(batch.roles[0].eq(int(Role.PAD)).sum()) > 0
    assert batch.roles.shape == batch.attention_mask.shape == batch.position_ids.shape
    assert torch.equal(batch.attention_mask.eq(0), batch.roles.eq(int(Role.PAD)))


def test_batched_rows_get_exactly_what_they_get_alone(vla, requests_) -> None:
    reqs = [requests_[(3 * i) % 5] for i in range(10)]  # repeats at scattered positions
    vla.constrain_actions = True
    try:
        pred = vla.predict_actions(reqs, unnorm_key=UNNORM_KEY, return_logits=True)
        for row, r in enumerate(reqs):
            one = vla.predict_actions([r], unnorm_key=UNNORM_KEY, return_logits=True)
            assert pred.token_ids[row].tolist() == one.token_ids[0].tolist()
            assert torch.equal(pred.actions[row], one.actions[0])
            assert (pred.action_logits[row] - one.action_logits[0]).abs().max().item() <= 1e-4
    finally:
        vla.constrain_actions = False
    assert bool(vla.action_tokenizer.is_action_token(pred.token_ids).all())
    assert pred.actions.shape == (10, 7) and pred.action_logits.shape == (10, 7, 256)


def test_cached_decoding_equals_a_full_forward(vla, requests_) -> None:
    batch = vla.encode(requests_[:3])
    gen = generate(vla, batch, max_new_tokens=3, stop_at_eos=False, return_logits=True)
    ids = torch.cat([batch.inputs["input_ids"], gen.tokens[:, :2]], dim=1)
    mask = torch.cat([batch.inputs["attention_mask"], torch.ones(3, 2, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        full = vla.model(input_ids=ids, attention_mask=mask, pixel_values=batch.inputs["pixel_values"]).logits
    assert torch.allclose(full[:, -3:], gen.logits, atol=1e-4)


def test_the_image_changes_the_action_logits(vla, requests_) -> None:
    ins = requests_[1].instruction
    img_a, img_b = requests_[1].image, requests_[2].image
    a = vla.predict_actions([VLARequest(ins, img_a)], return_logits=True)
    a2 = vla.predict_actions([VLARequest(ins, img_a.copy())], return_logits=True)
    b = vla.predict_actions([VLARequest(ins, img_b)], return_logits=True)
    assert torch.equal(a.action_logits, a2.action_logits)
    assert (a.action_logits - b.action_logits).abs().max().item() > 1e-4
    # a single changed pixel reaches the logits too
    img_c = img_a.copy()
    img_c[10, 10] = 255 - img_c[10, 10]
    c = vla.predict_actions([VLARequest(ins, img_c)], return_logits=True)
    assert (a.action_logits - c.action_logits).abs().max().item() > 0


def test_nnsight_and_hooks_agree_with_and_without_interventions(vla, requests_) -> None:
    hooks = vla.predict_actions(requests_, backend="hooks", return_logits=True)
    nns = vla.predict_actions(requests_, backend="nnsight", return_logits=True)
    assert torch.equal(hooks.token_ids, nns.token_ids)
    assert torch.equal(hooks.action_logits, nns.action_logits)
    d = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(0))
    iv = [AddDirection(d, 4.0, layers=[1, 2], roles=Role.ACTION, phase="decode"),
          AddDirection(d, 2.0, layers=[0], roles=Role.IMAGE, phase="prefill")]
    h = vla.predict_actions(requests_, interventions=iv, backend="hooks", return_logits=True)
    n = vla.predict_actions(requests_, interventions=iv, backend="nnsight", return_logits=True)
    assert torch.equal(h.token_ids, n.token_ids)
    assert (h.action_logits - n.action_logits).abs().max().item() <= 1e-5
    assert (h.action_logits - hooks.action_logits).abs().max().item() > 1e-3


def test_an_unmerged_model_predicts_what_the_merged_one_does(requests_) -> None:
    merged = build_tiny_testbed_vla(2)
    unmerged = build_tiny_testbed_vla(2, merge=False)
    assert unmerged.model.lora_layers() and not merged.model.lora_layers()
    a = merged.predict_actions(requests_, return_logits=True)
    b = unmerged.predict_actions(requests_, return_logits=True)
    assert (a.action_logits - b.action_logits).abs().max().item() <= 1e-4


def test_requests_are_checked(vla) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        vla.encode([])
    with pytest.raises(ConfigError, match="VLARequest"):
        vla.encode(["just text"])
    big = np.full((128, 128, 3), 200, dtype=np.uint8)  # other sizes are resized to 64x64
    small = np.full((64, 64, 3), 200, dtype=np.uint8)
    a = vla.encode([VLARequest("open the gripper", big)]).inputs["pixel_values"]
    b = vla.encode([{"instruction": "open the gripper", "image": small}]).inputs["pixel_values"]
    assert torch.allclose(a, b)
