import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.storage import load_tensors
from rdt_interp.tracing import Activations, capture

PROMPTS = ["hi", "How do I bake bread at home?", "Tell me a story about a very brave little toaster.",
           "What is 2+2?", "x"]


def _hf_hidden(m, prompts):
    """Reference: HF hidden_states for each prompt alone (no padding at all)."""
    out = []
    for p in prompts:
        b = m.encode([p])
        with torch.inference_mode():
            hs = m.model(**b.inputs, output_hidden_states=True).hidden_states
        out.append((b, hs))
    return out


@pytest.mark.parametrize("backend", ["nnsight", "hooks"])
def test_capture_matches_hf_hidden_states(tiny, backend):
    acts = capture(tiny, PROMPTS, layers=[0, 2, 3], selector="post_instruction[-2:]", batch_size=2,
                   backend=backend, progress=False)
    assert acts.values.shape == (5, 3, 2, 64) and acts.values.dtype == torch.float32
    for i, (_b, hs) in enumerate(_hf_hidden(tiny, PROMPTS)):
        for j, layer in enumerate([0, 2, 3]):
            ref = hs[layer][0, -2:]  # the last two tokens are post-instruction tokens
            # Padding and batching change matmul blocking only: agreement to float32 rounding.
            assert torch.allclose(acts.values[i, j], ref, atol=2e-5, rtol=1e-4), (i, layer)


def test_resid_post_is_next_resid_pre(tiny):
    pre = capture(tiny, PROMPTS, layers=[1, 2], selector="last", site="resid_pre", progress=False)
    post = capture(tiny, PROMPTS, layers=[1], selector="last", site="resid_post", progress=False)
    assert torch.allclose(post.at(1), pre.at(2), atol=1e-6)


def test_padding_cannot_leak(tiny):
    """The same prompt alone and inside batches of longer and shorter prompts: same vectors."""
    target = "How do I bake bread at home?"
    alone = capture(tiny, [target], selector="post_instruction[-3:]", batch_size=1, progress=False)
    for neighbours in (["x"], ["a much, much longer neighbouring prompt " * 4], ["x", "y" * 90, "zz"]):
        batched = capture(tiny, [*neighbours, target], selector="post_instruction[-3:]",
                          batch_size=8, progress=False)
        # Stated tolerance: 1e-5 absolute (float32 matmuls over different batch shapes).
        assert torch.allclose(batched.values[-1], alone.values[0], atol=1e-5, rtol=0)


def test_transformer_lens_backend_agrees(tiny):
    a = capture(tiny, PROMPTS, layers=[0, 3], selector="post_instruction[-1]", backend="nnsight", progress=False)
    b = capture(tiny, PROMPTS, layers=[0, 3], selector="post_instruction[-1]", backend="transformer_lens",
                progress=False)
    assert torch.allclose(a.values, b.values, atol=1e-5)


def test_mean_pooling_selector(tiny):
    acts = capture(tiny, PROMPTS, layers=[1], selector="mean(instruction)", progress=False)
    assert acts.values.shape == (5, 1, 1, 64)
    b = tiny.encode([PROMPTS[1]])
    with torch.inference_mode():
        hs = tiny.model(**b.inputs, output_hidden_states=True).hidden_states[1][0]
    from rdt_interp.roles import Role
    m = (b.roles[0] & int(Role.INSTRUCTION)) != 0
    assert torch.allclose(acts.values[1, 0, 0], hs[m].mean(0), atol=1e-5)


def test_cache_hits_and_recomputes_corrupted(tiny, tmp_path):
    a = capture(tiny, PROMPTS, layers=[1], batch_size=2, cache=tmp_path, progress=False)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    # Poison one cached file with wrong values but a valid checksum: a hit returns them, proving
    # the cache is read (then restore it).
    tensors, meta = load_tensors(files[0])
    from rdt_interp.storage import save_tensors
    save_tensors(files[0], {"values": tensors["values"] + 1000}, meta)
    b = capture(tiny, PROMPTS, layers=[1], batch_size=2, cache=tmp_path, progress=False)
    assert (b.values - a.values).abs().max() > 100
    # Now corrupt bytes: the checksum catches it and the batch is recomputed.
    raw = bytearray(files[0].read_bytes())
    raw[-4] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    c = capture(tiny, PROMPTS, layers=[1], batch_size=2, cache=tmp_path, progress=False)
    assert torch.allclose(c.values, a.values, atol=1e-6)
    load_tensors(files[0])  # rewritten, valid again


def test_cache_key_depends_on_model(tmp_path):
    from rdt_interp.models import load_chat_model
    m1, m2 = load_chat_model("tiny-qwen2", seed=1), load_chat_model("tiny-qwen2", seed=2)
    a = capture(m1, PROMPTS[:2], layers=[1], cache=tmp_path, progress=False)
    b = capture(m2, PROMPTS[:2], layers=[1], cache=tmp_path, progress=False)
    assert not torch.allclose(a.values, b.values)


def test_activations_save_load(tiny, tmp_path):
    a = capture(tiny, PROMPTS[:2], layers=[0, 1], progress=False)
    a.save(tmp_path / "a.safetensors")
    b = Activations.load(tmp_path / "a.safetensors")
    assert torch.equal(a.values, b.values) and b.layers == (0, 1) and b.texts == a.texts
    assert b.single().shape == (2, 2, 64)


@pytest.mark.parametrize("kw", [dict(layers=[9]), dict(layers=[]), dict(batch_size=0), dict(selector="nope[")])
def test_bad_arguments(tiny, kw):
    with pytest.raises(ConfigError):
        capture(tiny, PROMPTS, progress=False, **kw)


def test_lens_backend_leaves_the_model_untouched(tiny):
    from rdt_interp.models.adapter import get_submodule
    from rdt_interp.tracing.lens import bridge_for

    capture(tiny, PROMPTS[:1], layers=[0], backend="transformer_lens", progress=False)
    assert get_submodule(tiny.model, tiny.layers_path)[0] is tiny.layers[0]
    bridge = bridge_for(tiny)
    ours = {p.data_ptr() for p in tiny.model.parameters()}
    assert {p.data_ptr() for p in bridge.parameters()} <= ours  # weights shared, not copied
