"""Why did the hook and nnsight paths give different batch-32 tokens in ``bench_rdt_overhead``?

Reproduces that benchmark's setting (OpenVLA-7b shapes, random bf16, the word tokenizer and
instructions of ``bench_openvla``, action-constrained greedy decoding, 7 tokens) and runs
``generate`` twice per backend. Plain PyTorch forward hooks (they fire whichever runner calls the
module) keep the output of every top-level module and decoder layer at every forward call
(prefill and each decode step), and the thread and autograd state the forward ran under; so the
first (call, module) whose output differs between two runs names where they part. A profiled
call per backend lists the attention kernels each one ran. ``--condition`` repeats the hooks
pair under deterministic algorithms or a forced SDPA backend, to test a suspected cause.

    python benchmarks/diagnose_backends.py --out runs/diag_backends.json            # GPU
    python benchmarks/diagnose_backends.py --tiny --device cpu --out runs/smoke/diag.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import device_name, write_json  # noqa: E402
from bench_openvla import TINY_TEXT, TINY_VISION, instructions, word_tokenizer  # noqa: E402

from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config  # noqa: E402
from rdt_interp.models.vla import VLARequest  # noqa: E402
from rdt_interp.tracing.generation import generate  # noqa: E402


class PrefillProbe:
    """Keeps every output of each watched module per run (call 0 is the prefill) and the
    autograd and thread state of the first forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.state: dict[str, Any] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            for attr in ("last_hidden_state", "logits"):
                if not isinstance(t, torch.Tensor):
                    t = getattr(out, attr, None)
            if isinstance(t, torch.Tensor):
                self.outputs.setdefault(name, []).append(t.detach().clone())
            if not self.state:
                self.state = {"thread": "main" if threading.current_thread() is threading.main_thread()
                              else threading.current_thread().name,
                              "grad_enabled": torch.is_grad_enabled(),
                              "inference_mode": torch.is_inference_mode_enabled()}
        return hook

    def reset(self) -> None:
        self.outputs, self.state = {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attention_kernels(fn: Callable[[], Any], device: str) -> dict[str, int]:
    """Kernel names (with call counts) of one call that look like attention or softmax."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    out: dict[str, int] = {}
    for ev in prof.key_averages():
        name = ev.key
        if any(s in name.lower() for s in ("attention", "sdpa", "fmha", "flash", "softmax")):
            out[name[:120]] = int(ev.count)
    return dict(sorted(out.items()))


def compare(a: dict[str, Any], b: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """Token agreement, and the first (forward call, module) whose outputs differ."""
    first = None
    calls = max((len(v) for v in a["outputs"].values()), default=0)
    diff_by_call: list[float] = []
    for j in range(calls):
        worst = 0.0
        for name in order:
            xs, ys = a["outputs"].get(name, []), b["outputs"].get(name, [])
            if j >= len(xs) or j >= len(ys) or xs[j].shape != ys[j].shape:
                continue
            # rows whose earlier tokens already differ feed different inputs: compare only rows
            # that agree on every token generated before this call
            same = (a["tokens"][:, :j] == b["tokens"][:, :j]).all(dim=1).to(xs[j].device)
            if not bool(same.any()):
                continue
            d = float((xs[j][same].float() - ys[j][same].float()).abs().max())
            worst = max(worst, d)
            if d > 0 and first is None:
                first = {"call": j, "module": name, "max_abs_diff": d, "rows_compared": int(same.sum())}
        diff_by_call.append(worst)
    steps = a["logits"].shape[1]
    return {"tokens_equal": bool(torch.equal(a["tokens"], b["tokens"])),
            "rows_equal": float((a["tokens"] == b["tokens"]).all(dim=1).float().mean()),
            "first_differing_step": next((t for t in range(steps)
                                          if not torch.equal(a["tokens"][:, t], b["tokens"][:, t])), None),
            "max_logit_diff_by_step": [float((a["logits"][:, t] - b["logits"][:, t]).abs().max())
                                       for t in range(steps)],
            "first_differing": first, "max_abs_diff_by_call": diff_by_call,
            "state": [a["state"], b["state"]]}


def fast_pair(vla: Any, batch: Any, allowed: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """The fast path's graphs replayed twice on the same batch: are its tokens repeatable?"""
    from rdt_interp.fast import FastGenerator

    gen = FastGenerator(vla, max_batch=len(batch))
    a, b = (gen.generate(batch, allowed_token_ids=allowed, return_logits=True) for _ in range(2))
    report = {"device": device_name(args.device), "condition": "fast", "batch": len(batch),
              "tokens_equal": bool(torch.equal(a.tokens, b.tokens)),
              "rows_equal": float((a.tokens == b.tokens).all(dim=1).float().mean()),
              "max_logit_diff_by_step": [float((a.logits[:, t] - b.logits[:, t]).abs().max())
                                         for t in range(a.logits.shape[1])],
              "fast_path": gen.describe()}
    write_json(str(args.out), report)
    print(f"[fast] {({k: v for k, v in report.items() if k != 'fast_path'})}")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--condition", default="default",
                    choices=["default", "deterministic", "sdpa-math", "sdpa-efficient", "sdpa-cudnn", "fast"])
    args = ap.parse_args(argv)
    if args.condition == "deterministic":
        torch.use_deterministic_algorithms(True, warn_only=True)
    dtype = torch.bfloat16
    texts = instructions(args.batch, args.seed)
    cfg = openvla_7b_config()
    overrides = None
    if args.tiny:
        cfg["text_config"] = dict(TINY_TEXT)
        overrides = TINY_VISION
    torch.manual_seed(args.seed)
    vla = build_random_openvla(cfg, dtype, args.device, args.seed, tokenizer=word_tokenizer(texts),
                               vision_overrides=overrides)
    rng = np.random.default_rng(args.seed)
    reqs = [VLARequest(t, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for t in texts]
    batch = vla.encode(reqs)
    allowed = vla.action_tokenizer.token_ids
    if args.condition == "fast":  # before the probe's hooks: hooked vision towers do not compile
        return fast_pair(vla, batch, allowed, args)
    watched = {f"model.{n}": m for n, m in vla.model.named_children() if n != "language_model"}
    watched["embed_tokens"] = vla.model.get_input_embeddings()
    watched.update({f"layer{i}": m for i, m in enumerate(vla.layers)})
    watched["final_norm"] = vla.final_norm
    order = list(watched)
    probe = PrefillProbe(watched)


    def sdpa_ctx() -> Any:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"sdpa-math": "MATH", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
        if args.condition in names:
            return sdpa_kernel([getattr(SDPBackend, names[args.condition])])
        return contextlib.nullcontext()

    def run(backend: str) -> dict[str, Any]:
        probe.reset()
        with sdpa_ctx():
            g = generate(vla, batch, max_new_tokens=vla.action_dim, backend=backend, allowed_token_ids=allowed,
                         stop_at_eos=False, return_logits=True)
        return {"tokens": g.tokens.cpu(), "logits": g.logits, "outputs": dict(probe.outputs),
                "state": dict(probe.state)}

    names = ("hooks_a", "hooks_b", "nnsight_a", "nnsight_b") if args.condition == "default" else ("hooks_a", "hooks_b")
    pairs = [("hooks_a", "hooks_b"), ("nnsight_a", "nnsight_b"), ("hooks_a", "nnsight_a")][:3 if len(names) == 4 else 1]
    runs = {name: run(name.split("_")[0]) for name in names}
    probe.remove()
    report: dict[str, Any] = {
        "device": device_name(args.device), "condition": args.condition, "batch": args.batch,
        "n_layers": vla.n_layers, "decoder_positions": int(batch.seq_len),
        "pad_share": float(1 - batch.attention_mask.float().mean()),
        "pairs": {f"{a} vs {b}": compare(runs[a], runs[b], order) for a, b in pairs},
    }
    del runs
    one = lambda be: generate(vla, batch, max_new_tokens=vla.action_dim, backend=be,  # noqa: E731
                              allowed_token_ids=allowed, stop_at_eos=False)
    with sdpa_ctx():
        report["attention_kernels"] = {be: attention_kernels(lambda be=be: one(be), args.device)
                                       for be in sorted({n.split("_")[0] for n in names})}
    write_json(str(args.out), report)
    for k, v in report["pairs"].items():
        print(f"[{args.condition}] {k}: tokens equal {v['tokens_equal']}, rows equal {v['rows_equal']:.3f}, "
              f"first differing step {v['first_differing_step']}, first differing output {v['first_differing']}, "
              f"max diff by call {[round(x, 4) for x in v['max_abs_diff_by_call']]}, state {v['state']}")
    for be, ks in report["attention_kernels"].items():
        print(be, ks)
    return report


if __name__ == "__main__":
    main()
