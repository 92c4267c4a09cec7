"""Random-weight models of real shapes, built directly on the target device.

Latency and memory do not depend on weight values, so benchmarks at 7B scale use random
weights; the construction helpers live in :mod:`rdt_interp.models.meta_init` (re-exported
here), so that VLA families can use them without importing the chat adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rdt_interp.models.chat import ChatModel
from rdt_interp.models.meta_init import build_random, fill_random_, materialize_, parameters_on_meta
from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer

__all__ = ["LLAMA2_7B", "build_random", "fill_random_", "materialize_", "parameters_on_meta",
           "random_llama_chat"]

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)


def random_llama_chat(*, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                      seed: int = 0, **overrides: Any) -> ChatModel:
    """A Llama-2-7b-chat-shaped :class:`ChatModel` with random weights (byte tokenizer, Llama-2
    chat template) for benchmarks at real scale."""
    tok = byte_tokenizer(TINY_SPECS["tiny-llama"])
    cfg = LlamaConfig(**{**LLAMA2_7B, **overrides}, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = build_random(lambda: LlamaForCausalLM(cfg), dtype=dtype, device=device, seed=seed)
    return ChatModel(model, tok, name="llama-2-7b-random", random_weights=True)
