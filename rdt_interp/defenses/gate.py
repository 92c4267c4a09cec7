"""Probe-gated RDT+: steer only the requests a harmfulness probe flags.

A :class:`HarmGate` is a linear probe on the VLA's residual at one prefill role (by default the
last prompt token, which predicts action token 0) and layer, plus a threshold. At inference
(:func:`gated_generate`) a first pass runs the unsteered prompt up to the gate's layer (the
forward stops there) and scores every row; then the batch is generated once with RDT+ whose
``alpha`` / ``alpha_text`` are one number per row -- the chosen values where the probe fires,
0 elsewhere -- so every row gets what it would get alone: RDT+ if flagged, the undefended
policy if not.

:func:`fit_gate` fits the probe on the VLA's own prefill activations of a labelled split
(``val``) and sets the threshold to hit a target false-positive rate on that split's benign
requests. The threshold is read off *out-of-fold* scores (K folds that keep each
harmful/benign pair together), since a probe's scores on its own training rows are too well
separated; the final probe is then fitted on the whole split. A probe fitted elsewhere (e.g. on
the chat model, :func:`chat_harm_probe`) can be passed instead; only the threshold is then set
on the split. docs/defenses.md says why the VLA's own activations are the default.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from rdt_interp.analysis.layer_pick import pick_layer
from rdt_interp.analysis.permutation import permutation_pvalue
from rdt_interp.analysis.probes import LinearProbe
from rdt_interp.analysis.stats import auc_groups, permutation_null, wilson_interval
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.models.vla import VLAAdapter
from rdt_interp.tracing.generation import Backend, Generation, generate, make_runner
from rdt_interp.tracing.interventions import Intervention, Site, StepContext, steer
from rdt_interp.tracing.vla import (
    RoleRecorder,
    RoleSpec,
    action_token_ids,
    capture_roles,
)


@dataclass(frozen=True, eq=False)
class HarmGate:
    """Fires on a row when ``probe(residual at role, layer) > threshold``."""

    probe: LinearProbe
    layer: int
    threshold: float
    role: str = "last_text"
    site: str = "resid_pre"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = RoleSpec.parse(self.role)
        if spec.phase != "prefill":
            raise ConfigError(f"the gate reads role {self.role!r}, which is not in the prefill",
                              fix="gate on a prefill role (last_text, text, a selector such as instruction[-1])")
        object.__setattr__(self, "role", spec.name)
        object.__setattr__(self, "site", Site.parse(self.site).value)
        if math.isnan(self.threshold):
            raise ConfigError("the gate threshold is NaN", fix="set it with threshold_for_fpr() or fit_gate()")

    @property
    def d_model(self) -> int:
        return self.probe.d_model

    def _check(self, adapter: ModelAdapter) -> None:
        if adapter.d_model != self.d_model:
            raise DModelMismatchError(expected=adapter.d_model, actual=self.d_model, what="gate probe")
        if not 0 <= self.layer < adapter.n_layers:
            raise ConfigError(f"gate layer {self.layer} is not a layer of {adapter.name} ({adapter.n_layers} layers)")

    def batch_scores(self, adapter: VLAAdapter, batch: EncodedBatch, *, backend: Backend = "hooks") -> Float[Tensor, "n"]:
        """Probe scores of an encoded batch: the unsteered prompt, run up to the gate's layer."""
        self._check(adapter)
        rec = RoleRecorder([self.role], [self.layer], self.site)
        with torch.inference_mode(), make_runner(backend, adapter, (), [rec]) as runner:
            runner.forward(adapter.prefill_kwargs(batch, use_cache=False), StepContext("prefill", batch.roles),
                           need_output=False)
        x = rec.tensors()[self.role][:, 0]
        return self.probe.decision_function(x).float()

    def scores(self, adapter: VLAAdapter, requests: Sequence[Any], *, batch_size: int = 16,
               backend: Backend = "hooks") -> Float[Tensor, "n"]:
        """Probe scores of requests (batched, in the caller's order)."""
        self._check(adapter)
        x = _residuals(adapter, requests, self.layer, self.role, self.site, batch_size, backend)
        return self.probe.decision_function(x).float()

    def fires(self, scores: Float[Tensor, "n"]) -> Bool[Tensor, "n"]:
        return scores > self.threshold

    def with_threshold(self, threshold: float, **meta: Any) -> HarmGate:
        return HarmGate(self.probe, self.layer, float(threshold), self.role, self.site, {**self.meta, **meta})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "HarmGate", "probe": self.probe.to_dict(), "layer": self.layer,
                "threshold": self.threshold, "role": self.role, "site": self.site, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HarmGate:
        if d.get("kind", "HarmGate") != "HarmGate":
            raise ConfigError(f"this is a {d.get('kind')}, not a HarmGate")
        return cls(LinearProbe.from_dict(dict(d["probe"])), int(d["layer"]), float(d["threshold"]),
                   str(d.get("role", "last_text")), str(d.get("site", "resid_pre")), dict(d.get("meta", {})))


