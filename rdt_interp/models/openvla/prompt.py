"""OpenVLA's prompt and the role of every prompt token.

The reference prompt is ``In: What action should the robot take to {instruction.lower()}?\\nOut:``
tokenized with BOS, and ``predict_action`` appends the tokenizer's bare word-boundary token
("▁", id 29871 for Llama-2) when the prompt does not already end with it. Roles::

    <s>                                          BOS | TEXT | TEMPLATE
    In: What action should the robot take to     TEXT | TEMPLATE
    {instruction}                                TEXT | INSTRUCTION
    ?\\nOut:  + the empty token                   TEXT | POST_INSTRUCTION
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rdt_interp.errors import ConfigError
from rdt_interp.roles import Role

PROMPT_BEFORE = "In: What action should the robot take to "
PROMPT_AFTER = "?\nOut:"


def empty_token_id(tokenizer: Any) -> int:
    """The token the reference appends after ``Out:`` (29871 "▁" for Llama-2), from the tokenizer.

    SentencePiece vocabularies have the bare word-boundary piece "▁"; for other tokenizers it
    is the token a trailing space adds (``"Out: "`` vs ``"Out:"``).
    """
    tid = tokenizer.convert_tokens_to_ids("▁")
    if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
        return tid
    a = tokenizer("Out:", add_special_tokens=False)["input_ids"]
    b = tokenizer("Out: ", add_special_tokens=False)["input_ids"]
    if len(b) == len(a) + 1 and b[: len(a)] == a:
        return int(b[-1])
    raise ConfigError(
        f"cannot find the empty (word-boundary) token of {type(tokenizer).__name__}",
        fix="pass empty_token_id=... to the adapter",
    )


@dataclass
class OpenVLAPrompt:
    """Renders and tokenizes OpenVLA prompts with roles (fast tokenizers only: needs offsets)."""

    tokenizer: Any
    empty_token_id: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, empty_token: int | None = None) -> OpenVLAPrompt:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer (no offsets)",
                              fix="load it with AutoTokenizer.from_pretrained(path, use_fast=True)")
        if tokenizer.bos_token_id is None:
            raise ConfigError("the tokenizer has no BOS token; OpenVLA inserts the image after BOS",
                              fix="use the checkpoint's Llama-2 tokenizer")
        return cls(tokenizer, empty_token_id(tokenizer) if empty_token is None else int(empty_token))

    @staticmethod
    def render(instruction: str) -> tuple[str, int, int]:
        """Prompt text and the character span ``[start, end)`` of the instruction in it."""
        body = instruction.lower()
        text = PROMPT_BEFORE + body + PROMPT_AFTER
        return text, len(PROMPT_BEFORE), len(PROMPT_BEFORE) + len(body)

    def tokenize(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids (BOS first, empty token last) and their roles."""
        if not isinstance(instruction, str):
            raise ConfigError(f"instruction must be a string, got {type(instruction).__name__}")
        text, start, end = self.render(instruction)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        bos = int(self.tokenizer.bos_token_id)
        if not ids or ids[0] != bos:  # tokenizers without a BOS post-processor
            ids.insert(0, bos)
            offsets.insert(0, (0, 0))
        roles: list[int] = []
        for i, (a, b) in enumerate(offsets):
            if i == 0:
                r = Role.BOS | Role.TEMPLATE
            elif b > a and a < end and b > start:
                r = Role.INSTRUCTION
            elif a >= end and (b > a or a > start):
                r = Role.POST_INSTRUCTION
            else:
                r = Role.TEMPLATE
            roles.append(int(r | Role.TEXT))
        if ids[-1] != self.empty_token_id:  # as the reference's predict_action does
            ids.append(self.empty_token_id)
            roles.append(int(Role.TEXT | Role.POST_INSTRUCTION))
        return ids, roles
