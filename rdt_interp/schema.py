"""One schema style for every config: frozen dataclasses validated strictly by pydantic.

A config is a plain frozen dataclass (``dataclasses.replace``, ``asdict`` and equality work as
usual); :func:`strict_schema` marks it so that pydantic rejects unknown keys, and
:func:`validate` turns a mapping (parsed TOML or JSON, command-line overrides) into it. Strict:
a number must be written as a number (``"2"`` is an error, not 2), an integer as an integer (an
integer is accepted for a float field and becomes a float), JSON arrays fill tuple fields. Every
problem is one :class:`~rdt_interp.errors.ConfigError` that names each offending key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from rdt_interp.errors import ConfigError, RdtError

T = TypeVar("T")


def strict_schema(*classes: type) -> None:
    """Reject unknown keys at every level of these dataclasses when they are validated."""
    for cls in classes:
        cls.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]


def from_stored(cls: type[T], d: Mapping[str, Any], *, ignore: tuple[str, ...] = ("experiment",)) -> T:
    """A config dataclass back from its ``asdict`` form in a stored result (JSON lists become
    tuples); a key the dataclass does not have is an error, except the ``ignore``d ones."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known - set(ignore))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


@cache
def _adapter(cls: type) -> Any:  # a TypeAdapter (a subscripted hint that beartype cannot check)
    return TypeAdapter(cls)


def validate(cls: type[T], data: Mapping[str, Any], *, source: str = "config", fix: str | None = None) -> T:
    """``data`` as a ``cls``, or one :class:`ConfigError` listing every bad key.

    Parameters
    ----------
    cls
        A dataclass marked with :func:`strict_schema` (and its nested dataclasses).
    data
        Plain values (what ``json.loads`` or ``tomllib.loads`` returns).
    source
        What the data is, for the message (a file name, ``"--set"``).
    fix
        The error's fix hint (default: where the schema lives).

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Opt:
    ...     steps: int = 1
    >>> strict_schema(Opt)
    >>> validate(Opt, {"steps": 3})
    Opt(steps=3)
    >>> validate(Opt, {"stpes": 3}, source="run.toml")
    Traceback (most recent call last):
    ...
    rdt_interp.errors.ConfigError: run.toml is invalid:
      stpes: unknown key
      fix: see the fields of Opt
    """
    try:
        # JSON mode is what makes strict validation accept arrays for tuple fields.
        return _adapter(cls).validate_json(json.dumps(dict(data), default=str), strict=True)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(error_lines(exc)),
                          fix=fix or f"see the fields of {cls.__name__}") from None


def error_lines(exc: ValidationError) -> list[str]:
    """One line per problem: the dotted key, then what is wrong with it."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
        elif err["type"] == "value_error" and isinstance((err.get("ctx") or {}).get("error"), RdtError):
            cause = err["ctx"]["error"]  # a check in the dataclass's __post_init__
            msg = cause.message + (f" (fix: {cause.fix})" if cause.fix else "")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")  # no key: a check across fields
    return lines
