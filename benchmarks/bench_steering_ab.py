"""Benchmark: what steering costs and how far guarded action prediction is from the floor, measured
so that a small overhead can be told apart from noise.

At OpenVLA-7b shapes with random bf16 weights (latency does not depend on weight values), in one
process, per batch size:

* variants: eager and fast path, each unsteered, unsteered again (the **A/A control**: the same
  call under a second name, so the spread of "no difference" is measured), RDT and RDT+;
* ``--rounds`` rounds; every round runs each variant once, in an order shuffled per round (seeded),
  so clock, thermal and allocator drift hit all variants alike and no variant always follows
  another; one call = one 7-token action from an encoded batch, synchronized before and after;
* per comparison, the ratio of medians minus 1, with a 95% bootstrap interval over rounds
  (rounds resampled with replacement, both variants of a comparison with the same rounds);
* the bandwidth floor (bytes one action must read over the measured copy bandwidth, as in
  ``bench_fast_path.py``) and the prefill / decode-step times of the fast path (CUDA events);
* ``--autotune``: a second fast generator whose decode layer and head are compiled with Inductor's
  max-autotune, timed in the same rounds.

    python benchmarks/bench_steering_ab.py --out runs/steering_ab.json                # GPU
    python benchmarks/bench_steering_ab.py --tiny --device cpu --rounds 6 --out runs/smoke/ab.json

JSON to ``--out``, a markdown table to stdout, progress with elapsed seconds to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import write_json  # noqa: E402
from bench_fast_path import T0, copy_bandwidth, floor_model, fp32_graph_check, log, timed  # noqa: E402
from bench_openvla import TINY_TEXT, TINY_VISION, instructions, word_tokenizer  # noqa: E402

from rdt_interp.fast import FastGenerator  # noqa: E402
from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config  # noqa: E402
from rdt_interp.models.vla import VLARequest  # noqa: E402
from rdt_interp.tracing import generate, rdt, rdt_plus  # noqa: E402


def shuffled_rounds(fns: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int, warmup: int,
                    seed: int) -> dict[str, list[float]]:
    """``rounds`` rounds of every variant once, in a fresh random order each round."""
    rng = np.random.default_rng(seed)
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            timed(fns[k], device)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            times[names[i]].append(timed(fns[names[i]], device)[0])
    return times


def ratio_ci(times: dict[str, list[float]], variant: str, base: str, *, n_boot: int = 4000,
             seed: int = 0) -> dict[str, float]:
    """median(variant) / median(base) - 1 and its 95% bootstrap interval over rounds (paired:
    both medians of a resample use the same rounds)."""
    a, b = np.asarray(times[variant]), np.asarray(times[base])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1) - 1
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"overhead": float(np.median(a) / np.median(b) - 1), "ci95_low": float(lo), "ci95_high": float(hi)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=120, help="rounds at batch 1")
    ap.add_argument("--rounds-large", type=int, default=40, help="rounds at batches > 1")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--alpha-act", type=float, default=4.0)
    ap.add_argument("--alpha-text", type=float, default=2.0)
    ap.add_argument("--no-eager", action="store_true", help="fast path only")
    ap.add_argument("--autotune", action="store_true", help="also a max-autotune fast generator")
    ap.add_argument("--library", action="store_true",
                    help="also a fast generator with the library kernels only (triton_kernels=False)")
    ap.add_argument("--variants", default="unsteered,RDT,RDT+", help="steering variants timed")
    ap.add_argument("--fp32-check", action="store_true", help="tiny fp32 model: graphs + compile = eager")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    texts = instructions(max(batches) + 8, args.seed)
    rng = np.random.default_rng(args.seed)
    requests = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]
    tokenizer = word_tokenizer(texts)
    cfg = openvla_7b_config()
    overrides = None
    layer = args.layer
    if args.tiny:
        cfg["text_config"] = dict(TINY_TEXT)
        overrides = TINY_VISION
        layer = min(layer, TINY_TEXT["num_hidden_layers"] - 1)
    torch.manual_seed(args.seed)
    vla = build_random_openvla(cfg, dtype, device, args.seed, tokenizer=tokenizer, vision_overrides=overrides)
    log(f"built {'tiny' if args.tiny else 'OpenVLA-7b-shaped'} model ({dtype}) on {device}")
    # the direction as a user has it: float32 on the host (the paths copy it to the device once)
    r = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(args.seed + 1))
    r = r / r.norm()
    steer = {"": [], "+RDT": rdt(r, args.alpha_act, layer), "+RDT+": rdt_plus(r, args.alpha_act, args.alpha_text, layer)}
    wanted = {"unsteered": "", "RDT": "+RDT", "RDT+": "+RDT+"}
    steer = {wanted[v]: steer[wanted[v]] for v in args.variants.split(",")}
    encoded = {b: vla.encode(requests[:b]) for b in batches}

    gens: dict[str, FastGenerator] = {"fast": FastGenerator(vla, max_batch=max(batches))}
    if args.autotune:
        gens["fast-autotune"] = FastGenerator(vla, max_batch=max(batches), autotune=True)
    if args.library:
        gens["fast-library"] = FastGenerator(vla, max_batch=max(batches), triton_kernels=False)
    first_call: dict[str, float] = {}
    for name, g in gens.items():
        for b in batches:
            for tag, ivs in steer.items():
                first_call[f"{name}{tag} b={b}"] = timed(lambda g=g, b=b, ivs=ivs: g.generate(encoded[b], interventions=ivs),
                                                         device)[0]
        log(f"{name}: steps built and captured ({g.describe()['compile_mode']})")

    results: dict[str, Any] = {"latency_ms": {}, "overhead": {}, "phase_ms": {}, "rounds": {}}
    for b in batches:
        batch = encoded[b]
        fns: dict[str, Callable[[], Any]] = {}
        if not args.no_eager:
            for tag, ivs in steer.items():
                fns[f"eager{tag}"] = lambda batch=batch, ivs=ivs: generate(
                    vla, batch, max_new_tokens=vla.action_dim, interventions=ivs, stop_at_eos=False)
            fns["eager A/A"] = fns["eager"]
        for name, g in gens.items():
            for tag, ivs in steer.items():
                fns[f"{name}{tag}"] = lambda g=g, batch=batch, ivs=ivs: g.generate(batch, interventions=ivs)
            fns[f"{name} A/A"] = fns[name]
        rounds = args.rounds if b == 1 else args.rounds_large
        log(f"batch {b}: {rounds} shuffled rounds of {len(fns)} variants")
        times = shuffled_rounds(fns, device, rounds=rounds, warmup=args.warmup, seed=args.seed + b)
        results["rounds"][b] = rounds
        for k, ts in times.items():
            results["latency_ms"][f"{k} b={b}"] = {
                "median": 1e3 * statistics.median(ts), "p10": 1e3 * float(np.percentile(ts, 10)),
                "p90": 1e3 * float(np.percentile(ts, 90)), "n": len(ts)}
        bases = (["eager"] if not args.no_eager else []) + list(gens)
        for base in bases:
            for tag in [t for t in ("+RDT", "+RDT+") if t in steer] + [" A/A"]:
                results["overhead"][f"{base}{tag} vs {base} b={b}"] = ratio_ci(times, f"{base}{tag}", base,
                                                                               seed=args.seed + b)
        for other in gens:
            if other != "fast":
                results["overhead"][f"{other} vs fast b={b}"] = ratio_ci(times, other, "fast")
        for name, g in gens.items():
            for tag in [t for t in ("", "+RDT+") if t in steer]:
                ph = g.step_times(batch, interventions=steer[tag], repeats=10)
                results["phase_ms"][f"{name}{tag} b={b}"] = {k.removesuffix("_s") + "_ms": 1e3 * v for k, v in ph.items()}
        log("  " + ", ".join(f"{k} {1e3 * statistics.median(ts):.2f}" for k, ts in times.items()))

    bw = copy_bandwidth(device, 4.0 if device.type == "cuda" else 0.25)
    fast = gens["fast"]
    floors = {b: floor_model(vla, fast, encoded[b], bw, float("inf")) for b in batches}
    summary: dict[str, Any] = {}
    for b in batches:
        floor_ms = 1e3 * floors[b]["bandwidth_floor_s"]
        summary[b] = {"bandwidth_floor_ms": floor_ms,
                      "decode_step_floor_ms": 1e3 * floors[b]["decode_step_roofline_floor_s"]}
        for name in gens:
            summary[b][f"{name}+RDT+ / floor"] = results["latency_ms"][f"{name}+RDT+ b={b}"]["median"] / floor_ms
    fp32 = fp32_graph_check(device, tokenizer, texts) if args.fp32_check and device.type == "cuda" else None
    import transformers

    results.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": "random (tiny)" if args.tiny else "random (OpenVLA-7b shapes)",
        "steering": {"layer": layer, "alpha_act": args.alpha_act, "alpha_text": args.alpha_text,
                     "direction": "float32 on the host, unit norm"},
        "copy_bandwidth_bytes_per_s": bw, "floor": floors, "summary": summary,
        "first_call_seconds": first_call,
        "fast_path": {name: g.describe() for name, g in gens.items()},
        "fp32_tiny_exact_check": fp32,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "method": "shuffled rounds (one call of each variant per round, order permuted per round), A/A "
                  "control, ratio of medians - 1 with a paired 95% bootstrap interval over rounds (4000)",
        "total_seconds": time.perf_counter() - T0,
    })
    write_json(str(args.out), results)
    print(table(results, batches))
    return results


def table(r: dict[str, Any], batches: list[int]) -> str:
    lines = [f"**{r['device']}**, {r['weights']}, {r['dtype']}; steering at layer {r['steering']['layer']} "
             f"(alpha_act {r['steering']['alpha_act']}, alpha_text {r['steering']['alpha_text']})", "",
             "| batch | variant | median ms (p10-p90) |", "|---|---|---|"]
    for k, v in r["latency_ms"].items():
        name, b = k.rsplit(" b=", 1)
        lines.append(f"| {b} | {name} | {v['median']:.2f} ({v['p10']:.2f}-{v['p90']:.2f}) |")
    lines += ["", "| comparison | overhead [95% CI] |", "|---|---|"]
    for k, v in r["overhead"].items():
        lines.append(f"| {k} | {100 * v['overhead']:+.2f}% [{100 * v['ci95_low']:+.2f}, {100 * v['ci95_high']:+.2f}] |")
    lines += ["", "| batch | bandwidth floor | " + " | ".join(k for k in r["summary"][batches[0]] if "/" in k) + " |",
              "|---|---|" + "---|" * sum("/" in k for k in r["summary"][batches[0]])]
    for b in batches:
        s = r["summary"][b]
        lines.append(f"| {b} | {s['bandwidth_floor_ms']:.2f} ms | "
                     + " | ".join(f"{v:.2f}x" for k, v in s.items() if "/" in k) + " |")
    lines += ["", "| step | prefill ms | decode step ms |", "|---|---|---|"]
    for k, v in r["phase_ms"].items():
        lines.append(f"| {k} | {v['prefill_ms']:.2f} | {v['decode_step_ms']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
