import json

import pytest
import torch

from rdt_interp.errors import CorruptFileError, IntegrityError, MissingFileError, RdtError
from rdt_interp.storage import (
    atomic_write_json,
    cache_dir,
    digest_strings,
    digest_tensor,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
)


def test_tensors_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "x.safetensors", t, {"note": "hi", "n": 3})
    back, meta = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    assert meta == {"note": "hi", "n": 3}


def test_corruption_is_detected(tmp_path):
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"a": torch.ones(64)})
    raw = bytearray(p.read_bytes())
    raw[-8] ^= 0xFF  # flip bits inside the tensor data; the header still parses
    p.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        load_tensors(p)
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(IntegrityError):
        load_tensors(p)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"x": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": Boom()})
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_digests_are_content_based(tmp_path):
    assert digest_strings(["ab", "c"]) != digest_strings(["a", "bc"])
    assert digest_tensor(torch.zeros(3)) != digest_tensor(torch.zeros(3, dtype=torch.float64))
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RDT_INTERP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    import stat

    atomic_write_json(tmp_path / "r.json", {"x": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_missing_tensor_file_says_not_found_and_names_the_path(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(MissingFileError, match="not found") as err:
        load_tensors(p)
    assert str(p) in str(err.value) and "sha256" not in str(err.value)


def test_garbage_tensor_file_says_corrupt_and_names_the_path(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptFileError, match="corrupt") as err:
        load_tensors(p, what="activation cache")
    assert str(p) in str(err.value) and "activation cache" in str(err.value)
    assert "sha256 mismatch" not in str(err.value)


def test_truncated_json_is_a_typed_error_naming_the_file(tmp_path):
    p = tmp_path / "config.json"
    atomic_write_json(p, {"a": [1, 2, 3]})
    p.write_text(p.read_text()[:7])
    with pytest.raises(CorruptFileError, match="not valid JSON") as err:
        read_json(p)
    assert str(p) in str(err.value) and isinstance(err.value, RdtError)
    with pytest.raises(MissingFileError, match="not found"):
        read_json(tmp_path / "absent.json")


def test_json_writer_writes_null_for_nan_and_inf(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"x": float("nan"), "y": [1.0, float("inf"), -float("inf")],
                          "t": torch.tensor([0.5, float("nan")]), "nested": ({"z": float("nan")},)})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # the standard library's strict parser accepts it
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert back == {"x": None, "y": [1.0, None, None], "t": [0.5, None], "nested": [{"z": None}]}


def test_json_writer_refuses_nan_that_slips_past_the_conversion():
    from rdt_interp.storage import to_json

    class Odd:  # a type the writer only knows through ``default``: still no NaN in the output
        def tolist(self):
            return [float("nan")]

    assert json.loads(to_json({"o": Odd()})) == {"o": [None]}
