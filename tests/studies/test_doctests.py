"""The Examples sections of the steering, store and executor values run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["rdt_interp.studies.steering", "rdt_interp.studies.store",
                                    "rdt_interp.studies.executor", "rdt_interp.distributed.executor",
                                    "rdt_interp.tracing.interventions"])
def test_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
