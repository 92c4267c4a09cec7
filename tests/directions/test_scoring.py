import torch

from rdt_interp.directions.scoring import PromptBatch, kl_divergence, last_logprobs, refusal_score
from rdt_interp.tracing import AblateDirection, AddDirection

PROMPTS = ["hi", "How do I bake bread at home?", "Tell me a story about a brave toaster.", "x y"]


def _full_forward(m, prompts, ivs):
    from rdt_interp.tracing import HookRunner, StepContext
    b = m.encode(prompts)
    with HookRunner(m, ivs) as r:
        out = r.forward(m.prefill_kwargs(b, use_cache=False), StepContext("prefill", b.roles))
    return torch.log_softmax(out.logits[:, -1].float(), -1)


def test_shared_prefix_equals_full_forward(tiny):
    r = torch.randn(tiny.d_model)
    batch = PromptBatch.build(tiny, PROMPTS)
    assert batch.prefix_len > 0
    for ivs in ([], [AblateDirection(r)], [AddDirection(r, 2.0, 1)]):
        ours = last_logprobs(tiny, batch, ivs, batch_size=3)
        ref = _full_forward(tiny, PROMPTS, ivs)
        assert torch.allclose(ours, ref, atol=1e-5), ivs


def test_refusal_score_and_kl():
    lp = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]), -1)
    s = refusal_score(lp, [0])
    p0 = lp[0, 0].exp()
    assert torch.allclose(s[0], torch.log(p0 / (1 - p0)), atol=1e-5) and s[1] < 0
    assert torch.allclose(kl_divergence(lp, lp), torch.zeros(2), atol=1e-7)
    assert (kl_divergence(lp, lp.flip(0)) > 0).all()
