"""The adapter interface: a batch remembers which tokenizer encoded it, and runs refuse others."""

import dataclasses

import pytest
import torch

from rdt_interp.errors import TokenizerMismatchError
from rdt_interp.models import load_chat_model
from rdt_interp.tracing import TraceSession, generate

PROMPTS = ["How do I bake bread?", "hi"]


@pytest.fixture(scope="module")
def llama():
    return load_chat_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def qwen():
    return load_chat_model("tiny-qwen2", seed=0)


def test_encode_stamps_the_tokenizer(llama, qwen):
    batch = llama.encode(PROMPTS)
    assert batch.tokenizer_id == llama.tokenizer_id() is not None
    assert qwen.tokenizer_id() != llama.tokenizer_id()
    assert batch.to("cpu").tokenizer_id == batch.tokenizer_id  # kept when moved
    # same tokenizer, other weights: fine
    other = load_chat_model("tiny-llama", seed=1)
    generate(other, batch, max_new_tokens=1)


def test_a_batch_of_another_tokenizer_is_refused(llama, qwen):
    batch = llama.encode(PROMPTS)
    with pytest.raises(TokenizerMismatchError, match="another tokenizer") as err:
        generate(qwen, batch, max_new_tokens=2)
    assert "tiny-qwen2" in str(err.value) and "adapter.encode" in str(err.value)
    with pytest.raises(TokenizerMismatchError), TraceSession(qwen).trace(batch):
        pass


def test_token_ids_past_the_embedding_table_are_refused(llama):
    batch = llama.encode(PROMPTS)
    ids = batch.inputs["input_ids"].clone()
    ids[0, -1] = llama.model.get_input_embeddings().num_embeddings + 5
    unknown = dataclasses.replace(batch, inputs={**batch.inputs, "input_ids": ids}, tokenizer_id=None)
    with pytest.raises(TokenizerMismatchError, match="token id"):
        generate(llama, unknown, max_new_tokens=1)
    assert torch.equal(llama.check_batch(batch).inputs["input_ids"], batch.inputs["input_ids"])
