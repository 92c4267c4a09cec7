from ..vla_adapters import vla  # noqa: F401  (the VLA families, for tests/studies/vla and tests/studies/defenses)
