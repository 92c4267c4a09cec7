"""Benchmark: OpenVLA-7b action prediction, batch 1 vs batched, on this implementation.

Real shapes with random bf16 weights by default (latency and memory do not depend on weight
values), or a real checkpoint with ``--checkpoint DIR``. Measures build/load time, peak GPU
memory, the latency of one 7-token action prediction at batch 1 (median after warm-up, CUDA
synchronised) and throughput at batch 1/8/32 in actions/s, end to end from (instruction, image)
requests: tokenization and image preprocessing included. Prints a markdown table and writes JSON.

    python benchmarks/bench_openvla.py --out runs/bench_openvla.json            # GPU, real shapes
    python benchmarks/bench_openvla.py --tiny --device cpu --out runs/smoke/b.json    # CPU smoke test

Nothing is downloaded. Without ``--tokenizer`` a word-level stand-in for Llama-2's tokenizer is
used (one token per word and punctuation mark, SentencePiece-style "▁" boundaries), so prompts
are about as long as real ones (~30 text tokens + 256 image patches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rdt_interp.models.openvla import (  # noqa: E402
    build_random_openvla,
    load_openvla,
    openvla_7b_config,
)
from rdt_interp.models.vla import VLARequest  # noqa: E402

TINY_VISION = {
    "vit_large_patch14_reg4_dinov2.lvd142m": {"embed_dim": 48, "depth": 4, "num_heads": 3},
    "vit_so400m_patch14_siglip_224": {"embed_dim": 40, "depth": 4, "num_heads": 2},
}
TINY_TEXT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32064,
             "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "pad_token_id": 32000}

VERBS = ["pick up", "put", "move", "push", "place", "open", "close", "slide", "lift", "stack"]
OBJECTS = ["the red cup", "the blue block", "the small green bowl", "the silver spoon", "the yellow sponge",
           "the carrot", "the drawer", "the white towel", "the orange", "the black marker"]
PLACES = ["on the plate", "into the top drawer", "next to the sink", "to the left edge of the table",
          "behind the wooden box", "onto the blue cloth", "in front of the robot", "near the pot"]
EXTRA = ["carefully", "slowly", "without touching the other objects", "and then stop", "as far as possible"]


def instructions(n: int, seed: int) -> list[str]:
    """Instructions of about 10-20 words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parts = [VERBS[rng.integers(len(VERBS))], OBJECTS[rng.integers(len(OBJECTS))],
                 PLACES[rng.integers(len(PLACES))], EXTRA[rng.integers(len(EXTRA))]]
        text = " ".join(parts)
        if len(text.split()) < 10:
            text += " " + PLACES[rng.integers(len(PLACES))]
        out.append(text)
    return out


