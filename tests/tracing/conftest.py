from ..vla_adapters import vla  # noqa: F401  (the VLA families, for tests/tracing/test_vla.py)
