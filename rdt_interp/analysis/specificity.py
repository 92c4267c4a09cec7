"""Is the effect specific to *this* direction? The real direction against random ones.

The effect of a direction ``r`` (any scalar: projection AUC, refusal rate after steering, …)
is compared with the effects of ``N >= 100`` random directions of the same norm, drawn
uniformly on the sphere. The result has the empirical p-value ``(1 + #{null >= real}) /
(1 + N)``, the z-score against the null, a bootstrap CI of the real effect (when the effect can
resample its data) and the same numbers for controls: ``-r``, a class-mean difference with
shuffled labels, the direction of another layer.

A second null (``shuffled=``): a *distribution* of class-mean differences with shuffled labels
(:func:`label_shuffled_directions`), rescaled to the real direction's norm. Random directions
are isotropic; shuffled-label directions live where the activations vary, so an effect that any
high-variance direction has is not credited to the refusal direction. The result reports the
p-value and z-score against each null.

An effect is a callable ``effect(directions[k, d]) -> [k]`` evaluated on batches of directions;
:class:`ProjectionAUC` is the vectorized one for "does the direction separate the classes":
1000 random directions on 512 x 4096 activations take about a second on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from rdt_interp.analysis._result import ResultMixin
from rdt_interp.analysis.permutation import shuffled_mean_differences
from rdt_interp.analysis.probes import class_mean_difference
from rdt_interp.analysis.stats import (
    Array,
    as_labels,
    as_tensor,
    auc_groups,
    bootstrap_distribution,
    cohens_d,
    empirical_pvalue,
    percentile_interval,
    threads_for,
)
from rdt_interp.errors import ConfigError, DModelMismatchError

Effect = Callable[[Tensor], Tensor]
MIN_RANDOM = 100
MIN_SHUFFLED = 19  # the fewest for which p = 1 / (N + 1) can reach 0.05
_SALT = 0x5EED_0F_D1


@dataclass(frozen=True, eq=False)
class ProjectionAUC:
    """Effect = AUC of the projections ``x @ r`` (positive class scores higher), per direction.

    Norm-free (AUC ignores positive scale). ``bootstrap`` resamples the samples within each class
    for a CI of one direction's AUC.
    """

    x: Float[Array, "n d"]
    y: Shaped[Array, "n"]
    name: ClassVar[str] = "projection AUC"

    def __post_init__(self) -> None:
        x = as_tensor(self.x, dtype=torch.float32).contiguous()
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", as_labels(self.y, n=x.shape[0]))

    @property
    def d_model(self) -> int:
        return int(self.x.shape[1])

    def _scores(self, directions: Float[Tensor, "k d"]) -> tuple[Tensor, Tensor]:
        if directions.shape[-1] != self.d_model:
            raise DModelMismatchError(expected=self.d_model, actual=int(directions.shape[-1]))
        s = self.x @ directions.to(self.x.dtype).T
        return s[self.y], s[~self.y]

    def _stat(self, p: Tensor, q: Tensor) -> Tensor:
        return auc_groups(p, q)

    def __call__(self, directions: Float[Tensor, "k d"]) -> Float[Tensor, "k"]:
        return self._stat(*self._scores(directions)).to(torch.float64)

    def bootstrap(self, direction: Float[Tensor, "d"], n_boot: int, seed: int) -> Float[Tensor, "n_boot"]:
        p, q = self._scores(direction[None])
        return bootstrap_distribution(lambda a, b: self._stat(a, b)[:, 0], p, q, n_boot=n_boot,
                                      seed=seed).to(torch.float64)


@dataclass(frozen=True, eq=False)
class ProjectionCohenD(ProjectionAUC):
    """Effect = Cohen's d of the projections onto the unit direction (scale-free)."""

    name: ClassVar[str] = "projection Cohen's d"

    def _stat(self, p: Tensor, q: Tensor) -> Tensor:
        return cohens_d(p, q)


