"""The model's forward: masks over text or decoder positions, and errors that name the fix."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLARequest

from .conftest import instructions, random_images


@pytest.fixture(scope="module")
def batch(tiny_vla):
    reqs = [VLARequest(i, im) for i, im in zip(instructions(3), random_images(3, 4), strict=True)]
    return tiny_vla.encode(reqs)


def test_text_level_and_decoder_level_masks_give_the_same_forward(tiny_vla, batch):
    kw = {k: v for k, v in batch.inputs.items() if k != "attention_mask"}
    with torch.inference_mode():
        text = tiny_vla.model(**kw, attention_mask=batch.inputs["attention_mask"])
        full = tiny_vla.model(**kw, attention_mask=batch.attention_mask)
        no_pos = tiny_vla.model(input_ids=kw["input_ids"], pixel_values=kw["pixel_values"],
                                attention_mask=batch.inputs["attention_mask"])
    assert torch.equal(text.attention_mask, batch.attention_mask)
    assert torch.equal(text.logits, full.logits)
    assert torch.equal(text.logits, no_pos.logits)  # positions default to the multimodal mask's


def test_forward_errors_name_the_fix(tiny_vla, batch):
    ids, px = batch.inputs["input_ids"], batch.inputs["pixel_values"]
    with torch.inference_mode():
        with pytest.raises(ConfigError, match="3 per ViT"):
            tiny_vla.model(input_ids=ids, pixel_values=px[:, :3])
        with pytest.raises(ConfigError, match="one image per prompt"):
            tiny_vla.model(input_ids=ids, pixel_values=px[:2])
        with pytest.raises(ConfigError, match="attention_mask has"):
            tiny_vla.model(input_ids=ids, pixel_values=px, attention_mask=batch.inputs["attention_mask"][:, 1:])
        out = tiny_vla.model(**batch.inputs, use_cache=True)
        with pytest.raises(ConfigError, match="prefill"):
            tiny_vla.model(input_ids=ids[:, -1:], pixel_values=px, past_key_values=out.past_key_values)
