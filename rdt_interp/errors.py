"""Typed errors. Each one says what went wrong and how to fix it.

Every error raised on bad user input derives from :class:`RdtError`, so callers can catch one
type; the subclasses tell apart what kind of input was wrong.
"""

from __future__ import annotations


class RdtError(Exception):
    """Base class. ``fix`` is a one-line instruction that is appended to the message."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")

    def one_line(self) -> str:
        """The message and the fix on one line (what the command line prints)."""
        first, *rest = [line.strip() for line in str(self.message).splitlines() if line.strip()] or [""]
        text = first + (" " + "; ".join(rest) if rest else "")
        return text if self.fix is None else f"{text} (fix: {self.fix})"


class ConfigError(RdtError, ValueError):
    """A configuration value, selector string or argument is invalid."""


class CheckpointError(RdtError, FileNotFoundError):
    """A checkpoint directory is missing, incomplete or not the kind of model asked for."""


class WeightMismatchError(CheckpointError):
    """Checkpoint weights do not match the architecture (missing / unexpected / wrong shape)."""

    def __init__(
        self,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str] | None = None,
        where: str = "checkpoint",
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched or [])
        parts = [f"weights in {where} do not match the architecture:"]
        for name, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("wrong shape", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:12]) + (f", … (+{len(keys) - 12})" if len(keys) > 12 else "")
                parts.append(f"  {name} ({len(keys)}): {shown}")
        super().__init__(
            "\n".join(parts),
            fix="check that config.json belongs to these weights (same model family and sizes)",
        )


class IntegrityError(RdtError):
    """Bytes on disk do not have the digest they must have."""

    def __init__(self, what: str, *, expected: str, actual: str, fix: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{what}: sha256 mismatch\n  expected {expected}\n  actual   {actual}",
            fix=fix or "reinstall the package that provides these bytes",
        )


class DModelMismatchError(RdtError, ValueError):
    """A direction, probe or activation has another width than the model it is used with."""

    def __init__(self, *, expected: int, actual: int, what: str = "direction") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{what} has d_model={actual}, the target has d_model={expected}",
            fix="use a source model of the same width (e.g. Llama-2-7b-chat for OpenVLA-7b), "
            "or map the direction explicitly before using it",
        )


class UnknownNameError(RdtError, KeyError):
    """A name (registry entry, unnorm key, role…) is not one of the known names."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        self.name = name
        self.known = list(known)
        super().__init__(
            f"unknown {kind} {name!r}",
            fix=f"use one of: {', '.join(sorted(map(str, known)))}",
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return Exception.__str__(self)


class MissingFileError(RdtError, FileNotFoundError):
    """A file the toolkit was asked to read does not exist."""

    def __init__(self, path: object, *, what: str = "file", fix: str | None = None) -> None:
        self.path = str(path)
        super().__init__(f"{what} not found: {self.path}", fix=fix)


class CorruptFileError(IntegrityError, ValueError):
    """A file exists but cannot be parsed or fails its checksum (truncated, garbage, another format).

    An :class:`IntegrityError`, so code that recomputes a corrupted cache entry catches both.
    """

    def __init__(self, path: object, *, reason: str, what: str = "file", fix: str | None = None) -> None:
        self.path = str(path)
        RdtError.__init__(self, f"{what} {self.path} is corrupt: {reason}", fix=fix)


class UnsupportedArchitectureError(RdtError, TypeError):
    """A model class has no architecture adapter (``rdt_interp.models.architectures``), or its
    adapter's component paths do not match the model."""


class TokenizerMismatchError(RdtError, ValueError):
    """A batch was encoded with another tokenizer than the model it is run on."""


class SelectionError(RdtError):
    """Direction selection found no candidate that passes its filters; ``scores`` holds the
    scored candidates (the table the message shows)."""

    def __init__(self, message: str, *, fix: str | None = None, scores: tuple = ()) -> None:
        self.scores = scores
        super().__init__(message, fix=fix)
