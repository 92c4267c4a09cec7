"""Declarative run configs (TOML) with a schema: unknown keys and bad values are clear errors.

A config names the chat model, the chat-side study settings, the direction options, and
optionally a VLA and the VLA-side study settings::

    name = "demo"

    [chat_model]
    name = "qwen2.5-coder-0.5b-instruct"     # registry name, checkpoint dir or hub id
    dtype = "float32"
    device = "cpu"

    [chat]                                   # rdt_interp.studies.chat.ChatRefusalConfig
    n_train = 128
    alphas = [1.0, 2.0, 4.0]
    [chat.selection]                         # rdt_interp.directions.selection.SelectionConfig
    screen_n = 16

    [direction]
    rank = 1                                 # > 1: rank-k subspace of the contrast matrix
    weighting = "projection"
    norm = "mean_diff"                       # the steering vector's norm never grows with k

    [vla_model]
    adapter = "testbed"                      # testbed | testbed-tiny | openvla | openvla-7b-random

    [vla]                                    # rdt_interp.studies.vla.VLARDTConfig
    alphas = [1.0, 2.0, 4.0]

Sections map one-to-one onto the frozen config dataclasses of the studies, validated with
pydantic (strict: extra keys are rejected).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ConfigDict, TypeAdapter, ValidationError

from rdt_interp.directions.selection import SelectionConfig
from rdt_interp.errors import ConfigError
from rdt_interp.studies.chat.config import ChatRefusalConfig
from rdt_interp.studies.vla.config import VLARDTConfig

VLAKind = Literal["testbed", "testbed-tiny", "openvla", "openvla-7b-random"]
#: dtypes a config may name (a typo is a config error, not an AttributeError after the chat side ran)
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ChatModelSpec:
    name: str = "qwen2.5-coder-0.5b-instruct"
    dtype: Dtype = "float32"
    device: str = "cpu"
    system_prompt: str | None = None
    # "reference": Arditi et al.'s prompt format (for Qwen: no default system turn);
    # "model": the tokenizer's own chat template (a departure the run's report names).
    template: Literal["reference", "model"] = "reference"


@dataclass(frozen=True)
class DirectionSpec:
    rank: int = 1
    weighting: Literal["projection", "equal"] = "projection"
    norm: Literal["mean_diff", "unit", "none"] = "mean_diff"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError("direction.rank must be >= 1")


@dataclass(frozen=True)
class VLAModelSpec:
    adapter: VLAKind = "testbed"
    checkpoint: str | None = None
    dtype: Dtype = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.adapter == "openvla" and not self.checkpoint:
            raise ConfigError("vla_model.adapter = 'openvla' needs vla_model.checkpoint",
                              fix="set checkpoint to the openvla-7b directory")


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    chat_model: ChatModelSpec = field(default_factory=ChatModelSpec)
    chat: ChatRefusalConfig = field(default_factory=ChatRefusalConfig)
    direction: DirectionSpec = field(default_factory=DirectionSpec)
    vla_model: VLAModelSpec | None = None
    vla: VLARDTConfig | None = None
    cross_model: bool = True

    def __post_init__(self) -> None:
        if (self.vla_model is None) != (self.vla is None):
            raise ConfigError("[vla_model] and [vla] go together", fix="give both sections or neither")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.vla is not None:
            d["vla"] = self.vla.to_dict()
        return d


# Every section is a plain dataclass; pydantic reads this attribute as its config, so unknown
# keys are rejected at every level.
for _cls in (ChatModelSpec, DirectionSpec, VLAModelSpec, StudyConfig, ChatRefusalConfig,
             SelectionConfig, VLARDTConfig):
    _cls.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
_SECTION_ADAPTERS: dict[Any, TypeAdapter[Any]] = {StudyConfig: TypeAdapter(StudyConfig)}
#: the VLA kinds a config (and a distributed job) may name
VLA_KINDS: tuple[str, ...] = get_args(VLAKind)


def validate_section(cls: Any, data: Any, *, source: str = "config") -> Any:
    """``data`` validated as ``cls`` (a config dataclass), strictly and with unknown keys refused:
    the one schema check of study configs, distributed job files and their sections."""
    if cls not in _SECTION_ADAPTERS:
        cls.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
        _SECTION_ADAPTERS[cls] = TypeAdapter(cls)
    try:
        # JSON mode is what makes strict validation accept arrays for tuple fields.
        return _SECTION_ADAPTERS[cls].validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
                msg = "unknown key"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines),
                          fix="see the schema in rdt_interp/studies/config.py (docs/cli.md)") from None


def parse_config(data: dict[str, Any], *, source: str = "config") -> StudyConfig:
    """Validate a config mapping (e.g. parsed TOML); errors name the offending key.

    Strict: a number must be written as a number (``alpha = "2"`` is an error, not 2.0), an
    integer as an integer; TOML arrays fill tuple fields. Model names are checked separately
    (:func:`rdt_interp.studies.study.check_models`), since that looks at the filesystem.
    """
    return validate_section(StudyConfig, data, source=source)


def load_config(path: str | os.PathLike[str]) -> StudyConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    return parse_config(data, source=str(p))


def builtin_config(name: str) -> StudyConfig:
    """A config shipped with the package (``demo``, ``quick``)."""
    from importlib import resources

    path = resources.files("rdt_interp.data").joinpath("configs", f"{name}.toml")
    if not path.is_file():
        from rdt_interp.errors import UnknownNameError

        names = [p.name[:-5] for p in resources.files("rdt_interp.data").joinpath("configs").iterdir()
                 if p.name.endswith(".toml")]
        raise UnknownNameError("built-in config", name, names)
    return load_config(Path(str(path)))
