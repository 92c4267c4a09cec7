"""PredictionStore: one cache of predictions; a damaged file is an error that names it."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.errors import CorruptFileError, RdtError
from rdt_interp.studies.store import ActionSet, PredictionStore


def _acts(n: int = 3, seed: int = 0) -> ActionSet:
    g = torch.Generator().manual_seed(seed)
    return ActionSet(torch.randint(0, 256, (n, 7), generator=g), torch.randn(n, 7, 16, generator=g))


def test_get_computes_once_and_reads_back_from_disk(tmp_path):
    calls = []
    store = PredictionStore(tmp_path)
    first = store.get("test-none", lambda: calls.append(1) or _acts())
    again = PredictionStore(tmp_path).get("test-none", lambda: calls.append(1) or _acts(seed=1))
    assert calls == [1]
    assert torch.equal(first.ids, again.ids) and torch.equal(first.logits, again.logits)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files


def test_in_memory_store():
    store = PredictionStore(None)
    acts = store.get("k", _acts)
    assert store.has("k") and store.get("k", lambda: _acts(seed=9)) is acts and store.path("k") is None


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_file_is_an_error_naming_it_not_a_silent_recomputation(tmp_path, damage):
    store = PredictionStore(tmp_path)
    store.save("val-action@2", _acts())
    path = tmp_path / "val-action@2.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    calls = []
    with pytest.raises(CorruptFileError) as err:
        PredictionStore(tmp_path).get("val-action@2", lambda: calls.append(1) or _acts())
    assert calls == []  # nothing recomputed over it
    assert str(path) in str(err.value) and "delete" in err.value.fix and isinstance(err.value, RdtError)


def test_a_file_with_other_rows_is_an_error(tmp_path):
    PredictionStore(tmp_path).save("test-none", _acts(3))
    with pytest.raises(CorruptFileError, match="holds 3 rows where this step predicts 5"):
        PredictionStore(tmp_path).get("test-none", lambda: _acts(5), n_rows=5)


def test_assemble_puts_rows_back_in_order():
    whole = _acts(5)
    parts = [([3, 0], whole.rows([3, 0])), ([4, 1, 2], whole.rows([4, 1, 2]))]
    got = ActionSet.assemble(5, parts)
    assert torch.equal(got.ids, whole.ids) and torch.equal(got.logits, whole.logits)
