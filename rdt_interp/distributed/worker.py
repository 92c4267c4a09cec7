"""Per-rank entry point: ``python -m rdt_interp.distributed.worker``, started by ``torchrun``.

    torchrun --standalone --nproc-per-node 4 -m rdt_interp.distributed.worker JOB.toml --run-dir runs/x
    torchrun --standalone --nproc-per-node 4 -m rdt_interp.distributed.worker --study CONFIG.toml --run-dir runs/y

(:func:`rdt_interp.distributed.launch.launch` builds these command lines, with NVLink
multicast off.) Every rank builds its own copy of the model on its own GPU (or, with
``model.devices_per_rank = k``, spreads it over ``k`` GPUs), checks that all copies have the
same weights, and runs the job's tasks in ``RUN/<task>/``: shards are computed in parallel and
merged by rank 0. A job file names the model, direction and task (:mod:`.jobs`); ``--study``
runs a whole ``rdt-interp run`` study config instead (chat side on rank 0, the VLA side over
all ranks, cross-model analysis and figures on rank 0). Started again after a failure, a run
computes only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rdt_interp.distributed.context import DistContext, init_distributed
from rdt_interp.distributed.jobs import Job, build_direction, build_model, load_job
from rdt_interp.errors import ConfigError, DModelMismatchError, RdtError
from rdt_interp.storage import atomic_write_json
from rdt_interp.studies.rundir import RunDir

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level

Say = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def rank_devices(ctx: DistContext, devices_per_rank: int) -> list[torch.device]:
    """The devices of this rank: its own GPU, or ``devices_per_rank`` consecutive GPUs."""
    if devices_per_rank == 1:
        return [ctx.device]
    if ctx.device.type != "cuda":
        raise ConfigError("model.devices_per_rank > 1 needs CUDA devices")
    first = ctx.local_rank * devices_per_rank
    n = torch.cuda.device_count()
    if first + devices_per_rank > n:
        raise ConfigError(f"rank {ctx.rank} needs GPUs {first}..{first + devices_per_rank - 1}, {n} are visible",
                          fix="start (GPUs / devices_per_rank) processes per node")
    return [torch.device(f"cuda:{first + j}") for j in range(devices_per_rank)]


def build_for_rank(ctx: DistContext, job: Job) -> Any:
    """This rank's copy of the job's model (checked against every other rank's by digest)."""
    devices = rank_devices(ctx, job.devices_per_rank)
    if len(devices) == 1:
        adapter = build_model(job.model, devices[0])
    else:
        from rdt_interp.distributed.placement import place_model

        spec = {**job.model, "dtype": job.model.get("dtype", "bfloat16")}
        adapter = build_model(spec, "cpu")  # too big for one GPU: build on the host, then spread
        place_model(adapter, devices)
    ctx.check_same("the model weights (digest)", adapter.digest())
    return adapter


def _vla_config(job: Job) -> Any:
    from rdt_interp.studies.vla import VLARDTConfig

    return VLARDTConfig.from_dict(job.vla)


def _requests(adapter: Any, cfg: Any) -> list[Any]:
    from rdt_interp.studies.vla import config_requests

    return config_requests(adapter, cfg)


def _run_dir(ctx: DistContext, path: Path, config: dict[str, Any], say: Say) -> RunDir:
    return ctx.main_first(lambda: RunDir(path, config, log=say))


def task_vla_rdt(ctx: DistContext, adapter: Any, job: Job, out: Path, say: Say) -> dict[str, Any]:
    from rdt_interp.distributed.vla import run_vla_rdt_distributed

    res = run_vla_rdt_distributed(ctx, adapter, build_direction(job.direction, adapter), _vla_config(job), out,
                                  log=say)
    return res.summary()


def _study_run(ctx: DistContext, adapter: Any, job: Job, out: Path, say: Say, kind: str) -> tuple[Any, Any, RunDir]:
    from rdt_interp.studies.vla import as_direction
    from rdt_interp.studies.vla.pipeline import run_identity

    cfg = _vla_config(job)
    d = as_direction(build_direction(job.direction, adapter), adapter.d_model)
    identity = run_identity(adapter, d, cfg)
    run = _run_dir(ctx, out, {**identity, "experiment": f"vla_rdt_{kind}"}, say)
    return cfg, d, run


def task_sweep(ctx: DistContext, adapter: Any, job: Job, out: Path, say: Say) -> dict[str, Any]:
    """The alpha sweep (``vla.sweep_modes`` x ``vla.alphas`` on val and test)."""
    from rdt_interp.distributed.vla import sharded_conditions
    from rdt_interp.studies.vla import subset

    cfg, d, run = _study_run(ctx, adapter, job, out, say, "sweep")
    requests = _requests(adapter, cfg)
    conds = [(m, float(a)) for m in cfg.sweep_modes for a in cfg.alphas]
    splits = [s for s in ("val", "test") if subset(requests, s)]
    res = sharded_conditions(ctx, run, "alpha_sweep", adapter, d, requests, cfg, conds, splits,
                             store_dir=run.path / "predictions", say=say)
    return {"conditions": len(res.conditions), "splits": list(res.splits)}


def task_specificity(ctx: DistContext, adapter: Any, job: Job, out: Path, say: Say) -> dict[str, Any]:
    """``r`` against ``vla.n_random`` random directions at ``vla.alpha`` on the test pairs."""
    from rdt_interp.distributed.vla import sharded_specificity
    from rdt_interp.studies.vla import specificity_requests

    cfg, d, run = _study_run(ctx, adapter, job, out, say, "specificity")
    if cfg.alpha is None:
        raise ConfigError("task 'specificity' needs vla.alpha")
    res = sharded_specificity(ctx, run, "specificity", adapter, d, specificity_requests(_requests(adapter, cfg), cfg),
                              cfg, float(cfg.alpha), say=say)
    return {"real": res.real, "p": res.p, "z": res.z, "n_random": res.n_random}


def task_capture(ctx: DistContext, adapter: Any, job: Job, out: Path, say: Say) -> dict[str, Any]:
    """Residuals of a chat model at a selector, or of a VLA by role, in shards."""
    from rdt_interp.distributed.capture import sharded_capture, sharded_capture_roles
    from rdt_interp.models.vla import VLAAdapter

    cap = dict(job.capture)
    run = _run_dir(ctx, out, {"experiment": "capture", "capture": cap, "vla": dict(job.vla),
                              "model": adapter.describe()}, say)
    layers = cap.get("layers")
    batch_size = int(cap.get("batch_size", 16))
    backend = str(cap.get("backend", "hooks"))
    if isinstance(adapter, VLAAdapter):
        from rdt_interp.tracing.vla import DEFAULT_ROLES

        cfg = _vla_config(job)
        requests = _requests(adapter, cfg)
        caps = sharded_capture_roles(ctx, run, "activations", adapter, [r.request for r in requests],
                                     roles=tuple(cap.get("roles", DEFAULT_ROLES)), layers=layers,
                                     site=cap.get("site", "resid_pre"), batch_size=batch_size, backend=backend,
                                     constrain_actions=cfg.constrain_actions, say=say)
        return {"n": len(caps), "roles": list(caps.roles), "layers": list(caps.layers)}
    from rdt_interp.prompts import instructions, load_prompt_file, load_split

    if "file" in cap:
        ps = load_prompt_file(cap["file"])
    else:
        ps = load_split(str(cap.get("split", "harmful_train")))
    if "n" in cap:
        ps = ps.take(int(cap["n"]))
    acts = sharded_capture(ctx, run, "activations", adapter, instructions(ps), layers=layers,
                           selector=cap.get("selector", "last"), site=cap.get("site", "resid_pre"),
                           batch_size=batch_size, backend=backend, say=say)
    return {"n": len(acts), "shape": list(acts.values.shape)}


TASK_FNS: dict[str, Callable[[DistContext, Any, Job, Path, Say], dict[str, Any]]] = {
    "vla_rdt": task_vla_rdt, "sweep": task_sweep, "specificity": task_specificity, "capture": task_capture}


def run_job(ctx: DistContext, job: Job, run_dir: str | Path, *, log: Say = logger.info) -> dict[str, Any]:
    """Every task of ``job`` on this rank, in ``run_dir/<task>``; rank 0 writes ``run_dir/worker.json``."""
    say = log if ctx.is_main else _quiet
    root = Path(run_dir)
    t0 = time.perf_counter()
    adapter = build_for_rank(ctx, job)
    say(f"[rank 0/{ctx.world_size}] built {getattr(adapter, 'name', 'model')} on {adapter.device} "
        f"in {time.perf_counter() - t0:.1f}s")
    timings: dict[str, float] = {"build": time.perf_counter() - t0}
    results: dict[str, Any] = {}
    for task in job.tasks:
        t = time.perf_counter()
        results[task] = TASK_FNS[task](ctx, adapter, job, root / task, say)
        timings[task] = time.perf_counter() - t
        say(f"[done]   {task} in {timings[task]:.1f}s")
    if ctx.is_main:
        atomic_write_json(root / "worker.json", {"job": job.to_dict(), "world_size": ctx.world_size,
                                                 "backend": ctx.backend, "device": str(ctx.device),
                                                 "seconds": timings, "results": results})
    ctx.barrier()
    return results


def run_study_distributed(ctx: DistContext, config: str | Path, run_dir: str | Path, *, log: Say = logger.info,
                          progress: bool = False) -> dict[str, Any] | None:
    """``rdt-interp run CONFIG`` over the ranks of ``ctx``, in the same run directory.

    Every rank holds a copy of the chat model and of the VLA. Spread over the ranks: the
    chat side's direction selection (:func:`~rdt_interp.distributed.selection.sharded_selection`,
    after rank 0 captured the candidates) and the whole VLA study
    (:func:`~rdt_interp.distributed.vla.run_vla_rdt_distributed`). Rank 0 runs the rest of the
    chat side and finishes with :func:`~rdt_interp.studies.study.run_study`, which finds
    every step done but the cross-model analysis, the summary and the figures. Returns the
    summary on rank 0."""
    from rdt_interp.directions.diff_in_means import extract_candidates
    from rdt_interp.distributed.selection import sharded_selection
    from rdt_interp.distributed.vla import run_vla_rdt_distributed
    from rdt_interp.models.loading import load_chat_model
    from rdt_interp.studies import study
    from rdt_interp.studies.chat import chat_run_dir, chat_splits, run_chat_refusal
    from rdt_interp.studies.config import load_config

    say = log if ctx.is_main else _quiet
    cfg = load_config(config)
    run = ctx.main_first(lambda: RunDir(run_dir, {"experiment": "study", **cfg.to_dict()}, log=say))
    on_gpu = ctx.device.type == "cuda"
    chat_device = ctx.device if on_gpu or cfg.chat_model.device.startswith("cuda") else cfg.chat_model.device
    say(f"loading chat model {cfg.chat_model.name} on every rank")
    chat_model = load_chat_model(cfg.chat_model.name, dtype=cfg.chat_model.dtype, device=chat_device,
                                 system_prompt=cfg.chat_model.system_prompt, template=cfg.chat_model.template)
    ctx.check_same("the chat model weights (digest)", chat_model.digest())
    # The chat study's own run directory (the config run_chat_refusal gives it).
    chat_run = ctx.main_first(lambda: chat_run_dir(run.path / "chat", cfg.chat, log=say))
    if not ctx.broadcast(bool(chat_run.done("selection"))):
        # rank 0 filters the prompts, the others read the cached step
        splits = ctx.main_first(lambda: chat_splits(chat_model, cfg.chat, chat_run))
        cands = ctx.main_first(lambda: extract_candidates(
            chat_model, splits["harmful_train"], splits["harmless_train"], batch_size=cfg.chat.capture_batch_size,
            cache=chat_run.file("activations"), progress=False))  # rank 0 captures, the others read the cache
        sharded_selection(ctx, chat_run, "selection", chat_model, cands, splits["harmful_val"],
                          splits["harmless_val"], cfg.chat.selection, say=say)
        del cands
    direction = shuffled = None
    if ctx.is_main:
        run_chat_refusal(chat_model, cfg.chat, run.path / "chat", progress=progress, log=say)
        direction = study._direction(cfg, run, chat_model, say) if cfg.vla_model is not None else None
        if direction is not None:
            shuffled = study.shuffled_directions(cfg, run.path, chat_model, direction)
    else:
        del chat_model
        chat_model = None
    direction = ctx.broadcast(direction)
    shuffled = ctx.broadcast(shuffled)
    vla = None
    if cfg.vla_model is not None and cfg.vla is not None:
        vla_device = str(ctx.device) if on_gpu or cfg.vla_model.device.startswith("cuda") else cfg.vla_model.device
        vla = study.load_vla(dataclasses.replace(cfg.vla_model, device=vla_device))
        if vla.device != torch.device(vla_device):
            vla.model.to(vla_device)
        if vla.d_model != direction.d_model:
            raise DModelMismatchError(expected=vla.d_model, actual=direction.d_model,
                                      what=f"the direction of {cfg.chat_model.name}")
        ctx.check_same("the VLA weights (digest)", vla.digest())
        run_vla_rdt_distributed(ctx, vla, direction, cfg.vla, run.path / "vla", progress=progress, log=say,
                                shuffled=shuffled)
    return ctx.on_main(lambda: study.run_study(cfg, run_dir, progress=progress, log=say, chat_model=chat_model,
                                               vla=vla))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rdt_interp.distributed.worker", description=__doc__.splitlines()[0])
    ap.add_argument("job", type=Path, help="job file (TOML/JSON, see rdt_interp.distributed.jobs), or with "
                                           "--study an rdt-interp study config")
    ap.add_argument("--run-dir", type=Path, required=True, help="run directory (shared by all ranks)")
    ap.add_argument("--study", action="store_true", help="JOB is an `rdt-interp run` study config")
    ap.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda with nccl, cpu with gloo)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: torch's)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    ctx = None
    try:
        device = args.device
        if not args.study:
            job = load_job(args.job)
            if job.devices_per_rank > 1 and (device or "cuda").startswith("cuda") and torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                device = f"cuda:{local * job.devices_per_rank}"
        ctx = init_distributed(args.backend, device=device)
        if args.study:
            run_study_distributed(ctx, args.job, args.run_dir, log=log)
        else:
            run_job(ctx, job, args.run_dir, log=log)
    except RdtError as exc:
        # No teardown: the other ranks may sit in a barrier; torchrun stops them when we exit.
        print(f"error (rank {ctx.rank if ctx else '?'}): {exc}", file=sys.stderr, flush=True)
        return 2
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
