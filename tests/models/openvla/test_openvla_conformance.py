"""Conformance with the public OpenVLA code (transformers 4.40.1 + timm 0.9.16) on the tiny fixture.

The fixture holds the reference's outputs for one prompt and image in fp32 on CPU. This
implementation reproduces them bit for bit here (max abs error 0.0); the bounds below leave
room for other CPUs' kernels while still catching real deviations (e.g. the tanh-approximate
GELU in the ViTs changes the vision features by ~4e-6, a missing rotary or norm detail by >1e-2).
"""

from __future__ import annotations

import pytest
import torch

from rdt_interp.models.openvla import OpenVLAAdapter
from rdt_interp.tracing.generation import generate

LOGIT_TOL = 1e-4  # the brief's bound for logits and hidden states
VISION_TOL = 1e-6  # tight enough to tell exact from tanh-approximate GELU


@pytest.fixture(scope="module")
def reference_forward(tiny_vla: OpenVLAAdapter, expected):
    with torch.inference_mode():
        return tiny_vla.model(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"],
                              output_hidden_states=True)


def test_vision_patches_match_reference(tiny_vla, expected):
    with torch.inference_mode():
        patches, projected = tiny_vla.model.image_features(expected["pixel_values"])
    assert patches.shape == expected["vision_patches"].shape == (1, 256, 88)
    assert (patches - expected["vision_patches"]).abs().max().item() <= VISION_TOL
    assert (projected - expected["projected_patches"]).abs().max().item() <= VISION_TOL


def test_logits_match_reference(reference_forward, expected):
    logits = reference_forward.logits
    assert logits.shape == expected["logits"].shape == (1, 12 + 256, 1064)
    assert (logits - expected["logits"]).abs().max().item() <= LOGIT_TOL


def test_every_hidden_state_matches_reference(reference_forward, expected):
    hs = torch.stack(reference_forward.hidden_states)
    assert hs.shape == expected["hidden_states"].shape  # embeddings + 4 layers (last one normed)
    err = (hs - expected["hidden_states"]).abs().amax(dim=(1, 2, 3))
    assert err.max().item() <= LOGIT_TOL, err.tolist()


def test_projected_patches_follow_bos(reference_forward, tiny_vla, expected):
    # the reference inserts the projected patches right after BOS: the embeddings say so
    h0 = reference_forward.hidden_states[0][0]
    emb = tiny_vla.model.get_input_embeddings().weight
    ids = expected["input_ids"][0]
    assert torch.equal(h0[0], emb[ids[0]])
    assert torch.equal(h0[1:257], reference_forward.projected_patches[0])
    assert torch.equal(h0[257:], emb[ids[1:]])


@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_greedy_action_tokens_and_actions_match_exactly(tiny_vla, expected, backend):
    batch = tiny_vla.encode_tokens(expected["input_ids"], expected["pixel_values"])
    gen = generate(tiny_vla, batch, max_new_tokens=7, stop_at_eos=False, backend=backend)
    assert gen.tokens[0].tolist() == expected["generated_ids"].tolist()
    actions = tiny_vla.action_tokenizer.decode(gen.tokens[0], "bridge_orig")
    assert actions.dtype == expected["actions"].dtype == torch.float64
    assert torch.equal(actions, expected["actions"])


def test_reference_forward_is_what_generation_prefills(tiny_vla, expected, reference_forward):
    # the adapter's batch route (positions over text + patches) gives the same logits
    batch = tiny_vla.encode_tokens(expected["input_ids"], expected["pixel_values"])
    assert batch.seq_len == expected["logits"].shape[1]
    with torch.inference_mode():
        out = tiny_vla.model(**tiny_vla.prefill_kwargs(batch, use_cache=False))
    assert torch.equal(out.logits, reference_forward.logits)