def word_tokenizer(texts: list[str]) -> Any:
    """A word-level tokenizer over the benchmark's words, shaped like Llama-2's (BOS, "▁" pieces)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rdt_interp.models.openvla.prompt import PROMPT_AFTER, PROMPT_BEFORE

    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                   pre_tokenizers.Split(Regex(r"[?:\n]"), behavior="isolated")])
    pieces = ["<unk>", "<s>", "</s>", "<pad>", "▁"]
    for t in [PROMPT_BEFORE + x.lower() + PROMPT_AFTER for x in texts]:
        for piece, _ in pre.pre_tokenize_str(t):
            if piece not in pieces:
                pieces.append(piece)
    tk = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a real OpenVLA checkpoint directory")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: word-level stand-in)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per batch size (default 5; 3 tiny)")
    ap.add_argument("--latency-reps", type=int, default=16, help="batch-1 predictions timed (>= 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; 1 tiny)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = [int(b) for b in args.batches.split(",")]
    reps = args.reps or (3 if args.tiny else 5)
    if args.latency_reps < 10:
        ap.error("--latency-reps must be >= 10")
    torch.manual_seed(args.seed)
    n_req = max(batches + [args.latency_reps])
    texts = instructions(n_req, args.seed)
    rng = np.random.default_rng(args.seed)
    requests = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = word_tokenizer(texts)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.checkpoint is not None:
        build_s, vla = timed(lambda: load_openvla(args.checkpoint, dtype=dtype, device=device,
                                                  tokenizer=tokenizer), device)
        weights = f"checkpoint {args.checkpoint.name}"
    else:
        cfg = openvla_7b_config()
        overrides = None
        if args.tiny:
            cfg["text_config"] = dict(TINY_TEXT)
            overrides = TINY_VISION
        build_s, vla = timed(lambda: build_random_openvla(cfg, dtype, device, args.seed, tokenizer=tokenizer,
                                                          vision_overrides=overrides), device)
        weights = "random (tiny)" if args.tiny else "random (OpenVLA-7b shapes)"
    mem_weights = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    n_params = sum(p.numel() for p in vla.model.parameters())
    prompt_lens = [len(vla.prompt.tokenize(t)[0]) for t in texts]
    print(f"built {weights}: {_count(n_params)} parameters in {build_s:.1f}s on {device} ({dtype})",
          flush=True)

    for _ in range(args.warmup if args.warmup is not None else (1 if args.tiny else 3)):
        vla.predict_actions(requests[: max(batches)])
        vla.predict_actions(requests[:1])
    for r in requests[: args.latency_reps]:  # every prompt length once (kernel selection per shape)
        vla.predict_actions([r])

    # batch 1 in a loop: latency per prediction and the loop's throughput
    lat = []
    singles = []
    for r in requests[: args.latency_reps]:
        dt, pred = timed(lambda r=r: vla.predict_actions([r], return_logits=True), device)
        lat.append(dt)
        singles.append((pred.token_ids[0].cpu(), pred.action_logits[0].float().cpu()))
    loop_tput = len(lat) / sum(lat)

    results: dict[str, Any] = {"throughput": {}, "seconds_per_batch": {}}
    big = max(batches)
    batched = None
    for b in batches:
        times = []
        for _ in range(reps):
            dt, pred = timed(lambda b=b: vla.predict_actions(requests[:b], return_logits=b == big), device)
            times.append(dt)
        med = statistics.median(times)
        results["seconds_per_batch"][b] = med
        results["throughput"][b] = b / med
        if b == big:
            batched = pred
    encode_s, _ = timed(lambda: vla.encode(requests[:big]), device)  # tokenize + images, on the CPU
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # Batched rows vs their single runs. In bf16 the GEMMs of different batch sizes round
    # differently (about as much as bf16 differs from fp32), so a row can flip where its top two
    # action logits are closer than that: common with random weights, whose logits are nearly
    # flat. Once a token flips, the later steps see another prefix: compare the first step.
    k = min(len(singles), big)
    same = sum(bool(torch.equal(singles[i][0], batched.token_ids[i].cpu())) for i in range(k)) / k
    diffs = [float((singles[i][1][0] - batched.action_logits[i, 0].float().cpu()).abs().max()) for i in range(k)]
    margins = [float((lg.topk(2).values[:, 0] - lg.topk(2).values[:, 1]).min()) for _, lg in singles[:k]]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import transformers

    results.update({
        "device": device_name,
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "weights": weights,
        "parameters": n_params,
        "build_seconds": build_s,
        "peak_memory_weights_gib": mem_weights,
        "peak_memory_gib": peak,
        "latency_b1_median_ms": 1e3 * statistics.median(lat),
        "latency_b1_p90_ms": 1e3 * float(np.percentile(lat, 90)),
        "latency_b1_reps": len(lat),
        "throughput_b1_loop": loop_tput,
        "batched_over_loop": results["throughput"][big] / loop_tput,
        "batched_size": big,
        "rows_equal_to_single_runs": same,
        "rows_compared": k,
        "batched_vs_single_first_step_logit_max_diff": max(diffs),
        "single_run_min_top2_margin_median": statistics.median(margins),
        "encode_seconds_batch": encode_s,
        "prompt_tokens_mean": float(np.mean(prompt_lens)),
        "decoder_positions_mean": float(np.mean(prompt_lens)) + vla.num_patches,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    return results


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table(r: dict[str, Any]) -> str:
    def gib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} GiB"

    rows = [
        ("device", r["device"]),
        ("weights / dtype", f"{r['weights']} / {r['dtype']} ({_count(r['parameters'])} parameters)"),
        ("build / load time", f"{r['build_seconds']:.1f} s"),
        ("peak GPU memory (weights / overall)", f"{gib(r['peak_memory_weights_gib'])} / {gib(r['peak_memory_gib'])}"),
        ("decoder positions per prompt (mean)", f"{r['decoder_positions_mean']:.0f} "
                                                f"({r['prompt_tokens_mean']:.0f} text + patches)"),
        ("latency, 1 action (7 tokens), batch 1", f"{r['latency_b1_median_ms']:.1f} ms median "
                                                  f"(p90 {r['latency_b1_p90_ms']:.1f} ms, n={r['latency_b1_reps']})"),
        ("throughput, batch-1 loop", f"{r['throughput_b1_loop']:.2f} actions/s"),
    ]
    rows += [(f"throughput, batch {b}", f"{t:.2f} actions/s ({1e3 * r['seconds_per_batch'][b]:.0f} ms per batch)")
             for b, t in r["throughput"].items()]
    rows.append((f"batch {r['batched_size']} / batch-1 loop", f"{r['batched_over_loop']:.1f}x (goal >= 8x)"))
    rows.append((f"tokenize + preprocess {r['batched_size']} requests (CPU)", f"{1e3 * r['encode_seconds_batch']:.0f} ms"))
    rows.append(("batched rows = their single runs", f"{100 * r['rows_equal_to_single_runs']:.0f}% of "
                 f"{r['rows_compared']} (first-step action-logit diff <= "
                 f"{r['batched_vs_single_first_step_logit_max_diff']:.2g}; median smallest top-2 margin "
                 f"{r['single_run_min_top2_margin_median']:.2g})"))
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a.ljust(width)} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
