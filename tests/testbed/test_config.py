"""The testbed's training configuration: one strict schema; committed and older manifests load."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources

import pytest

from rdt_interp.errors import ConfigError
from rdt_interp.testbed.config import TrainConfig, parse_train_config, tiny_config
from rdt_interp.testbed.model import LoRASpec, TestbedVLAConfig, VisionSpec

# the first testbed's manifest (commit 9624b26, format 1): written before device, precision,
# workers, train_samples, weight_decay, scheduled_sampling, val_swap and projector_norm existed
OLD_TRAIN_CONFIG = {
    "seed": 0, "base": "qwen2.5-coder-0.5b-instruct",
    "model": {"vision": {"image_size": 64, "patch_size": 16, "hidden_size": 192, "depth": 6, "num_heads": 3,
                         "mlp_dim": 768},
              "lora": {"rank": 8, "alpha": 16.0,
                       "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
              "n_bins": 256, "action_dim": 7},
    "vision_samples": 40000, "vision_val_samples": 1000, "vision_epochs": 3.2, "vision_batch": 128,
    "vision_lr": 0.001, "vision_ckpt_every": 50, "steps": 480, "batch_size": 8, "lr_vision": 0.0002,
    "lr_projector": 0.001, "lr_lora": 0.0005, "lr_rows": 0.001, "warmup": 10, "min_lr_ratio": 0.1,
    "grad_clip": 1.0, "val_every": 80, "val_size": 64, "ckpt_every": 20, "threads": 1,
}


def _manifest() -> dict:
    return json.loads(resources.files("rdt_interp.data").joinpath("testbed", "manifest.json").read_text())


def test_the_committed_manifest_is_the_default_recipe_on_the_gpu() -> None:
    m = _manifest()
    cfg = TrainConfig.from_dict(m["train_config"])
    # the defaults are the committed recipe; only where and how it ran differ
    assert cfg == TrainConfig(device="cuda", precision="bfloat16", workers=16, threads=4)
    assert cfg.to_dict() == m["train_config"]  # nothing is lost or added on the way through
    assert TestbedVLAConfig.from_dict(m["config"]) == cfg.model
    assert cfg.vision_steps == 1407 and cfg.autocast_dtype is not None


def test_an_old_manifest_loads_with_what_its_version_did() -> None:
    cfg = TrainConfig.from_dict(OLD_TRAIN_CONFIG)
    assert (cfg.device, cfg.precision, cfg.workers) == ("cpu", "float32", 1)
    assert cfg.weight_decay == 0.0 and cfg.scheduled_sampling == 0.0 and cfg.val_swap == 0
    assert cfg.train_samples == 480 * 8  # the old trainer generated steps x batch_size samples
    assert cfg.model.projector_norm is False and cfg.model.vision.image_size == 64
    assert cfg.vision_epochs == 3.2 and cfg.model.lora.targets[0] == "q_proj"
    assert TestbedVLAConfig.from_dict(OLD_TRAIN_CONFIG["model"]).projector_norm is False


@pytest.mark.parametrize("change,needles", [
    ({"stpes": 3}, ["stpes: unknown key"]),
    ({"steps": "3"}, ["steps: Input should be a valid integer"]),
    ({"steps": True}, ["steps: Input should be a valid integer"]),
    ({"lr_lora": "1e-3"}, ["lr_lora: Input should be a valid number"]),
    ({"precision": "bf16"}, ["precision: Input should be 'float32' or 'bfloat16'"]),
    ({"steps": 0}, ["must be >= 1"]),
    ({"scheduled_sampling": 1.0}, ["scheduled_sampling must be in [0, 1)"]),
    ({"model": {"vision": {"image_size": 100, "patch_size": 16}}}, ["model.vision: image_size 100"]),
    ({"model": {"lora": {"rnak": 4}}}, ["model.lora.rnak: unknown key"]),
    ({"model": {"lora": {"targets": ["q_proj", "attn"]}}}, ["model.lora", "are not Qwen2 decoder linears"]),
])
def test_a_bad_key_or_value_is_one_error_naming_it(change, needles) -> None:
    data = {**_manifest()["train_config"], **change}
    with pytest.raises(ConfigError) as err:
        parse_train_config(data, source="train_config.json")
    text = err.value.one_line()
    assert text.startswith("train_config.json is invalid:") and "fix:" in text
    for needle in needles:
        assert needle in text


def test_several_bad_keys_are_all_named() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig().replace(stpes=3, batch_size="8")
    assert "stpes: unknown key" in str(err.value) and "batch_size: Input should be" in str(err.value)


def test_replace_validates_and_turns_integers_into_floats() -> None:
    cfg = TrainConfig().replace(vision_epochs=2, steps=10)
    assert cfg.vision_epochs == 2.0 and isinstance(cfg.vision_epochs, float) and cfg.steps == 10
    assert cfg == replace(TrainConfig(), vision_epochs=2.0, steps=10)
    model = TestbedVLAConfig(VisionSpec(64, 16, 32, 1, 2, 64), LoRASpec(rank=2, alpha=4.0))
    assert TrainConfig().replace(model=model).model == model  # a config object is accepted too
    tiny = tiny_config(seed=3, vision_epochs=1)
    assert tiny.seed == 3 and tiny.base == "tiny-qwen2" and tiny.vision_epochs == 1.0
    assert tiny_config() == tiny_config(0)


def test_a_file_round_trips(tmp_path) -> None:
    cfg = tiny_config(steps=5)
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(json.loads(path.read_text())) == cfg
