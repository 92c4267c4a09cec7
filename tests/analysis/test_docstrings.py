"""The Examples sections of the statistics modules run (as doctests, under the tests' jaxtyping hook)."""

import doctest
import importlib

import pytest

MODULES = ["stats", "permutation", "layer_pick", "alignment", "specificity"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(f"rdt_interp.analysis.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