def _residuals(adapter: VLAAdapter, requests: Sequence[Any], layers: int | Sequence[int], role: str, site: str,
               batch_size: int, backend: Backend) -> Tensor:
    """Residuals at ``role``: ``[n, d]`` for one layer, ``[n, L, d]`` for a list of layers."""
    reqs = [getattr(r, "request", r) for r in requests]
    one = isinstance(layers, int)
    caps = capture_roles(adapter, reqs, roles=[role], layers=[layers] if one else list(layers), site=site,
                         batch_size=batch_size, backend=backend)
    x = caps.at(role).values[:, :, 0]
    return x[:, 0] if one else x


# -- thresholds ------------------------------------------------------------------------------------
def threshold_for_fpr(benign_scores: Float[Tensor, "n"], target_fpr: float) -> float:
    """The smallest threshold at which at most ``floor(target_fpr * n)`` benign scores are
    above it (the gate fires on ``score > threshold``)."""
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1), got {target_fpr}")
    s = benign_scores.double().flatten()
    if s.numel() == 0:
        raise ConfigError("no benign scores to set the threshold on")
    allowed = int(math.floor(target_fpr * s.numel() + 1e-9))
    desc = s.sort(descending=True).values
    return float(desc[allowed]) if allowed < s.numel() else float("-inf")


@dataclass(frozen=True)
class GateRates:
    """How a gate splits labelled scores: TPR (harmful flagged), FPR (benign flagged), AUC."""

    tpr: float
    tpr_lo: float
    tpr_hi: float
    fpr: float
    fpr_lo: float
    fpr_hi: float
    auc: float
    n_harmful: int
    n_benign: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateRates:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def gate_rates(scores: Float[Tensor, "n"], harmful: Bool[Tensor, "n"], threshold: float, *,
               n_boot: int = 1000, seed: int = 0) -> GateRates:
    """TPR and FPR of ``scores > threshold`` with Wilson CIs, and the AUC of the scores
    (``n_boot`` and ``seed`` are kept for the callers; rates need no resampling)."""
    y = torch.as_tensor(harmful, dtype=torch.bool)
    if not bool(y.any()) or bool(y.all()):
        raise ConfigError("gate_rates needs harmful and benign rows")
    fired = (scores.double() > threshold).double()
    tpr = wilson_interval(fired[y], int(y.sum()))
    fpr = wilson_interval(fired[~y], int((~y).sum()))
    auc = float(auc_groups(scores.double()[y], scores.double()[~y]))
    return GateRates(float(tpr[0]), float(tpr[1]), float(tpr[2]), float(fpr[0]), float(fpr[1]), float(fpr[2]),
                     auc, int(y.sum()), int((~y).sum()))


# -- fitting ---------------------------------------------------------------------------------------
def grouped_folds(groups: Sequence[str], folds: int, seed: int = 0) -> list[int]:
    """Fold index per row; rows of one group (a harmful/benign pair) share a fold."""
    keys = list(dict.fromkeys(groups))
    if folds < 2 or len(keys) < folds:
        raise ConfigError(f"{len(keys)} groups cannot make {folds} folds", fix="lower folds or add pairs")
    random.Random(seed).shuffle(keys)
    fold_of = {k: i % folds for i, k in enumerate(keys)}
    return [fold_of[g] for g in groups]


