"""Start N processes on this node with ``torchrun`` (NVLink multicast off).

    from rdt_interp.distributed.launch import launch
    launch(4, "rdt_interp.distributed.worker", ["job.toml", "--run-dir", "runs/x"], backend="nccl")

runs::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
      python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 4 \\
      -m rdt_interp.distributed.worker job.toml --run-dir runs/x --backend nccl

``module_or_script`` is a module name (``pkg.mod``, run with ``-m``) or a path to a ``.py``
file. ``--standalone`` picks a free rendezvous port, so several launches can share a machine.
When one process fails, torchrun stops the others and returns non-zero; the shards they
finished stay on disk, and launching again computes only the missing ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rdt_interp.distributed.context import set_nccl_safe_env
from rdt_interp.errors import ConfigError

_WORKER = "rdt_interp.distributed.worker"


def _is_script(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or Path(target).is_file()


def torchrun_command(
    n_procs: int,
    module_or_script: str,
    args: Sequence[str] = (),
    backend: str = "auto",
    *,
    python: str | None = None,
    pass_backend: bool | None = None,
    extra_torchrun_args: Sequence[str] = (),
) -> list[str]:
    """The ``torchrun`` command line (as ``python -m torch.distributed.run``, so it uses the same
    interpreter). ``--backend BACKEND`` is appended to ``args`` for the package's worker (or
    when ``pass_backend``)."""
    if n_procs < 1:
        raise ConfigError(f"n_procs must be >= 1, got {n_procs}")
    if backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"unknown backend {backend!r}", fix="use auto, nccl or gloo")
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(n_procs), *extra_torchrun_args]
    if _is_script(module_or_script):
        cmd.append(str(module_or_script))
    else:
        cmd += ["-m", module_or_script]
    cmd += list(args)
    if pass_backend if pass_backend is not None else module_or_script == _WORKER:
        cmd += ["--backend", backend]
    return cmd


def launch_env(n_procs: int, backend: str = "auto", env: Mapping[str, str] | None = None,
               threads_per_proc: int | None = None) -> dict[str, str]:
    """The environment of the launched processes: the caller's (or ``env``) with NVLink
    multicast off and, unless set, ``OMP_NUM_THREADS`` = ``threads_per_proc`` (default: this
    machine's cores split between the processes)."""
    out = dict(os.environ if env is None else env)
    set_nccl_safe_env(out)
    out.setdefault("TOKENIZERS_PARALLELISM", "false")
    out.setdefault("PYTHONUNBUFFERED", "1")
    if "OMP_NUM_THREADS" not in out:
        if threads_per_proc is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads_per_proc = max(1, cpus // n_procs)
        out["OMP_NUM_THREADS"] = str(threads_per_proc)
    return out


def launch(
    n_procs: int,
    module_or_script: str = _WORKER,
    args: Sequence[str] = (),
    backend: str = "auto",
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    threads_per_proc: int | None = None,
    capture_output: bool = False,
    timeout: float | int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``module_or_script args`` in ``n_procs`` processes with torchrun and wait for them.

    ``check``: raise :class:`subprocess.CalledProcessError` when a process failed. The launched
    processes always have ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``.
    """
    cmd = torchrun_command(n_procs, module_or_script, args, backend)
    return subprocess.run(cmd, env=launch_env(n_procs, backend, env, threads_per_proc), check=check,
                          cwd=cwd, text=True, capture_output=capture_output, timeout=timeout)


def format_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A shell line for ``cmd`` with the NCCL safety variables in front (for logs and docs)."""
    import shlex

    pre = " ".join(f"{k}={(env or {}).get(k, v)}" for k, v in
                   (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")))
    return pre + " " + " ".join(shlex.quote(c) for c in cmd)


__all__ = ["format_command", "launch", "launch_env", "torchrun_command"]
