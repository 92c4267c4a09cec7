"""Last-position scores for direction selection, computed fast.

Every chat prompt starts with the same template tokens (system prompt, user header). A
:class:`PromptBatch` runs that shared prefix once per intervention (one row), repeats its KV
cache across the batch and runs only the prompt-specific suffixes, reading the logits at each
row's last position only. With Qwen2.5's template this halves the tokens per prompt. Suffixes
are right-padded (no gap between prefix and suffix, which sliding-window attention needs) and
sorted by length (few distinct last positions per batch). The result equals a plain
full-prompt forward up to float32 rounding (tested on Llama, Qwen2 and Gemma 3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import cache_kwarg, cache_of, pad_sequences
from rdt_interp.models.chat import ChatModel
from rdt_interp.roles import Role
from rdt_interp.tracing.hooks import HookRunner
from rdt_interp.tracing.interventions import Intervention, InterventionPlan, StepContext


@dataclass
class PromptBatch:
    """Prompts split into a shared prefix and left-padded suffixes."""

    prefix_ids: Int[Tensor, "1 p"]
    prefix_roles: Int[Tensor, "1 p"]
    suffix_ids: Int[Tensor, "n s"]
    suffix_roles: Int[Tensor, "n s"]
    suffix_mask: Int[Tensor, "n s"]
    texts: list[str]
    order: list[int]  # row i of the suffix tensors is prompt order[i]

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.shape[1])

    @classmethod
    def build(cls, model: ChatModel, texts: Sequence[str], *, share_prefix: bool = True) -> PromptBatch:
        if not texts:
            raise ConfigError("need at least one prompt")
        pairs = [model.tokenize_with_roles(t) for t in texts]
        n_prefix = 0
        if share_prefix:
            first_ids, first_roles = pairs[0]
            limit = min(len(ids) for ids, _ in pairs) - 1  # every row keeps >= 1 own token
            while (n_prefix < limit and first_roles[n_prefix] & Role.TEMPLATE
                   and all(ids[n_prefix] == first_ids[n_prefix] for ids, _ in pairs)):
                n_prefix += 1
        ids0, roles0 = pairs[0]
        prefix_ids = torch.tensor([ids0[:n_prefix]], dtype=torch.long)
        prefix_roles = torch.tensor([roles0[:n_prefix]], dtype=torch.long)
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), i))
        s_ids, s_roles, s_mask = pad_sequences(
            [pairs[i][0][n_prefix:] for i in order], [pairs[i][1][n_prefix:] for i in order],
            model.tokenizer.pad_token_id, "right",
        )
        return cls(prefix_ids, prefix_roles, s_ids, s_roles, s_mask, list(texts), order)

    def __len__(self) -> int:
        return int(self.suffix_ids.shape[0])


@torch.inference_mode()
def last_logprobs(
    model: ChatModel,
    batch: PromptBatch,
    interventions: Sequence[Intervention] | InterventionPlan = (),
    *,
    batch_size: int = 32,
) -> Float[Tensor, "n vocab"]:
    """Log-probabilities of the next token after each full prompt, under ``interventions``."""
    dev = model.device
    out: list[Tensor] = []
    cache_name = cache_kwarg(model.model)
    with HookRunner(model, interventions) as runner:
        cache = None
        p = batch.prefix_len
        if p:
            pre = runner.forward(
                {"input_ids": batch.prefix_ids.to(dev), "attention_mask": torch.ones_like(batch.prefix_ids, device=dev),
                 "position_ids": torch.arange(p, device=dev)[None], "use_cache": True, "logits_to_keep": 1},
                StepContext("prefill", batch.prefix_roles),
            )
            cache = cache_of(pre)
        for start in range(0, len(batch), batch_size):
            sl = slice(start, start + batch_size)
            ids, roles, mask = (batch.suffix_ids[sl].to(dev), batch.suffix_roles[sl],
                                batch.suffix_mask[sl].to(dev))
            n, s = ids.shape
            last = mask.sum(1) - 1
            # Logits only at the distinct last positions of this batch (sorted: few of them).
            keep, which = torch.unique(last, return_inverse=True)
            kw = {"input_ids": ids, "use_cache": cache is not None, "logits_to_keep": keep,
                  "position_ids": p + torch.arange(s, device=dev).expand(n, s),
                  "attention_mask": torch.cat([torch.ones(n, p, dtype=mask.dtype, device=dev), mask], 1)}
            if cache is not None:
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(n)
                kw[cache_name] = c
            res = runner.forward(kw, StepContext("prefill", roles))
            logits = res.logits[torch.arange(n, device=dev), which]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    rows = torch.cat(out)
    result = torch.empty_like(rows)
    result[torch.tensor(batch.order)] = rows
    return result


def refusal_score(logprobs: Float[Tensor, "n vocab"], refusal_ids: Sequence[int]) -> Float[Tensor, "n"]:
    """Arditi et al.'s refusal score: log-odds of the refusal-opening tokens' total probability."""
    if not refusal_ids:
        raise ConfigError("no refusal token ids", fix="set ChatModel.refusal_phrases")
    lp = torch.logsumexp(logprobs[:, list(refusal_ids)], dim=-1)  # log p(refusal)
    log1m = torch.log1p(-lp.exp().clamp(max=1 - 1e-7))
    return lp - log1m


def kl_divergence(base: Float[Tensor, "n vocab"], other: Float[Tensor, "n vocab"]) -> Float[Tensor, "n"]:
    """KL(base || other) per row, from log-probabilities."""
    return (base.exp() * (base - other)).sum(-1)