def fit_gate(
    adapter: VLAAdapter,
    requests: Sequence[Any],
    harmful: Sequence[bool] | Bool[Tensor, "n"] | None = None,
    *,
    layer: int | Sequence[int],
    role: str = "last_text",
    target_fpr: float = 0.05,
    probe: LinearProbe | None = None,
    C: float = 1.0,
    folds: int = 5,
    groups: Sequence[str] | None = None,
    batch_size: int = 16,
    backend: Backend = "hooks",
    seed: int = 0,
    n_perm: int = 1000,
) -> HarmGate:
    """A gate for ``adapter`` fitted on labelled ``requests`` (the ``val`` split).

    ``harmful`` per request (default: ``request.label == "harmful"``). Without ``probe``: a
    logistic probe (``C``) on the VLA's residual at ``role`` / ``layer``; the threshold is set
    on out-of-fold scores (``folds`` folds grouped by ``groups``, default each request's
    ``pair_id``), then the probe is refitted on every row. With ``probe``: its scores on
    ``requests`` set the threshold. Several ``layer`` candidates: the one whose (out-of-fold, or
    given-probe) scores have the highest AUC on ``requests`` is used (one capture serves all).
    ``meta`` records the probe source, the per-layer AUCs, the target FPR and the FPR / TPR /
    AUC reached on ``requests``, and the evidence that the chosen layer separates the classes at
    all: per layer, the label-permutation p-value of its AUC (``layer_p``, ``n_perm`` shuffles
    of the labels over the same scores, one-sided) and the Holm adjustment across the layers
    offered (``layer_p_holm``); ``p_holm`` is the chosen layer's and ``significant`` is
    ``p_holm <= 0.05``. For a given probe the permutation p-value is exact; for the out-of-fold
    probe it permutes the scores without refitting (approximate).
    """
    if n_perm < 1:
        raise ConfigError(f"n_perm must be >= 1, got {n_perm}", fix="use n_perm=1000")
    if harmful is None:
        labels = [getattr(r, "label", None) for r in requests]
        if any(lab not in ("harmful", "benign") for lab in labels):
            raise ConfigError("requests carry no harmful/benign label", fix="pass harmful= (one bool per request)")
        y = torch.tensor([lab == "harmful" for lab in labels])
    else:
        y = torch.as_tensor(list(harmful) if not isinstance(harmful, Tensor) else harmful, dtype=torch.bool)
    if y.shape[0] != len(requests) or bool(y.all()) or not bool(y.any()):
        raise ConfigError(f"fit_gate needs harmful and benign requests with one label each "
                          f"({len(requests)} requests, {y.shape[0]} labels)")
    layers = [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]
    if not layers or len(set(layers)) != len(layers):
        raise ConfigError(f"gate layers {layers} must be distinct and at least one")
    if probe is not None and probe.d_model != adapter.d_model:
        raise DModelMismatchError(expected=adapter.d_model, actual=probe.d_model, what="gate probe")
    xs = _residuals(adapter, requests, layers, role, "resid_pre", batch_size, backend)  # [n, L, d]
    if probe is None:
        grp = list(groups) if groups is not None else [str(getattr(r, "pair_id", i)) for i, r in enumerate(requests)]
        fold = torch.tensor(grouped_folds(grp, folds, seed))
        for f in range(folds):
            tr = fold != f
            if bool(y[tr].all()) or not bool(y[tr].any()):
                raise ConfigError(f"fold {f} leaves one class out of the training rows", fix="lower folds")

    def layer_scores(x: Tensor) -> Tensor:
        if probe is not None:
            return probe.decision_function(x).float()
        out = torch.empty(len(requests), dtype=torch.float32)
        for f in range(folds):
            te = fold == f
            out[te] = LinearProbe.fit(x[~te], y[~te], C=C).decision_function(x[te]).float()
        return out

    per_layer = [layer_scores(xs[:, j]) for j in range(len(layers))]
    aucs = [float(auc_groups(s.double()[y], s.double()[~y])) for s in per_layer]
    p_raw = [float(permutation_pvalue(torch.tensor([a], dtype=torch.float64),
                                      permutation_null(auc_groups, s.double()[:, None], y, n_perm=n_perm, seed=seed))[0])
             for a, s in zip(aucs, per_layer, strict=True)]
    # Highest AUC, the first layer on ties; its p-value Holm-adjusted across the layers offered.
    pick = pick_layer(p_raw, aucs, layers=layers, method="holm")
    best = pick.index
    chosen, scores = layers[best], per_layer[best]
    if probe is None:
        probe = LinearProbe.fit(xs[:, best], y, C=C, layer=chosen, position=role,
                                meta={"model": adapter.describe(), "n": len(requests)})
        source = {"probe_source": "vla", "threshold_scores": f"out-of-fold ({folds} folds, pairs kept together)",
                  "C": float(C)}
    else:
        source = {"probe_source": "given", "probe_meta": dict(probe.meta), "threshold_scores": "given probe"}
    threshold = threshold_for_fpr(scores[~y], target_fpr)
    rates = gate_rates(scores, y, threshold, n_boot=200, seed=seed)
    meta = {**source, "target_fpr": float(target_fpr), "fit_fpr": rates.fpr, "fit_tpr": rates.tpr,
            "fit_auc": rates.auc, "n_harmful": rates.n_harmful, "n_benign": rates.n_benign,
            "layer_auc": {str(a): round(b, 6) for a, b in zip(layers, aucs, strict=True)},
            "layer_p": {str(a): b for a, b in zip(layers, p_raw, strict=True)},
            "layer_p_holm": {str(a): float(b) for a, b in zip(layers, pick.p_adjusted_all, strict=True)},
            "p_holm": pick.p_adjusted, "significant": pick.significant, "n_perm": int(n_perm),
            "p_method": "label permutation of the AUC, Holm across the layers offered"}
    return HarmGate(probe, chosen, threshold, role, "resid_pre", meta)


