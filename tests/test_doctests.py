"""The Examples sections of the main public functions run as doctests in the test command."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

#: modules whose docstring examples are executed (keep each example to tiny models / tensors)
MODULES = (
    "rdt_interp.models.architectures",
    "rdt_interp.directions.diff_in_means",
    "rdt_interp.tracing.capture",
    "rdt_interp.tracing.interventions",
    "rdt_interp.analysis.probes",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, capsys):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores
    try:
        result = doctest.testmod(importlib.import_module(name), report=True,
                                 optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_num_threads(prev)
    out = capsys.readouterr().out
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, out
