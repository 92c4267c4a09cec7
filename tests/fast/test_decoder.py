"""The decoder kernels compute what the transformers modules compute."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.fast.decoder import DecoderStack, decode_layer, greedy, prefill_layer


@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def chat(request, tiny_models):
    return tiny_models[request.param]


def _hf_layer(chat, layer: int, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    decoder = chat.model.get_decoder()
    cos, sin = decoder.rotary_emb(h, pos)
    # transformers masks are additive or boolean; pass the boolean one the kernel gets
    out = chat.layers[layer](h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


NO_ADDS = ((), (), (), ())  # steering additions at resid_pre, attn_out, mlp_out, resid_post


@pytest.mark.parametrize("fuse", [False, True])
def test_prefill_and_decode_layers_match_the_modules(chat, fuse):
    stack = DecoderStack(chat, fuse=fuse)
    spec = stack.spec
    g = torch.Generator().manual_seed(0)
    b, n, cache = 2, 9, 16
    h = torch.randn(b, n + 1, spec.d_model, generator=g)
    pos = torch.arange(n + 1)[None].expand(b, -1)
    cos_t, sin_t = stack.rope_tables(cache)
    kc = torch.full((b, spec.n_kv_heads, cache, spec.head_dim), 7.0)  # stale values must not leak
    vc = torch.full_like(kc, -3.0)
    causal = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = _hf_layer(chat, 1, h, pos, causal[None, None].expand(b, 1, -1, -1))
        ours = prefill_layer(h[:, :n], stack.layers[1], kc, vc, cos_t[pos[:, :n]], sin_t[pos[:, :n]],
                             causal[None, None, :n, :n].expand(b, 1, -1, -1), NO_ADDS, spec=spec)
        assert (ours - ref[:, :n]).abs().max().item() < 1e-5
        valid = torch.zeros(b, 1, 1, cache, dtype=torch.bool)
        valid[..., : n + 1] = True
        step = decode_layer(h[:, n:], stack.layers[1], kc, vc, cos_t[pos[:, n:]], sin_t[pos[:, n:]], valid,
                            torch.tensor([n]), NO_ADDS, spec=spec)
    assert (step - ref[:, n:]).abs().max().item() < 1e-5
    assert kc[:, :, n + 1:].eq(7.0).all()  # only slot n was written


def test_rope_tables_are_the_rotary_modules_values(chat):
    stack = DecoderStack(chat, fuse=False)
    cos_t, sin_t = stack.rope_tables(64)
    pos = torch.tensor([[0, 5, 63, 17]])
    cos, sin = chat.model.get_decoder().rotary_emb(torch.zeros(1), pos)
    assert torch.equal(cos_t[pos], cos) and torch.equal(sin_t[pos], sin)


def test_weight_bytes_count_layers_norm_and_head_once(chat):
    stack = DecoderStack(chat, fuse=False)
    params = dict(chat.model.named_parameters())
    expected = sum(p.numel() * p.element_size() for name, p in params.items()
                   if ".layers." in name or name.endswith("norm.weight") and ".layers." not in name
                   or name.startswith("lm_head"))
    emb = chat.model.get_input_embeddings().weight
    tied = chat.lm_head.weight is emb
    assert stack.weight_bytes() == expected + (emb.numel() * emb.element_size() if tied else 0)


def test_greedy_over_allowed_ids_picks_the_first_maximum():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 2.0], [3.0, 0.0, 3.0, 1.0, 3.0]])
    assert greedy(logits, None).tolist() == [1, 0]
    assert greedy(logits, torch.tensor([4, 3, 2])).tolist() == [3, 4]


def test_unsupported_decoders_are_refused(tiny_models):
    with pytest.raises(ConfigError, match="gemma"):
        DecoderStack(tiny_models["tiny-gemma"], fuse=False)
