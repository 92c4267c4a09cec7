"""Serialization shared by the analysis results: frozen dataclasses <-> JSON dicts <-> files.

A result class lists its numpy fields in ``_arrays``; ``to_dict`` writes them as (nested) lists
and ``from_dict`` turns them back into float64 arrays. Other JSON lists come back as tuples, so a
round trip gives an equal result. Files are written atomically through :mod:`rdt_interp.storage`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from rdt_interp.errors import ConfigError
from rdt_interp.storage import atomic_write_json, read_json

RESULT_FORMAT = 1
R = TypeVar("R", bound="ResultMixin")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


class ResultMixin:
    """``to_dict`` / ``from_dict`` / ``save`` / ``load`` for a frozen result dataclass.

    JSON has no NaN: the writer stores undefined numbers as ``null`` and ``to_dict`` adds an
    ``undefined`` entry saying why (``_undefined`` maps an array field to its reason);
    ``from_dict`` turns the nulls back into NaN.
    """

    _arrays: ClassVar[tuple[str, ...]] = ()
    _undefined: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": type(self).__name__, "format": RESULT_FORMAT}
        undefined: dict[str, str] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
            if f.name in self._arrays and value is not None and not np.isfinite(value).all():
                undefined[f.name] = self._undefined.get(
                    f.name, "undefined: not a finite number (e.g. zero variance or an empty class)")
        if undefined:
            out["undefined"] = undefined
        return out

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        kind = d.get("kind", cls.__name__)
        if kind != cls.__name__:
            raise ConfigError(f"this is a {kind} result, not a {cls.__name__}",
                              fix=f"load it with {kind}.from_dict / {kind}.load")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in d:
                continue
            value = d[f.name]
            if f.name in cls._arrays and value is not None:
                value = np.asarray(value, dtype=np.float64)  # null -> NaN
            elif value is None and f.type == "float":
                value = float("nan")
            elif isinstance(value, Mapping):
                value = dict(value)
            else:
                value = _tuples(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str]) -> R:
        return cls.from_dict(read_json(path))


def coerce(result: Any, cls: type[Any]) -> Any:
    """``result`` as an instance of ``cls`` (accepts the instance itself or its ``to_dict()``)."""
    if isinstance(result, cls):
        return result
    if isinstance(result, Mapping):
        return cls.from_dict(result)
    raise ConfigError(f"expected a {cls.__name__} or its to_dict(), got {type(result).__name__}")
