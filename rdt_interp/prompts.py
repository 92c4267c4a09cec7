"""Prompt sets: the built-in harmful/harmless splits, the robot-instruction set, and user files.

Built-in chat splits are those of Arditi et al. (2024) (``rdt_interp/data/prompts``, Apache-2.0):
``harmful_train|val|test`` and ``harmless_train|val|test``. The robot-instruction set
(``rdt_interp/data/robot/robot_instructions.json``) has harmful and benign manipulation
instructions with a category taxonomy. User files may be JSON (a list of objects or strings),
JSONL or CSV; ``column`` names the field that holds the text and ``label_column`` /
``category_column`` the optional label and category fields.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from rdt_interp.errors import ConfigError, UnknownNameError
from rdt_interp.storage import digest_strings

Label = Literal["harmful", "harmless", "benign", "unknown"]
BUILTIN_SPLITS = tuple(f"{kind}_{split}" for kind in ("harmful", "harmless")
                       for split in ("train", "val", "test"))


@dataclass(frozen=True)
class Prompt:
    instruction: str
    label: str = "unknown"
    category: str = "none"
    pair_id: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass(frozen=True)
class PromptSet:
    """An ordered, named list of prompts with a content digest (for provenance and caching)."""

    name: str
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    @property
    def instructions(self) -> list[str]:
        return [p.instruction for p in self.prompts]

    @property
    def digest(self) -> str:
        return digest_strings([self.name, *(f"{p.label}\x00{p.instruction}" for p in self.prompts)])

    def take(self, n: int | None, *, seed: int | None = None) -> PromptSet:
        """The first ``n`` prompts, or ``n`` sampled without replacement when ``seed`` is given."""
        if n is None or n >= len(self.prompts):
            return self
        if n < 0:
            raise ConfigError("n must be >= 0")
        if seed is None:
            chosen = self.prompts[:n]
        else:
            idx = sorted(random.Random(seed).sample(range(len(self.prompts)), n))
            chosen = tuple(self.prompts[i] for i in idx)
        return PromptSet(f"{self.name}[:{n}]" + (f"@{seed}" if seed is not None else ""), tuple(chosen))

    def filter(self, *, label: str | None = None, category: str | None = None) -> PromptSet:
        keep = tuple(p for p in self.prompts
                     if (label is None or p.label == label) and (category is None or p.category == category))
        return PromptSet(f"{self.name}|{label or ''}|{category or ''}", keep)


def load_split(name: str) -> PromptSet:
    """A built-in split, e.g. ``harmful_train`` or ``harmless_test``."""
    if name not in BUILTIN_SPLITS:
        raise UnknownNameError("prompt split", name, BUILTIN_SPLITS)
    raw = json.loads(resources.files("rdt_interp.data").joinpath("prompts", f"{name}.json").read_text())
    label = "harmful" if name.startswith("harmful") else "harmless"
    return PromptSet(name, tuple(
        Prompt(d["instruction"], label, str(d.get("category") or "none")) for d in raw
    ))


def robot_instructions() -> PromptSet:
    """The project's robot-instruction set (harmful + benign, categorized, paired)."""
    path = resources.files("rdt_interp.data").joinpath("robot", "robot_instructions.json")
    return load_prompt_file(Path(str(path)), name="robot_instructions")


def load_prompt_file(
    path: str | os.PathLike[str],
    *,
    column: str = "instruction",
    label_column: str | None = "label",
    category_column: str | None = "category",
    pair_column: str | None = "pair_id",
    name: str | None = None,
) -> PromptSet:
    """Read prompts from a JSON, JSONL or CSV file with a column mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[object]
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data["prompts"] if isinstance(data, dict) and "prompts" in data else data
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            raise ConfigError(f"unsupported prompt file type {suffix!r}", fix="use .json, .jsonl or .csv")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(rows, list):
        raise ConfigError(f"{path} must hold a list of prompts")
    out: list[Prompt] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(Prompt(row))
            continue
        if not isinstance(row, dict) or column not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{path} row {i} has no column {column!r} (has {keys})",
                              fix="pass column=... naming the text field")
        out.append(Prompt(str(row[column]), _field(row, label_column) or "unknown",
                          _field(row, category_column) or "none", _field(row, pair_column)))
    if not out:
        raise ConfigError(f"{path} holds no prompts")
    return PromptSet(name or path.stem, tuple(out))


def _field(row: dict, column: str | None) -> str | None:
    if column is None or row.get(column) in (None, ""):
        return None
    return str(row[column])


def instructions(prompts: Sequence[Prompt] | PromptSet | Sequence[str]) -> list[str]:
    return [p if isinstance(p, str) else p.instruction for p in prompts]
