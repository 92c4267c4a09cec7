"""OpenVLA prompt text, the appended empty token, and token roles over decoder positions."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rdt_interp.errors import ConfigError
from rdt_interp.models.openvla import OpenVLAPrompt, empty_token_id
from rdt_interp.models.vla import VLARequest
from rdt_interp.roles import Role, Selector

from .conftest import random_images

BOS = int(Role.BOS | Role.TEXT | Role.TEMPLATE)
TEMPLATE = int(Role.TEXT | Role.TEMPLATE)
INSTRUCTION = int(Role.TEXT | Role.INSTRUCTION)
POST = int(Role.TEXT | Role.POST_INSTRUCTION)


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with SentencePiece's "▁" word boundaries, like Llama-2's."""
    pieces = ["<unk>", "<s>", "</s>", "▁", "▁In", ":", "▁What", "▁action", "▁should", "▁the", "▁robot",
              "▁take", "▁to", "▁pick", "▁up", "▁cup", "?", "\n", "Out"]
    tk = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(),
        pre_tokenizers.Split(Regex(r"[?:\n]"), behavior="isolated"),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_prompt_text_is_the_reference_template():
    text, start, end = OpenVLAPrompt.render("Pick up the Red Cup")
    assert text == "In: What action should the robot take to pick up the red cup?\nOut:"
    assert text[start:end] == "pick up the red cup"


def test_empty_token_is_derived_from_the_tokenizer(byte_tok):
    # SentencePiece vocabularies: the bare "▁" piece (29871 for Llama-2)
    sp = sentencepiece_like_tokenizer()
    assert empty_token_id(sp) == sp.convert_tokens_to_ids("▁") == 3
    # byte-level BPE has no "▁": the token a trailing space adds
    tid = empty_token_id(byte_tok)
    assert byte_tok.decode([tid]) == " "


def test_tokens_and_roles_of_one_prompt(byte_tok):
    prompt = OpenVLAPrompt.for_tokenizer(byte_tok)
    ids, roles = prompt.tokenize("Pick up the cup")
    assert ids[0] == byte_tok.bos_token_id and roles[0] == BOS
    assert ids[-1] == prompt.empty_token_id and roles[-1] == POST
    text = lambda role: byte_tok.decode([i for i, r in zip(ids, roles, strict=True) if r == role])  # noqa: E731
    assert text(TEMPLATE) == "In: What action should the robot take to "
    assert text(INSTRUCTION) == "pick up the cup"
    assert text(POST) == "?\nOut: "
    # roles are contiguous: template, instruction, post-instruction
    assert roles == sorted(roles, key=[BOS, TEMPLATE, INSTRUCTION, POST].index)


def test_sentencepiece_roles_split_at_word_boundaries():
    prompt = OpenVLAPrompt.for_tokenizer(sentencepiece_like_tokenizer())
    ids, roles = prompt.tokenize("pick up cup")
    tok = prompt.tokenizer
    pieces = tok.convert_ids_to_tokens(ids)
    assert "<unk>" not in pieces
    by_role = {r: [p for p, rr in zip(pieces, roles, strict=True) if rr == r] for r in set(roles)}
    assert by_role[BOS] == ["<s>"]
    assert by_role[TEMPLATE] == ["▁In", ":", "▁What", "▁action", "▁should", "▁the", "▁robot", "▁take", "▁to"]
    assert by_role[INSTRUCTION] == ["▁pick", "▁up", "▁cup"]
    # "Out:" then the appended empty token, as Llama-2's [..., 29901, 29871]
    assert by_role[POST] == ["?", "\n", "Out", ":", "▁"]


def test_batch_roles_mask_and_positions_over_text_and_patches(tiny_vla):
    reqs = [VLARequest(ins, img) for ins, img in
            zip(["Pick up the cup", "put the red block in the bowl"], random_images(2, 0), strict=True)]
    batch = tiny_vla.encode(reqs)
    singles = [tiny_vla.prompt.tokenize(r.instruction) for r in reqs]
    n_text = [len(s[0]) for s in singles]
    assert batch.seq_len == max(n_text) + 256
    assert batch.inputs["input_ids"].shape == (2, max(n_text))
    assert batch.inputs["pixel_values"].shape == (2, 6, 224, 224)
    for row, (ids, roles) in enumerate(singles):
        pads = batch.seq_len - len(ids) - 256
        got = batch.roles[row].tolist()
        assert got[:pads] == [int(Role.PAD)] * pads  # left padding goes before BOS
        assert got[pads] == BOS
        assert got[pads + 1: pads + 257] == [int(Role.IMAGE)] * 256  # patches right after BOS
        assert got[pads + 257:] == roles[1:]
        mask = batch.attention_mask[row]
        assert mask[:pads].sum() == 0 and bool(mask[pads:].all())
        assert batch.position_ids[row, pads:].tolist() == list(range(len(ids) + 256))
    # selectors see the same positions in every row whatever the padding
    idx, _ = Selector.parse("post_instruction[-1]").resolve(batch.roles)
    assert idx[:, 0].tolist() == [batch.seq_len - 1] * 2
    idx, _ = Selector.parse("image").resolve(batch.roles)
    assert idx.shape == (2, 256)


def test_right_padding_puts_patches_after_bos_too(tiny_vla):
    reqs = [VLARequest(ins, img) for ins, img in zip(["a", "pick up the cup"], random_images(2, 1), strict=True)]
    left, right = tiny_vla.encode(reqs), tiny_vla.encode(reqs, padding_side="right")
    for row in range(2):
        real_l = left.roles[row][left.attention_mask[row].bool()]
        real_r = right.roles[row][right.attention_mask[row].bool()]
        assert torch.equal(real_l, real_r)
        assert int(right.roles[row, 0]) == BOS


def test_encode_without_tokenizer_says_how_to_fix(tiny_vla):
    from rdt_interp.models.openvla import OpenVLAAdapter

    bare = OpenVLAAdapter(tiny_vla.model)
    with pytest.raises(ConfigError, match="tokenizer="):
        bare.encode([VLARequest("pick", random_images(1, 0)[0])])
    with pytest.raises(ConfigError, match="VLARequest"):
        tiny_vla.encode(["just a string"])
