"""The real offline Qwen2.5-Coder-0.5B-Instruct: hash-verified, dequantized once, cached."""

import time

import pytest

from rdt_interp.models import load_chat_model
from rdt_interp.models.offline import QWEN25_CODER_05B, dequantized_dir, verify_parts
from rdt_interp.roles import Role

pytestmark = pytest.mark.real_model


def test_parts_match_the_pinned_digest():
    paths = verify_parts(QWEN25_CODER_05B)
    assert len(paths) == 6


def test_cached_load_is_fast_and_real(qwen):
    cache = dequantized_dir(QWEN25_CODER_05B)
    assert cache.is_dir()
    written = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    again = load_chat_model("qwen2.5-coder-0.5b-instruct")
    # the cache is read, not rebuilt: no file of it is written again (a rebuild dequantizes, ~55 s
    # on quiet cores); the wall-clock bound is loose because the test shares its cores with others
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == written
    assert time.perf_counter() - t0 < 120  # ~1-5 s from the safetensors cache on quiet cores
    assert again.n_layers == 24 and again.d_model == 896 and not again.random_weights
    ids, roles = qwen.tokenize_with_roles("How do I bake bread?")
    post = [qwen.tokenizer.decode([i]) for i, r in zip(ids, roles, strict=True) if r & Role.POST_INSTRUCTION]
    assert post == ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert [qwen.tokenizer.decode([i]) for i in qwen.refusal_token_ids()][:3] == ["I", "As", "Sorry"]
