"""Token roles and position selectors.

Every token of a traced batch carries a :class:`Role` (a bit flag, so a token can be both ``TEXT``
and ``INSTRUCTION``). A :class:`Selector` turns roles into positions per row, so that code
downstream never has to think about padding side, prompt length or image-patch offsets.

Selector strings (``Selector.parse``)::

    last                       last real (non-pad) token of the prompt
    post_instruction[-1]       last post-instruction token (Arditi et al.'s position)
    post_instruction[-5:]      the last five post-instruction tokens, in order
    post_instruction           every post-instruction token (same count in every row)
    first(action)  last(text)  first / last token of a role
    action[2]                  the third token of a role (action step 2)
    mean(image)                mean over every token of a role (pooled to one position)
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from rdt_interp.errors import ConfigError, UnknownNameError


class Role(enum.IntFlag):
    """What a token position is. Combine with ``|``; test with ``&``."""

    NONE = 0
    PAD = enum.auto()
    BOS = enum.auto()
    TEMPLATE = enum.auto()  # chat scaffolding before the instruction / fixed VLA prompt text
    INSTRUCTION = enum.auto()  # the user's own text
    POST_INSTRUCTION = enum.auto()  # after the instruction up to the start of the reply
    TEXT = enum.auto()  # any prompt text token (VLA prompts mark text tokens with this)
    IMAGE = enum.auto()  # projected image patches
    ACTION = enum.auto()  # action tokens fed back during decoding
    GENERATED = enum.auto()  # generated text tokens fed back during decoding

    @classmethod
    def from_name(cls, name: str) -> Role:
        key = name.strip().upper()
        if key == "ANY":
            return ANY_REAL
        try:
            return cls[key]
        except KeyError:
            known = [m.name.lower() for m in cls if m.name and m is not cls.NONE] + ["any"]
            raise UnknownNameError("role", name, known) from None


# Every role except padding.
ANY_REAL = Role(sum(m.value for m in Role if m not in (Role.NONE, Role.PAD)))

_ROLE_RE = r"[a-z_]+"
_PATTERNS = [
    (re.compile(r"^last$"), "last"),
    (re.compile(rf"^(first|last)\(({_ROLE_RE})\)$"), "firstlast"),
    (re.compile(rf"^mean\(({_ROLE_RE})\)$"), "mean"),
    (re.compile(rf"^all\(({_ROLE_RE})\)$"), "all"),
    (re.compile(rf"^({_ROLE_RE})\[(-?\d+)\]$"), "index"),
    (re.compile(rf"^({_ROLE_RE})\[(-?\d*):(-?\d*)\]$"), "slice"),
    (re.compile(rf"^({_ROLE_RE})$"), "all"),
]


@dataclass(frozen=True)
class Selector:
    """Which positions to read or edit, by role.

    ``indices`` index into each row's positions of ``role`` (negative counts from the end);
    ``None`` means all of them. ``pool="mean"`` averages the chosen positions into one.
    """

    role: Role
    indices: tuple[int, ...] | None = None
    pool: Literal["none", "mean"] = "none"
    text: str = ""

    @classmethod
    def parse(cls, spec: str | Selector) -> Selector:
        if isinstance(spec, Selector):
            return spec
        s = spec.strip().lower().replace(" ", "")
        for pattern, kind in _PATTERNS:
            m = pattern.match(s)
            if not m:
                continue
            if kind == "last":
                return cls(ANY_REAL, (-1,), text=s)
            if kind == "firstlast":
                return cls(Role.from_name(m.group(2)), (0,) if m.group(1) == "first" else (-1,), text=s)
            if kind == "mean":
                return cls(Role.from_name(m.group(1)), None, "mean", text=s)
            if kind == "all":
                return cls(Role.from_name(m.group(1)), None, text=s)
            if kind == "index":
                return cls(Role.from_name(m.group(1)), (int(m.group(2)),), text=s)
            if kind == "slice":
                start = int(m.group(2)) if m.group(2) else None
                stop = int(m.group(3)) if m.group(3) else None
                if start is not None and start < 0:
                    stop_ = 0 if stop is None else stop
                    ok = start < stop_ <= 0
                else:
                    stop_ = stop if stop is not None else -1
                    ok = start is not None and stop is not None and 0 <= start < stop
                if not ok:
                    # The slice must have a length that does not depend on the row.
                    raise ConfigError(
                        f"selector {spec!r}: slice must be [-k:], [-k:-j] or [i:j] with i < j",
                        fix="e.g. 'post_instruction[-5:]'",
                    )
                return cls(Role.from_name(m.group(1)), tuple(range(start, stop_)), text=s)
        raise ConfigError(
            f"cannot parse position selector {spec!r}",
            fix="use one of: last, post_instruction[-1], post_instruction[-5:], first(action), "
            "last(text), action[2], mean(image), all(text)",
        )

    def __str__(self) -> str:
        return self.text or f"Selector({self.role!r}, {self.indices}, {self.pool})"

    @property
    def n_positions(self) -> int | None:
        """Positions per row in the output (``None``: depends on the batch)."""
        if self.pool == "mean":
            return 1
        return None if self.indices is None else len(self.indices)

    def resolve(
        self, roles: Int[Tensor, "batch seq"]
    ) -> tuple[Int[Tensor, "batch k"], Float[Tensor, "batch k"]]:
        """Positions ``[batch, k]`` and weights ``[batch, k]`` for these roles.

        With ``pool="none"`` weights are all ones. With ``pool="mean"`` every position of the
        role is returned (rows padded with index 0 and weight 0) and the weights sum to 1 per row.
        Raises :class:`ConfigError` when a row lacks the requested positions.
        """
        match = (roles & int(self.role)) != 0
        if self.role != Role.PAD:
            match &= (roles & int(Role.PAD)) == 0
        counts = match.sum(dim=1)
        batch, seq = roles.shape
        pos = torch.arange(seq, device=roles.device).expand(batch, seq)
        # Sorted positions of matches first (stable), others pushed to the end.
        key = torch.where(match, pos, pos + seq)
        order = key.argsort(dim=1, stable=True)
        if self.pool == "mean" or self.indices is None:
            k = int(counts.max().item()) if batch else 0
            if k == 0:
                raise ConfigError(f"selector {self}: no position has role {self.role!r}")
            if self.pool == "none" and bool((counts != k).any()):
                raise ConfigError(
                    f"selector {self}: rows have different numbers of {self.role!r} positions "
                    f"({sorted(set(counts.tolist()))})",
                    fix=f"pool them with 'mean({self.role.name.lower()})' or pick indices, "
                    f"e.g. '{self.role.name.lower()}[-1]'",
                )
            idx = order[:, :k]
            valid = torch.arange(k, device=roles.device)[None, :] < counts[:, None]
            idx = torch.where(valid, idx, torch.zeros_like(idx))
            w = valid.to(torch.float32)
            if self.pool == "mean":
                w = w / counts.clamp(min=1)[:, None].to(torch.float32)
            return idx, w
        want = torch.tensor(self.indices, device=roles.device)
        need = torch.where(want < 0, -want, want + 1)
        short = counts[:, None] < need[None, :]
        if bool(short.any()):
            rows = short.any(dim=1).nonzero().flatten().tolist()
            raise ConfigError(
                f"selector {self}: rows {rows[:8]} have only {counts[rows[0]].item()} "
                f"{self.role!r} positions",
                fix="check the prompt template / roles, or choose another selector",
            )
        rank = torch.where(want[None, :] < 0, counts[:, None] + want[None, :], want[None, :])
        idx = order.gather(1, rank)
        return idx, torch.ones(idx.shape, dtype=torch.float32, device=roles.device)

    def mask(self, roles: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq"]:
        """Boolean mask of the selected positions (for edits that apply to a set of tokens)."""
        if self.indices is None:
            match = (roles & int(self.role)) != 0
            if self.role != Role.PAD:
                match &= (roles & int(Role.PAD)) == 0
            return match
        idx, _ = self.resolve(roles)
        out = torch.zeros(roles.shape, dtype=torch.bool, device=roles.device)
        out.scatter_(1, idx, True)
        return out


def role_mask(roles: Int[Tensor, "batch seq"], role: Role) -> Bool[Tensor, "batch seq"]:
    """Positions carrying any of the flags in ``role`` (padding excluded unless asked for)."""
    m = (roles & int(role)) != 0
    if not (role & Role.PAD):
        m &= (roles & int(Role.PAD)) == 0
    return m


def gather_positions(
    hidden: Float[Tensor, "batch seq d"], idx: Int[Tensor, "batch k"], weights: Float[Tensor, "batch k"],
    pool: Literal["none", "mean"],
) -> Float[Tensor, "batch kout d"]:
    """Read ``hidden`` at ``idx``; with ``pool='mean'`` reduce to one weighted position."""
    picked = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))
    if pool == "mean":
        return (picked * weights[:, :, None].to(picked.dtype)).sum(dim=1, keepdim=True)
    return picked
