"""Capture cost vs a plain batched forward over the same tokens.

    python benchmarks/bench_capture.py --model tiny-llama --device cpu --n 64
    python benchmarks/bench_capture.py --model qwen2.5-coder-0.5b-instruct --device cpu --n 64
    python benchmarks/bench_capture.py --model llama-2-7b-random --device cuda --n 512   # GPU

The plain forward runs the decoder body (``model.model``, no LM head) on the same batches. The
captures record every layer's residual at the post-instruction positions (``--selector``)
through the nnsight path and the hook path. Variants are interleaved (A B C A B C …).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import device_name, interleaved, markdown_table, median, peak_memory_gib, write_json

from rdt_interp.prompts import load_split
from rdt_interp.tracing import capture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--selector", default="post_instruction[-5:]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.model == "llama-2-7b-random":
        from rdt_interp.models.random_init import random_llama_chat

        model = random_llama_chat(device=args.device, dtype=torch.bfloat16)
    else:
        from rdt_interp.models import load_chat_model

        model = load_chat_model(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    half = args.n // 2
    prompts = load_split("harmful_test").take(half, seed=0).instructions + \
        load_split("harmless_test").take(args.n - half, seed=0).instructions
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # same batching as capture
    batches = [model.encode([prompts[i] for i in order[s:s + args.batch_size]])
               for s in range(0, len(order), args.batch_size)]
    n_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    body = model.model.model

    @torch.inference_mode()
    def plain() -> None:
        for b in batches:
            body(**b.inputs, use_cache=False)

    def cap(backend: str):
        return lambda: capture(model, prompts, selector=args.selector, batch_size=args.batch_size,
                               backend=backend, progress=False)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = interleaved({"plain_forward": plain, "capture_nnsight": cap("nnsight"), "capture_hooks": cap("hooks")},
                        args.device, repeats=args.repeats)
    base = median(times["plain_forward"])
    rows = [{"variant": k, "median_s": median(v), "tokens_per_s": n_tokens / median(v),
             "ratio_vs_plain": median(v) / base} for k, v in times.items()]
    payload = {"device": device_name(args.device), "model": args.model, "n_prompts": args.n,
               "n_tokens": n_tokens, "layers": model.n_layers, "selector": args.selector,
               "batch_size": args.batch_size, "load_s": load_s, "peak_gib": peak_memory_gib(args.device),
               "rows": rows, "times": times, "torch": torch.__version__}
    print(f"## capture vs plain forward — {payload['device']}, {args.model}, {args.n} prompts, "
          f"{n_tokens} tokens, all {model.n_layers} layers at {args.selector}")
    print(markdown_table(rows))
    print(f"load {load_s:.1f} s, peak GPU memory {payload['peak_gib']}")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
