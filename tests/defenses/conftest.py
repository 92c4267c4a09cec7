from __future__ import annotations

import pytest
import torch

from ..vla_adapters import vla  # noqa: F401  (the VLA families, for tests/defenses/)


@pytest.fixture
def one_thread():
    # One torch thread: tiny models on shared cores run 10-40x faster than with two.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
