import pytest
import torch

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import (
    ConfigError,
    CorruptFileError,
    DModelMismatchError,
    IntegrityError,
    MissingFileError,
)


def _prov(**kw):
    base = dict(source_model="m", source_digest="abc", layer=3, position="post_instruction[-1]",
                site="resid_pre", method="diff_in_means", n_harmful=10, n_harmless=12)
    return Provenance(**{**base, **kw})


def test_save_load_round_trip(tmp_path):
    d = Direction(torch.randn(16) * 4, _prov(extra={"note": 1}))
    d.save(tmp_path / "r.safetensors")
    back = Direction.load(tmp_path / "r.safetensors", d_model=16)
    assert torch.equal(back.vector, d.vector)
    assert back.provenance == d.provenance
    assert back.provenance.package_version and back.provenance.created


def test_load_into_other_width_is_an_error(tmp_path):
    Direction(torch.randn(16), _prov()).save(tmp_path / "r.safetensors")
    with pytest.raises(DModelMismatchError, match="d_model=16"):
        Direction.load(tmp_path / "r.safetensors", d_model=4096)


def test_corrupted_file(tmp_path):
    p = tmp_path / "r.safetensors"
    Direction(torch.randn(16), _prov()).save(p)
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x55
    p.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        Direction.load(p)


def test_missing_direction_file_says_not_found(tmp_path):
    p = tmp_path / "r.safetensors"
    with pytest.raises(MissingFileError, match="direction file not found") as err:
        Direction.load(p)
    assert str(p) in str(err.value) and "sha256" not in str(err.value)


def test_garbage_direction_file_says_corrupt(tmp_path):
    p = tmp_path / "r.safetensors"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CorruptFileError, match="corrupt") as err:
        Direction.load(p)
    msg = str(err.value)
    assert str(p) in msg and "direction file" in msg and "sha256 mismatch" not in msg
    assert "it will be recomputed" not in msg  # a direction is not a cache entry


def test_rank_k_and_helpers():
    q, _ = torch.linalg.qr(torch.randn(8, 3))
    d = Direction(torch.randn(8), _prov(rank=3), basis=q.T)
    assert d.rank == 3 and d.ablation_basis.shape == (3, 8)
    assert abs(d.scaled(2.5).norm - 2.5) < 1e-5
    assert torch.allclose(d.negated().vector, -d.vector)
    assert Direction(torch.ones(4), _prov()).ablation_basis.shape == (1, 4)


def test_validation():
    with pytest.raises(ConfigError):
        Direction(torch.tensor([1.0, float("nan")]), _prov())
    with pytest.raises(ConfigError):
        Direction(torch.ones(4), _prov(), basis=torch.ones(2, 5))
    with pytest.raises(ConfigError, match="unknown provenance"):
        Provenance.from_dict({**_prov().to_dict(), "bogus": 1})
