"""The public surface: every subpackage star-imports, and every name in ``__all__`` exists."""

import importlib
import pkgutil

import pytest

import rdt_interp

SUBPACKAGES = sorted(m.name for m in pkgutil.walk_packages(rdt_interp.__path__, "rdt_interp.")
                     if m.ispkg)


def test_the_walk_finds_the_subpackages():
    assert {"rdt_interp.viz", "rdt_interp.tracing", "rdt_interp.models.openvla"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("name", ["rdt_interp", *SUBPACKAGES])
def test_star_import(name):
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - the statement users write
    exported = getattr(importlib.import_module(name), "__all__", None)
    if exported is not None:
        assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
        assert set(exported) <= set(namespace)
