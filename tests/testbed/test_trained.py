"""The committed testbed VLA: offline Qwen2.5-Coder-0.5B-Instruct + the trained delta."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from rdt_interp.models.offline import QWEN25_CODER_05B
from rdt_interp.roles import Role
from rdt_interp.storage import read_json
from rdt_interp.testbed.adapter import (
    DATA_DIR,
    DELTA_FILE,
    MANIFEST_FILE,
    UNNORM_KEY,
    load_testbed_vla,
)
from rdt_interp.testbed.artifacts import EXPECTED_FILE, expected_requests

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def vla():
    return load_testbed_vla()


def test_the_committed_delta_is_small_and_names_its_base() -> None:
    manifest = read_json(DATA_DIR / MANIFEST_FILE)
    size = (DATA_DIR / DELTA_FILE).stat().st_size
    assert size == manifest["delta"]["bytes"] <= 20 * 1024 * 1024
    assert manifest["delta"]["storage_dtype"] == "float16"
    assert manifest["base"]["gguf_sha256"] == QWEN25_CODER_05B.sha256


def test_stored_predictions_are_reproduced(vla) -> None:
    expected = read_json(DATA_DIR / EXPECTED_FILE)["samples"]
    reqs, meta = expected_requests(len(expected), vla.image_size)
    for m, e in zip(meta, expected, strict=True):
        assert (m["episode"], m["step"], m["instruction"]) == (e["episode"], e["step"], e["instruction"])
        assert m["image_sha256"] == e["image_sha256"]  # the renderer still draws the same scene
    pred = vla.predict_actions(reqs, unnorm_key=UNNORM_KEY, return_logits=True)
    top2 = pred.action_logits.topk(2, dim=-1).indices
    ids = vla.action_tokenizer.token_ids
    for k, e in enumerate(expected):
        for d, (got, want, margin) in enumerate(zip(pred.token_ids[k].tolist(), e["token_ids"], e["top1_margin"],
                                                   strict=True)):
            if margin > 1e-3:
                assert got == want, (e["instruction"], d)
            else:  # a near-tie may go either way with another BLAS thread count
                assert want in ids[top2[k, d]].tolist(), (e["instruction"], d)
    assert bool(vla.action_tokenizer.is_action_token(pred.token_ids).all())


def test_prompt_roles_and_action_rows_on_the_real_tokenizer(vla) -> None:
    ins = "put the sponge in the blue bowl"
    ids, roles = vla.tokenize(ins)
    tok = vla.tokenizer
    span = lambda role: tok.decode([i for i, r in zip(ids, roles, strict=True) if r & role])  # noqa: E731
    assert span(Role.INSTRUCTION).strip() == ins
    assert span(Role.TEMPLATE) == "<|endoftext|>In: What action should the robot take to"
    assert span(Role.POST_INSTRUCTION) == "?\nOut: "
    action_ids = vla.action_tokenizer.token_ids.tolist()
    assert action_ids[-1] == 151935 and action_ids[0] == 151680
    assert all(tok.convert_ids_to_tokens(i).startswith("[PAD") for i in action_ids)
    # merged: the backbone is a plain Qwen2 whose action rows were trained (they differ from the
    # identical placeholder rows of the base model)
    rows = vla.lm_head.weight[action_ids]
    assert rows.std(dim=0).mean() > 1e-4 and vla.n_layers == 24 and vla.d_model == 896
    assert not vla.random_weights and not torch.isnan(rows).any()


def test_images_matter_to_the_trained_model(vla) -> None:
    reqs, _ = expected_requests(2, vla.image_size)
    a = vla.predict_actions(reqs[:1], return_logits=True)
    other = type(reqs[0])(reqs[0].instruction, reqs[1].image)
    b = vla.predict_actions([other], return_logits=True)
    assert (a.action_logits - b.action_logits).abs().max().item() > 1e-2
    assert hashlib.sha256(np.asarray(reqs[0].image).tobytes()).hexdigest() != hashlib.sha256(
        np.asarray(reqs[1].image).tobytes()).hexdigest()
