"""Batched greedy generation with a KV cache, interventions and recordings at every step.

One loop serves chat LMs and VLAs: the prompt runs as one ``prefill`` pass, then each decode
step feeds one token per row (role ``adapter.generated_role``: ``GENERATED`` for chat models,
``ACTION`` for VLAs). Every forward goes through a runner, so the nnsight path and the hook
path apply the same edits at the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.tracing.hooks import HookRunner
from rdt_interp.tracing.interventions import Intervention, StepContext
from rdt_interp.tracing.recorder import Recorder
from rdt_interp.tracing.runner import Runner

Backend = Literal["hooks", "nnsight"]


@dataclass
class Generation:
    """Greedy continuation of a batch."""

    tokens: Int[Tensor, "batch new"]
    finished: Bool[Tensor, "batch"]
    logits: Float[Tensor, "batch new vocab"] | None = None


def make_runner(
    backend: Backend,
    adapter: ModelAdapter,
    interventions: Sequence[Intervention] = (),
    recorders: Sequence[Recorder] = (),
) -> Runner:
    if backend == "hooks":
        return HookRunner(adapter, interventions, recorders)
    if backend == "nnsight":
        # lazy: nnsight is heavy and only this backend needs it
        from rdt_interp.tracing.session import NNsightRunner

        return NNsightRunner(adapter, interventions, recorders)
    raise ConfigError(f"unknown backend {backend!r}", fix="use 'hooks' or 'nnsight'")


@torch.inference_mode()
def generate(
    adapter: ModelAdapter,
    batch: EncodedBatch,
    *,
    max_new_tokens: int,
    interventions: Sequence[Intervention] = (),
    recorders: Sequence[Recorder] = (),
    backend: Backend = "hooks",
    allowed_token_ids: Tensor | None = None,
    stop_at_eos: bool = True,
    return_logits: bool = False,
) -> Generation:
    """Greedy decoding of ``max_new_tokens`` per row (rows that hit EOS are padded with EOS)."""
    if batch.padding_side != "left":
        raise ConfigError("generation needs a left-padded batch",
                          fix="encode with padding_side='left' (the default)")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be >= 1")
    adapter.check_batch(batch)
    allowed = adapter.allowed_token_ids() if allowed_token_ids is None else allowed_token_ids
    eos = adapter.eos_token_id if stop_at_eos else None
    n = len(batch)
    device = batch.attention_mask.device
    with make_runner(backend, adapter, interventions, recorders) as runner:
        out = runner.forward(adapter.prefill_kwargs(batch, use_cache=True),
                             StepContext("prefill", batch.roles))
        logits = adapter.logits_of(out)[:, -1].float()
        cache = adapter.cache_of(out)
        mask = batch.attention_mask
        pos = batch.position_ids[:, -1:]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens: list[Tensor] = []
        kept: list[Tensor] = []
        step_roles = torch.full((n, 1), int(adapter.generated_role), dtype=torch.long)  # host side
        for step in range(max_new_tokens):
            if return_logits:
                kept.append(logits.cpu())
            nxt = greedy_token(logits, allowed)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            tokens.append(nxt)
            if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos + 1
            out = runner.forward(
                adapter.step_kwargs(nxt[:, None], cache, mask, pos),
                StepContext("decode", step_roles, step + 1),
            )
            logits = adapter.logits_of(out)[:, -1].float()
            cache = adapter.cache_of(out)
    return Generation(
        tokens=torch.stack(tokens, dim=1),
        finished=done,
        logits=torch.stack(kept, dim=1) if return_logits else None,
    )


def greedy_token(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """Argmax over the vocabulary, or over the ``allowed`` token ids (first maximum wins)."""
    if allowed is None:
        return logits.argmax(dim=-1)
    allowed = allowed.to(logits.device)
    return allowed[logits[:, allowed].argmax(dim=-1)]


def complete(
    model: ModelAdapter,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 32,
    backend: Backend = "hooks",
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy text completions of chat prompts (batched by length, returned in input order)."""
    decode = getattr(model, "decode", None)
    if decode is None:
        raise ConfigError(f"{model.name} cannot decode text", fix="use a ChatModel")
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: dict[int, str] = {}
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        gen = generate(model, model.encode([prompts[i] for i in chunk]), max_new_tokens=max_new_tokens,
                       interventions=interventions, backend=backend)
        eos = model.eos_token_id
        for row, i in enumerate(chunk):
            ids = gen.tokens[row].tolist()
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            out[i] = decode(ids)
        bar.update(len(chunk))
    bar.close()
    return [out[i] for i in range(len(prompts))]
