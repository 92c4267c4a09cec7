"""Benchmark: the latency cost of RDT and RDT+ on OpenVLA, on the hook path and the nnsight path.

At OpenVLA-7b shapes with random bf16 weights (latency does not depend on weight values), one
7-token action prediction from an already encoded batch (tokenization and image preprocessing
are the same for every variant and are left out), for::

    hooks/unsteered   hooks/RDT   hooks/RDT+   nnsight/unsteered   nnsight/RDT   nnsight/RDT+

timed interleaved in one run (A B C D E F A B ..., CUDA-synchronised), median of ``--reps``
(>= 15) after ``--warmup`` rounds, at batch 1 and 32. RDT adds ``alpha·r`` at the action
positions of the 6 decode steps at one layer; RDT+ also adds it at the text positions of the
prefill. Prints a markdown table and the overhead ratios (variant / unsteered on the same path,
nnsight / hooks for the same variant) and writes JSON to ``--out``. Also checks that both paths
produce the same tokens. If ``import nnsight`` fails, the nnsight rows are skipped (said so on
stdout and in the JSON). Batch 32 is skipped when the batch-1 timings project past
``--budget-s``.

    python benchmarks/bench_rdt_overhead.py --out runs/bench_rdt_overhead.json           # GPU
    python benchmarks/bench_rdt_overhead.py --tiny --device cpu --out runs/smoke/rdt.json       # CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import device_name, interleaved, markdown_table, sync, write_json  # noqa: E402
from bench_openvla import TINY_TEXT, TINY_VISION, instructions, word_tokenizer  # noqa: E402

from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config  # noqa: E402
from rdt_interp.models.vla import VLARequest  # noqa: E402
from rdt_interp.tracing.generation import generate  # noqa: E402
from rdt_interp.tracing.vla import steer_vla  # noqa: E402

VARIANTS = ("unsteered", "RDT", "RDT+")


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def nnsight_status() -> tuple[bool, str]:
    try:
        import nnsight  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no nnsight rows
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=15, help="timed repeats per variant (>= 15)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; 1 tiny)")
    ap.add_argument("--layer", type=int, default=None, help="steering layer (default n_layers // 2)")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--backends", default="hooks,nnsight")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="skip larger batches whose projected time would pass this many seconds")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: unchanged; 1 with --tiny on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    threads = args.threads or (1 if args.tiny and not args.device.startswith("cuda") else None)
    if threads:
        torch.set_num_threads(threads)
    if args.reps < 15:
        ap.error("--reps must be >= 15")
    t0 = time.perf_counter()
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    batches = sorted(int(b) for b in args.batches.split(","))
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    torch.manual_seed(args.seed)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    ok, why = nnsight_status()
    skipped: dict[str, str] = {}
    if "nnsight" in backends and not ok:
        msg = f"nnsight is not importable ({why}): skipping the nnsight rows"
        print(msg, flush=True)
        skipped["nnsight"] = msg
        backends = [b for b in backends if b != "nnsight"]

    n_req = max(batches)
    texts = instructions(n_req, args.seed)
    tokenizer = word_tokenizer(texts)
    cfg = openvla_7b_config()
    overrides = None
    if args.tiny:
        cfg["text_config"] = dict(TINY_TEXT)
        overrides = TINY_VISION
    tb = time.perf_counter()
    vla = build_random_openvla(cfg, dtype, device, args.seed, tokenizer=tokenizer, vision_overrides=overrides)
    sync(device)
    build_s = time.perf_counter() - tb
    _log(t0, f"built {'tiny' if args.tiny else 'OpenVLA-7b-shaped'} random model ({dtype}) on {device} "
             f"in {build_s:.1f}s")
    layer = args.layer if args.layer is not None else vla.n_layers // 2
    g = torch.Generator().manual_seed(args.seed + 1)
    r = torch.randn(vla.d_model, generator=g)
    r = (r / r.norm()).to(device, dtype)  # on the device already: no copy per steered forward
    ivs = {"unsteered": [], "RDT": steer_vla(r, "action", args.alpha, [layer], d_model=vla.d_model),
           "RDT+": steer_vla(r, "text+action", args.alpha, [layer], d_model=vla.d_model)}
    rng = np.random.default_rng(args.seed)
    requests = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]
    allowed = vla.action_tokenizer.token_ids

    def predictor(batch, backend: str, variant: str):
        return lambda: generate(vla, batch, max_new_tokens=vla.action_dim, interventions=ivs[variant],
                                backend=backend, allowed_token_ids=allowed, stop_at_eos=False).tokens

    rows: list[dict[str, Any]] = []
    agreement: dict[str, Any] = {}
    for b in batches:
        batch = vla.encode(requests[:b])
        fns = {f"{be}/{v}": predictor(batch, be, v) for be in backends for v in VARIANTS}
        if b != batches[0]:  # project this batch size from one call per variant
            probe_s = sum(_time_once(fn, device) for fn in fns.values())
            projected = probe_s * (args.reps + warmup)
            elapsed = time.perf_counter() - t0
            if elapsed + projected > args.budget_s:
                msg = (f"batch {b} skipped: one call per variant took {probe_s:.1f}s, {args.reps}+{warmup} "
                       f"rounds would take ~{projected:.0f}s (budget {args.budget_s:.0f}s, {elapsed:.0f}s used)")
                print(msg, flush=True)
                skipped[f"batch {b}"] = msg
                continue
        times = interleaved(fns, device, repeats=args.reps, warmup=warmup)
        toks = {k: fn().cpu() for k, fn in fns.items()}
        for be in backends:
            base = statistics.median(times[f"{be}/unsteered"])
            for v in VARIANTS:
                t = times[f"{be}/{v}"]
                med = statistics.median(t)
                hooks_med = statistics.median(times[f"hooks/{v}"]) if "hooks" in backends else float("nan")
                rows.append({"batch": b, "path": be, "variant": v, "median_ms": 1e3 * med,
                             "p10_ms": 1e3 * float(np.percentile(t, 10)), "p90_ms": 1e3 * float(np.percentile(t, 90)),
                             "n": len(t), "x_unsteered": med / base, "x_hooks": med / hooks_med,
                             "actions_per_s": b / med})
        for v in VARIANTS:
            if len(backends) == 2:
                agreement[f"batch {b} {v}: hooks == nnsight tokens"] = bool(
                    torch.equal(toks[f"hooks/{v}"], toks[f"nnsight/{v}"]))
            be = backends[0]
            if v != "unsteered":
                agreement[f"batch {b} {v}: share of tokens changed by steering ({be})"] = float(
                    (toks[f"{be}/{v}"] != toks[f"{be}/unsteered"]).float().mean())
        _log(t0, f"batch {b} done")

    import transformers

    result = {
        "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "weights": "random (tiny)" if args.tiny else "random (OpenVLA-7b shapes)",
        "n_layers": vla.n_layers, "d_model": vla.d_model, "steering_layer": layer, "alpha": args.alpha,
        "decoder_positions_batch1": int(vla.encode(requests[:1]).seq_len), "build_seconds": build_s,
        "reps": args.reps, "warmup_rounds": warmup, "rows": rows, "agreement": agreement, "skipped": skipped,
        "nnsight": {"available": ok, "status": why},
        "what": "greedy 7-token action prediction from an encoded batch (no tokenization / image preprocessing)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "total_seconds": time.perf_counter() - t0,
    }
    write_json(str(args.out), result)
    print(f"\n{result['device']}, {result['dtype']}, {result['weights']}; RDT at layer {layer}, alpha {args.alpha}; "
          f"median of {args.reps} interleaved after {warmup} warm-up rounds\n")
    print(markdown_table(rows))
    print()
    for row in rows:
        if row["variant"] != "unsteered":
            line = (f"batch {row['batch']:>2} {row['path']:>7} {row['variant']:>4}: "
                    f"{row['x_unsteered']:.3f}x unsteered")
            if row["path"] != "hooks" and np.isfinite(row["x_hooks"]):
                line += f", {row['x_hooks']:.2f}x hooks"
            print(line)
    for row in rows:
        if row["path"] == "nnsight" and row["variant"] == "unsteered":
            print(f"batch {row['batch']:>2} nnsight unsteered: {row['x_hooks']:.2f}x hooks")
    for k, v in agreement.items():
        print(f"{k}: {v}")
    for v in skipped.values():
        print(v)
    return result


def _time_once(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
