"""Job files are validated by the study config's schema: its model kind names, its [vla] section."""

from __future__ import annotations

import pytest

from rdt_interp.distributed.jobs import MODEL_KINDS, parse_job
from rdt_interp.errors import ConfigError
from rdt_interp.studies.config import VLA_KINDS, parse_config

VLA_JOB = {"task": "vla_rdt", "model": {"kind": "testbed-tiny"}, "direction": {"random": {"seed": 0}}}


def test_model_kinds_are_the_study_config_names():
    assert set(VLA_KINDS) <= set(MODEL_KINDS) and "openvla-7b-random" in MODEL_KINDS
    for kind in VLA_KINDS:  # every name a study config accepts, a job accepts
        parse_config({"vla_model": {"adapter": kind, "checkpoint": "x"}, "vla": {}})
        assert parse_job({"task": "capture", "model": {"kind": kind}}).model["kind"] == kind


def test_the_old_kind_name_is_read_as_the_config_name():
    job = parse_job({"task": "capture", "model": {"kind": "openvla-random", "config": "openvla-7b"}})
    assert job.model["kind"] == "openvla-7b-random"


@pytest.mark.parametrize("model, match", [
    ({"kind": "openvla-7b"}, "model.kind must be one of"),
    ({"kind": "testbed", "colour": "red"}, "colour: unknown key"),
    ({"kind": "testbed", "seed": "3"}, "seed"),
    ({"kind": "testbed", "dtype": "bfloat61"}, "dtype"),
    ({"kind": "testbed", "devices_per_rank": 0}, "devices_per_rank"),
])
def test_bad_model_sections(model, match):
    with pytest.raises(ConfigError, match=match):
        parse_job({"task": "capture", "model": model})


@pytest.mark.parametrize("vla, match", [
    ({"alpha": "2"}, "alpha"), ({"n_pairs": 0}, "n_pairs"), ({"alphas": [1.0], "wat": 1}, "wat: unknown key")])
def test_the_vla_section_is_the_study_config_section(vla, match):
    with pytest.raises(ConfigError, match=match):
        parse_job({**VLA_JOB, "vla": vla})
    with pytest.raises(ConfigError, match=match):  # the same error from a study config
        parse_config({"vla_model": {"adapter": "testbed-tiny"}, "vla": vla})


def test_capture_section_keys_are_checked():
    with pytest.raises(ConfigError, match="layer: unknown key"):
        parse_job({"task": "capture", "model": {"kind": "chat", "path": "tiny-llama"}, "capture": {"layer": [1]}})
    job = parse_job({"task": "capture", "model": {"kind": "chat", "path": "tiny-llama"},
                     "capture": {"layers": [1, 2], "roles": ["last_text"], "n": 4}})
    assert job.capture["layers"] == [1, 2]
