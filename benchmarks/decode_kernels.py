"""Microbenchmarks of the kernels a batch-1 decode step and the prefill spend their time in, at
OpenVLA-7b shapes (random bf16), each timed as CUDA-graph replays so launch cost is what a
captured step pays:

* GEMV ``x @ W.T`` for the q/k/v, o, gate/up, down and LM-head shapes: the library (``F.linear``)
  against the Triton kernel of ``rdt_interp/fast/triton_ops.py`` over a grid of tile configurations.
  Eight weight copies are rotated so the 60 MB L2 cannot serve repeats.
* attention for one query over a 336-slot cache with a key mask: SDPA (default choice, the
  efficient, cuDNN and math backends), the same maths written as reductions for Inductor,
  FlexAttention, and the split-KV Triton kernel of ``rdt_interp/fast/triton_ops.py`` over block
  sizes and warps (and as the fast path configures it); each also run again to see whether it
  repeats its own output bit for bit.
* the OpenVLA vision towers + projector at batch 1: eager, compiled as one function, each tower
  compiled on its own, and the towers on two streams (as ``rdt_interp/fast/vision.py`` runs them).

    python benchmarks/decode_kernels.py --out runs/decode_kernels.json      # GPU only
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import device_name, write_json  # noqa: E402

from rdt_interp.fast import triton_ops as G  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32064, 4096)}


def graph_time(fn: Callable[[], Any], *, inner: int, replays: int = 20) -> float:
    """Median seconds of one ``fn()`` call, from replays of a graph of ``inner`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for _ in range(inner):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(ts)


def bench_gemv(out: dict[str, Any], copies: int = 8) -> None:
    configs = [G.GemvConfig(*c) for c in itertools.product((2, 4, 8, 16), (512, 1024, 2048), (2, 4, 8), (2, 3, 4))
               if 16 <= c[0] * c[1] // (32 * c[2]) <= 128]  # float32 accumulators per thread
    res = {name: _gemv_shape(n, k, configs, copies) for name, (n, k) in SHAPES.items()}
    for name, row in res.items():
        print(f"gemv {name}: library {row['library_us']:.1f} us ({row['library_TBps']:.2f} TB/s); "
              f"triton best {row.get('best')}", flush=True)
    out["gemv"] = res


def _gemv_shape(n: int, k: int, configs: list[G.GemvConfig], copies: int) -> dict[str, Any]:
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    nbytes = n * k * 2
    it = itertools.cycle(ws)
    t_lib = graph_time(lambda: F.linear(x, next(it)), inner=copies * 4)
    ref = F.linear(x, ws[0]).float().reshape(-1)
    row: dict[str, Any] = {"library_us": 1e6 * t_lib, "library_TBps": nbytes / t_lib / 1e12, "configs": []}
    best = None
    for cfg in configs:
        if n % cfg.block_n:
            continue
        try:
            G.gemv_launch(x, ws[0], None, y, cfg)
            err = float((y.float() - ref).abs().max())
            it2 = itertools.cycle(ws)
            t = graph_time(lambda cfg=cfg, it2=it2: G.gemv_launch(x, next(it2), None, y, cfg), inner=copies * 4)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            row["configs"].append({"cfg": list(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        row["configs"].append({"cfg": list(cfg), "us": 1e6 * t, "TBps": nbytes / t / 1e12, "max_err": err})
        if best is None or t < best[0]:
            best = (t, cfg, err)
    if best is not None:
        row["best"] = {"cfg": list(best[1]), "us": 1e6 * best[0], "TBps": nbytes / best[0] / 1e12,
                       "max_err": best[2], "ref_max": float(ref.abs().max())}
    return row


def _attn_reductions(q, k, v, mask, scale):
    s = (q.float() * k.float()).sum(-1) * scale          # [b, h, c]
    s = s.masked_fill(~mask[:, 0], float("-inf"))       # mask [b, 1, 1, c] -> [b, 1, c]
    p = torch.softmax(s, dim=-1)
    return (p[..., None] * v.float()).sum(-2, keepdim=True).to(q.dtype)          # [b, h, 1, d]


def bench_attention(out: dict[str, Any], layers: int = 32) -> None:
    out["attention"] = {f"b{b}": _attention_batch(b, layers) for b in (1, 32)}


def _attention_batch(b: int, layers: int) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, c, d = 32, 336, 128
    ks = [torch.randn(b, h, c, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn(b, h, c, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(b, 1, 1, c, dtype=torch.bool, device="cuda")
    mask[:, :, :, 290:] = False
    mask[: b // 2, :, :, :7] = False
    scale = d ** -0.5
    ref = F.scaled_dot_product_attention(q, ks[0], vs[0], attn_mask=mask, scale=scale)

    def with_backend(backend: Any) -> Callable[..., Any]:
        def fn(q: Any, k: Any, v: Any) -> Any:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return fn

    variants: dict[str, Callable[..., Any]] = {
        "sdpa_default": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
        "sdpa_efficient": with_backend(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa_cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
        "sdpa_math": with_backend(SDPBackend.MATH),
        "reductions_compiled": torch.compile(lambda q, k, v: _attn_reductions(q, k, v, mask, scale), dynamic=False),
    }
    valid = mask[:, 0, 0].contiguous()
    for bc, nw in itertools.product((16, 32, 64, 128), (2, 4, 8)):
        cfg = G.AttentionConfig(bc, nw)
        variants[f"triton_split_kv_{bc}_w{nw}"] = (
            lambda q, k, v, cfg=cfg: G.decode_attention_launch(q, k, v, valid, scale, cfg))
    variants["triton_decode_attention"] = lambda q, k, v: G.decode_attention(q, k, v, valid, scale)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        def keep_valid(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return torch.where(valid[b, kv_idx], score, float("-inf"))

        variants["flex_compiled"] = torch.compile(
            lambda q, k, v: flex_attention(q, k, v, score_mod=keep_valid, scale=scale), dynamic=False)
    except Exception as exc:  # noqa: BLE001
        print(f"flex attention unavailable: {exc}", flush=True)
    row: dict[str, Any] = {}
    for name, fn in variants.items():
        try:
            o = fn(q, ks[0], vs[0])
            err = float((o.float().reshape(ref.shape) - ref.float()).abs().max())
            repeats = all(torch.equal(fn(q, ks[0], vs[0]), o) for _ in range(5))
            i = itertools.cycle(range(layers))

            def call(fn: Callable[..., Any] = fn, i: Any = i) -> Any:
                j = next(i)
                return fn(q, ks[j], vs[j])

            row[name] = {"us": 1e6 * graph_time(call, inner=layers), "max_err": err, "repeatable": repeats}
        except Exception as exc:  # noqa: BLE001
            row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"attention b={b} {name}: {row[name]}", flush=True)
    return row


def bench_vision(out: dict[str, Any]) -> None:
    import copy

    from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config

    cfg = copy.deepcopy(openvla_7b_config())
    cfg["text_config"]["num_hidden_layers"] = 1  # only the vision side is timed
    vla = build_random_openvla(cfg, torch.bfloat16, "cuda", 0)
    model = vla.model
    px = torch.randn(1, 6, 224, 224, device="cuda", dtype=torch.bfloat16)
    eager = model.image_features
    res: dict[str, Any] = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        comp = torch.compile(model.image_features, dynamic=False)
        ref = eager(px)[1]
        got = comp(px)[1]
        res["compile_s"] = time.perf_counter() - t0
        res["max_err"] = float((got.float() - ref.float()).abs().max())
        res["ref_max"] = float(ref.float().abs().max())
        res["eager_ms"] = 1e3 * graph_time(lambda: eager(px), inner=4)
        res["compiled_ms"] = 1e3 * graph_time(lambda: comp(px), inner=4)
        # the two towers are independent until their features are concatenated: each compiled on
        # its own (rdt_interp.fast.vision), run one after the other and on two streams
        from rdt_interp.fast.vision import ConcurrentTowers

        def fail(name: str, exc: Exception) -> None:
            raise exc

        for name, streams in (("towers_compiled_ms", False), ("towers_two_streams_ms", True)):
            towers = ConcurrentTowers(model.vision_backbone, model.projector, compile=True, on_fail=fail,
                                      device=px.device)
            if not streams:
                towers.streams = []
            got = towers(px)[1]
            torch.cuda.synchronize()
            res[name.replace("_ms", "_max_err")] = float((got.float() - ref.float()).abs().max())
            res[name] = 1e3 * graph_time(lambda towers=towers: towers(px), inner=4)
    print(f"vision b=1: {res}", flush=True)
    out["vision"] = res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="gemv,attention,vision")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernels.py needs a CUDA device")
    out: dict[str, Any] = {"device": device_name("cuda"), "torch": torch.__version__}
    parts = {"gemv": bench_gemv, "attention": bench_attention, "vision": bench_vision}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            parts[name](out)
        except Exception as exc:  # noqa: BLE001 - keep the other parts' results
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"{name} failed: {out[f'{name}_error']}", flush=True)
        out[f"{name}_seconds"] = time.perf_counter() - t0
        write_json(str(args.out), out)


if __name__ == "__main__":
    main()
