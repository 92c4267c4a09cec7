"""Where a study's work runs: one process (:class:`LocalExecutor`) or many
(:class:`rdt_interp.distributed.executor.ShardedExecutor`), through one protocol.

A study pipeline (e.g. :func:`rdt_interp.studies.vla.run_vla_rdt`) is written once against
:class:`Executor`. It hands the executor

* steps: :meth:`Executor.step` runs a named step of a run directory once (cached as JSON);
  ``work`` is the part every process takes part in, ``fn`` turns its value into the step's
  result (on the main process);
* predictions: :meth:`Executor.run` predicts every :class:`Condition` on its split's requests
  (through a :class:`~rdt_interp.studies.store.PredictionStore`);
* effects: :meth:`Executor.effect` gives the steering effect a statistic (e.g. the
  random-direction null) is computed over.

The local executor does each in turn in this process; the sharded one cuts predictions and
effects into shards over the ranks and merges them, so both return the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from tqdm.auto import tqdm

from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.store import ActionSet, PredictionStore

R = TypeVar("R")
W = TypeVar("W")
Say = Callable[[str], None]


@dataclass(frozen=True)
class Condition:
    """One steering condition on one split: target ``mode`` (``"none"``: unsteered) at ``alpha``.

    Examples
    --------
    >>> Condition("val", "action", 2.0).key, Condition("test", "none", 0.0).store_key
    ('action@2', 'test-none')
    """

    split: str
    mode: str
    alpha: float = 0.0

    @property
    def key(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}@{self.alpha:g}"

    @property
    def store_key(self) -> str:
        return f"{self.split}-{self.key}"


def sweep_conditions(splits: Sequence[str], conditions: Sequence[tuple[str, float]]) -> list[Condition]:
    """Per split, the unsteered baseline then each ``(mode, alpha)`` once, in order."""
    out: list[Condition] = []
    for split in splits:
        seen: set[str] = set()
        for mode, alpha in [("none", 0.0), *conditions]:
            c = Condition(split, mode, float(alpha))
            if c.key not in seen:
                seen.add(c.key)
                out.append(c)
    return out


#: predicts one condition on a list of requests (it batches them itself)
Predict = Callable[[Condition, Sequence[Any]], ActionSet]


@runtime_checkable
class Executor(Protocol):
    """Runs the work of a study pipeline (see the module docstring)."""

    is_main: bool

    def say(self, msg: str) -> None:
        """Log ``msg`` (once, from the main process)."""

    def open_run(self, path: str | Path, identity: Mapping[str, Any]) -> RunDir:
        """The run directory ``path`` for a run of ``identity`` (refused if it holds another)."""

    def step(self, run: RunDir, name: str, fn: Callable[..., Any], *, work: Callable[[], Any] | None = None) -> Any:
        """Step ``name`` of ``run``: its cached JSON value, or ``fn()`` (``fn(work())`` when ``work``
        is given) computed, saved and timed. Returns the JSON value in every process."""

    def run(self, conditions: Sequence[Condition], requests: Mapping[str, Sequence[Any]], predict: Predict, *,
            batch_size: int, store: PredictionStore, run: RunDir | None = None, name: str = "conditions",
            identity: Mapping[str, Any] | None = None) -> dict[Condition, ActionSet]:
        """The predictions of every condition on ``requests[condition.split]``."""

    def effect(self, make: Callable[[Sequence[Any]], Any], requests: Sequence[Any], *, batch_size: int,
               max_rows: int, test: Callable[[Any], Any], about: Mapping[str, Any] | None = None,
               run: RunDir | None = None, name: str = "effect", identity: Mapping[str, Any] | None = None) -> Any:
        """The effect ``test`` will be computed over: ``make(requests)`` (a
        :class:`~rdt_interp.studies.vla.specificity.SteeringEffect`), or the same per-prompt values
        computed in shards of ``batch_size`` prompts x at most ``max_rows`` rows (``test`` may be
        called with a stand-in to list the directions it asks for; ``about`` holds the
        attributes the stand-in carries: ``name``, ``reuse``)."""

    def on_main(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in the main process only (writing results, figures)."""


class LocalExecutor:
    """Everything in this process, in order: the reference executor.

    Examples
    --------
    >>> import tempfile
    >>> ex = LocalExecutor()
    >>> run = ex.open_run(tempfile.mkdtemp(), {"experiment": "demo"})
    >>> ex.step(run, "answer", lambda: {"x": 42})
    {'x': 42}
    >>> ex.step(run, "answer", lambda: {"x": 0})  # cached
    {'x': 42}
    """

    is_main = True

    def __init__(self, *, log: Say | None = None, progress: bool = False) -> None:
        self._log = log
        self.progress = progress

    def say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    def open_run(self, path: str | Path, identity: Mapping[str, Any]) -> RunDir:
        return RunDir(path, dict(identity), log=self._log)

    def step(self, run: RunDir, name: str, fn: Callable[..., Any], *, work: Callable[[], Any] | None = None) -> Any:
        return run.timed_step(name, (lambda: fn()) if work is None else (lambda: fn(work())))

    def run(self, conditions: Sequence[Condition], requests: Mapping[str, Sequence[Any]], predict: Predict, *,
            batch_size: int, store: PredictionStore, run: RunDir | None = None, name: str = "conditions",
            identity: Mapping[str, Any] | None = None) -> dict[Condition, ActionSet]:
        out: dict[Condition, ActionSet] = {}
        for c in tqdm(conditions, desc=name, disable=not self.progress, leave=False):
            reqs = requests[c.split]
            out[c] = store.get(c.store_key, lambda c=c, reqs=reqs: predict(c, reqs), n_rows=len(reqs))
        return out

    def effect(self, make: Callable[[Sequence[Any]], Any], requests: Sequence[Any], *, batch_size: int,
               max_rows: int, test: Callable[[Any], Any], about: Mapping[str, Any] | None = None,
               run: RunDir | None = None, name: str = "effect", identity: Mapping[str, Any] | None = None) -> Any:
        return make(requests)

    def on_main(self, fn: Callable[[], Any]) -> None:
        fn()


__all__ = ["Condition", "Executor", "LocalExecutor", "Predict", "sweep_conditions"]
