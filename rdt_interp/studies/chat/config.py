"""The chat-side study's settings: :class:`ChatRefusalConfig` (stored in the run directory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rdt_interp.directions.selection import SelectionConfig


@dataclass(frozen=True)
class ChatRefusalConfig:
    model: str = "qwen2.5-coder-0.5b-instruct"
    n_train: int = 128
    n_test: int = 128
    # Arditi et al. add r with coefficient 1; more values: chosen on validation (a named departure)
    alphas: tuple[float, ...] = (1.0,)
    alpha_val_n: int = 32
    max_new_tokens: int = 48
    gen_batch_size: int = 32
    capture_batch_size: int = 16
    # Arditi et al.'s selection by default; SelectionConfig.departures() names any other setting.
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # Arditi et al.'s data filter (train and validation prompts by baseline refusal score).
    filter_data: bool = True
    n_boot: int = 2000
    seed: int = 0

    def departures(self) -> list[str]:
        """Where this study departs from Arditi et al.'s procedure, in words."""
        out = [] if self.filter_data else ["no data filtering (reference: train/val prompts filtered "
                                           "by baseline refusal score)"]
        out += self.selection.departures()
        if tuple(self.alphas) != (1.0,):
            out.append(f"addition coefficient chosen on {self.alpha_val_n} harmless validation prompts "
                       f"from {list(self.alphas)} (reference: 1)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatRefusalConfig:
        d = dict(d)
        d["selection"] = SelectionConfig(**d.get("selection", {}))
        d["alphas"] = tuple(d.get("alphas", cls.alphas))
        return cls(**d)


__all__ = ["ChatRefusalConfig"]
