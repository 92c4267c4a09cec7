import json

import pytest

from rdt_interp.errors import ConfigError, CorruptFileError
from rdt_interp.studies.rundir import RunDir


def test_truncated_config_json_is_a_typed_error_naming_the_path(tmp_path):
    RunDir(tmp_path, {"name": "a", "alpha": 1.0})
    cfg = tmp_path / "config.json"
    cfg.write_text(cfg.read_text()[:10])  # an interrupted copy
    with pytest.raises(CorruptFileError, match="run config") as err:
        RunDir(tmp_path, {"name": "a", "alpha": 1.0})
    assert str(cfg) in str(err.value)


def test_truncated_step_result_names_the_step(tmp_path):
    run = RunDir(tmp_path, {"name": "a"})
    run.save("sweep", {"x": 1})
    (tmp_path / "sweep.json").write_text('{"x": ')
    with pytest.raises(CorruptFileError, match="'sweep'"):
        run.step("sweep", lambda: {"x": 1})


def test_another_config_is_refused(tmp_path):
    RunDir(tmp_path, {"name": "a"})
    with pytest.raises(ConfigError, match="another config"):
        RunDir(tmp_path, {"name": "b"})


def test_nan_in_a_step_result_is_stored_as_null(tmp_path):
    run = RunDir(tmp_path, {"name": "a"})
    value = run.step("s", lambda: {"cos": [float("nan"), 0.5]})
    assert value == {"cos": [None, 0.5]}  # what is stored is what the caller gets back
    assert json.loads((tmp_path / "s.json").read_text()) == {"cos": [None, 0.5]}
