"""Benchmark: the RDT specificity sweep data-parallel over the GPUs of one node (torchrun).

OpenVLA-7b shapes with random bf16 weights: every rank builds its own copy on its own GPU
(same seed -> same weights; the digests are compared). The sweep is the VLA study's direction
specificity: ``--directions`` (>= 100) random directions, the real one and ``-r``, on
``--prompts`` prompts, 7 action tokens each, decode-only RDT at a fixed alpha, so each rank
prefills its prompt batches once and decodes every direction from the stored KV cache
(``SteeringEffect``). Measured in one launch:

1. ``1 GPU, plain``   -- ``direction_specificity`` (the single-process code) on rank 0 alone;
2. ``1 GPU, sharded`` -- the sharded sweep with one rank (rank 0 alone), the scaling baseline;
3. ``N GPUs``         -- the sharded sweep on all ranks, merge included.

It reports throughput in (direction x prompt) pairs per second, the speedup and the scaling
efficiency (goal >= 0.85), checks the merged N-GPU result against the 1-GPU results, and, with
two or more GPUs, splits a second copy of the model over all GPUs (model parallelism) and checks
that RDT on the split model gives the one-GPU model's actions. Markdown table on stdout, JSON to
``--out``.

    python benchmarks/bench_distributed.py --nproc 2 --out runs/bench_distributed.json        # 2 GPUs
    python benchmarks/bench_distributed.py --tiny --backend gloo --nproc 2 --out runs/smoke/bd.json  # CPU smoke test

The script starts itself under torchrun (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import device_name, markdown_table, write_json  # noqa: E402

T0 = time.perf_counter()


def say(ctx: Any, msg: str) -> None:
    if ctx is None or ctx.is_main:
        print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace, device: torch.device, texts: list[str]) -> Any:
    from bench_openvla import TINY_TEXT, TINY_VISION, word_tokenizer

    from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config

    cfg = openvla_7b_config()
    overrides = None
    if args.tiny:
        cfg["text_config"] = dict(TINY_TEXT)
        overrides = TINY_VISION
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return build_random_openvla(cfg, dtype, device, args.seed, tokenizer=word_tokenizer(texts),
                                vision_overrides=overrides)


def requests(args: argparse.Namespace) -> list[Any]:
    from bench_openvla import instructions

    from rdt_interp.models.vla import VLARequest

    texts = instructions(args.prompts, args.seed)
    rng = np.random.default_rng(args.seed)
    return [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]


def direction(adapter: Any, args: argparse.Namespace) -> Any:
    from rdt_interp.directions.direction import Direction, Provenance

    layer = args.layer if args.layer is not None else adapter.n_layers // 2
    g = torch.Generator().manual_seed(1000 + args.seed)
    v = torch.randn(adapter.d_model, generator=g)
    v = v / v.norm() * args.norm
    return Direction(v, Provenance("random", "bench", layer, "", "resid_pre", "random", created=""))


def config(args: argparse.Namespace, layer: int) -> Any:
    from rdt_interp.studies.vla import VLARDTConfig

    return VLARDTConfig(alpha=args.alpha, layers=(layer,), n_random=args.directions, batch_size=args.batch_size,
                        specificity_rows=args.rows, specificity_mode="action", specificity_metric="zero_mass",
                        n_boot=1000, seed=args.seed)


def compare(a: Any, b: Any) -> dict[str, Any]:
    """How far two SpecificityResults are apart."""
    null_a, null_b = np.asarray(a.null), np.asarray(b.null)
    return {"identical": bool(a.real == b.real and np.array_equal(null_a, null_b) and a.p == b.p),
            "real_abs_diff": abs(a.real - b.real), "null_max_abs_diff": float(np.max(np.abs(null_a - null_b))),
            "p": [a.p, b.p], "z": [a.z, b.z], "control_-r": [a.controls["-r"]["effect"], b.controls["-r"]["effect"]]}


def shard_diff(dir_a: Path, dir_b: Path) -> dict[str, Any]:
    from rdt_interp.storage import load_tensors

    files = sorted(dir_a.glob("*.safetensors"))
    equal, worst = 0, 0.0
    for f in files:
        va, vb = load_tensors(f)[0]["values"], load_tensors(dir_b / f.name)[0]["values"]
        equal += bool(torch.equal(va, vb))
        worst = max(worst, float((va - vb).abs().max()))
    return {"shards": len(files), "bitwise_equal": equal, "max_abs_diff": worst}


def model_parallel_check(ctx: Any, args: argparse.Namespace, adapter: Any, reqs: list[Any], d: Any,
                         texts: list[str]) -> dict[str, Any]:
    """Rank 0: a second copy of the model split over every GPU vs the one-GPU model."""
    from rdt_interp.distributed.placement import layer_devices, place_model
    from rdt_interp.studies.vla import SteeringEffect, predict
    from rdt_interp.tracing.vla import steer_vla

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ctx.device.type == "cuda" and n_gpu >= 2:
        devices = [f"cuda:{i}" for i in range(n_gpu)]
        kind = f"layers over {n_gpu} GPUs"
    else:
        devices = ["cpu", "cpu"]
        kind = "CPU only: hooks attached, one device (no second GPU)"
    t = time.perf_counter()
    split = build(args, ctx.device, texts)
    same_weights = split.digest() == adapter.digest()
    place_model(split, devices, force_hooks=True)
    build_s = time.perf_counter() - t
    L = d.provenance.layer
    sub = reqs[: min(8, len(reqs))]
    dirs = torch.stack([d.vector] + [torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(i))
                                     for i in range(3)])
    dirs = dirs / dirs.norm(dim=1, keepdim=True) * d.norm
    out: dict[str, Any] = {"kind": kind, "devices": devices, "same_weights": same_weights, "build_seconds": build_s,
                           "steering_layer": L, "steering_layer_device": str(layer_devices(split)[L]),
                           "layer_devices": sorted({str(x) for x in layer_devices(split)})}
    times = {}
    vals = []
    for name, ad in (("one", adapter), ("split", split)):
        sync(ctx.device)
        t = time.perf_counter()
        eff = SteeringEffect(ad, sub, alpha=args.alpha, layers=[L], batch_size=len(sub), max_rows=args.rows)
        vals.append(eff.per_prompt(dirs))
        sync(ctx.device)
        times[name] = time.perf_counter() - t
    preds = [predict(ad, sub, steer_vla(d, "text+action", args.alpha, [L]), batch_size=len(sub))
             for ad in (adapter, split)]
    out.update({
        "rdt_effect_max_abs_diff": float((vals[0] - vals[1]).abs().max()),
        "rdt_plus_tokens_equal": float((preds[0].ids == preds[1].ids).float().mean()),
        "rdt_plus_logits_max_abs_diff": float((preds[0].logits - preds[1].logits).abs().max()),
        "seconds_one_device": times["one"], "seconds_split": times["split"]})
    del split
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def worker(args: argparse.Namespace) -> dict[str, Any] | None:
    from rdt_interp.distributed.context import init_distributed, single_process
    from rdt_interp.distributed.vla import sharded_specificity
    from rdt_interp.studies.rundir import RunDir
    from rdt_interp.studies.vla import SteeringEffect, direction_specificity

    ctx = init_distributed(args.backend)
    dev = ctx.device
    names = ctx.all_gather(device_name(str(dev)))
    say(ctx, f"{ctx.world_size} ranks ({args.backend}): " + ", ".join(f"{i}: {n}" for i, n in enumerate(names)))
    reqs = requests(args)
    texts = [r.instruction for r in reqs]
    t = time.perf_counter()
    adapter = build(args, dev, texts)
    sync(dev)
    build_s = time.perf_counter() - t
    ctx.check_same("the model weights (digest)", adapter.digest())
    say(ctx, f"built {adapter.name} ({sum(p.numel() for p in adapter.model.parameters()) / 1e9:.2f}B params, "
             f"{adapter.dtype}) on every rank in {build_s:.1f}s; weights identical on all ranks")
    d = direction(adapter, args)
    cfg = config(args, d.provenance.layer)
    root = Path(args.run_root) / f"{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(ctx.broadcast(str(root)))
    n_dirs = cfg.n_random + 2  # the real direction, the random ones, -r
    pairs = n_dirs * len(reqs)

    # warm-up on every rank: prefill and decode shapes of the sweep
    t = time.perf_counter()
    g = torch.Generator().manual_seed(7)
    warm = torch.randn(max(1, cfg.specificity_rows // cfg.batch_size), adapter.d_model, generator=g)
    SteeringEffect(adapter, reqs[: cfg.batch_size], alpha=args.alpha, layers=[d.provenance.layer],
                   batch_size=cfg.batch_size, max_rows=cfg.specificity_rows).per_prompt(warm * args.norm)
    sync(dev)
    ctx.barrier()
    say(ctx, f"warm-up {time.perf_counter() - t:.1f}s; sweep: {n_dirs} directions x {len(reqs)} prompts "
             f"= {pairs} pairs, {cfg.specificity_rows} rows per pass, alpha {args.alpha}, layer {d.provenance.layer}")

    # 1 GPU: the plain single-process code, then the sharded code with one rank (rank 0 alone)
    single: dict[str, Any] = {}
    if ctx.is_main:
        sync(dev)
        t = time.perf_counter()
        plain = direction_specificity(adapter, d, reqs, cfg, args.alpha)
        sync(dev)
        single["plain_s"] = time.perf_counter() - t
        say(ctx, f"1 rank, plain direction_specificity: {single['plain_s']:.1f}s")
        t = time.perf_counter()
        one_run = RunDir(root / "one", {"bench": "distributed", "world": 1})
        one = sharded_specificity(single_process(dev), one_run, "specificity", adapter, d, reqs, cfg, args.alpha)
        sync(dev)
        single["sharded_s"] = time.perf_counter() - t
        say(ctx, f"1 rank, sharded: {single['sharded_s']:.1f}s")
    ctx.barrier()

    # N GPUs
    run = ctx.main_first(lambda: RunDir(root / "n", {"bench": "distributed", "world": ctx.world_size}))
    ctx.barrier()
    t = time.perf_counter()
    many = sharded_specificity(ctx, run, "specificity", adapter, d, reqs, cfg, args.alpha)
    sync(dev)
    ctx.barrier()
    n_s = time.perf_counter() - t
    say(ctx, f"{ctx.world_size} ranks, sharded: {n_s:.1f}s")
    reports = read_reports_for(run)

    mp = None
    if not args.no_model_parallel:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ctx.barrier()
        if ctx.is_main:
            say(ctx, "model-parallel check (rank 0; the others wait)")
            mp = model_parallel_check(ctx, args, adapter, reqs, d, texts)
        ctx.barrier()
    peak = ctx.all_gather(torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    if not ctx.is_main:
        ctx.close()
        return None
    n = ctx.world_size
    tput1 = pairs / single["sharded_s"]
    tputn = pairs / n_s
    import transformers

    res = {
        "world_size": n, "backend": ctx.backend, "devices": names, "tiny": args.tiny,
        "model": adapter.describe(), "build_seconds": build_s, "peak_memory_gib": peak,
        "sweep": {"directions": n_dirs, "random_directions": cfg.n_random, "prompts": len(reqs),
                  "pairs": pairs, "action_tokens": adapter.action_dim, "alpha": args.alpha,
                  "layer": d.provenance.layer, "batch_size": cfg.batch_size, "rows_per_pass": cfg.specificity_rows,
                  "shards": sum(len(r["assigned"]) for r in reports)},
        "seconds": {"1_plain": single["plain_s"], "1_sharded": single["sharded_s"], f"{n}_sharded": n_s},
        "per_rank_compute_seconds": [r["seconds"] for r in reports],
        "per_rank_shards": [len(r["computed"]) for r in reports],
        "throughput_pairs_per_s": {"1_plain": pairs / single["plain_s"], "1_sharded": tput1, f"{n}_sharded": tputn},
        "speedup": tputn / tput1, "scaling_efficiency": tputn / tput1 / n,
        "speedup_vs_plain": single["plain_s"] / n_s,
        "merged_vs_1_plain": compare(plain, many), "merged_vs_1_sharded": compare(one, many),
        "shards_n_vs_1": shard_diff(root / "one" / "shards" / "specificity", root / "n" / "shards" / "specificity"),
        "model_parallel": mp,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_seconds": time.perf_counter() - T0, "run": root.name,  # the scratch folder's name, not its path
    }
    write_json(args.out, res)
    print(table(res), flush=True)
    ctx.close()
    return res


def read_reports_for(run: Any) -> list[dict[str, Any]]:
    """The per-rank shard reports of this launch (rank order)."""
    from rdt_interp.storage import read_json

    files = (run.path / "shards" / "specificity" / "_ranks").glob("rank-*.json")
    reps = [read_json(p) for p in files]
    return sorted((r for r in reps if r["world_size"] == int(run.config["world"])), key=lambda r: r["rank"])


def table(r: dict[str, Any]) -> str:
    n = r["world_size"]
    dev = r["devices"]
    rows = [
        {"setting": "1 device, plain direction_specificity", "devices": dev[0],
         "seconds": r["seconds"]["1_plain"], "pairs/s": r["throughput_pairs_per_s"]["1_plain"], "speedup": "",
         "efficiency": ""},
        {"setting": "1 device, sharded (1 rank)", "devices": dev[0], "seconds": r["seconds"]["1_sharded"],
         "pairs/s": r["throughput_pairs_per_s"]["1_sharded"], "speedup": 1.0, "efficiency": 1.0},
        {"setting": f"{n} devices, sharded ({n} ranks)", "devices": ", ".join(sorted(set(dev))) + f" x{n}",
         "seconds": r["seconds"][f"{n}_sharded"], "pairs/s": r["throughput_pairs_per_s"][f"{n}_sharded"],
         "speedup": r["speedup"], "efficiency": r["scaling_efficiency"]},
    ]
    s = r["sweep"]
    m1, ms = r["merged_vs_1_plain"], r["shards_n_vs_1"]
    lines = [f"## Specificity sweep, data parallel ({r['model']['name']}, {r['model']['dtype']}, "
             f"{'tiny' if r['tiny'] else 'OpenVLA-7b shapes'}, random weights)", "",
             f"{s['directions']} directions ({s['random_directions']} random + r + -r) x {s['prompts']} prompts x "
             f"{s['action_tokens']} action tokens, decode-only RDT at alpha {s['alpha']} (layer {s['layer']}), "
             f"prefill reused, {s['rows_per_pass']} rows per pass, {s['shards']} shards", "",
             markdown_table(rows), "",
             f"- scaling efficiency {r['scaling_efficiency']:.3f} (goal >= 0.85); per-rank compute "
             + ", ".join(f"{x:.1f}s ({k} shards)" for x, k in zip(r["per_rank_compute_seconds"],
                                                                    r["per_rank_shards"], strict=True)),
             f"- merged {n}-rank result vs 1-rank plain: identical={m1['identical']}, |real diff| "
             f"{m1['real_abs_diff']:.3g}, max |null diff| {m1['null_max_abs_diff']:.3g}, p {m1['p'][0]:.4g} vs "
             f"{m1['p'][1]:.4g}",
             f"- shards {n} ranks vs 1 rank: {ms['bitwise_equal']}/{ms['shards']} bitwise equal, max |diff| "
             f"{ms['max_abs_diff']:.3g}",
             f"- build {r['build_seconds']:.1f}s per rank; peak memory per rank (GiB): {r['peak_memory_gib']}"]
    mp = r.get("model_parallel")
    if mp:
        lines.append(f"- model parallel ({mp['kind']}): layers on {mp['layer_devices']}, steering layer "
                     f"{mp['steering_layer']} on {mp['steering_layer_device']}; RDT effect max |diff| vs one device "
                     f"{mp['rdt_effect_max_abs_diff']:.3g}; RDT+ tokens equal {100 * mp['rdt_plus_tokens_equal']:.0f}%, "
                     f"logits max |diff| {mp['rdt_plus_logits_max_abs_diff']:.3g}; {mp['seconds_split']:.2f}s split vs "
                     f"{mp['seconds_one_device']:.2f}s one device (8 prompts x 4 directions)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=None, help="processes (GPUs) to launch (default: all GPUs)")
    ap.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 64; 16 tiny)")
    ap.add_argument("--directions", type=int, default=100, help="random directions (>= 100)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per prefill batch")
    ap.add_argument("--rows", type=int, default=64, help="(prompt, direction) rows per decode pass")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--norm", type=float, default=2.0, help="norm of the steering direction")
    ap.add_argument("--layer", type=int, default=None, help="steering layer (default: the middle one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-model-parallel", action="store_true", help="skip the model-parallel check")
    ap.add_argument("--run-root", default=None, help="where shard files go (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prompts is None:
        args.prompts = 16 if args.tiny else 64
    if args.tiny and args.batch_size == 16:
        args.batch_size = 8
    if args.worker:
        worker(args)
        return
    import tempfile

    from rdt_interp.distributed.launch import format_command, launch, torchrun_command

    n = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    if args.run_root is None:
        args.run_root = tempfile.mkdtemp(prefix="bench_distributed_")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    passthrough = _drop(passthrough, "--nproc")
    passthrough = _drop(passthrough, "--run-root")
    script_args = [*passthrough, "--run-root", args.run_root, "--worker"]
    if "--backend" not in passthrough:
        script_args += ["--backend", args.backend]
    cmd = torchrun_command(n, str(Path(__file__).resolve()), script_args, args.backend)
    print(format_command(cmd), flush=True)
    proc = launch(n, str(Path(__file__).resolve()), script_args, args.backend, check=False)
    sys.exit(proc.returncode)


def _drop(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
