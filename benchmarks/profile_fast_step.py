"""Where the fast path's time goes: GPU kernel times of one guarded action, by kernel and by phase.

Builds the OpenVLA-7b-shaped random model (bf16), a :class:`FastGenerator` with the default
compile settings but without CUDA graphs (the profiler then sees every kernel; kernel durations
are the graph's, the launch gaps are not), runs a few warm calls with RDT+, and records
``--calls`` more under ``torch.profiler``. Prints the top kernels by total GPU time, the GPU time
per call, and the share spent in matmuls, attention, and everything else (elementwise, norms,
copies): the part a fused or better-tuned kernel could recover. The ``host`` part then times
deployed calls (CUDA graphs on) in three phases -- staging before the first step is launched
(the GPU waits), launching the steps, and after them (waiting for the GPU, copying tokens out) --
next to the steps' own back-to-back time, and lists the host ops and CUDA runtime calls by self
CPU time.

    python benchmarks/profile_fast_step.py --out runs/profile.json            # GPU
    python benchmarks/profile_fast_step.py --tiny --device cpu --out runs/smoke/profile.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import write_json  # noqa: E402
from bench_openvla import TINY_TEXT, TINY_VISION, instructions, word_tokenizer  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from rdt_interp.fast import FastGenerator  # noqa: E402
from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config  # noqa: E402
from rdt_interp.models.vla import VLARequest  # noqa: E402
from rdt_interp.tracing import rdt_plus  # noqa: E402

MATMUL = ("gemm", "gemv", "cutlass", "sm90_", "nvjet", "mm_", "matmul", "splitk")
ATTENTION = ("flash", "fmha", "attention", "sdpa", "efficient")


def kind(name: str) -> str:
    """matmul, attention or other, from a kernel's name. Inductor's own kernels are named after
    the ops they fuse, which can include the op they feed (``..._gemv_mean_mul_pow_rsqrt`` is an
    RMSNorm, ``..._decode_attention_index_copy_...`` RoPE and the cache write), so a
    ``triton_poi/red/per`` kernel is element-wise work; a ``triton_tem`` one is a matmul template."""
    low = name.lower()
    if low.startswith("triton_tem"):
        return "matmul"
    if low.startswith(("triton_poi", "triton_red", "triton_per")):
        return "other"
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in MATMUL):
        return "matmul"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--parts", default="kernels,host", help="kernels (no graphs), host (graphs, as deployed)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    texts = instructions(args.batch + 4, 0)
    rng = np.random.default_rng(0)
    reqs = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]
    cfg = openvla_7b_config()
    overrides = None
    layer = 14
    if args.tiny:
        cfg["text_config"] = dict(TINY_TEXT)
        overrides = TINY_VISION
        layer = 1
    vla = build_random_openvla(cfg, dtype, device, 0, tokenizer=word_tokenizer(texts), vision_overrides=overrides)
    r = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(1))
    ivs = rdt_plus(r / r.norm(), 4.0, 2.0, layer)
    batch = vla.encode(reqs[: args.batch])
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "batch": args.batch, "calls": args.calls}
    if "kernels" in parts:
        res.update(kernel_profile(vla, batch, ivs, device, args.calls))
    if "host" in parts:
        res["host"] = host_profile(vla, batch, ivs, device, args.calls)
    write_json(str(args.out), res)


def kernel_profile(vla: Any, batch: Any, ivs: list[Any], device: torch.device, calls: int) -> dict[str, Any]:
    """GPU time by kernel, without CUDA graphs (the profiler sees every kernel)."""
    fast = FastGenerator(vla, max_batch=len(batch), cuda_graphs=False)
    for _ in range(3):
        fast.generate(batch, interventions=ivs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fast.generate(batch, interventions=ivs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / calls
    rows: list[dict[str, Any]] = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
        if device.type == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda":
            t = ev.self_cpu_time_total
        rows.append({"name": ev.key[:120], "kind": kind(ev.key), "calls_per_action": ev.count / calls,
                     "us_per_action": t / calls})
    rows.sort(key=lambda x: -x["us_per_action"])
    total = sum(x["us_per_action"] for x in rows)
    by_kind: dict[str, float] = {}
    for x in rows:
        by_kind[x["kind"]] = by_kind.get(x["kind"], 0.0) + x["us_per_action"]
    n_kernels = sum(x["calls_per_action"] for x in rows)
    res = {"wall_ms_per_action_without_graphs": 1e3 * wall,
           "gpu_busy_ms_per_action": total / 1e3, "kernels_per_action": n_kernels,
           "ms_by_kind": {k: v / 1e3 for k, v in by_kind.items()}, "top_kernels": rows[:40],
           "fast_path": fast.describe()}
    print(f"batch {len(batch)}: GPU busy {res['gpu_busy_ms_per_action']:.2f} ms per action, "
          f"{n_kernels:.0f} kernels; wall without graphs {res['wall_ms_per_action_without_graphs']:.2f} ms")
    print("by kind (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in res["ms_by_kind"].items()))
    print("| kernel | kind | per action | us per action |\n|---|---|---|---|")
    for x in rows[:25]:
        print(f"| {x['name'][:90]} | {x['kind']} | {x['calls_per_action']:.0f} | {x['us_per_action']:.1f} |")
    return res


def host_profile(vla: Any, batch: Any, ivs: list[Any], device: torch.device, calls: int) -> dict[str, Any]:
    """Where a deployed call (CUDA graphs on) spends host time: before the first step is launched
    (staging the batch: the GPU waits), launching the steps, and after (waiting for the GPU,
    copying the tokens out); plus the host-side ops and CUDA runtime calls by self CPU time."""
    fast = FastGenerator(vla, max_batch=len(batch))
    run_once = fast._run_once
    marks: list[float] = []

    def marked(prefill: Any, decode: Any) -> None:
        marks.append(time.perf_counter())
        run_once(prefill, decode)
        marks.append(time.perf_counter())

    fast._run_once = marked  # type: ignore[method-assign]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    for _ in range(3):
        fast.generate(batch, interventions=ivs)
    phases: dict[str, list[float]] = {"before_steps_ms": [], "launching_steps_ms": [], "after_steps_ms": [],
                                      "call_ms": []}
    for _ in range(max(20, calls)):
        sync(device)
        t0 = time.perf_counter()
        fast.generate(batch, interventions=ivs)
        sync(device)
        t3 = time.perf_counter()
        t1, t2 = marks[-2:]
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            phases[k].append(1e3 * v)
    steps = fast.step_times(batch, interventions=ivs, repeats=10)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fast.generate(batch, interventions=ivs)
            sync(device)
    ops = sorted(({"name": ev.key[:120], "calls_per_action": ev.count / calls,
                   "self_cpu_us_per_action": ev.self_cpu_time_total / calls} for ev in prof.key_averages()),
                 key=lambda x: -x["self_cpu_us_per_action"])
    res = {"median": {k: statistics.median(v) for k, v in phases.items()},
           "steps_back_to_back_ms": {k.removesuffix("_s") + "_ms": 1e3 * v for k, v in steps.items()},
           "top_host_ops": ops[:30], "fast_path": fast.describe()}
    med = res["median"]
    print(f"host, graphs on: call {med['call_ms']:.2f} ms = before steps {med['before_steps_ms']:.3f} + "
          f"launching {med['launching_steps_ms']:.3f} + after {med['after_steps_ms']:.3f}; steps back to back: "
          f"prefill {res['steps_back_to_back_ms']['prefill_ms']:.2f} + {fast.n_tokens - 1} x "
          f"{res['steps_back_to_back_ms']['decode_step_ms']:.3f} ms")
    print("| host op / runtime call | per action | self CPU us per action |\n|---|---|---|")
    for x in ops[:20]:
        print(f"| {x['name'][:90]} | {x['calls_per_action']:.0f} | {x['self_cpu_us_per_action']:.1f} |")
    return res

if __name__ == "__main__":
    main()
