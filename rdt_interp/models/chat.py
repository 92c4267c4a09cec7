"""The generic chat-LM adapter: prompts from the tokenizer's own chat template, with roles.

Roles come from character offsets: the rendered prompt is split into the text before the
user's instruction (``TEMPLATE``), the instruction (``INSTRUCTION``) and what follows up to the
start of the reply (``POST_INSTRUCTION`` — where Arditi et al. read the refusal direction).
Every prompt token also carries ``TEXT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import (
    EncodedBatch,
    ModelAdapter,
    PaddingSide,
    pad_sequences,
    position_ids_from_mask,
)
from rdt_interp.models.architectures import model_components
from rdt_interp.roles import Role

_SENTINEL = "\u2063RDT_INSTRUCTION\u2063"


class ChatModel(ModelAdapter):
    """A Hugging Face causal LM plus its tokenizer, addressed through the adapter interface."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str = "chat-model",
        system_prompt: str | None = None,
        chat_template: str | None = None,
        random_weights: bool = False,
        template_name: str = "model",
        refusal_phrases: Sequence[str] = ("I'm sorry", "I cannot", "I can't", "As an", "Sorry", "I apologize"),
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.system_prompt = system_prompt
        self.random_weights = random_weights
        # which prompt format renders the prompts: "reference" (Arditi et al.'s) or "model"
        self.template_name = template_name
        self.refusal_phrases = tuple(refusal_phrases)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"tokenizer of {name} has no chat template",
                fix="pass chat_template=... (a Jinja template) or use a chat/instruct checkpoint",
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"tokenizer of {name} is not a fast tokenizer (no offsets)",
                              fix="load it with use_fast=True")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        n = model.config.get_text_config().num_hidden_layers
        self.components = model_components(model, n_layers=n)

    # -- structure -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.components.layers

    @property
    def layers_path(self) -> str:
        return self.components.paths.layers

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def embed(self) -> nn.Module:
        return self.components.embed

    @property
    def final_norm(self) -> nn.Module:
        return self.components.final_norm

    @property
    def lm_head(self) -> nn.Module:
        return self.components.lm_head

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # -- prompts -----------------------------------------------------------------------------------
    def _messages(self, instruction: str) -> list[dict[str, str]]:
        msgs = []
        if self.system_prompt is not None:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": instruction})
        return msgs

    @cached_property
    def _template_parts(self) -> tuple[str, str]:
        """The rendered prompt before and after the instruction (template applied once)."""
        text = self.tokenizer.apply_chat_template(
            self._messages(_SENTINEL), tokenize=False, add_generation_prompt=True
        )
        if text.count(_SENTINEL) != 1:
            raise ConfigError(f"chat template of {self.name} does not render the user message once")
        before, after = text.split(_SENTINEL)
        return before, after

    @cached_property
    def _verbatim(self) -> tuple[bool, bool]:
        """Whether the template inserts the user's text unchanged: (always, when it has no
        surrounding whitespace). Then prompts are built without a per-prompt Jinja render."""
        before, after = self._template_parts

        def unchanged(probe: str) -> bool:
            text = self.tokenizer.apply_chat_template(self._messages(probe), tokenize=False,
                                                      add_generation_prompt=True)
            return text == before + probe + after

        core = "Probe: <text> & 'quotes', \"double\"\nsecond line {{ x }} {% raw %}!"
        return unchanged(f"  {core}  "), unchanged(core)

    def render(self, instruction: str) -> tuple[str, int, int]:
        """Prompt text and the character span ``[start, end)`` of the instruction in it."""
        before, after = self._template_parts
        always, stripped = self._verbatim
        if always or (stripped and instruction == instruction.strip()):
            return before + instruction + after, len(before), len(before) + len(instruction)
        text = self.tokenizer.apply_chat_template(
            self._messages(instruction), tokenize=False, add_generation_prompt=True
        )
        start = len(before)
        end = len(text) - len(after)
        if not (text.startswith(before) and text.endswith(after)) or end < start:
            # Templates that transform the content (e.g. ``| trim``): locate it instead.
            stripped = instruction.strip()
            start = text.find(stripped, len(before) - 1 if before else 0)
            if start < 0:
                raise ConfigError(f"cannot find the instruction in the rendered prompt: {instruction!r}")
            end = start + len(stripped)
        return text, start, end

    def tokenize_with_roles(self, instruction: str) -> tuple[list[int], list[int]]:
        text, start, end = self.render(instruction)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        roles: list[int] = []
        bos = self.tokenizer.bos_token_id
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if a < end and b > start and b > a:
                r = Role.INSTRUCTION
            elif a >= end and (b > a or a > start):
                r = Role.POST_INSTRUCTION
            else:
                r = Role.TEMPLATE
            r |= Role.TEXT
            if i == 0 and bos is not None and ids[0] == bos:
                r |= Role.BOS
            roles.append(int(r))
        if not any(r & Role.POST_INSTRUCTION for r in roles):
            raise ConfigError(f"chat template of {self.name} leaves no post-instruction tokens")
        return ids, roles

    def encode(self, requests: Sequence[Any], *, padding_side: PaddingSide = "left") -> EncodedBatch:
        texts = [r if isinstance(r, str) else r["instruction"] for r in requests]
        if not texts:
            raise ConfigError("encode() needs at least one prompt")
        pairs = [self.tokenize_with_roles(t) for t in texts]
        ids, roles, mask = pad_sequences(
            [p[0] for p in pairs], [p[1] for p in pairs], self.tokenizer.pad_token_id, padding_side
        )
        pos = position_ids_from_mask(mask)
        return EncodedBatch(
            inputs={"input_ids": ids, "attention_mask": mask, "position_ids": pos},
            roles=roles,
            attention_mask=mask,
            position_ids=pos,
            texts=texts,
            padding_side=padding_side,
        ).to(self.device)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def refusal_token_ids(self) -> list[int]:
        """First tokens of the model's usual refusal openings (for the refusal score)."""
        out: list[int] = []
        for phrase in self.refusal_phrases:
            ids = self.tokenizer(phrase, add_special_tokens=False)["input_ids"]
            if ids and ids[0] not in out:
                out.append(ids[0])
        return out

    def describe(self) -> dict[str, Any]:
        before, after = self._template_parts
        return {**super().describe(), "template": self.template_name, "system_prompt": self.system_prompt,
                "prompt_format": before + "{instruction}" + after}

    def __repr__(self) -> str:
        kind = "random" if self.random_weights else "pretrained"
        return f"ChatModel({self.name!r}, {kind}, n_layers={self.n_layers}, d_model={self.d_model})"