def random_directions(n: int, d: int, *, norm: float = 1.0, seed: int = 0) -> Float[Tensor, "n d"]:
    """``n`` directions uniform on the sphere of radius ``norm`` in ``R^d`` (float32)."""
    # Salted, so that seed 0 here is not the stream of torch.manual_seed(0) (a direction drawn
    # that way would otherwise be its own first "random" direction).
    gen = torch.Generator().manual_seed(_SALT + seed)
    g = torch.randn(n, d, generator=gen)
    return g * (norm / g.norm(dim=1, keepdim=True))


def label_shuffled_direction(
    x: Float[Array, "n d"], y: Shaped[Array, "n"], *, seed: int = 0
) -> Float[Tensor, "d"]:
    """Class-mean difference after a random permutation of the labels (a control direction)."""
    lab = as_labels(y)
    gen = torch.Generator().manual_seed(seed)
    return class_mean_difference(x, lab[torch.randperm(lab.shape[0], generator=gen)])


def label_shuffled_directions(
    x: Float[Array, "n_samples d"], y: Shaped[Array, "ny"], n: int, *, seed: int = 0, norm: float | None = None
) -> Float[Tensor, "n_shuffled d"]:
    """``n`` class-mean differences of ``x`` under shuffled labels (class sizes kept), one product.

    With ``norm`` every row is rescaled to that norm (the real direction's, for
    :func:`specificity_test` ``shuffled=``, which also rescales). Seeded: the same ``seed``
    gives the same rows.

    Parameters
    ----------
    x : array of float, shape (n_samples, d)
        The activations the real direction was computed from.
    y : array of bool or 0/1, shape (n_samples,)
        Their labels (``True`` / 1 = harmful); at least two per class.
    n : int
        How many shuffled directions (>= 1).
    seed : int
        Seeds the shuffles.
    norm : float, optional
        Rescale every row to this norm.

    Returns
    -------
    Tensor of float32, shape (n, d)

    Raises
    ------
    ConfigError
        Fewer than two samples per class, NaN / inf activations, ``n < 1``, a zero shuffled
        direction when ``norm`` is given.

    Examples
    --------
    >>> x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    >>> y = torch.arange(30) < 15
    >>> dirs = label_shuffled_directions(x, y, 50, seed=1, norm=2.0)
    >>> tuple(dirs.shape), bool(torch.allclose(dirs.norm(dim=1), torch.tensor(2.0)))
    ((50, 8), True)
    """
    dirs = shuffled_mean_differences(x, y, n, seed=seed)
    if norm is None:
        return dirs
    if not norm > 0:
        raise ConfigError(f"norm must be > 0, got {norm}")
    lengths = dirs.norm(dim=1, keepdim=True)
    if bool((lengths == 0).any()):
        raise ConfigError("a shuffled-label direction is zero (every sample has the same activation?)",
                          fix="use activations that vary across samples")
    return dirs * (norm / lengths)


@dataclass(frozen=True, eq=False)
class SpecificityResult(ResultMixin):
    """The real direction's effect, its random-direction null sample and the controls.

    ``controls`` maps a control's name to ``{"effect", "p", "z"}`` against the same null (and
    ``"p_shuffled"`` against the shuffled-label null when there is one).
    ``real_lo``/``real_hi`` (and ``z_lo``/``z_hi``) are NaN when the effect cannot bootstrap.

    ``shuffled_null`` (``n_shuffled`` effects of label-shuffled class-mean differences of the
    real direction's norm), ``shuffled_p`` and ``shuffled_z`` are the second null; ``None`` /
    NaN / 0 (and absent from ``to_dict``) when the test ran without ``shuffled=``.
    """

    effect_name: str
    real: float
    real_lo: float
    real_hi: float
    p: float
    z: float
    z_lo: float
    z_hi: float
    null: Float[np.ndarray, "n_random"]
    alternative: str
    norm: float
    d_model: int
    n_random: int
    seed: int
    level: float
    n_boot: int
    controls: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    shuffled_null: Float[np.ndarray, "n_shuffled"] | None = None
    shuffled_p: float = float("nan")
    shuffled_z: float = float("nan")
    n_shuffled: int = 0

    _arrays: ClassVar[tuple[str, ...]] = ("null", "shuffled_null")
    _shuffled_fields: ClassVar[tuple[str, ...]] = ("shuffled_null", "shuffled_p", "shuffled_z", "n_shuffled")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.shuffled_null is None:
            for name in self._shuffled_fields:
                del out[name]
        return out

    @property
    def null_mean(self) -> float:
        return float(np.mean(self.null))

    @property
    def null_sd(self) -> float:
        return float(np.std(self.null, ddof=1))

    def null_quantile(self, q: float) -> float:
        return float(np.quantile(self.null, q))


