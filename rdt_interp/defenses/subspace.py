"""VLM-Guard-style subspace projection: a chat model's safety subspace, removed from (or clamped
in) a VLA's residual stream.

VLM-Guard (Liu et al., 2025) takes the "safety steering direction" from the safety-aligned LLM
that a VLM is built on -- the principal directions (SVD) of how harmful and harmless queries
differ in the LLM's hidden states -- and, at inference, projects the VLM's representations onto
the subspace orthogonal to it. Here:

* :func:`safety_subspace` captures the chat model on harmful and harmless prompts at one layer
  and position and takes the top ``k`` right singular vectors of the contrast matrix
  (:func:`rdt_interp.directions.subspace.contrast_subspace`: each harmful activation minus the
  harmless mean), a :class:`SafetySubspace`;
* :func:`vlm_guard` turns it into interventions applied at every position (BOS, image patches,
  text, action tokens) in prefill and decode. ``mode="project"`` is VLM-Guard's projection,
  :class:`~rdt_interp.tracing.interventions.AblateDirection` with the ``[k, d]`` basis
  (by default at every layer, from the block input and from what attention and the MLP write,
  so the subspace cannot be re-written); ``mode="clamp"`` is the option of setting the
  component in the subspace to a target (by default the harmful-class mean, times ``scale``)
  at the block input of chosen layers: :class:`ClampSubspace`.

What is *not* reproduced: VLM-Guard's own choice of layers, positions and prompt sets, and its
evaluation on text generation (here the "LLM component" is the chat model, and for the testbed
VLA that is exactly the model it was fine-tuned from; for OpenVLA it would be a chat model of
the backbone's width, not the base Llama-2 OpenVLA starts from).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp.directions.subspace import contrast_subspace
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.models.adapter import ModelAdapter
from rdt_interp.prompts import instructions
from rdt_interp.storage import digest_tensor, load_tensors, save_tensors
from rdt_interp.tracing.capture import capture
from rdt_interp.tracing.interventions import AblateDirection, Intervention, Site, StepContext

GUARD_MODES: tuple[str, ...] = ("project", "clamp")


@dataclass(frozen=True, eq=False)
class SafetySubspace:
    """A rank-``k`` harmful-vs-harmless subspace of one model at one layer and position.

    ``basis`` has orthonormal rows, each oriented with the class-mean difference;
    ``harmful_mean`` / ``harmless_mean`` are the class means (their coordinates give clamp
    targets); ``singular_values`` is the whole spectrum of the contrast matrix.
    """

    basis: Float[Tensor, "k d_model"]
    harmful_mean: Float[Tensor, "d_model"]
    harmless_mean: Float[Tensor, "d_model"]
    singular_values: Float[Tensor, "r"]
    layer: int
    position: str
    source: dict[str, Any] = field(default_factory=dict)
    n_harmful: int = 0
    n_harmless: int = 0

    def __post_init__(self) -> None:
        b = self.basis.detach().to("cpu", torch.float32)
        if b.ndim != 2 or b.shape[0] < 1:
            raise ConfigError(f"a safety subspace needs a [k, d] basis, got {tuple(b.shape)}")
        gram = b.double() @ b.double().T
        if not torch.allclose(gram, torch.eye(b.shape[0], dtype=torch.float64), atol=1e-4):
            raise ConfigError("the basis rows are not orthonormal",
                              fix="build it with safety_subspace() or subspace_from_activations()")
        object.__setattr__(self, "basis", b)
        for name in ("harmful_mean", "harmless_mean", "singular_values"):
            object.__setattr__(self, name, getattr(self, name).detach().to("cpu", torch.float32))
        for name in ("harmful_mean", "harmless_mean"):
            if getattr(self, name).shape != (b.shape[1],):
                raise DModelMismatchError(expected=int(b.shape[1]), actual=int(getattr(self, name).shape[-1]),
                                          what=name)

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.basis.shape[1])

    @property
    def explained_variance_ratio(self) -> Float[Tensor, "r"]:
        s2 = self.singular_values.double() ** 2
        return (s2 / s2.sum()).float()

    @property
    def digest(self) -> str:
        return digest_tensor(torch.cat([self.basis.flatten(), self.harmful_mean, self.harmless_mean]))[:16]

    def coordinates(self, x: Float[Tensor, "*n d_model"]) -> Float[Tensor, "*n k"]:
        if x.shape[-1] != self.d_model:
            raise DModelMismatchError(expected=self.d_model, actual=int(x.shape[-1]), what="activations")
        return x.float() @ self.basis.T

    def target(self, which: str = "harmful", scale: float = 1.0) -> Float[Tensor, "k"]:
        """Clamp target: ``scale`` times the coordinates of a class mean (``harmful`` /
        ``harmless``) in the subspace."""
        if which not in ("harmful", "harmless"):
            raise ConfigError(f"target must be 'harmful' or 'harmless', got {which!r}")
        mean = self.harmful_mean if which == "harmful" else self.harmless_mean
        return self.coordinates(mean) * float(scale)

    def check_d_model(self, d_model: int) -> SafetySubspace:
        if d_model != self.d_model:
            raise DModelMismatchError(expected=d_model, actual=self.d_model, what="safety subspace")
        return self

    def info(self) -> dict[str, Any]:
        """What identifies the subspace (for run directories and tables)."""
        return {"k": self.k, "d_model": self.d_model, "layer": self.layer, "position": self.position,
                "digest": self.digest, "source": self.source.get("name", "?"),
                "n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "explained_variance_topk": [round(float(v), 6) for v in self.explained_variance_ratio[:self.k]]}

    def save(self, path: str | os.PathLike[str]) -> None:
        save_tensors(path, {"basis": self.basis, "harmful_mean": self.harmful_mean,
                            "harmless_mean": self.harmless_mean, "singular_values": self.singular_values},
                     {"kind": "rdt_interp.SafetySubspace", "layer": self.layer, "position": self.position,
                      "source": self.source, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, d_model: int | None = None) -> SafetySubspace:
        t, meta = load_tensors(path)
        if meta.get("kind") != "rdt_interp.SafetySubspace":
            raise ConfigError(f"{path} is not a saved SafetySubspace")
        out = cls(t["basis"], t["harmful_mean"], t["harmless_mean"], t["singular_values"], int(meta["layer"]),
                  str(meta["position"]), dict(meta.get("source", {})), int(meta.get("n_harmful", 0)),
                  int(meta.get("n_harmless", 0)))
        return out if d_model is None else out.check_d_model(d_model)


def subspace_from_activations(
    harmful: Float[Tensor, "n1 d"],
    harmless: Float[Tensor, "n0 d"],
    k: int,
    *,
    layer: int,
    position: str,
    source: Mapping[str, Any] | None = None,
) -> SafetySubspace:
    """The top-``k`` contrast subspace of ``harmful`` vs ``harmless`` activations ``[n, d]``."""
    sub = contrast_subspace(harmful.float(), harmless.float(), k)
    return SafetySubspace(sub.basis, harmful.double().mean(0).float(), harmless.double().mean(0).float(),
                          sub.singular_values, int(layer), str(position), dict(source or {}),
                          int(harmful.shape[0]), int(harmless.shape[0]))


def safety_subspace(
    chat: ModelAdapter,
    harmful: Sequence[Any],
    harmless: Sequence[Any],
    *,
    layer: int,
    k: int = 4,
    position: str = "post_instruction[-1]",
    batch_size: int = 16,
    progress: bool = False,
) -> SafetySubspace:
    """Capture ``chat`` on harmful and harmless prompts (strings or a ``PromptSet``) at ``layer``
    and ``position`` (block input) and take the rank-``k`` contrast subspace."""
    if not 0 <= layer < chat.n_layers:
        raise ConfigError(f"layer {layer} is not a layer of {chat.name} ({chat.n_layers} layers)")
    kw = dict(layers=[layer], selector=position, batch_size=batch_size, backend="hooks", progress=progress)
    h = capture(chat, instructions(harmful), desc="capture harmful", **kw)
    hl = capture(chat, instructions(harmless), desc="capture harmless", **kw)
    if h.values.shape[2] != 1:
        raise ConfigError(f"position {position!r} selects {h.values.shape[2]} positions per prompt",
                          fix="select one position, e.g. post_instruction[-1]")
    return subspace_from_activations(h.values[:, 0, 0], hl.values[:, 0, 0], k, layer=layer, position=position,
                                     source=chat.describe())


@dataclass(frozen=True, eq=False)
class ClampSubspace(AblateDirection):
    """Set the component of the residual in the subspace to that of ``target`` (a ``[d]``
    vector) at every position: ``h - (h Q^T) Q + (target Q^T) Q``.

    An :class:`AblateDirection` whose edit puts the target's component back after the
    projection; by default at the block input only (clamping what attention or the MLP writes
    would add the target once per site).
    """

    target: Tensor | None = None
    sites: tuple[Site, ...] = (Site.RESID_PRE,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is None:
            raise ConfigError("ClampSubspace needs a target ([d] vector)",
                              fix="e.g. SafetySubspace.harmful_mean")
        t = torch.as_tensor(getattr(self.target, "vector", self.target)).detach().to("cpu", torch.float64)
        if t.ndim != 1 or t.shape[0] != self.basis.shape[1]:
            raise DModelMismatchError(expected=int(self.basis.shape[1]), actual=int(t.shape[-1]), what="clamp target")
        object.__setattr__(self, "target", t)
        object.__setattr__(self, "_coords", (self.basis @ t).contiguous())

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        if not (self.phase == "both" or self.phase == ctx.phase):
            return h
        q = self.basis.to(device=h.device, dtype=h.dtype)
        c = self._coords.to(device=h.device, dtype=h.dtype)  # type: ignore[attr-defined]
        return h - (h @ q.T) @ q + c @ q


def vlm_guard(
    subspace: SafetySubspace | Float[Tensor, "k d"],
    *,
    mode: str = "project",
    layers: Sequence[int] | None = None,
    target: Float[Tensor, "d"] | None = None,
    scale: float = 1.0,
    d_model: int | None = None,
) -> list[Intervention]:
    """VLM-Guard interventions from a safety subspace (or a bare ``[k, d]`` basis).

    ``mode="project"``: remove the subspace at ``layers`` (``None``: every layer) from the block
    input and from attention / MLP outputs, at every position, prefill and decode.
    ``mode="clamp"``: set the subspace component to that of ``scale * target`` (default target:
    the harmful-class mean; needs a :class:`SafetySubspace`) at the block input of ``layers``
    (``None``: the subspace's own layer), every position, both phases. With ``d_model`` the
    width is checked now (:class:`DModelMismatchError`).
    """
    if mode not in GUARD_MODES:
        raise ConfigError(f"unknown VLM-Guard mode {mode!r}", fix=f"use one of {list(GUARD_MODES)}")
    basis = subspace.basis if isinstance(subspace, SafetySubspace) else subspace
    if basis.ndim != 2:
        raise ConfigError(f"a subspace basis is [k, d], got {tuple(basis.shape)}")
    if d_model is not None and basis.shape[-1] != d_model:
        raise DModelMismatchError(expected=d_model, actual=int(basis.shape[-1]), what="safety subspace")
    if mode == "project":
        return [AblateDirection(basis, layers=None if layers is None else tuple(layers), phase="both")]
    if target is None:
        if not isinstance(subspace, SafetySubspace):
            raise ConfigError("clamping to the harmful mean needs a SafetySubspace",
                              fix="pass target= (a [d] vector), or the SafetySubspace itself")
        target = subspace.harmful_mean
    if layers is None:
        if not isinstance(subspace, SafetySubspace):
            raise ConfigError("clamp mode with a bare basis needs layers=")
        layers = (subspace.layer,)
    return [ClampSubspace(basis, layers=tuple(layers), phase="both", target=target.float() * float(scale))]


__all__ = ["GUARD_MODES", "ClampSubspace", "SafetySubspace", "safety_subspace", "subspace_from_activations",
           "vlm_guard"]
