"""Per-architecture adapters: where each model class keeps its canonical components.

Every model the toolkit traces is mapped onto four canonical components — ``embed`` (the token
embedding), ``layers`` (the decoder layers, an ``nn.ModuleList``), ``final_norm`` and
``lm_head`` — through an explicit entry in :data:`ARCHITECTURES`, keyed by the model's class
name (``type(model).__name__``, or a base class's). Nothing is guessed: a model class without an
entry raises :class:`~rdt_interp.errors.UnsupportedArchitectureError`, whose message says what to
register.

Two kinds of entry:

* :class:`DecoderArchitecture` — a Hugging Face causal LM (Llama, Qwen2, Gemma 1-3, Mistral):
  dotted paths of the four components inside the model.
* :class:`BackboneArchitecture` — a model that wraps a causal LM (a VLA): the attribute that holds
  the LLM backbone, whose own entry gives the paths (prefixed with the attribute).

VLA families above this layer (the testbed VLA) add their entry with
:func:`register_architecture` next to their model adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from rdt_interp.errors import ConfigError, UnsupportedArchitectureError

__all__ = [
    "ARCHITECTURES", "BackboneArchitecture", "ComponentPaths", "DecoderArchitecture",
    "ModelComponents", "architecture_of", "model_components", "register_architecture",
]


@dataclass(frozen=True)
class ComponentPaths:
    """Dotted paths of the canonical components inside a model (integer parts index)."""

    embed: str
    layers: str
    final_norm: str
    lm_head: str

    def prefixed(self, prefix: str) -> ComponentPaths:
        return ComponentPaths(*(f"{prefix}.{p}" for p in
                                (self.embed, self.layers, self.final_norm, self.lm_head)))


@dataclass(frozen=True)
class DecoderArchitecture:
    """A decoder-only causal LM: the paths of its components (HF's ``*ForCausalLM`` layout by
    default)."""

    name: str
    #: class names this entry applies to (``type(model).__name__`` or a base class's)
    model_classes: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def paths(self, model: nn.Module) -> ComponentPaths:
        return ComponentPaths(self.embed, self.layers, self.final_norm, self.lm_head)


@dataclass(frozen=True)
class BackboneArchitecture:
    """A model wrapping a causal LM (a VLA): ``backbone`` is the attribute holding the LLM, whose
    own :class:`DecoderArchitecture` entry gives the component paths."""

    name: str
    model_classes: tuple[str, ...]
    backbone: str = "language_model"

    def paths(self, model: nn.Module) -> ComponentPaths:
        inner = _resolve(model, self.backbone, self)
        return architecture_of(inner).paths(inner).prefixed(self.backbone)


Architecture = DecoderArchitecture | BackboneArchitecture

#: class name -> architecture adapter
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``arch`` for each of its ``model_classes``; returns it.

    Raises
    ------
    ConfigError
        A class already has another entry (pass ``replace=True`` to override it).
    """
    for cls in arch.model_classes:
        old = ARCHITECTURES.get(cls)
        if old is not None and old != arch and not replace:
            raise ConfigError(f"{cls} already has the architecture adapter {old.name!r}",
                              fix="pass replace=True to override it")
    for cls in arch.model_classes:
        ARCHITECTURES[cls] = arch
    return arch