def _evaluate(effect: Effect, directions: Tensor) -> Tensor:
    out = effect(directions)
    if not isinstance(out, Tensor) or out.shape != (directions.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"effect returned {shape} for {directions.shape[0]} directions",
                          fix="the effect must map directions [k, d] to a tensor [k]")
    return out.detach().to(torch.float64).cpu()


def specificity_test(
    effect: Effect,
    direction: Float[Array, "d"],
    *,
    n_random: int = 1000,
    batch_size: int = 256,
    controls: Mapping[str, Float[Array, "dc"]] | None = None,
    alternative: str = "greater",
    match_norm: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    effect_name: str | None = None,
    meta: Mapping[str, Any] | None = None,
    shuffled: Float[Array, "n_shuffled ds"] | None = None,
) -> SpecificityResult:
    """Effect of ``direction`` against ``n_random`` random directions of the same norm.

    Controls are rescaled to the same norm when ``match_norm`` (so only their direction
    differs). Use ``alternative="two-sided"`` for effects whose sign is arbitrary (e.g. AUC of
    a direction whose orientation was not fixed in advance).

    ``shuffled`` (``[N, d]``, ``N >= 19``; e.g. :func:`label_shuffled_directions` of the
    activations the direction came from) adds the second null: each row is rescaled to the
    direction's norm and its effect evaluated (``batch_size`` rows at a time); the result then
    has ``shuffled_null``, ``shuffled_p`` and ``shuffled_z``. The random-direction numbers do not
    change when it is added.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(200) < 100
    >>> r = torch.zeros(32); r[0] = 1.0
    >>> x = torch.randn(200, 32, generator=g) + 1.5 * y[:, None].float() * r
    >>> res = specificity_test(ProjectionAUC(x, y), r, n_random=200, n_boot=0,
    ...                        shuffled=label_shuffled_directions(x, y, 50, seed=1))
    >>> round(res.p, 4), round(res.shuffled_p, 4), res.n_shuffled  # 1 / 201 and 1 / 51
    (0.005, 0.0196, 50)
    """
    d_ = int(as_tensor(direction).shape[-1])
    with threads_for(d_ * max(n_random, getattr(getattr(effect, "x", None), "shape", (1,))[0])):
        return _specificity_test(effect, direction, n_random, batch_size, controls, alternative,
                                 match_norm, n_boot, seed, level, effect_name, meta, shuffled)


