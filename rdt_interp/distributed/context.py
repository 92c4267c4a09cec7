"""Who am I in a data-parallel run: rank, world size, device; barriers and small collectives.

Processes are started by ``torchrun`` (see :mod:`rdt_interp.distributed.launch`), which sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the rendezvous address; :func:`init_distributed`
joins the process group (NCCL on GPUs, gloo on CPUs). Without those variables it returns a
single-process context, so the same code runs unchanged in a notebook or a test.

Work never travels through the process group: every rank writes its shards to the run
directory and rank 0 merges them. The group only carries barriers and a few small objects
(plan digests, model digests), which is why gloo on CPU exercises exactly the code that runs
with NCCL on GPUs.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rdt_interp.errors import ConfigError

T = TypeVar("T")

#: set in every process this package starts or joins: NVLink multicast (NVLS) stays off
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


class RankMismatchError(ConfigError):
    """The ranks of one run disagree on something that must be identical (plan, weights)."""


@dataclass
class DistContext:
    """This process's place in the run. ``group`` is False for a single process (no collectives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = torch.device("cpu")
    group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if not self.group:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order."""
        if not self.group:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.group:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, what: str, value: Any) -> None:
        """Raise :class:`RankMismatchError` unless every rank passes the same ``value``."""
        values = self.all_gather(value)
        if any(v != values[0] for v in values):
            raise RankMismatchError(
                f"the ranks disagree on {what}: " + ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(values)),
                fix="every rank must build the same model and config (same seed, same files)")

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on the others (e.g. creating a run directory)."""
        if self.is_main:
            out = fn()
            self.barrier()
            return out
        self.barrier()
        return fn()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only while the others wait; ``None`` on the others."""
        out = fn() if self.is_main else None
        self.barrier()
        return out

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.group = False


def set_nccl_safe_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with NVLink multicast switched off; returns it."""
    target = os.environ if env is None else env
    for k, v in NCCL_SAFE_ENV.items():
        target[k] = v
    return target  # type: ignore[return-value]


def single_process(device: str | torch.device | None = None) -> DistContext:
    """A context for one process (rank 0 of 1, no process group)."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    return DistContext(0, 1, 0, "none", dev, False)


def init_distributed(backend: str = "auto", *, device: str | torch.device | None = None,
                     timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group ``torchrun`` set up, or return a single-process context.

    ``backend``: ``auto`` (NCCL when CUDA is available, else gloo), ``nccl`` or ``gloo``. With
    NCCL each rank uses ``cuda:LOCAL_RANK``; with gloo the CPU unless ``device`` says otherwise
    (``device="cuda"`` picks ``cuda:LOCAL_RANK``).
    """
    set_nccl_safe_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"unknown backend {backend!r}", fix="use auto, nccl or gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend nccl needs CUDA", fix="use --backend gloo on a CPU machine")
    if device is None:
        dev = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} wants {dev} but {torch.cuda.device_count()} CUDA devices are visible",
                              fix="start at most one process per GPU (--nproc-per-node <= GPUs)")
        torch.cuda.set_device(dev)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return DistContext(rank, 1, local, backend, dev, False)
    import torch.distributed as dist

    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "timeout": _dt.timedelta(minutes=timeout_minutes)}
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend, dev, True)


__all__ = ["NCCL_SAFE_ENV", "DistContext", "RankMismatchError", "init_distributed", "set_nccl_safe_env",
           "single_process"]