for _arch in (
    DecoderArchitecture("llama", ("LlamaForCausalLM",)),
    DecoderArchitecture("qwen2", ("Qwen2ForCausalLM",)),
    DecoderArchitecture("gemma", ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")),
    DecoderArchitecture("mistral", ("MistralForCausalLM",)),
    # native OpenVLA (rdt_interp.models.openvla): vision backbone + projector + a causal LM
    BackboneArchitecture("openvla", ("OpenVLAModel",)),
):
    register_architecture(_arch)


def architecture_of(model: nn.Module) -> Architecture:
    """The registered adapter for ``model``'s class (or the nearest registered base class).

    Raises
    ------
    UnsupportedArchitectureError
        No class in ``type(model).__mro__`` has an entry.
    """
    for cls in type(model).__mro__:
        arch = ARCHITECTURES.get(cls.__name__)
        if arch is not None:
            return arch
    name = type(model).__name__
    raise UnsupportedArchitectureError(
        f"no architecture adapter for model class {name} (supported: "
        f"{', '.join(sorted(ARCHITECTURES))})",
        fix=(f"add an entry for {name!r} to ARCHITECTURES in rdt_interp/models/architectures.py, "
             f"or call rdt_interp.models.architectures.register_architecture("
             f"DecoderArchitecture('<family>', ({name!r},), embed='model.embed_tokens', "
             f"layers='model.layers', final_norm='model.norm', lm_head='lm_head')) with the "
             f"dotted paths of that class (BackboneArchitecture for a model wrapping a causal LM)"),
    )


@dataclass(frozen=True, eq=False)
class ModelComponents:
    """The canonical components of one model. Each is looked up along its path on access, so a
    module replaced later (e.g. by ``resize_token_embeddings``) is the one returned."""

    architecture: Architecture
    paths: ComponentPaths
    model: nn.Module

    @property
    def embed(self) -> nn.Module:
        return _resolve(self.model, self.paths.embed, self.architecture)

    @property
    def layers(self) -> nn.ModuleList:
        return _resolve(self.model, self.paths.layers, self.architecture)

    @property
    def final_norm(self) -> nn.Module:
        return _resolve(self.model, self.paths.final_norm, self.architecture)

    @property
    def lm_head(self) -> nn.Module:
        return _resolve(self.model, self.paths.lm_head, self.architecture)

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def model_components(model: nn.Module, *, n_layers: int | None = None) -> ModelComponents:
    """Resolve the canonical components of ``model`` through its architecture adapter.

    Parameters
    ----------
    model
        A model whose class (or a base class) has an entry in :data:`ARCHITECTURES`.
    n_layers
        When given, the number of decoder layers the config declares; a mismatch is an error.

    Raises
    ------
    UnsupportedArchitectureError
        No adapter for the class, or the adapter's paths do not match the model.

    Examples
    --------
    >>> from rdt_interp.models.tiny import build_tiny
    >>> model, _ = build_tiny("tiny-qwen2", n_layers=2)
    >>> parts = model_components(model, n_layers=2)
    >>> parts.architecture.name, parts.paths.layers, parts.n_layers
    ('qwen2', 'model.layers', 2)
    >>> parts.lm_head is model.get_output_embeddings()
    True
    """
    arch = architecture_of(model)
    paths = arch.paths(model)
    for p in (paths.embed, paths.final_norm, paths.lm_head):
        _resolve(model, p, arch)  # every path must exist now, not at first use
    layers = _resolve(model, paths.layers, arch)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{paths.layers} of {type(model).__name__} is a {type(layers).__name__}, not the "
            f"ModuleList of decoder layers (architecture adapter {arch.name!r})",
            fix="correct the layers path of that entry in rdt_interp/models/architectures.py")
    if n_layers is not None and len(layers) != n_layers:
        raise UnsupportedArchitectureError(
            f"{paths.layers} of {type(model).__name__} holds {len(layers)} layers, its config "
            f"declares {n_layers} (architecture adapter {arch.name!r})",
            fix="correct the layers path of that entry in rdt_interp/models/architectures.py")
    return ModelComponents(arch, paths, model)


def _resolve(model: nn.Module, path: str, arch: Architecture) -> Any:
    obj: Any = model
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no {path!r} (architecture adapter {arch.name!r} "
                f"expects it)",
                fix="correct that entry's paths in rdt_interp/models/architectures.py, or register "
                    "an adapter for this class with register_architecture(..., replace=True)",
            ) from None
    if not isinstance(obj, nn.Module):
        raise UnsupportedArchitectureError(
            f"{path!r} of {type(model).__name__} is not a module (architecture adapter {arch.name!r})",
            fix="correct that entry's paths in rdt_interp/models/architectures.py")
    return obj
