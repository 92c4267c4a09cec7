import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.roles import Role
from rdt_interp.tracing import AddDirection, Recorder, generate

PROMPTS = ["hi", "How do I bake bread at home?", "Tell me a story."]


def test_matches_hf_generate(tiny):
    batch = tiny.encode(PROMPTS)
    ours = generate(tiny, batch, max_new_tokens=6, stop_at_eos=False)
    for i, p in enumerate(PROMPTS):
        b = tiny.encode([p])
        with torch.inference_mode():
            ref = tiny.model.generate(**b.inputs, max_new_tokens=6, do_sample=False,
                                      eos_token_id=None, min_new_tokens=6)
        assert ours.tokens[i].tolist() == ref[0, b.seq_len:].tolist(), p


def test_rows_identical_alone_and_batched(tiny):
    batch = generate(tiny, tiny.encode(PROMPTS), max_new_tokens=5, stop_at_eos=False)
    for i, p in enumerate(PROMPTS):
        alone = generate(tiny, tiny.encode([p]), max_new_tokens=5, stop_at_eos=False)
        assert torch.equal(batch.tokens[i], alone.tokens[0])


def test_decode_phase_edit_only_affects_decode(tiny):
    v = torch.randn(tiny.d_model) * 5
    batch = tiny.encode(PROMPTS)
    base = generate(tiny, batch, max_new_tokens=4, stop_at_eos=False, return_logits=True)
    dec = generate(tiny, batch, max_new_tokens=4, stop_at_eos=False, return_logits=True,
                   interventions=[AddDirection(v, 1.0, [0], roles=Role.GENERATED, phase="decode")])
    # The first new token comes from the prefill: unchanged; later logits change.
    assert torch.equal(base.logits[:, 0], dec.logits[:, 0])
    assert not torch.allclose(base.logits[:, 1:], dec.logits[:, 1:])


def test_recorder_captures_prefill_and_every_decode_step(tiny):
    batch = tiny.encode(PROMPTS)
    rec = Recorder([1, 3], "resid_pre", selector="last", phases=("prefill", "decode"))
    g = generate(tiny, batch, max_new_tokens=4, recorders=[rec], stop_at_eos=False)
    assert rec.prefill_tensor().shape == (3, 2, 1, 64)
    assert rec.decode_tensor().shape == (3, 2, 3, 64)  # 4 tokens -> 3 fed-back steps
    # A decode-step residual equals the same position in a full forward over prompt + tokens.
    full_ids = torch.cat([batch.inputs["input_ids"], g.tokens[:, :2]], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        hs = tiny.model(input_ids=full_ids, attention_mask=mask, position_ids=pos,
                        output_hidden_states=True).hidden_states
    assert torch.allclose(rec.decode_tensor()[:, 0, 1], hs[1][:, -1], atol=1e-5)


def test_eos_stops_rows(tiny):
    g = generate(tiny, tiny.encode(PROMPTS), max_new_tokens=3, allowed_token_ids=torch.tensor([tiny.eos_token_id]))
    assert g.finished.all() and g.tokens.shape[1] == 1


def test_needs_left_padding(tiny):
    with pytest.raises(ConfigError, match="left"):
        generate(tiny, tiny.encode(PROMPTS, padding_side="right"), max_new_tokens=2)


def test_decode_steps_on_cuda_keep_cudnn_attention_out_and_restore_the_flags():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rdt_interp.tracing.runner import repeatable_decode_attention

    cuda = torch.backends.cuda
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        with repeatable_decode_attention(torch.device("cuda")):
            assert not cuda.cudnn_sdp_enabled()
            assert cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
            assert not cuda.flash_sdp_enabled()  # a backend the caller turned off stays off
        assert cuda.cudnn_sdp_enabled() and not cuda.flash_sdp_enabled()
        with repeatable_decode_attention(torch.device("cpu")):  # CPU: nothing changes
            assert cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_every_decode_forward_and_no_prefill_runs_under_repeatable_attention(tiny, backend, monkeypatch):
    import contextlib

    from rdt_interp.tracing import runner

    entered: list[str] = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(device.type)
        yield

    monkeypatch.setattr(runner, "repeatable_decode_attention", spy)
    generate(tiny, tiny.encode(PROMPTS), max_new_tokens=4, stop_at_eos=False, backend=backend)
    assert entered == [tiny.device.type] * 3  # the 3 decode steps after the prefill
