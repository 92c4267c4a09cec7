"""Tiny random chat models built in-process (unit tests, benchmarks), no download needed.

The tokenizer is byte-level BPE without merges: every byte is a token, plus the special tokens
of the family's chat template. It is a real ``PreTrainedTokenizerFast`` with offsets, so prompt
building and role assignment run exactly the code path a real checkpoint uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% set messages = messages[1:] %}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    family: str  # "llama" | "qwen2" | "gemma3"
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    chat_template: str


TINY_SPECS: dict[str, TinySpec] = {
    "tiny-llama": TinySpec("llama", ("<unk>", "<s>", "</s>", "<pad>"), "<s>", "</s>", "<pad>",
                           LLAMA2_CHAT_TEMPLATE),
    "tiny-qwen2": TinySpec("qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
                           "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE),
    "tiny-gemma": TinySpec("gemma3", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
                           "<bos>", "<end_of_turn>", "<pad>", GEMMA_TEMPLATE),
}


def byte_tokenizer(spec: TinySpec) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: specials first (ids 0..k-1), then the 256 byte symbols."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(spec.specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=[s for s in spec.specials if s not in (spec.bos, spec.eos, spec.pad)],
    )
    tok.chat_template = spec.chat_template
    return tok


def build_tiny(
    name: str,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded random model of the family named by ``name`` with its byte tokenizer."""
    spec = TINY_SPECS[name]
    tok = byte_tokenizer(spec)
    vocab = len(tok)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    if spec.family == "llama":
        cfg, cls = LlamaConfig(**common, tie_word_embeddings=False), LlamaForCausalLM
    elif spec.family == "qwen2":
        cfg, cls = Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM
    else:
        cfg = Gemma3TextConfig(**common, head_dim=hidden_size // n_heads, sliding_window=16,
                               tie_word_embeddings=True)
        cls = Gemma3ForCausalLM
    # The generator is local so building a model never disturbs global RNG state.
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        model = cls(cfg)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
