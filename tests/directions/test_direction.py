import pytest
import torch

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError, DModelMismatchError, IntegrityError


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
