import pytest

from rdt_interp.errors import CheckpointError, ConfigError
from rdt_interp.studies.config import builtin_config, parse_config
from rdt_interp.studies.study import check_models

VLA = {"vla_model": {"adapter": "testbed-tiny"}}


@pytest.mark.parametrize("data,needle", [
    ({**VLA, "vla": {"alpha": "2"}}, "vla.alpha: Input should be a valid number"),
    ({**VLA, "vla": {"alphas": [1.0, "4"]}}, "vla.alphas.1"),
    ({"chat": {"n_train": 8.0}}, "chat.n_train: Input should be a valid integer"),
    ({"chat": {"alphas": [1.0], "n_boot": True}}, "chat.n_boot"),
    ({**VLA, "vla": {"n_pairs": 0}}, "n_pairs must be >= 1"),
    ({**VLA, "vla": {"n_random": 0}}, "n_random must be >= 1"),
    ({**VLA, "vla": {"folds": 1}}, "folds must be >= 2"),
    ({"vla_model": {"adapter": "testbed-tiny", "dtype": "bfloat"}, "vla": {}}, "vla_model.dtype"),
    ({"chat_model": {"dtype": "fp32"}}, "chat_model.dtype"),
])
def test_strict_types_and_bounds(data, needle):
    with pytest.raises(ConfigError, match="invalid") as err:
        parse_config(data)
    assert needle in str(err.value)


def test_numbers_and_arrays_as_toml_writes_them():
    cfg = parse_config({**VLA, "vla": {"alpha": 2, "alphas": [1, 2.5], "n_pairs": 3, "layers": [1, 2]},
                        "chat_model": {"dtype": "bfloat16"}})
    assert cfg.vla.alpha == 2.0 and cfg.vla.alphas == (1.0, 2.5) and cfg.vla.layers == (1, 2)
    assert cfg.chat_model.dtype == "bfloat16"
    for name in ("demo", "quick"):
        builtin_config(name)


def test_check_models_resolves_every_name_without_loading(tmp_path):
    check_models(parse_config({"chat_model": {"name": "llama-2-7b-random"},
                               "vla_model": {"adapter": "openvla-7b-random"}, "vla": {}}))
    with pytest.raises(CheckpointError, match="unknown model 'llama-2-7b'"):
        check_models(parse_config({"chat_model": {"name": "llama-2-7b"}}))
    bad_vla = parse_config({"chat_model": {"name": "tiny-llama"},
                            "vla_model": {"adapter": "openvla", "checkpoint": str(tmp_path / "x")}, "vla": {}})
    with pytest.raises(CheckpointError, match="does not exist"):
        check_models(bad_vla)
    check_models(bad_vla, vla=False)  # the caller passes the VLA itself
