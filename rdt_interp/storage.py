"""Files on disk: atomic writes, digests, the user cache directory, tensors + JSON metadata.

Everything the toolkit writes goes through these functions, so an interrupted process never
leaves a half-written file behind: data is written to a temporary file in the same directory,
flushed, fsync-ed and renamed over the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rdt_interp.errors import CorruptFileError, MissingFileError

CACHE_ENV = "RDT_INTERP_CACHE"


def cache_dir() -> Path:
    """The user cache directory (``$RDT_INTERP_CACHE``, else ``$XDG_CACHE_HOME/rdt-interp``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "rdt-interp"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; give results the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by ``None``: standard JSON has no NaN, and a
    reader in another language would reject the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) or hasattr(obj, "tolist"):  # and numpy arrays and scalars
        return _finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")


def to_json(obj: Any) -> str:
    """Standard JSON: NaN and inf become ``null`` (``allow_nan=False`` makes any that slip
    through an error, never a non-standard file)."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(target, to_json(obj) + "\n")


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing file or one that does not parse is a typed error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MissingFileError(path, what=what) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(path, what=what, reason=f"not valid JSON ({exc})",
                               fix="an interrupted copy or a hand edit truncated it: restore it, "
                               "or delete it (a run step's result is recomputed)") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]], chunk: int = 1 << 22) -> str:
    """Digest of the concatenation of several files (in the given order)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def digest_strings(items: Iterable[str]) -> str:
    """Order-sensitive digest of a sequence of strings (prompt sets, key parts)."""
    h = hashlib.sha256()
    for item in items:
        b = item.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def digest_tensor(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(
    target: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write tensors as safetensors atomically, with JSON metadata and a content checksum.

    The checksum (over every tensor's bytes) lets :func:`load_tensors` detect a corrupted file
    even when the safetensors header still parses.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"json": to_json(dict(metadata or {})), "checksum": _checksum(tensors)}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(
    path: str | os.PathLike[str],
    *,
    what: str = "tensor file",
    fix: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    what
        What the file is, for error messages (``"direction file"``, ...).
    fix
        The fix hint of a corrupt-file error (default: delete it and write it again).

    Returns
    -------
    tensors, metadata
        The tensors and the JSON metadata given to :func:`save_tensors`.

    Raises
    ------
    MissingFileError
        ``path`` does not exist.
    CorruptFileError
        Not a readable safetensors file, or its content checksum does not match (an
        :class:`~rdt_interp.errors.IntegrityError`, which cache readers catch to recompute).
    """
    fix = fix or "delete it and write it again (a cache entry is recomputed on the next run)"
    if not Path(path).is_file():
        raise MissingFileError(path, what=what)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(raw_meta.get("json", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(path, what=what, fix=fix,
                               reason=f"not a readable safetensors file ({exc})") from exc
    expected = raw_meta.get("checksum")
    actual = _checksum(tensors)
    if expected is None or expected != actual:
        raise CorruptFileError(path, what=what, fix=fix,
                               reason=f"content checksum {actual[:16]}… does not match the recorded "
                               f"{str(expected)[:16]}…")
    return tensors, meta


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(digest_tensor(tensors[key]).encode())
    return h.hexdigest()


def to_json_line(obj: Any) -> str:
    """One line of a JSONL file: standard JSON as :func:`to_json` (NaN and inf become ``null``),
    without indentation."""
    return json.dumps(_finite(obj), default=_json_default, allow_nan=False)
