"""Where capture time goes on a GPU (Llama-2-7b shapes, random weights): plain forward, encoding,
hook recording with and without the full-depth output, and the public ``capture``.

Diagnosis script behind docs/benchmarks.md (capture was 1.3-1.5x a plain forward before copies
were queued through pinned memory). Needs CUDA; prints medians of interleaved repeats.
"""

import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from _common import interleaved, median  # noqa: E402

from rdt_interp.models.random_init import random_llama_chat  # noqa: E402
from rdt_interp.prompts import load_split  # noqa: E402
from rdt_interp.roles import Selector  # noqa: E402
from rdt_interp.tracing import HookRunner, Recorder, StepContext, capture  # noqa: E402

DEV = "cuda"
m = random_llama_chat(device=DEV, dtype=torch.bfloat16)
prompts = (load_split("harmful_test").take(256, seed=0).instructions
           + load_split("harmless_test").take(256, seed=0).instructions)
order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
chunks = [[prompts[i] for i in order[s:s + 64]] for s in range(0, 512, 64)]
batches = [m.encode(c) for c in chunks]
body = m.model.model
sel = Selector.parse("post_instruction[-5:]")


@torch.inference_mode()
def plain() -> None:
    for b in batches:
        body(**b.inputs, use_cache=False)


def enc() -> None:
    for c in chunks:
        m.encode(c)


@torch.inference_mode()
def hooks(need_output: bool) -> None:
    for b in batches:
        rec = Recorder(range(32), "resid_pre", sel, device=None)
        with HookRunner(m, [], [rec]) as r:
            r.forward(m.prefill_kwargs(b, use_cache=False), StepContext("prefill", b.roles_for_context),
                      need_output=need_output)
        rec.prefill_tensor()


@torch.inference_mode()
def model_call() -> None:
    for b in batches:
        m.model(**m.prefill_kwargs(b, use_cache=False))


def cap() -> None:
    capture(m, prompts, selector="post_instruction[-5:]", batch_size=64, backend="hooks", progress=False)


t = interleaved({"plain_body": plain, "model_call_full": model_call, "encode_only": enc,
                 "hooks_preencoded": lambda: hooks(False), "hooks_full_output": lambda: hooks(True),
                 "capture_hooks": cap}, DEV, repeats=3)
for k, v in t.items():
    print(f"{k:20s} {median(v):.3f}s")
print("first batch shapes", [tuple(b.inputs["input_ids"].shape) for b in batches][:2])
