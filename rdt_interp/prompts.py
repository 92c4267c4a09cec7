"""Prompt sets: the built-in harmful/harmless splits, the robot-instruction set, and user files.

Built-in chat splits are those of Arditi et al. (2024) (``rdt_interp/data/prompts``, Apache-2.0):
``harmful_train|val|test`` and ``harmless_train|val|test``. The robot-instruction set
(``rdt_interp/data/robot/robot_instructions.json``) has harmful and benign manipulation
instructions with a category taxonomy. User files may be JSON (a list of objects or strings, or
rows grouped by label: ``{"harmful": [...], "benign": [...]}``), JSONL or CSV; ``column`` names
the field that holds the text and ``label_column`` / ``category_column`` / ``pair_column`` the
optional label, category and pair fields (:func:`load_prompt_file`).
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
    labels: Sequence[str] | None = None,
    name: str | None = None,
) -> PromptSet:
    """Read prompts from a JSON, JSONL or CSV file with a column mapping.

    Parameters
    ----------
    path
        The file; its suffix picks the format:

        - ``.json``: a list of rows, ``{"prompts": [rows]}``, or rows grouped by label,
          ``{"harmful": [rows], "benign": [rows]}`` (each key is the label of its rows);
        - ``.jsonl``: one row per line;
        - ``.csv``: a header line naming the columns, then one row per line.

        A row is an object (its fields are the columns) or, in JSON, a bare string (the text).
    column
        The field that holds the prompt text (required in every row).
    label_column, category_column, pair_column
        The fields of the label, the category and the pair id (``None``: not read). Missing or
        empty values give the label ``"unknown"``, the category ``"none"`` and no pair. In a
        grouped file a row's own label, if it has one, must agree with its group.
    labels
        If given, every prompt must carry one of these labels and each of them must occur
        (e.g. ``("harmful", "benign")``); otherwise labels are free.
    name
        The prompt set's name (default: the file's stem).

    Returns
    -------
    PromptSet

    Raises
    ------
    ConfigError
        A missing file, an unsupported suffix, a file that does not parse, a row without the
        text column, and (with ``labels``) a row without a label, an unknown or a missing label.

    Examples
    --------
    >>> import json, tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "mine.json"
    >>> _ = f.write_text(json.dumps({"harmful": [{"instruction": "stab the person", "category": "violence"}],
    ...                              "benign": ["pick up the cup"]}))
    >>> [(p.label, p.category) for p in load_prompt_file(f, labels=("harmful", "benign"))]
    [('harmful', 'violence'), ('benign', 'none')]
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[tuple[object, str | None]]  # (row, label of its group)
    if suffix == ".json":
        rows = _json_rows(path, label_column)
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((json.loads(line), None))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path} line {n} is not valid JSON: {exc}") from None
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [(row, None) for row in csv.DictReader(fh)]
    else:
        raise ConfigError(f"unsupported prompt file type {suffix!r}", fix="use .json, .jsonl or .csv")
    out: list[Prompt] = []
    for i, (row, group) in enumerate(rows):
        if isinstance(row, str):
            out.append(Prompt(row, group or "unknown"))
            continue
        if not isinstance(row, dict) or column not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{path} row {i} has no column {column!r} (has {keys})",
                              fix="pass column=... naming the text field")
        own = _field(row, label_column)
        if group is not None and own is not None and own != group:
            raise ConfigError(f"{path} row {i} is in group {group!r} but its {label_column!r} is {own!r}",
                              fix="move the row to its group, or drop its label field")
        out.append(Prompt(str(row[column]), group or own or "unknown",
                          _field(row, category_column) or "none", _field(row, pair_column)))
    if not out:
        raise ConfigError(f"{path} holds no prompts")
    if labels is not None:
        _check_labels(path, out, tuple(labels), label_column)
    return PromptSet(name or path.stem, tuple(out))


def _json_rows(path: Path, label_column: str | None) -> list[tuple[object, str | None]]:
    """Rows of a JSON prompt file with the label of their group (``None`` outside a grouped file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    if isinstance(data, list):
        return [(row, None) for row in data]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return [(row, str(label)) for label, group in data.items() for row in group]
    raise ConfigError(
        f"{path} must hold a list of prompts, {{\"prompts\": [...]}}, or prompts grouped by label "
        f"({{\"harmful\": [...], \"benign\": [...]}}); got {type(data).__name__}"
        + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else ""),
        fix="wrap the rows in a list, or group them under their labels")


def _check_labels(path: Path, prompts: Sequence[Prompt], labels: tuple[str, ...], label_column: str | None) -> None:
    unlabelled = [i for i, p in enumerate(prompts) if p.label == "unknown"]
    if unlabelled:
        raise ConfigError(
            f"{path}: {len(unlabelled)} prompts have no label (first: row {unlabelled[0]}; label column "
            f"{label_column!r})",
            fix="pass label_column=... naming the label field, or group the prompts by label")
    found = {p.label for p in prompts}
    unknown, missing = sorted(found - set(labels)), [x for x in labels if x not in found]
    if unknown or missing:
        raise ConfigError(
            f"{path}: labels {sorted(found)}" + (f", unknown {unknown}" if unknown else "")
            + (f", missing {missing}" if missing else ""),
            fix=f"every prompt needs one of {list(labels)}, and each of them must occur")


def _field(row: dict, column: str | None) -> str | None:
    if column is None or row.get(column) in (None, ""):
        return None
    return str(row[column])


def instructions(prompts: Sequence[Prompt] | PromptSet | Sequence[str]) -> list[str]:
    return [p if isinstance(p, str) else p.instruction for p in prompts]
