import pytest
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.models import ChatModel
from rdt_interp.models.tiny import build_tiny
from rdt_interp.roles import Role


def _decoded_roles(m, text):
    ids, roles = m.tokenize_with_roles(text)
    return [(m.tokenizer.decode([i]), r) for i, r in zip(ids, roles, strict=True)]


def test_roles_cover_instruction_exactly(tiny):
    pairs = _decoded_roles(tiny, "How do I bake bread?")
    instr = "".join(t for t, r in pairs if r & Role.INSTRUCTION)
    assert instr.strip() == "How do I bake bread?"
    assert all(r & Role.TEXT for _, r in pairs)
    # post-instruction tokens come last and reach the end of the prompt
    flags = [bool(r & Role.POST_INSTRUCTION) for _, r in pairs]
    first = flags.index(True)
    assert all(flags[first:]) and not any(flags[:first])


def test_roles_with_system_prompt():
    model, tok = build_tiny("tiny-llama")
    m = ChatModel(model, tok, name="t", system_prompt="Be nice.")
    text, a, b = m.render("Bake bread")
    assert "Be nice." in text and text[a:b] == "Bake bread"
    pairs = _decoded_roles(m, "Bake bread")
    assert "".join(t for t, r in pairs if r & Role.INSTRUCTION) == "Bake bread"


def test_template_that_trims_content():
    model, tok = build_tiny("tiny-llama")  # the Llama-2 template trims the user message
    m = ChatModel(model, tok, name="t")
    pairs = _decoded_roles(m, "  padded instruction  ")
    assert "".join(t for t, r in pairs if r & Role.INSTRUCTION) == "padded instruction"


def test_encode_left_padding_and_positions(tiny):
    b = tiny.encode(["hi", "a longer instruction here"])
    mask = b.attention_mask
    assert mask[0, 0] == 0 and mask[1, 0] == 1
    assert torch.equal(b.position_ids[0][mask[0] == 1], torch.arange(int(mask[0].sum())))
    assert bool(((b.roles & int(Role.PAD)) != 0).eq(mask == 0).all())
    r = tiny.encode(["hi", "a longer instruction here"], padding_side="right")
    assert r.attention_mask[0, -1] == 0


def test_no_chat_template_is_a_clear_error():
    model, tok = build_tiny("tiny-llama")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat_template"):
        ChatModel(model, tok)


def test_structure(tiny):
    assert tiny.n_layers == 4 and tiny.d_model == 64
    assert len(tiny.layers) == 4
    assert tiny.final_norm is not None and tiny.lm_head.weight.shape[1] == 64
    d = tiny.describe()
    assert d["random_weights"] is True and len(d["digest"]) == 64


@pytest.mark.parametrize("text", ["How do I bake {{ bread }}?", "  padded  ", "a\nb", "x & <y> 'z'"])
def test_fast_render_equals_the_template(tiny, text):
    rendered, a, b = tiny.render(text)
    ref = tiny.tokenizer.apply_chat_template(tiny._messages(text), tokenize=False, add_generation_prompt=True)
    assert rendered == ref
    assert rendered[a:b].strip() == text.strip()
