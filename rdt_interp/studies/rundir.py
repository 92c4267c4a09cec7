"""Run directories: a config, then one JSON file per finished step.

A step's result is written atomically when the step finishes, so a run killed at any point and
started again recomputes only the unfinished steps and ends with the same results (every step
is deterministic given the config and its seeds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rdt_interp.errors import ConfigError
from rdt_interp.storage import atomic_write_json, read_json, to_json


class RunDir:
    def __init__(self, path: str | os.PathLike[str], config: dict[str, Any], *, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: None)
        cfg_path = self.path / "config.json"
        normalized = _roundtrip(config)
        if cfg_path.is_file():
            existing = read_json(cfg_path, what="run config")
            if existing != normalized:
                raise ConfigError(
                    f"{self.path} holds a run with another config",
                    fix="choose a new run directory, or delete it to start over",
                )
        else:
            atomic_write_json(cfg_path, normalized)
        self.config = normalized

    def file(self, name: str) -> Path:
        return self.path / name

    def done(self, name: str) -> bool:
        return (self.path / f"{name}.json").is_file()

    def load(self, name: str) -> Any:
        return read_json(self.path / f"{name}.json", what=f"result of step {name!r}")

    def save(self, name: str, value: Any) -> None:
        atomic_write_json(self.path / f"{name}.json", value)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Return the cached result of step ``name``, or run ``fn`` and store what it returns."""
        if self.done(name):
            self.log(f"[cached] {name}")
            return self.load(name)
        self.log(f"[run]    {name}")
        value = _roundtrip(fn())
        self.save(name, value)
        return value

    def timings(self) -> dict[str, float]:
        """Seconds each step took when it ran (``timings.json``; cached steps are not re-timed)."""
        return dict(self.load("timings")) if self.done("timings") else {}

    def timed_step(self, name: str, fn: Callable[[], Any]) -> Any:
        """:meth:`step`, recording in ``timings.json`` how long it took when it actually ran."""
        if self.done(name):
            return self.step(name, fn)
        t = time.perf_counter()
        value = self.step(name, fn)
        self.save("timings", self.timings() | {name: time.perf_counter() - t})
        return value


def _roundtrip(obj: Any) -> Any:
    import json

    return json.loads(to_json(obj))
