import sys, time, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from _common import timed, interleaved, median
from rdt_interp.models.random_init import random_llama_chat
from rdt_interp.prompts import load_split
from rdt_interp.tracing import capture, HookRunner, Recorder, StepContext
from rdt_interp.roles import Selector
dev = "cuda"
m = random_llama_chat(device=dev, dtype=torch.bfloat16)
prompts = load_split("harmful_test").take(256, seed=0).instructions + load_split("harmless_test").take(256, seed=0).instructions
order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
chunks = [[prompts[i] for i in order[s:s+64]] for s in range(0, 512, 64)]
batches = [m.encode(c) for c in chunks]
body = m.model.model
sel = Selector.parse("post_instruction[-5:]")
@torch.inference_mode()
def plain():
    for b in batches: body(**b.inputs, use_cache=False)
def enc():
    for c in chunks: m.encode(c)
@torch.inference_mode()
def hooks_pre():
    for b in batches:
        rec = Recorder(range(32), "resid_pre", sel, device=None)
        with HookRunner(m, [], [rec]) as r:
            r.forward(m.prefill_kwargs(b, use_cache=False), StepContext("prefill", b.roles_for_context), need_output=False)
        rec.prefill_tensor()
@torch.inference_mode()
def hooks_full_depth():
    for b in batches:
        rec = Recorder(range(32), "resid_pre", sel, device=None)
        with HookRunner(m, [], [rec]) as r:
            r.forward(m.prefill_kwargs(b, use_cache=False), StepContext("prefill", b.roles_for_context), need_output=True)
@torch.inference_mode()
def model_call():
    for b in batches: m.model(**m.prefill_kwargs(b, use_cache=False))
def cap():
    capture(m, prompts, selector="post_instruction[-5:]", batch_size=64, backend="hooks", progress=False)
t = interleaved({"plain_body": plain, "model_call_full": model_call, "encode_only": enc, "hooks_preencoded": hooks_pre, "hooks_full_output": hooks_full_depth, "capture_hooks": cap}, dev, repeats=3)
for k, v in t.items(): print(f"{k:20s} {median(v):.3f}s")
print({k: [b.inputs['input_ids'].shape for b in batches][:2] for k in ['shapes']})