def _specificity_test(
    effect: Effect, direction: Float[Array, "d"], n_random: int, batch_size: int,
    controls: Mapping[str, Float[Array, "dc"]] | None, alternative: str, match_norm: bool,
    n_boot: int, seed: int, level: float, effect_name: str | None, meta: Mapping[str, Any] | None,
    shuffled: Float[Array, "n_shuffled ds"] | None = None,
) -> SpecificityResult:
    if n_random < MIN_RANDOM:
        raise ConfigError(f"n_random={n_random} is too few for a p-value below 0.01",
                          fix=f"use n_random >= {MIN_RANDOM} (1000 is the default)")
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    r = as_tensor(direction, dtype=torch.float32)
    d = int(r.shape[0])
    norm = float(r.norm())
    if norm == 0.0:
        raise ConfigError("the direction has zero norm")
    shuf = None if shuffled is None else _norm_matched(shuffled, d, norm)
    real = float(_evaluate(effect, r[None])[0])
    # Drawn up front: the null does not depend on batch_size.
    rand = random_directions(n_random, d, norm=norm, seed=seed)
    null = torch.cat([_evaluate(effect, rand[i:i + batch_size]) for i in range(0, n_random, batch_size)])
    mean, sd = float(null.mean()), float(null.std())

    def p_of(value: float) -> float:
        return float(empirical_pvalue(torch.tensor(value, dtype=torch.float64), null, alternative))

    lo = hi = float("nan")
    boot = getattr(effect, "bootstrap", None)
    if callable(boot) and n_boot > 0:
        lo_t, hi_t = percentile_interval(boot(r, n_boot, seed + 1), level)
        lo, hi = float(lo_t), float(hi_t)
    out_controls: dict[str, dict[str, float]] = {}
    for name, c in (controls or {}).items():
        cv = as_tensor(c, dtype=torch.float32)
        if cv.shape[-1] != d:
            raise DModelMismatchError(expected=d, actual=int(cv.shape[-1]), what=f"control {name!r}")
        if match_norm:
            cn = float(cv.norm())
            if cn == 0.0:
                raise ConfigError(f"control {name!r} has zero norm")
            cv = cv * (norm / cn)
        value = float(_evaluate(effect, cv[None])[0])
        out_controls[str(name)] = {"effect": value, "p": p_of(value), "z": (value - mean) / sd}
    extra: dict[str, Any] = {}
    if shuf is not None:
        s_null = torch.cat([_evaluate(effect, shuf[i:i + batch_size]) for i in range(0, shuf.shape[0], batch_size)])
        s_mean, s_sd = float(s_null.mean()), float(s_null.std())

        def p_shuf(value: float) -> float:
            return float(empirical_pvalue(torch.tensor(value, dtype=torch.float64), s_null, alternative))

        for ctl in out_controls.values():
            ctl["p_shuffled"] = p_shuf(ctl["effect"])
        extra = {"shuffled_null": s_null.numpy(), "shuffled_p": p_shuf(real),
                 "shuffled_z": (real - s_mean) / s_sd, "n_shuffled": int(shuf.shape[0])}
    name = effect_name or getattr(effect, "name", None) or getattr(effect, "__name__", "effect")
    return SpecificityResult(
        effect_name=str(name), real=real, real_lo=lo, real_hi=hi, p=p_of(real), z=(real - mean) / sd,
        z_lo=(lo - mean) / sd, z_hi=(hi - mean) / sd, null=null.numpy(), alternative=alternative,
        norm=norm, d_model=d, n_random=n_random, seed=seed, level=level, n_boot=n_boot,
        controls=out_controls, meta=dict(meta or {}), **extra,
    )


def _norm_matched(shuffled: Any, d: int, norm: float) -> Tensor:  # the check itself: any shape in
    sv = as_tensor(shuffled, dtype=torch.float32)
    if sv.ndim != 2:
        raise ConfigError(f"shuffled must be [n_shuffled, d], got shape {tuple(sv.shape)}",
                          fix="pass label_shuffled_directions(x, y, n) (a single direction is not a null)")
    if sv.shape[1] != d:
        raise DModelMismatchError(expected=d, actual=int(sv.shape[1]), what="shuffled-label directions")
    if sv.shape[0] < MIN_SHUFFLED:
        raise ConfigError(f"{sv.shape[0]} shuffled-label directions are too few for a p-value below 0.05",
                          fix=f"pass at least {MIN_SHUFFLED} (e.g. label_shuffled_directions(x, y, 200))")
    if not bool(torch.isfinite(sv).all()):
        raise ConfigError("shuffled-label directions contain NaN or inf", fix="check the activations they came from")
    lengths = sv.norm(dim=1, keepdim=True)
    if bool((lengths == 0).any()):
        raise ConfigError("a shuffled-label direction has zero norm")
    return sv * (norm / lengths)
