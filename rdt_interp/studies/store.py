"""Predictions and the one cache they are kept in.

:class:`ActionSet` is what a VLA predicted for a list of requests (greedy action tokens and the
logits over the action tokens); :class:`PredictionStore` keeps one per condition key
(``SPLIT-MODE@ALPHA``) in memory and, given a folder, as safetensors files written atomically.
Every study (the VLA study, the defense comparison, their sharded runs) reads and writes
predictions through it.

A cache file that cannot be read is an error that names the file (:class:`CorruptFileError`),
not a silent recomputation: an atomic write never leaves a half-written file, so a file that
fails to load was damaged or written by something else, and recomputing over it on every run
would hide that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rdt_interp.errors import CorruptFileError
from rdt_interp.storage import load_tensors, save_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ActionSet:
    """Greedy action tokens ``[n, steps]`` and logits over the action tokens ``[n, steps, n_bins]``.

    Examples
    --------
    >>> import torch
    >>> acts = ActionSet(torch.zeros(3, 7, dtype=torch.long), torch.zeros(3, 7, 256))
    >>> len(acts), len(acts.rows([0, 2]))
    (3, 2)
    """

    ids: Int[Tensor, "n steps"]
    logits: Float[Tensor, "n steps n_bins"]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, idx: Sequence[int]) -> ActionSet:
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return ActionSet(self.ids[i], self.logits[i])

    @classmethod
    def assemble(cls, n: int, parts: Sequence[tuple[Sequence[int], ActionSet]]) -> ActionSet:
        """``n`` rows put together from ``(rows, actions)`` parts (each row exactly once)."""
        first = parts[0][1]
        ids = torch.empty((n, *first.ids.shape[1:]), dtype=first.ids.dtype)
        logits = torch.empty((n, *first.logits.shape[1:]), dtype=first.logits.dtype)
        for rows, acts in parts:
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            ids[idx] = acts.ids
            logits[idx] = acts.logits
        return cls(ids, logits)

    def save(self, path: str | Path) -> None:
        save_tensors(path, {"ids": self.ids, "logits": self.logits})

    @classmethod
    def load(cls, path: str | Path) -> ActionSet:
        t, _ = load_tensors(path, what="prediction file")
        if set(t) != {"ids", "logits"}:
            raise CorruptFileError(path, what="prediction file", reason=f"holds tensors {sorted(t)}, not ids/logits")
        return cls(t["ids"], t["logits"])


class PredictionStore:
    """Predictions per condition key, in memory and (with ``root``) in ``root/KEY.safetensors``.

    Parameters
    ----------
    root
        The folder of the cached files (a run directory's ``predictions``); ``None`` keeps
        predictions in memory only.

    Examples
    --------
    >>> import tempfile, torch
    >>> store = PredictionStore(tempfile.mkdtemp())
    >>> make = lambda: ActionSet(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, 4))
    >>> len(store.get("test-none", make)), store.has("test-none")
    (2, True)
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.mem: dict[str, ActionSet] = {}

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def has(self, key: str) -> bool:
        path = self.path(key)
        return key in self.mem or (path is not None and path.is_file())

    def load(self, key: str, *, n_rows: int | None = None) -> ActionSet | None:
        """The cached predictions of ``key``, or ``None`` when there are none.

        Raises
        ------
        CorruptFileError
            The file exists but cannot be read, or holds another number of rows than ``n_rows``.
        """
        if key in self.mem:
            out = self.mem[key]
        else:
            path = self.path(key)
            if path is None or not path.is_file():
                return None
            fix = f"delete {path}; its condition is predicted again on the next run"
            try:
                out = ActionSet.load(path)
            except CorruptFileError as exc:
                log.error("prediction cache %s cannot be read: %s", path, exc.message)
                raise CorruptFileError(path, what="prediction file", reason=exc.message, fix=fix) from exc
            if n_rows is not None and len(out) != n_rows:
                raise CorruptFileError(path, what="prediction file", fix=fix,
                                       reason=f"it holds {len(out)} rows where this step predicts {n_rows}")
            self.mem[key] = out
        if n_rows is not None and len(out) != n_rows:
            raise CorruptFileError(f"<memory>/{key}", what="predictions", reason=f"{len(out)} rows, not {n_rows}")
        return out

    def save(self, key: str, acts: ActionSet) -> None:
        """Keep ``acts`` under ``key`` (an atomic file write when the store has a folder)."""
        path = self.path(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            acts.save(path)
        self.mem[key] = acts

    def get(self, key: str, fn: Callable[[], ActionSet], *, n_rows: int | None = None) -> ActionSet:
        """The cached predictions of ``key``, or ``fn()`` (then cached)."""
        out = self.load(key, n_rows=n_rows)
        if out is None:
            out = fn()
            self.save(key, out)
        return out


__all__ = ["ActionSet", "PredictionStore"]
