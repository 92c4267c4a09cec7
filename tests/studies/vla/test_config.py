"""VLARDTConfig.n_shuffled: off by default (and absent from the stored config), else >= 19."""

from __future__ import annotations

import json

import pytest

from rdt_interp.errors import ConfigError
from rdt_interp.storage import to_json
from rdt_interp.studies.config import builtin_config, parse_config
from rdt_interp.studies.vla import VLARDTConfig


def test_n_shuffled_is_off_by_default_and_absent_from_the_stored_config():
    cfg = VLARDTConfig()
    assert cfg.n_shuffled == 0 and "n_shuffled" not in cfg.to_dict()
    on = VLARDTConfig(n_shuffled=20)
    assert on.to_dict()["n_shuffled"] == 20
    assert VLARDTConfig.from_dict(json.loads(to_json(on.to_dict()))) == on
    assert VLARDTConfig.from_dict(json.loads(to_json(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("n", [5, 1, 18, -1])
def test_too_few_shuffled_directions_are_refused(n):
    with pytest.raises(ConfigError, match="n_shuffled must be 0 .off. or >= 19"):
        VLARDTConfig(n_shuffled=n)
    study = {"name": "x", "chat_model": {"name": "tiny-qwen2"}, "vla_model": {"adapter": "testbed-tiny"},
             "vla": {"n_shuffled": n}}
    with pytest.raises(ConfigError, match="n_shuffled"):
        parse_config(study)
    assert VLARDTConfig(n_shuffled=19).n_shuffled == 19


def test_only_the_demo_config_turns_the_shuffled_null_on():
    assert builtin_config("demo").vla.n_shuffled == 20
    quick = builtin_config("quick")
    assert quick.vla is None or quick.vla.n_shuffled == 0
