"""Architecture adapters: each supported family maps onto the canonical components; an unknown
class is an error that says how to add one."""

import pytest
import torch
import transformers
from torch import nn

from rdt_interp.errors import ConfigError, RdtError, UnsupportedArchitectureError
from rdt_interp.models import load_chat_model
from rdt_interp.models.architectures import (
    ARCHITECTURES,
    DecoderArchitecture,
    architecture_of,
    model_components,
    register_architecture,
)

from ..vla_adapters import FAMILIES
from ..vla_adapters import get as get_vla

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _tiny_hf(config_cls: str, model_cls: str, **extra) -> nn.Module:
    cfg = getattr(transformers, config_cls)(**SMALL, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(cfg).eval()


HF_CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
}


def _check_hf_layout(model: nn.Module, parts) -> None:
    assert parts.embed is model.get_input_embeddings()
    assert parts.lm_head is model.get_output_embeddings()
    assert parts.layers is model.model.layers and parts.n_layers == model.config.num_hidden_layers
    assert parts.final_norm is model.model.norm


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_each_hf_family_maps_onto_the_canonical_components(case):
    config_cls, model_cls, extra = HF_CASES[case]
    model = _tiny_hf(config_cls, model_cls, **extra)
    parts = model_components(model, n_layers=2)
    assert parts.architecture.name == {"gemma2": "gemma", "gemma3": "gemma"}.get(case, case)
    assert parts.paths.layers == "model.layers"
    _check_hf_layout(model, parts)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma"])
def test_chat_models_expose_the_components(name):
    adapter = load_chat_model(name, seed=0)
    parts = adapter.components
    _check_hf_layout(adapter.model, parts)
    assert adapter.layers is parts.layers and adapter.layers_path == "model.layers"
    assert adapter.final_norm is parts.final_norm and adapter.lm_head is parts.lm_head
    assert adapter.embed is parts.embed


@pytest.mark.parametrize("name", FAMILIES)
def test_vla_families_resolve_through_their_backbone(name):
    adapter = get_vla(name)
    parts = adapter.components
    lm = adapter.model.language_model
    assert parts.architecture.name == {"testbed-qwen2": "testbed-vla"}.get(name, "openvla")
    assert parts.paths.layers == "language_model.model.layers"
    assert parts.paths.final_norm == "language_model.model.norm"
    assert parts.paths.lm_head == "language_model.lm_head"
    assert parts.paths.embed == "language_model.model.embed_tokens"
    _check_hf_layout(lm, parts)
    assert adapter.layers is lm.model.layers and adapter.embed is lm.get_input_embeddings()


def test_an_unknown_architecture_says_how_to_add_one():
    class MyNewForCausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(UnsupportedArchitectureError) as err:
        model_components(MyNewForCausalLM())
    msg = str(err.value)
    assert isinstance(err.value, RdtError)
    assert "MyNewForCausalLM" in msg and "LlamaForCausalLM" in msg  # the class, and what is supported
    assert "rdt_interp/models/architectures.py" in msg and "register_architecture" in msg
    assert "DecoderArchitecture('<family>', ('MyNewForCausalLM',)" in msg


def test_a_gpt2_is_not_guessed():
    # GPT-2 has a ModuleList of n blocks (``transformer.h``) but no adapter: no heuristic match.
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        model_components(transformers.GPT2LMHeadModel(cfg))


def test_registering_an_adapter_makes_the_class_supported(monkeypatch):
    monkeypatch.setattr("rdt_interp.models.architectures.ARCHITECTURES", dict(ARCHITECTURES))
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    register_architecture(DecoderArchitecture("gpt2", ("GPT2LMHeadModel",), embed="transformer.wte",
                                              layers="transformer.h", final_norm="transformer.ln_f"))
    parts = model_components(model, n_layers=2)
    assert parts.layers is model.transformer.h and parts.final_norm is model.transformer.ln_f
    with pytest.raises(ConfigError, match="already has"):
        register_architecture(DecoderArchitecture("other", ("GPT2LMHeadModel",)))


def test_a_wrong_path_or_layer_count_is_an_error(monkeypatch):
    model = _tiny_hf("LlamaConfig", "LlamaForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match="holds 2 layers, its config declares 3"):
        model_components(model, n_layers=3)
    monkeypatch.setitem(ARCHITECTURES, "LlamaForCausalLM",
                        DecoderArchitecture("llama", ("LlamaForCausalLM",), final_norm="model.ln_f"))
    with pytest.raises(UnsupportedArchitectureError, match="no 'model.ln_f'"):
        model_components(model)
    monkeypatch.setitem(ARCHITECTURES, "LlamaForCausalLM",
                        DecoderArchitecture("llama", ("LlamaForCausalLM",), layers="model.norm"))
    with pytest.raises(UnsupportedArchitectureError, match="not the ModuleList"):
        model_components(model)


def test_subclasses_use_their_base_class_entry():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(transformers.LlamaConfig(**SMALL))
    assert architecture_of(model).name == "llama"


def test_components_follow_a_replaced_module():
    adapter = load_chat_model("tiny-llama", seed=0)
    old_head = adapter.lm_head
    adapter.model.resize_token_embeddings(len(adapter.tokenizer) + 8)  # replaces embedding and head
    assert adapter.lm_head is adapter.model.get_output_embeddings() and adapter.lm_head is not old_head
    assert adapter.embed is adapter.model.get_input_embeddings()
    assert adapter.embed.num_embeddings == len(adapter.tokenizer) + 8


def test_a_chat_model_of_an_unknown_architecture_is_refused_at_construction():
    from rdt_interp.models import ChatModel
    from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer

    tok = byte_tokenizer(TINY_SPECS["tiny-llama"])
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=32)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as err:
        ChatModel(transformers.GPT2LMHeadModel(cfg), tok, name="gpt2-toy")
    assert "register_architecture" in err.value.one_line()