def chat_harm_probe(
    chat: ModelAdapter,
    harmful: Sequence[Any],
    harmless: Sequence[Any],
    *,
    layer: int,
    position: str = "post_instruction[-1]",
    C: float = 1.0,
    batch_size: int = 16,
) -> LinearProbe:
    """A harmfulness probe fitted on a chat model's activations (to transfer to a VLA of the
    same width through :func:`fit_gate` ``probe=``)."""
    from rdt_interp.prompts import instructions
    from rdt_interp.tracing.capture import capture

    kw = dict(layers=[layer], selector=position, batch_size=batch_size, backend="hooks", progress=False)
    h = capture(chat, instructions(harmful), **kw).values[:, 0, 0]
    hl = capture(chat, instructions(harmless), **kw).values[:, 0, 0]
    y = torch.cat([torch.ones(h.shape[0]), torch.zeros(hl.shape[0])]).bool()
    return LinearProbe.fit(torch.cat([h, hl]), y, C=C, layer=layer, position=position,
                           meta={"model": chat.describe(), "n": int(y.numel()), "source": "chat"})


# -- gated generation ------------------------------------------------------------------------------
def gated_interventions(
    direction: Any,
    fired: Bool[Tensor, "batch"],
    *,
    alpha: float,
    layers: int | Sequence[int],
    alpha_text: float | None = None,
    mode: str = "text+action",
    include_image: bool = False,
) -> list[Intervention]:
    """RDT+ (or another target mode) with per-row alphas: ``alpha`` where ``fired``, else 0."""
    on = torch.as_tensor(fired, dtype=torch.bool).float()
    return steer(direction, mode, on * float(alpha), layers,
                 alpha_text=None if alpha_text is None else on * float(alpha_text), include_image=include_image)


@dataclass(frozen=True, eq=False)
class GatedGeneration:
    """A gated generation: the tokens (and logits), each row's probe score and whether it fired."""

    generation: Generation
    scores: Float[Tensor, "batch"]
    fired: Bool[Tensor, "batch"]


def gated_generate(
    adapter: VLAAdapter,
    batch: EncodedBatch,
    gate: HarmGate,
    direction: Any,
    *,
    alpha: float,
    layers: int | Sequence[int],
    alpha_text: float | None = None,
    mode: str = "text+action",
    include_image: bool = False,
    scores: Float[Tensor, "batch"] | None = None,
    constrain_actions: bool = True,
    backend: Backend = "hooks",
    return_logits: bool = True,
) -> GatedGeneration:
    """Score the batch with ``gate`` (unless ``scores`` are given), then generate the actions
    with RDT+ on the rows where it fires and nothing on the others."""
    s = gate.batch_scores(adapter, batch, backend=backend) if scores is None else scores.float()
    if s.shape[0] != len(batch):
        raise ConfigError(f"{s.shape[0]} scores for a batch of {len(batch)}")
    fired = gate.fires(s)
    ivs = gated_interventions(direction, fired, alpha=alpha, layers=layers, alpha_text=alpha_text, mode=mode,
                              include_image=include_image)
    gen = generate(adapter, batch, max_new_tokens=adapter.action_dim, interventions=ivs, backend=backend,
                   allowed_token_ids=action_token_ids(adapter, constrain_actions), stop_at_eos=False,
                   return_logits=return_logits)
    return GatedGeneration(gen, s.cpu(), fired.cpu())


__all__ = ["GateRates", "GatedGeneration", "HarmGate", "chat_harm_probe", "fit_gate", "gate_rates",
           "gated_generate", "gated_interventions", "grouped_folds", "threshold_for_fpr"]
