"""The dequantized-weight cache: its digest is recorded when written and checked on every load."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from rdt_interp.models import offline

SPEC = offline.GGUFModel(name="fake-model", packages=(), part_globs=(), sha256="ab" * 32, size=0,
                         pip_names=(), refuses=False)


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """``_build`` replaced by one that writes a small checkpoint (no GGUF needed); counts calls."""
    monkeypatch.setenv("RDT_INTERP_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_build(spec, target, *, progress=True):
        calls.append(target)
        target.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(target / offline.WEIGHTS_FILE))
        offline.write_source_record(target, spec)
        return target

    monkeypatch.setattr(offline, "_build", fake_build)
    return calls


def test_cache_is_built_once_and_reused(builds):
    first = offline.ensure_dequantized(SPEC)
    assert offline.ensure_dequantized(SPEC) == first and len(builds) == 1
    record = json.loads((first / offline.SOURCE_FILE).read_text())
    assert record["weights_sha256"] == offline.sha256_file(first / offline.WEIGHTS_FILE)


def test_changed_weights_are_rebuilt_with_a_warning_naming_the_file(builds, caplog):
    target = offline.ensure_dequantized(SPEC)
    weights = target / offline.WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x10  # one flipped bit in the tensor data: the header still parses
    weights.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger=offline.__name__):
        offline.ensure_dequantized(SPEC)
    assert len(builds) == 2
    assert str(weights) in caplog.text and "changed since they were written" in caplog.text


def test_cache_without_a_recorded_digest_gets_one(builds, caplog):
    target = offline.ensure_dequantized(SPEC)
    marker = target / offline.SOURCE_FILE
    legacy = {k: v for k, v in json.loads(marker.read_text()).items() if k != "weights_sha256"}
    marker.write_text(json.dumps(legacy))
    with caplog.at_level(logging.WARNING, logger=offline.__name__):
        offline.ensure_dequantized(SPEC)
    assert len(builds) == 1 and "no recorded digest" in caplog.text
    assert "weights_sha256" in json.loads(marker.read_text())


def test_truncated_record_is_rebuilt(builds):
    target = offline.ensure_dequantized(SPEC)
    (target / offline.SOURCE_FILE).write_text('{"name": ')
    offline.ensure_dequantized(SPEC)
    assert len(builds) == 2
