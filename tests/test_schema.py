"""The one config-validation rule (rdt_interp.schema): its documented example runs as written."""

from __future__ import annotations

import doctest

import rdt_interp.schema


def test_the_docstring_examples_run() -> None:
    result = doctest.testmod(rdt_interp.schema, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
