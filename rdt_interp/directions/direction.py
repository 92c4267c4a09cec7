"""A direction in a model's residual stream, with where it came from.

Stored as safetensors (the vector and, for rank-k directions, an orthonormal basis) plus JSON
provenance in the file's metadata: source model and digest, layer, position, site, prompt-set
digests, n per class, norm, rank and the rdt-interp version that made it. Loading checks the
width against the model it is meant for.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp import __version__
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.storage import load_tensors, save_tensors


def _version() -> str:
    return __version__


@dataclass(frozen=True)
class Provenance:
    source_model: str
    source_digest: str
    layer: int
    position: str  # selector text, e.g. "post_instruction[-1]"
    site: str  # resid_pre / resid_post
    method: str  # "diff_in_means" | "svd_rank_k" | "random" | ...
    harmful_digest: str = ""
    harmless_digest: str = ""
    n_harmful: int = 0
    n_harmless: int = 0
    rank: int = 1
    normalization: str = "raw"  # how `vector` is scaled (see Direction)
    package_version: str = field(default_factory=_version)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown provenance fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, eq=False)
class Direction:
    """A steering/ablation direction.

    ``vector`` is what :class:`~rdt_interp.tracing.AddDirection` adds (times alpha): for a
    diff-in-means direction it is the raw mean difference (Arditi et al.'s activation addition
    uses it unnormalized). ``basis`` (``[rank, d_model]``, orthonormal) is what
    :class:`~rdt_interp.tracing.AblateDirection` projects out; for rank 1 it is ``unit``.
    """

    vector: Float[Tensor, "d_model"]
    provenance: Provenance
    basis: Float[Tensor, "rank d_basis"] | None = None

    def __post_init__(self) -> None:
        v = self.vector.detach().to("cpu", torch.float32)
        if v.ndim != 1 or v.numel() == 0:
            raise ConfigError(f"direction vector must be 1-D, got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ConfigError("direction vector has NaN/inf entries")
        object.__setattr__(self, "vector", v)
        if self.basis is not None:
            b = self.basis.detach().to("cpu", torch.float32)
            if b.ndim != 2 or b.shape[1] != v.shape[0]:
                raise ConfigError(f"basis of shape {tuple(b.shape)} does not match d={v.shape[0]}")
            object.__setattr__(self, "basis", b)

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def unit(self) -> Float[Tensor, "d_model"]:
        return self.vector / self.vector.norm().clamp(min=1e-12)

    @property
    def rank(self) -> int:
        return 1 if self.basis is None else int(self.basis.shape[0])

    @property
    def ablation_basis(self) -> Float[Tensor, "rank d_model"]:
        return self.unit[None, :] if self.basis is None else self.basis

    def check_d_model(self, d_model: int) -> Direction:
        if d_model != self.d_model:
            raise DModelMismatchError(expected=d_model, actual=self.d_model)
        return self

    def scaled(self, norm: float) -> Direction:
        """Same direction with ``||vector|| = norm``."""
        return replace(self, vector=self.unit * norm,
                       provenance=replace(self.provenance, normalization=f"norm={norm:.6g}"))

    def negated(self) -> Direction:
        return replace(self, vector=-self.vector,
                       provenance=replace(self.provenance, method=f"-{self.provenance.method}"))

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {"vector": self.vector}
        if self.basis is not None:
            tensors["basis"] = self.basis
        save_tensors(path, tensors, {"kind": "rdt_interp.Direction", "provenance": self.provenance.to_dict(),
                                     "norm": self.norm, "d_model": self.d_model, "rank": self.rank})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, d_model: int | None = None) -> Direction:
        """Load; with ``d_model`` given, refuse a direction of another width."""
        tensors, meta = load_tensors(path, what="direction file",
                                     fix="save it again with Direction.save, or re-run the step that "
                                     "wrote it (`rdt-interp run` resumes)")
        if meta.get("kind") != "rdt_interp.Direction":
            raise ConfigError(f"{path} is not a saved Direction")
        out = cls(tensors["vector"], Provenance.from_dict(meta["provenance"]), tensors.get("basis"))
        if d_model is not None:
            out.check_d_model(d_model)
        return out

    def __repr__(self) -> str:
        p = self.provenance
        return (f"Direction({p.method}, {p.source_model} L{p.layer} {p.position}, "
                f"d={self.d_model}, rank={self.rank}, norm={self.norm:.3g})")
