"""Batched greedy action prediction: every padded row gets what it gets alone, both backends."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.models.vla import VLARequest
from rdt_interp.roles import Role
from rdt_interp.tracing.interventions import AddDirection

from .conftest import instructions, random_images

N_DISTINCT = 8
BATCH = 32
LOGIT_TOL = 1e-4


def padded_batch() -> list[VLARequest]:
    """32 rows: 8 instructions of different lengths (1 .. 26 words) x their images, 4 copies each
    at scattered batch positions, so rows see different amounts of padding and batch neighbours."""
    distinct = [VLARequest(ins, img) for ins, img in
                zip(instructions(N_DISTINCT), random_images(N_DISTINCT, seed=3), strict=True)]
    return [distinct[(5 * i) % N_DISTINCT] for i in range(BATCH)]


@pytest.mark.parametrize("model", ["tiny_vla", "midsize_vla"])
def test_batch_of_32_rows_equal_their_single_runs(model, request):
    vla = request.getfixturevalue(model)
    vla.constrain_actions = model == "midsize_vla"  # cover both decoding modes
    try:
        reqs = padded_batch()
        batch = vla.encode(reqs)
        lengths = batch.attention_mask.sum(dim=1)
        assert len(set(lengths.tolist())) == N_DISTINCT  # really padded
        pred = vla.predict_actions(reqs, unnorm_key="bridge_orig", return_logits=True)
        alone = {id(r): vla.predict_actions([r], unnorm_key="bridge_orig", return_logits=True)
                 for r in reqs[:N_DISTINCT]}
        for row, r in enumerate(reqs):
            one = alone[id(r)]
            assert pred.token_ids[row].tolist() == one.token_ids[0].tolist(), row
            assert torch.equal(pred.actions[row], one.actions[0])
            assert (pred.action_logits[row] - one.action_logits[0]).abs().max().item() <= LOGIT_TOL
    finally:
        vla.constrain_actions = False


def test_constrained_decoding_picks_the_best_action_token(tiny_vla):
    reqs = padded_batch()[:4]
    tiny_vla.constrain_actions = True
    try:
        pred = tiny_vla.predict_actions(reqs, return_logits=True)
    finally:
        tiny_vla.constrain_actions = False
    tok = tiny_vla.action_tokenizer
    assert bool(tok.is_action_token(pred.token_ids).all())
    best = tok.token_ids[pred.action_logits.argmax(dim=-1)]
    assert torch.equal(pred.token_ids, best)


def test_the_image_changes_the_action_logits(tiny_vla):
    # openvla#346: on transformers >= 4.50 the public code silently ignored the image
    ins = "pick up the red cup"
    img_a, img_b = random_images(2, seed=11)
    a = tiny_vla.predict_actions([VLARequest(ins, img_a)], return_logits=True)
    a2 = tiny_vla.predict_actions([VLARequest(ins, img_a.copy())], return_logits=True)
    b = tiny_vla.predict_actions([VLARequest(ins, img_b)], return_logits=True)
    assert torch.equal(a.action_logits, a2.action_logits)
    assert (a.action_logits - b.action_logits).abs().max().item() > 1e-3
    # and so do the patch positions of the prefill: blank them and the logits move too
    batch = tiny_vla.encode([VLARequest(ins, img_a)])
    with torch.inference_mode():
        full = tiny_vla.model(**batch.inputs).logits[:, -1]
        mask = batch.inputs["attention_mask"]
        text_only = tiny_vla.model(input_ids=batch.inputs["input_ids"], attention_mask=mask).logits[:, -1]
    assert (full - text_only).abs().max().item() > 1e-3


def test_nnsight_and_hooks_give_identical_tokens(tiny_vla):
    reqs = padded_batch()[:6]
    hooks = tiny_vla.predict_actions(reqs, backend="hooks", return_logits=True)
    nns = tiny_vla.predict_actions(reqs, backend="nnsight", return_logits=True)
    assert torch.equal(hooks.token_ids, nns.token_ids)
    assert torch.equal(hooks.action_logits, nns.action_logits)


def test_interventions_by_role_agree_across_backends(tiny_vla):
    # RDT-style: add a direction at action positions while decoding (roles over text + patches)
    reqs = padded_batch()[:4]
    direction = torch.randn(tiny_vla.d_model, generator=torch.Generator().manual_seed(0))
    iv = [AddDirection(direction, 8.0, layers=[1, 2], roles=Role.ACTION, phase="decode"),
          AddDirection(direction, 2.0, layers=[1], roles=Role.IMAGE, phase="prefill")]
    base = tiny_vla.predict_actions(reqs, return_logits=True)
    hooks = tiny_vla.predict_actions(reqs, interventions=iv, backend="hooks", return_logits=True)
    nns = tiny_vla.predict_actions(reqs, interventions=iv, backend="nnsight", return_logits=True)
    assert torch.equal(hooks.token_ids, nns.token_ids)
    assert (hooks.action_logits - nns.action_logits).abs().max().item() <= 1e-5
    assert (hooks.action_logits - base.action_logits).abs().max().item() > 1e-3
