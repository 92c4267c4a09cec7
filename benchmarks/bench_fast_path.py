"""Benchmark: guarded (RDT+) OpenVLA action prediction on the fast path vs the eager path.

At OpenVLA-7b shapes with random bf16 weights (latency does not depend on weight values), in one
run: eager unsteered, eager + RDT+, fast unsteered, fast + RDT+, at batch 1 and 32, timed
interleaved (A B C D A B C D ..., median of ``--reps`` after warm-up), from an already encoded
batch (tokenization and image preprocessing are timed separately, once). Reports

* the memory-bandwidth floor of the device: bytes one action must read (vision tower once, the
  LLM weights once per forward = prefill + 6 decode steps, the KV cache per step) over the
  device-to-device copy bandwidth measured here with a large copy; and a roofline floor that
  also charges each forward ``max(bytes / bandwidth, FLOPs / measured bf16 matmul rate)``;
* fast + RDT+ over both floors (goal <= 1.5x at batch 1), the RDT+ overhead on the fast path
  (goal <= 1%), compile and capture time, and alpha changes without recapture;
* bf16 token agreement fast vs eager (rows, tokens, first tokens) with the eager top-2 margin at
  each disagreement (random weights make logits nearly flat, so near-ties flip in bf16);
* on CUDA, a small fp32 model through the same graphs + compile: tokens must equal eager exactly.

    python benchmarks/bench_fast_path.py --out runs/bench_fast_path.json           # GPU
    python benchmarks/bench_fast_path.py --tiny --device cpu --out runs/smoke/fast.json  # CPU smoke test

JSON to ``--out``, a markdown table to stdout, progress lines (with elapsed seconds) to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_openvla import TINY_TEXT, TINY_VISION, instructions, word_tokenizer  # noqa: E402

from rdt_interp.fast import FastGenerator  # noqa: E402
from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config  # noqa: E402
from rdt_interp.models.vla import VLARequest  # noqa: E402
from rdt_interp.tracing import generate, rdt_plus  # noqa: E402

T0 = time.perf_counter()
#: datasheet HBM bandwidth (bytes/s) by device-name fragment, for reference next to the measured one
DATASHEET_BW = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *, repeats: int,
                warmup: int) -> dict[str, list[float]]:
    """A B C D A B C D ...: clock or load drift hits every variant alike; seconds per run."""
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device)[0])
    return times


# -- the floor --------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of 5."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), device)[0] for _ in range(5))
    del src, dst
    return 2 * n * 2 / best


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Dense matmul FLOP/s on ``n x n`` operands, best of 5."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(5))
    return 2 * n**3 / best


def vision_towers(model: Any) -> list[tuple[list[torch.nn.Parameter], int, int, int]]:
    """Per ViT: the parameters one image touches (embeddings and the blocks OpenVLA runs: all but
    the last; not SigLIP's pooling head), its token count, depth run and width."""
    out = []
    for feat in (model.vision_backbone.featurizer, model.vision_backbone.fused_featurizer):
        if feat is None:
            continue
        params = list(feat.base.embeddings.parameters())
        for block in feat.blocks[: feat.spec.depth - 1]:
            params += list(block.parameters())
        tokens = feat.spec.num_patches + feat.spec.num_prefix_tokens
        out.append((params, tokens, feat.spec.depth - 1, feat.spec.embed_dim))
    return out


def floor_model(vla: Any, fast: FastGenerator, batch: Any, bw: float, flops: float) -> dict[str, float]:
    """Seconds one action (``n_tokens`` greedy tokens for every row of ``batch``) needs at least.

    Forward passes: prefill (vision towers + projector + LLM over the prompt), then one decode
    step per further token. A pass reads its weights once and, when decoding, the KV cache of the
    real positions; its FLOPs are the matmuls (2 per weight per token) plus attention.
    """
    spec = fast.stack.spec
    esize = fast.stack.norm_w.element_size()
    llm_bytes = fast.stack.weight_bytes()
    llm_params = llm_bytes / esize
    head_params = fast.stack.lm_w.numel()
    b = len(batch)
    towers = vision_towers(vla.model)
    proj = list(vla.model.projector.parameters())
    vis_bytes = sum(p.numel() * p.element_size() for ps, *_ in towers for p in ps)
    vis_bytes += sum(p.numel() * p.element_size() for p in proj)
    vis_flops = 2 * sum(p.numel() for p in proj) * vla.num_patches * b
    for params, tokens, depth, width in towers:
        vis_flops += 2 * sum(p.numel() for p in params) * tokens * b + 4 * depth * tokens**2 * width * b
    real = batch.attention_mask.sum(dim=1).float()  # real positions per row
    s_mean = float(real.mean())
    kv_per_pos = spec.n_layers * 2 * spec.n_kv_heads * spec.head_dim * esize
    pre_flops = (2 * (llm_params - head_params) * float(real.sum()) + 2 * head_params * b
                 + 2 * spec.n_layers * float((real**2).sum()) * spec.d_model)  # causal attention
    passes = [(vis_bytes + llm_bytes, vis_flops + pre_flops)]
    for i in range(1, fast.n_tokens):
        kv = kv_per_pos * b * (s_mean + i)
        passes.append((llm_bytes + kv, 2 * llm_params * b + 4 * spec.n_layers * b * (s_mean + i) * spec.d_model))
    total_bytes = sum(p[0] for p in passes)
    step = [max(by / bw, fl / flops) for by, fl in passes]
    return {
        "prefill_roofline_floor_s": step[0],
        "decode_step_roofline_floor_s": statistics.mean(step[1:]) if len(step) > 1 else 0.0,
        "bandwidth_floor_s": total_bytes / bw,
        "roofline_floor_s": sum(max(by / bw, fl / flops) for by, fl in passes),
        "bytes_per_action": total_bytes,
        "llm_weight_bytes": llm_bytes,
        "vision_weight_bytes": vis_bytes,
        "kv_read_bytes": total_bytes - vis_bytes - len(passes) * llm_bytes,
        "prefill_flops": vis_flops + pre_flops,
        "forward_passes": len(passes),
    }


# -- agreement --------------------------------------------------------------------------------


def agreement(vla: Any, fast: FastGenerator, batches: list[Any], ivs: list[Any]) -> dict[str, Any]:
    """Fast vs eager greedy tokens; at each row's first disagreement, the eager logit gap between
    the eager token and the fast token (small = a near-tie that bf16 rounding can flip)."""
    rows = tokens = firsts = same_rows = 0
    gaps: list[float] = []
    step0_diff = 0.0
    for batch in batches:
        ref = generate(vla, batch, max_new_tokens=fast.n_tokens, interventions=ivs, stop_at_eos=False,
                       return_logits=True)
        got = fast.generate(batch, interventions=ivs, return_logits=True)
        a, b = ref.tokens.cpu(), got.tokens.cpu()
        eq = a == b
        rows += a.shape[0]
        tokens += int(eq.sum())
        firsts += int(eq[:, 0].sum())
        same_rows += int(eq.all(dim=1).sum())
        step0_diff = max(step0_diff, float((ref.logits[:, 0] - got.logits[:, 0]).abs().max()))
        for r in range(a.shape[0]):
            bad = (~eq[r]).nonzero()
            if len(bad):
                s = int(bad[0])
                lg = ref.logits[r, s].float()
                gaps.append(float(lg[a[r, s]] - lg[b[r, s]]))
    n_tok = rows * fast.n_tokens
    return {
        "rows": rows,
        "rows_identical": same_rows / rows,
        "tokens_equal": tokens / n_tok,
        "first_tokens_equal": firsts / rows,
        "step0_logit_max_abs_diff": step0_diff,
        "disagreement_eager_gap_median": statistics.median(gaps) if gaps else None,
        "disagreement_eager_gap_max": max(gaps) if gaps else None,
    }


def fp32_graph_check(device: torch.device, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Tiny OpenVLA in fp32 on the device through CUDA graphs + compile: exact eager tokens."""
    cfg = openvla_7b_config()
    cfg["text_config"] = dict(TINY_TEXT)
    vla = build_random_openvla(cfg, torch.float32, device, 1, tokenizer=tokenizer, vision_overrides=TINY_VISION)
    with torch.no_grad():  # wider logits than N(0, 0.02): fp32 ties become impossible
        for p in vla.model.language_model.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
    rng = np.random.default_rng(5)
    reqs = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts[:6]]
    batch = vla.encode(reqs)
    r = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(3))
    fast = FastGenerator(vla, max_batch=8)
    out: dict[str, Any] = {"equal": True, "max_logit_diff": 0.0}
    for ivs in ([], rdt_plus(r, 4.0, 2.0, [1, 2]), rdt_plus(r, -3.0, 5.0, [1, 2])):
        ref = generate(vla, batch, max_new_tokens=7, interventions=ivs, stop_at_eos=False, return_logits=True)
        got = fast.generate(batch, interventions=ivs, return_logits=True)
        out["equal"] &= bool(torch.equal(ref.tokens.cpu(), got.tokens.cpu()))
        out["max_logit_diff"] = max(out["max_logit_diff"], float((ref.logits - got.logits).abs().max()))
    out["steps_built"] = fast.stats.steps_built  # 4: the third call only changed alpha
    out.update({k: fast.describe()[k] for k in ("compile_mode", "cuda_graphs", "compile_error", "graph_error")})
    return out


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per variant (default 20; 3 tiny)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed interleaved rounds before timing")
    ap.add_argument("--compile", default="auto", choices=["auto", "none", "decode", "all"])
    ap.add_argument("--no-graphs", action="store_true", help="fast path without CUDA graphs")
    ap.add_argument("--rdt-layers", default="14", help="layers of the RDT+ edit: '14', '8-15' or '4,14'")
    ap.add_argument("--alpha-act", type=float, default=4.0)
    ap.add_argument("--alpha-text", type=float, default=2.0)
    ap.add_argument("--agreement-singles", type=int, default=8, help="batch-1 prompts in the agreement test")
    ap.add_argument("--no-fp32-check", action="store_true", help="skip the fp32 exact-token check (CUDA)")
    ap.add_argument("--time-budget", type=float, default=200.0,
                    help="skip the fp32 check if the run has taken longer than this many seconds")
    ap.add_argument("--bw-gib", type=float, default=4.0, help="size of the bandwidth-test copy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    batches = [int(b) for b in args.batches.split(",")]
    reps = args.reps or (3 if args.tiny else 20)
    if not args.tiny and reps < 20:
        log(f"note: --reps {reps} < 20")
    layers = _parse_layers(args.rdt_layers)
    torch.manual_seed(args.seed)
    n_req = max(batches + [args.agreement_singles])
    texts = instructions(n_req + 8, args.seed)
    rng = np.random.default_rng(args.seed)
    requests = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]
    tokenizer = word_tokenizer(texts)

    cfg = openvla_7b_config()
    overrides = None
    if args.tiny:
        cfg["text_config"] = dict(TINY_TEXT)
        overrides = TINY_VISION
        layers = [min(x, TINY_TEXT["num_hidden_layers"] - 1) for x in layers]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build_s, vla = timed(lambda: build_random_openvla(cfg, dtype, device, args.seed, tokenizer=tokenizer,
                                                      vision_overrides=overrides), device)
    n_params = sum(p.numel() for p in vla.model.parameters())
    log(f"built {'tiny' if args.tiny else 'OpenVLA-7b-shaped'} random model ({n_params / 1e9:.2f}B params, "
        f"{dtype}) on {device} in {build_s:.1f}s")
    g = torch.Generator().manual_seed(args.seed + 1)
    r = torch.randn(vla.d_model, generator=g)
    r = r / r.norm()
    ivs = rdt_plus(r, args.alpha_act, args.alpha_text, layers)

    encode_s, encoded = timed(lambda: {b: vla.encode(requests[:b]) for b in batches}, device)
    t0 = time.perf_counter()
    fast = FastGenerator(vla, max_batch=max(batches), compile=args.compile,
                         cuda_graphs=False if args.no_graphs else None)
    fast_build_s = time.perf_counter() - t0
    log(f"fast path: {fast.describe()['compile_mode']} compile, graphs={fast.cuda_graphs}, "
        f"KV cache {fast.cache_bytes() / 2**30:.2f} GiB, built in {fast_build_s:.1f}s")

    setup: dict[str, float] = {}
    for b in batches:  # first calls: compile + warm-up + capture, timed apart from the latency
        for name, iv in (("fast", []), ("fast+rdt+", ivs)):
            dt, _ = timed(lambda b=b, iv=iv: fast.generate(encoded[b], interventions=iv), device)
            setup[f"{name} b={b}"] = dt
            log(f"first call {name} batch {b}: {dt:.1f}s (compile/warm-up/capture)")

    results: dict[str, Any] = {"latency_ms": {}, "latency_p10_ms": {}, "latency_p90_ms": {}}
    for b in batches:
        batch = encoded[b]
        fns = {
            "eager": lambda batch=batch: generate(vla, batch, max_new_tokens=fast.n_tokens, stop_at_eos=False),
            "eager+rdt+": lambda batch=batch: generate(vla, batch, max_new_tokens=fast.n_tokens, interventions=ivs,
                                                       stop_at_eos=False),
            "fast": lambda batch=batch: fast.generate(batch),
            "fast+rdt+": lambda batch=batch: fast.generate(batch, interventions=ivs),
        }
        log(f"timing batch {b}: {reps} interleaved rounds of {list(fns)}")
        times = interleaved(fns, device, repeats=reps, warmup=args.warmup)
        for k, ts in times.items():
            results["latency_ms"][f"{k} b={b}"] = 1e3 * statistics.median(ts)
            results["latency_p10_ms"][f"{k} b={b}"] = 1e3 * float(np.percentile(ts, 10))
            results["latency_p90_ms"][f"{k} b={b}"] = 1e3 * float(np.percentile(ts, 90))
        log("  " + ", ".join(f"{k} {1e3 * statistics.median(ts):.1f} ms" for k, ts in times.items()))
    captured = (fast.stats.steps_built, fast.stats.graphs_captured)
    phases = {}
    for b in batches:
        for name, iv in (("fast", []), ("fast+rdt+", ivs)):
            phases[f"{name} b={b}"] = fast.step_times(encoded[b], interventions=iv, repeats=min(reps, 10))

    # alpha / direction change: no new steps, tokens follow the eager path
    r2 = torch.randn(vla.d_model, generator=g)
    ivs2 = rdt_plus(r2 / r2.norm(), -args.alpha_act, 2 * args.alpha_text, layers)
    b0 = batches[0]
    before = (fast.stats.steps_built, fast.stats.graphs_captured)
    fast.generate(encoded[b0], interventions=ivs2)
    alpha_change = {"new_steps": fast.stats.steps_built - before[0],
                    "new_graphs": fast.stats.graphs_captured - before[1]}

    log("agreement fast vs eager (return_logits: a few more captures)")
    singles = [vla.encode([req]) for req in requests[: args.agreement_singles]]
    agree_sets = [encoded[b] for b in batches if b > 1] + singles
    agree = {"unsteered": agreement(vla, fast, agree_sets, []),
             "rdt+": agreement(vla, fast, agree_sets, ivs),
             "rdt+ (alpha changed)": agreement(vla, fast, agree_sets[:1], ivs2)}

    log("floor: copy bandwidth and matmul rate")
    bw = copy_bandwidth(device, args.bw_gib if device.type == "cuda" else 0.25)
    mm = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 512)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    sheet = next((v for k, v in DATASHEET_BW.items() if k in dev_name), None)
    floors = {b: floor_model(vla, fast, encoded[b], bw, mm) for b in batches}

    fp32: dict[str, Any] | None = None
    if device.type == "cuda" and not args.no_fp32_check:
        if time.perf_counter() - T0 > args.time_budget:
            log(f"fp32 check skipped: past the {args.time_budget:.0f}s budget")
            fp32 = {"skipped": f"time budget {args.time_budget:.0f}s"}
        else:
            log("fp32 exact-token check on a tiny model (graphs + compile)")
            fp32 = fp32_graph_check(device, tokenizer, texts)

    lat = results["latency_ms"]
    summary: dict[str, Any] = {}
    for b in batches:
        f = floors[b]
        fast_ms, fastr_ms = lat[f"fast b={b}"], lat[f"fast+rdt+ b={b}"]
        summary[b] = {
            "bandwidth_floor_ms": 1e3 * f["bandwidth_floor_s"],
            "roofline_floor_ms": 1e3 * f["roofline_floor_s"],
            "fast_rdt+_over_bandwidth_floor": fastr_ms / (1e3 * f["bandwidth_floor_s"]),
            "fast_rdt+_over_roofline_floor": fastr_ms / (1e3 * f["roofline_floor_s"]),
            "datasheet_bandwidth_floor_ms": 1e3 * f["bytes_per_action"] / sheet if sheet else None,
            "rdt+_overhead_fast": fastr_ms / fast_ms - 1,
            "rdt+_overhead_eager": lat[f"eager+rdt+ b={b}"] / lat[f"eager b={b}"] - 1,
            "speedup_rdt+": lat[f"eager+rdt+ b={b}"] / fastr_ms,
            "fast_rdt+_actions_per_s": b / (fastr_ms / 1e3),
        }
    import transformers

    results.update({
        "device": dev_name,
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "weights": "random (tiny)" if args.tiny else "random (OpenVLA-7b shapes)",
        "parameters": n_params,
        "build_seconds": build_s,
        "encode_seconds_all_batches": encode_s,
        "decoder_positions_mean": {b: float(encoded[b].attention_mask.sum(1).float().mean()) for b in batches},
        "rdt_plus": {"layers": layers, "alpha_act": args.alpha_act, "alpha_text": args.alpha_text},
        "fast_path": fast.describe(),
        "fast_build_seconds": fast_build_s,
        "first_call_seconds": setup,
        "steps_built_after_timing": captured[0],
        "graphs_captured_after_timing": captured[1],
        "alpha_change": alpha_change,
        "copy_bandwidth_bytes_per_s": bw,
        "datasheet_bandwidth_bytes_per_s": sheet,
        "matmul_flops_per_s": mm,
        "floor": {b: floors[b] for b in batches},
        "fast_phase_seconds": phases,
        "summary": summary,
        "agreement": agree,
        "fp32_tiny_exact_check": fp32,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "total_seconds": time.perf_counter() - T0,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results, batches))
    log(f"done; JSON in {args.out}")
    return results


def _parse_layers(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def table(r: dict[str, Any], batches: list[int]) -> str:
    lat, p10, p90 = r["latency_ms"], r["latency_p10_ms"], r["latency_p90_ms"]
    fp = r["fast_path"]
    lines = [
        f"**{r['device']}**, {r['weights']}, {r['dtype']}, RDT+ at layers {r['rdt_plus']['layers']} "
        f"(alpha_act {r['rdt_plus']['alpha_act']}, alpha_text {r['rdt_plus']['alpha_text']}); fast path: "
        f"compile {fp['compile_mode']}, CUDA graphs {fp['cuda_graphs']}, fused projections {fp['fused_projections']}",
        "",
        "| batch | variant | median ms (p10-p90) | actions/s |",
        "|---|---|---|---|",
    ]
    for b in batches:
        for v in ("eager", "eager+rdt+", "fast", "fast+rdt+"):
            k = f"{v} b={b}"
            lines.append(f"| {b} | {v} | {lat[k]:.2f} ({p10[k]:.2f}-{p90[k]:.2f}) | {b / lat[k] * 1e3:.1f} |")
    bw, sheet = r["copy_bandwidth_bytes_per_s"], r["datasheet_bandwidth_bytes_per_s"]
    lines += ["", "| metric | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]

    def row(name: str, fn: Callable[[int], str]) -> None:
        lines.append(f"| {name} | " + " | ".join(fn(b) for b in batches) + " |")

    s = r["summary"]
    row("bandwidth floor (bytes / measured copy BW)", lambda b: f"{s[b]['bandwidth_floor_ms']:.2f} ms")
    row("roofline floor (+ prefill FLOPs / measured matmul rate)", lambda b: f"{s[b]['roofline_floor_ms']:.2f} ms")
    if sheet:
        row(f"datasheet-bandwidth floor ({sheet / 1e12:.2f} TB/s)", lambda b: f"{s[b]['datasheet_bandwidth_floor_ms']:.2f} ms")
    row("**fast+RDT+ / bandwidth floor** (goal <= 1.5x at b=1)", lambda b: f"{s[b]['fast_rdt+_over_bandwidth_floor']:.2f}x")
    row("fast+RDT+ / roofline floor", lambda b: f"{s[b]['fast_rdt+_over_roofline_floor']:.2f}x")
    row("**RDT+ overhead, fast path** (goal <= 1%)", lambda b: f"{100 * s[b]['rdt+_overhead_fast']:+.2f}%")
    row("RDT+ overhead, eager path", lambda b: f"{100 * s[b]['rdt+_overhead_eager']:+.2f}%")
    row("speedup fast+RDT+ vs eager+RDT+", lambda b: f"{s[b]['speedup_rdt+']:.2f}x")
    row("first call (compile + warm-up + capture), fast / fast+RDT+",
        lambda b: f"{r['first_call_seconds'][f'fast b={b}']:.1f} s / {r['first_call_seconds'][f'fast+rdt+ b={b}']:.1f} s")
    ph = r["fast_phase_seconds"]
    row("fast+RDT+ prefill step (vision + LLM) / its roofline floor",
        lambda b: f"{1e3 * ph[f'fast+rdt+ b={b}']['prefill_s']:.2f} / {1e3 * r['floor'][b]['prefill_roofline_floor_s']:.2f} ms")
    row("fast+RDT+ decode step / its floor",
        lambda b: f"{1e3 * ph[f'fast+rdt+ b={b}']['decode_step_s']:.3f} / "
                  f"{1e3 * r['floor'][b]['decode_step_roofline_floor_s']:.3f} ms")
    row("fast (unsteered) prefill / decode step",
        lambda b: f"{1e3 * ph[f'fast b={b}']['prefill_s']:.2f} / {1e3 * ph[f'fast b={b}']['decode_step_s']:.3f} ms")
    row("bytes per action (weights + KV reads)", lambda b: f"{r['floor'][b]['bytes_per_action'] / 1e9:.2f} GB")
    lines += ["", "| check | value |", "|---|---|",
              f"| measured copy bandwidth | {bw / 1e12:.3f} TB/s (read + write of a {r['device_type']} copy)"
              + (f"; datasheet {sheet / 1e12:.2f} TB/s" if sheet else "") + " |",
              f"| measured {r['dtype']} matmul rate | {r['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s |",
              f"| compile / capture time (all steps) | {fp['warmup_seconds']:.1f} s warm-up incl. compile / "
              f"{fp['capture_seconds']:.2f} s capture; {fp['graphs_captured']} graphs, {fp['steps_built']} steps |",
              f"| alpha + direction change | {r['alpha_change']['new_steps']} new steps, "
              f"{r['alpha_change']['new_graphs']} new graphs |"]
    for name, a in r["agreement"].items():
        gap = a["disagreement_eager_gap_max"]
        lines.append(f"| agreement fast vs eager, {name} ({a['rows']} rows) | rows {100 * a['rows_identical']:.1f}%, "
                     f"tokens {100 * a['tokens_equal']:.1f}%, first tokens {100 * a['first_tokens_equal']:.1f}%; "
                     f"step-0 logit diff <= {a['step0_logit_max_abs_diff']:.3g}"
                     + (f"; eager gap at disagreements <= {gap:.3g}" if gap is not None else "") + " |")
    c = r["fp32_tiny_exact_check"]
    if c is not None and "skipped" in c:
        lines.append(f"| fp32 tiny model, graphs + compile = eager | skipped ({c['skipped']}) |")
    elif c is not None:
        lines.append(f"| fp32 tiny model, graphs + compile = eager | tokens equal: {c['equal']}, logit diff <= "
                     f"{c['max_logit_diff']:.2g}, steps {c['steps_built']} (4 expected), compile {c['compile_mode']}, "
                     f"errors: {c['compile_error'] or c['graph_error'] or 'none'} |")
    errs = [e for e in (fp["compile_error"], fp["graph_error"]) if e]
    if errs:
        lines.append(f"| **fallbacks** | {'; '.join(errs)} |")
    lines.append(f"| peak GPU memory | {r['peak_memory_gib']:.1f} GiB |" if r["peak_memory_gib"] else "| peak GPU memory | n/a |")
    lines.append(f"| total benchmark time | {r['total_seconds']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
