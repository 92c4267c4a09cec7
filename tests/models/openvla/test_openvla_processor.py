"""The image processor reproduces the reference's pixel_values (PIL bicubic, no torchvision)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rdt_interp.errors import ConfigError
from rdt_interp.models.openvla import OpenVLAConfig, OpenVLAImageProcessor

from .conftest import CHECKPOINT, FIXTURE

PROC = FIXTURE / "processor"
# Exact here (max abs error 0.0). One uint8 step of the resized image is >= 1/255/0.5 = 7.8e-3 after
# normalisation, so this bound means "the same resampled pixels"; torch's antialiased bicubic
# interpolate, the alternative to PIL, is off by up to 1.75e-2 and fails it.
PIXEL_TOL = 1e-6


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(PROC / "image.png").convert("RGB")


@pytest.fixture(scope="module")
def expected_pixels() -> dict:
    return load_file(PROC / "expected_pixel_values.safetensors")


@pytest.mark.parametrize("strategy,key", [("letterbox", "letterbox"), ("resize-naive", "resize_naive")])
def test_pixel_values_match_reference(image, expected_pixels, strategy, key):
    proc = OpenVLAImageProcessor.from_file(PROC / f"preprocessor_{strategy}")
    assert proc.strategy == strategy
    px = proc(image)
    assert px.shape == expected_pixels[key].shape == (1, 6, 224, 224)
    assert px.dtype == torch.float32
    assert (px - expected_pixels[key]).abs().max().item() <= PIXEL_TOL


@pytest.mark.parametrize("strategy", ["letterbox", "resize-naive"])
def test_settings_derived_from_config_equal_the_shipped_preprocessor_config(strategy):
    # checkpoints without preprocessor_config.json get what the reference derives from config.json
    cfg = OpenVLAConfig.from_dir(CHECKPOINT)
    cfg = dataclasses.replace(cfg, image_resize_strategy=strategy)
    derived = OpenVLAImageProcessor.from_openvla_config(cfg)
    shipped = OpenVLAImageProcessor.from_file(PROC / f"preprocessor_{strategy}")
    assert derived == shipped


def test_letterbox_pads_with_the_fill_and_keeps_aspect():
    proc = OpenVLAImageProcessor.from_file(PROC / "preprocessor_letterbox")
    white = Image.new("RGB", (300, 100), (255, 255, 255))
    px = proc(white)[0, 3:]  # SigLIP view: (x/255 - 0.5) / 0.5
    fill = (127 / 255 - 0.5) / 0.5
    assert px[:, 0, 112].allclose(torch.full((3,), fill), atol=1e-6)  # top band is padding
    assert px[:, 112, 112].allclose(torch.ones(3), atol=1e-6)  # centre is the image


def test_odd_padding_is_center_cropped_like_the_reference():
    # 301x100 pads to 301x301 minus one column (int() of an odd half); resize + crop give 224x224
    proc = OpenVLAImageProcessor.from_file(PROC / "preprocessor_letterbox")
    px = proc(Image.new("RGB", (301, 100), (10, 200, 30)))
    assert px.shape == (1, 6, 224, 224)
    assert torch.isfinite(px).all()


def test_arrays_and_pil_images_give_the_same_pixels(image):
    proc = OpenVLAImageProcessor.from_file(PROC / "preprocessor_resize-naive")
    arr = np.asarray(image)
    assert torch.equal(proc(arr), proc(image))
    batch = proc([image, arr[::-1].copy()])
    assert batch.shape == (2, 6, 224, 224)
    assert torch.equal(batch[0], proc(image)[0])


def test_bad_images_raise_with_a_fix(image):
    proc = OpenVLAImageProcessor.from_file(PROC / "preprocessor_letterbox")
    with pytest.raises(ConfigError, match="uint8"):
        proc(np.asarray(image).astype(np.float32) / 255)
    with pytest.raises(ConfigError, match="HxWx3"):
        proc(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ConfigError, match="no images"):
        proc([])


def test_unknown_strategy_is_rejected():
    with pytest.raises(ConfigError, match="resize-naive"):
        OpenVLAImageProcessor("stretch", ())
