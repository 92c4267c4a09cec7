"""Linear read-outs of a two-class contrast: labelled activations on a (layer, position) grid,
class-mean differences, and logistic-regression probes that save, load and transfer.

:class:`Labeled` holds the activations and labels; :func:`class_mean_difference` the per-cell
direction; :class:`LinearProbe` a fitted probe (:func:`fit_probe`). The grid of read-outs with
intervals and p-values, layer selection and transfer are in :mod:`rdt_interp.analysis.probe_grid`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from einops import einsum
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from rdt_interp.analysis.stats import (
    Array,
    as_labels,
    as_tensor,
)
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.roles import Selector
from rdt_interp.storage import load_tensors, save_tensors


@runtime_checkable
class ActivationsLike(Protocol):
    """What :class:`rdt_interp.tracing.Activations` offers (kept structural: no model imports)."""

    values: Tensor
    layers: tuple[int, ...]
    selector: str


def position_names(selector: str, n_positions: int) -> tuple[str, ...]:
    """Names for the position axis of a capture, e.g. ``post_instruction[-2]``, ``first(action)``."""
    if n_positions == 1:
        return (selector,)
    try:
        sel = Selector.parse(selector)
    except ConfigError:
        sel = None
    if sel is not None and sel.indices is not None and len(sel.indices) == n_positions:
        role = sel.role.name.lower() if sel.role.name else "pos"
        return tuple(f"{role}[{i}]" for i in sel.indices)
    return tuple(f"{selector}#{j}" for j in range(n_positions))


def _grid_values(acts: ActivationsLike | Float[Array, "..."]) -> Float[Tensor, "n layer pos d"]:
    v = acts.values if isinstance(acts, ActivationsLike) else acts
    t = as_tensor(v)
    if not t.is_floating_point():
        raise ConfigError(f"activations must be floats, got {t.dtype}")
    if t.ndim == 3:  # [n, layer, d]: one position
        t = t[:, :, None]
    if t.ndim != 4:
        raise ConfigError(f"activations must be [n, layer, d] or [n, layer, pos, d], got {tuple(t.shape)}")
    return t.float()


@dataclass(frozen=True, eq=False)
class Labeled:
    """Activations of two classes on a grid: ``x[n, layer, pos, d]``, ``y[n]`` (True = positive).

    ``split`` names where the samples come from (``train``, ``val``, ``test``…); it travels into
    every result so that a number can always be traced to the split it was measured on.
    """

    x: Float[Tensor, "n layer pos d_model"]
    y: Bool[Tensor, "n"]
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    split: str
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "y", as_labels(self.y, n=self.x.shape[0]))
        if len(self.layers) != self.x.shape[1] or len(self.positions) != self.x.shape[2]:
            raise ConfigError(f"x of shape {tuple(self.x.shape)} does not match {len(self.layers)} "
                              f"layers and {len(self.positions)} positions")
        if len(set(self.positions)) != len(self.positions):
            raise ConfigError(f"position names repeat: {self.positions}")

    @classmethod
    def from_classes(
        cls,
        positive: ActivationsLike | Float[Array, "..."],
        negative: ActivationsLike | Float[Array, "..."],
        *,
        split: str,
        layers: Sequence[int] | None = None,
        positions: Sequence[str] | None = None,
    ) -> Labeled:
        """Stack a positive class (e.g. harmful) and a negative class (harmless)."""
        xp, xn = _grid_values(positive), _grid_values(negative)
        if xp.shape[-1] != xn.shape[-1]:
            raise DModelMismatchError(expected=int(xp.shape[-1]), actual=int(xn.shape[-1]),
                                      what="negative-class activations")
        if xp.shape[1:3] != xn.shape[1:3]:
            raise ConfigError(f"classes have different (layer, pos) grids: {tuple(xp.shape[1:3])} "
                              f"vs {tuple(xn.shape[1:3])}", fix="capture both with the same layers/selector")
        for a in (positive, negative):
            if layers is None and isinstance(a, ActivationsLike):
                layers = tuple(a.layers)
            if positions is None and isinstance(a, ActivationsLike):
                positions = position_names(a.selector, xp.shape[2])
        if isinstance(positive, ActivationsLike) and isinstance(negative, ActivationsLike) and (
                tuple(positive.layers) != tuple(negative.layers)):
            raise ConfigError(f"classes were captured at different layers: {positive.layers} vs "
                              f"{negative.layers}")
        layers = tuple(range(xp.shape[1])) if layers is None else tuple(int(v) for v in layers)
        positions = tuple(f"pos{j}" for j in range(xp.shape[2])) if positions is None else tuple(positions)
        y = torch.cat([torch.ones(xp.shape[0], dtype=torch.bool), torch.zeros(xn.shape[0], dtype=torch.bool)])
        model = dict(getattr(positive, "model", {}) or {})
        return cls(torch.cat([xp, xn]), y, layers, positions, split, model)

    @classmethod
    def from_roles(cls, captured: Any, y: Any, *, split: str, roles: Sequence[str] | None = None) -> Labeled:
        """The grid of a VLA role capture (:class:`rdt_interp.tracing.vla.RoleActivations`, read
        structurally): positions are role names, ``roles`` picks and orders them (default: all)."""
        names = captured.role_names(roles)
        return cls(captured.grid(names), torch.as_tensor(y), captured.layers, names, split,
                   dict(captured.model))

    @classmethod
    def stack_positions(cls, *parts: Labeled) -> Labeled:
        """Join captures of the same prompts at different positions (e.g. last text, first action)."""
        if not parts:
            raise ConfigError("stack_positions needs at least one part")
        first = parts[0]
        for p in parts[1:]:
            if p.layers != first.layers or not torch.equal(p.y, first.y) or p.split != first.split:
                raise ConfigError("parts differ in layers, labels or split",
                                  fix="capture every position from the same prompts and layers")
        return cls(torch.cat([p.x for p in parts], dim=2), first.y, first.layers,
                   tuple(n for p in parts for n in p.positions), first.split, first.model)

    @property
    def d_model(self) -> int:
        return int(self.x.shape[-1])

    @property
    def n_pos(self) -> int:
        return int(self.y.sum())

    @property
    def n_neg(self) -> int:
        return int((~self.y).sum())

    def index(self, layer: int, position: str | None = None) -> tuple[int, int]:
        return _index(self.layers, self.positions, layer, position)

    def cell(self, layer: int, position: str | None = None) -> Float[Tensor, "n d_model"]:
        i, j = self.index(layer, position)
        return self.x[:, i, j]

    def select(self, layers: Sequence[int] | None = None, positions: Sequence[str] | None = None) -> Labeled:
        li = list(range(len(self.layers))) if layers is None else [
            _index(self.layers, ("",), v, None)[0] for v in layers]
        pj = list(range(len(self.positions))) if positions is None else [
            _index(self.layers, self.positions, self.layers[0], p)[1] for p in positions]
        return Labeled(self.x[:, li][:, :, pj], self.y, tuple(self.layers[i] for i in li),
                       tuple(self.positions[j] for j in pj), self.split, self.model)


def _index(layers: Sequence[int], positions: Sequence[str], layer: int, position: str | None) -> tuple[int, int]:
    if layer not in layers:
        raise ConfigError(f"layer {layer} is not in the grid (have {list(layers)})")
    if position is None:
        if len(positions) != 1:
            raise ConfigError(f"the grid has positions {list(positions)}; name one")
        return list(layers).index(layer), 0
    if position not in positions:
        raise ConfigError(f"position {position!r} is not in the grid (have {list(positions)})")
    return list(layers).index(layer), list(positions).index(position)


def class_mean_difference(
    x: Float[Array, "n *grid d_model"], y: Shaped[Array, "n"]
) -> Float[Tensor, "*grid d_model"]:
    """``mean(x[positive]) - mean(x[negative])`` (Arditi et al.'s diff-in-means), per grid cell.

    Parameters
    ----------
    x
        Activations ``[n, *grid, d_model]`` (tensor or array; computed in float32).
    y
        ``n`` labels, ``True`` (or 1) for the positive class.

    Returns
    -------
    Tensor
        ``[*grid, d_model]`` float32.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]], [[0.0, 1.0]]])  # [n=3, layer=1, d=2]
    >>> class_mean_difference(x, torch.tensor([True, True, False])).tolist()
    [[3.0, -1.0]]
    """
    t = as_tensor(x, dtype=torch.float32)
    lab = as_labels(y, n=t.shape[0])
    return t[lab].mean(dim=0) - t[~lab].mean(dim=0)


def _unit(d: Tensor) -> Tensor:
    # A zero class-mean difference is real (layer 0 at chat-template tokens: the same embedding
    # for every prompt); it stays zero, so its scores tie: AUC 0.5, p = 1.
    norm = d.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, d / norm.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))


def _project(x: Float[Tensor, "n layer pos d"], dirs: Float[Tensor, "layer pos d"]) -> Tensor:
    return einsum(x, _unit(dirs.to(x.dtype)), "n layer pos d, layer pos d -> n layer pos")


def _grid_directions(directions: Float[Array, "..."], data: Labeled) -> Float[Tensor, "layer pos d"]:
    d = as_tensor(directions, dtype=torch.float32)
    L, P, width = data.x.shape[1], data.x.shape[2], data.d_model
    if d.shape[-1] != width:
        raise DModelMismatchError(expected=width, actual=int(d.shape[-1]), what="direction")
    if d.ndim == 1:
        d = d.expand(L, P, width)
    elif d.ndim == 2 and d.shape[0] == L:
        d = d[:, None].expand(L, P, width)
    elif not (d.ndim == 3 and d.shape[:2] == (L, P)):
        raise ConfigError(f"directions of shape {tuple(d.shape)} fit neither [d], [layer, d] nor "
                          f"[layer, pos, d] for a grid of {L} layers x {P} positions")
    return d


# -- fitted probes ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A logistic-regression read-out ``score = x @ weight + bias`` in raw activation space.

    Standardization is folded into ``weight``/``bias``, so the probe applies to raw activations
    of any model of the same width (AUC ignores the bias and any positive scale).
    """

    weight: Float[Tensor, "d_model"]
    bias: float
    C: float = 1.0
    layer: int | None = None
    position: str | None = None
    converged: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "LinearProbe"

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[0])

    @property
    def direction(self) -> Float[Tensor, "d_model"]:
        return self.weight / self.weight.norm()

    @classmethod
    def fit(
        cls,
        x: Float[Array, "n d_model"],
        y: Shaped[Array, "n"],
        *,
        C: float = 1.0,
        max_iter: int = 2000,
        layer: int | None = None,
        position: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> LinearProbe:
        """L2 logistic regression on standardized features (scikit-learn, lbfgs)."""
        # lazy: scikit-learn takes seconds to import; only fitting needs it
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        if C <= 0:
            raise ConfigError(f"C must be > 0, got {C}")
        X = as_tensor(x, dtype=torch.float64).numpy()
        lab = as_labels(y, n=X.shape[0]).numpy()
        mu, sd = X.mean(axis=0), X.std(axis=0)
        sd[sd == 0] = 1.0  # constant features carry nothing; avoid 0/0
        lr = LogisticRegression(C=C, max_iter=max_iter)
        # One BLAS thread: lbfgs makes many small matrix-vector products, for which threads cost
        # more than they give (6-16x slower on a loaded 2-core machine).
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit((X - mu) / sd, lab)
        coef = lr.coef_[0] / sd
        bias = float(lr.intercept_[0] - (coef * mu).sum())
        return cls(torch.as_tensor(coef, dtype=torch.float32), bias, float(C), layer, position,
                   bool(int(np.max(lr.n_iter_)) < max_iter), dict(meta or {}))

    def decision_function(self, x: Float[Array, "n d"]) -> Float[Tensor, "n"]:
        t = as_tensor(x, dtype=torch.float64)
        if t.shape[-1] != self.d_model:
            raise DModelMismatchError(expected=self.d_model, actual=int(t.shape[-1]), what="activations")
        return t @ self.weight.double() + self.bias

    def predict_proba(self, x: Float[Array, "n d"]) -> Float[Tensor, "n"]:
        return torch.sigmoid(self.decision_function(x))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.weight.tolist(), "bias": self.bias, "C": self.C,
                "layer": self.layer, "position": self.position, "converged": self.converged,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearProbe:
        if d.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"this is a {d.get('kind')}, not a LinearProbe")
        return cls(torch.tensor(d["weight"], dtype=torch.float32), float(d["bias"]), float(d["C"]),
                   d.get("layer"), d.get("position"), bool(d.get("converged", True)), dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike[str]) -> None:
        meta = {k: v for k, v in self.to_dict().items() if k != "weight"}
        save_tensors(path, {"weight": self.weight}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearProbe:
        tensors, meta = load_tensors(path)
        return cls.from_dict({**meta, "weight": tensors["weight"].tolist()})


def fit_probe(data: Labeled, layer: int, position: str | None = None, *, C: float = 1.0,
              max_iter: int = 2000) -> LinearProbe:
    """Fit a :class:`LinearProbe` on one cell of ``data`` (all of it: use a train split)."""
    return LinearProbe.fit(data.cell(layer, position), data.y, C=C, max_iter=max_iter, layer=layer,
                           position=position or data.positions[0],
                           meta={"split": data.split, "model": data.model})


# -- the grid --------------------------------------------------------------------------------------
