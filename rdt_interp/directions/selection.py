"""Choosing the refusal direction the way Arditi et al. (2024) did, fast enough for a CPU.

For each candidate (layer, post-instruction position) diff-in-means vector r:

* ablation score — mean refusal score on harmful validation prompts with r projected out of
  every layer (lower: the direction mediates refusal);
* steering score — mean refusal score on harmless validation prompts with r added at its layer
  (higher: adding it induces refusal);
* KL — KL(base || ablated) of the next-token distribution on harmless validation prompts.

Filters (Arditi et al.'s): layer < ``int(max_layer_fraction * n_layers)``, KL <=
``kl_threshold``, steering score (at coefficient ``steering_alpha``) >= 0, no NaN; the lowest
ablation score wins. When no candidate passes, selection raises :class:`SelectionError` with the
table, unless ``if_none_pass`` names a relaxation, which the result records. Selection never
sees the test split.

The prompts are filtered first (:func:`filter_prompts`): harmful prompts the model does not
refuse (refusal score <= 0) and harmless prompts it does refuse (score >= 0) are dropped, so the
direction contrasts refusal with compliance rather than harmful with harmless content.

Departures from the reference, each off by default: ``positions`` scores only some
post-instruction positions; ``screen_n > 0`` screens every candidate on ``screen_n`` prompts per
class and scores only the ``top_k`` best by ablation score on ``final_n``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from rdt_interp.directions.diff_in_means import CandidateDirections
from rdt_interp.directions.scoring import PromptBatch, kl_divergence, last_logprobs, refusal_score
from rdt_interp.errors import ConfigError, SelectionError
from rdt_interp.models.chat import ChatModel
from rdt_interp.prompts import PromptSet, instructions
from rdt_interp.tracing.interventions import AblateDirection, AddDirection

Relaxation = Literal["error", "ignore_steering", "unfiltered"]


@dataclass(frozen=True)
class SelectionConfig:
    """Arditi et al.'s selection by default; every other value is a departure that
    :meth:`departures` names."""

    max_layer_fraction: float = 0.8
    kl_threshold: float = 0.1
    screen_n: int = 0
    final_n: int = 32
    top_k: int = 8
    batch_size: int = 32
    steering_alpha: float = 1.0
    #: post-instruction positions to score (negative, from the end); None: all of them
    positions: tuple[int, ...] | None = None
    #: what to do when no candidate passes: raise, or pick with the steering filter (or every
    #: filter) dropped — the result then names the relaxation
    if_none_pass: Relaxation = "error"

    def __post_init__(self) -> None:
        if not 0 < self.max_layer_fraction <= 1:
            raise ConfigError("max_layer_fraction must be in (0, 1]")
        if self.final_n < 1 or self.top_k < 1 or self.screen_n < 0:
            raise ConfigError("final_n and top_k must be >= 1, screen_n >= 0")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
            if not self.positions or any(p >= 0 for p in self.positions):
                raise ConfigError(f"selection positions must be negative (from the end), got {self.positions}",
                                  fix="e.g. positions = [-1] for the last post-instruction token")
        if self.if_none_pass not in ("error", "ignore_steering", "unfiltered"):
            raise ConfigError(f"if_none_pass must be error, ignore_steering or unfiltered, got {self.if_none_pass!r}")

    def layer_limit(self, n_layers: int) -> int:
        """Candidates come from layers ``< layer_limit`` (the reference drops the last 20%)."""
        return int(self.max_layer_fraction * n_layers)

    def departures(self) -> list[str]:
        """The settings that differ from Arditi et al.'s procedure, in words."""
        ref = SelectionConfig()
        out = []
        if self.max_layer_fraction != ref.max_layer_fraction:
            out.append(f"layer cut-off at {self.max_layer_fraction:g}·L (reference 0.8)")
        if self.kl_threshold != ref.kl_threshold:
            out.append(f"KL filter at {self.kl_threshold:g} (reference 0.1)")
        if self.steering_alpha != ref.steering_alpha:
            out.append(f"steering filter at coefficient {self.steering_alpha:g} (reference 1)")
        if self.final_n != ref.final_n:
            out.append(f"{self.final_n} validation prompts per class (reference 32)")
        if self.screen_n:
            out.append(f"candidates screened on {self.screen_n}+{self.screen_n} prompts, best {self.top_k} "
                       f"scored on {self.final_n}+{self.final_n} (reference: all on the full set)")
        if self.positions is not None:
            out.append(f"only post-instruction positions {list(self.positions)} scored (reference: all)")
        return out  # a relaxation (if_none_pass) is a departure only when used: SelectionResult.relaxation


@dataclass(frozen=True)
class CandidateScore:
    layer: int
    position: int
    ablation: float
    kl: float
    steering: float | None
    stage: str  # "screen" or "final"
    passes: bool


@dataclass(frozen=True)
class SelectionResult:
    layer: int
    position: int
    filters_passed: bool
    scores: tuple[CandidateScore, ...]
    baseline_harmful: float  # mean refusal score without intervention
    baseline_harmless: float
    config: SelectionConfig
    n_layers: int
    seconds: float
    candidate_norms: dict[str, float] = field(default_factory=dict)
    #: the relaxation that picked the direction when no candidate passed (None: filters passed)
    relaxation: str | None = None

    def final_scores(self) -> list[CandidateScore]:
        return [s for s in self.scores if s.stage == "final"]

    def chosen(self) -> CandidateScore:
        return next(s for s in self.final_scores() if (s.layer, s.position) == (self.layer, self.position))

    def grid(self, metric: str, stage: str = "screen") -> tuple[list[int], list[int], list[list[float]]]:
        """(layers, positions, values[layer][position]) of one score, NaN where not scored."""
        rows = [s for s in self.scores if s.stage == stage]
        layers = sorted({s.layer for s in rows})
        positions = sorted({s.position for s in rows})
        table = {(s.layer, s.position): getattr(s, metric) for s in rows}
        return layers, positions, [[float("nan") if table.get((ly, p)) is None else float(table[(ly, p)])
                                    for p in positions] for ly in layers]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = [asdict(s) for s in self.scores]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionResult:
        d = dict(d)
        d["scores"] = tuple(CandidateScore(**s) for s in d["scores"])
        d["config"] = SelectionConfig(**d["config"])
        return cls(**d)


def candidate_pairs(candidates: CandidateDirections, config: SelectionConfig, n_layers: int) -> list[tuple[int, int]]:
    """The (layer, position) candidates selection scores: below the layer limit, at the
    configured positions, and with a non-zero vector."""
    limit = config.layer_limit(n_layers)
    positions = candidates.positions if config.positions is None else config.positions
    missing = [p for p in positions if p not in candidates.positions]
    if missing:
        raise ConfigError(f"selection positions {missing} were not extracted (have {list(candidates.positions)})",
                          fix="choose positions among the extracted post-instruction positions")
    norms = candidates.norms
    # A candidate whose classes have identical means (e.g. layer 0 at a fixed template token)
    # is no direction at all.
    floor = 1e-6 * float(norms.max())
    pairs = [(ly, p) for ly in candidates.layers if ly < limit for p in positions
             if float(norms[candidates.layers.index(ly), candidates.positions.index(p)]) > floor]
    if not pairs:
        raise ConfigError(f"no candidate below layer {limit} (int({config.max_layer_fraction:g}·{n_layers})) "
                          "with a non-zero vector", fix="raise max_layer_fraction or extract more layers")
    return pairs


def passes_filters(kl: float, steering: float, ablation: float, config: SelectionConfig) -> bool:
    """Arditi et al.'s filters on a scored candidate (the layer limit is applied before scoring)."""
    if any(math.isnan(v) for v in (kl, steering, ablation)):
        return False
    return kl <= config.kl_threshold and steering >= 0.0


def pick(finals: Sequence[CandidateScore], config: SelectionConfig) -> tuple[CandidateScore, str | None]:
    """The lowest ablation score among passing candidates, and the relaxation used (None if
    some candidate passed). No passing candidate: :class:`SelectionError` with the table, or the
    relaxation ``config.if_none_pass`` names."""
    passing = [s for s in finals if s.passes]
    if passing:
        return min(passing, key=lambda s: s.ablation), None
    if config.if_none_pass == "ignore_steering":
        pool = [s for s in finals if s.kl <= config.kl_threshold and not math.isnan(s.ablation)]
        if pool:
            return min(pool, key=lambda s: s.ablation), "ignore_steering"
    elif config.if_none_pass == "unfiltered":
        pool = [s for s in finals if not math.isnan(s.ablation)]
        if pool:
            return min(pool, key=lambda s: s.ablation), "unfiltered"
    rows = "\n".join(f"    L{s.layer:>3} P{s.position:>3}  ablation {s.ablation:8.3f}  KL {s.kl:7.4f}  "
                      f"steering {s.steering if s.steering is not None else float('nan'):8.3f}"
                      for s in sorted(finals, key=lambda s: s.ablation))
    raise SelectionError(
        f"no direction candidate passes the filters (KL <= {config.kl_threshold:g}, steering score "
        f">= 0 at coefficient {config.steering_alpha:g}); {len(finals)} scored:\n{rows}",
        fix="set [chat.selection] if_none_pass = \"ignore_steering\" (or raise steering_alpha / "
            "kl_threshold); the run's report then names the relaxation",
        scores=tuple(finals),
    )


@dataclass(frozen=True)
class FilteredPrompts:
    """Prompts kept by :func:`filter_prompts`, with every scored prompt's refusal score."""

    harmful: list[str]
    harmless: list[str]
    harmful_scores: list[float]  # of every harmful prompt scored, in input order
    harmless_scores: list[float]


def filter_prompts(
    model: ChatModel,
    harmful: PromptSet | Sequence[str],
    harmless: PromptSet | Sequence[str],
    *,
    batch_size: int = 32,
) -> FilteredPrompts:
    """Arditi et al.'s data filter: keep the harmful prompts the model refuses (refusal score
    > 0) and the harmless ones it does not (score < 0), in input order."""
    ids = model.refusal_token_ids()
    h, hl = instructions(harmful), instructions(harmless)
    if not h or not hl:
        raise ConfigError("filter_prompts needs prompts of both classes")
    scores = refusal_score(last_logprobs(model, PromptBatch.build(model, h + hl), batch_size=batch_size), ids)
    sh, shl = scores[: len(h)].tolist(), scores[len(h):].tolist()
    return FilteredPrompts([t for t, v in zip(h, sh, strict=True) if v > 0],
                           [t for t, v in zip(hl, shl, strict=True) if v < 0], sh, shl)


class CandidateScorer:
    """The scoring set-up of a selection: validation prompts, their batches and unsteered
    log-probabilities, and the score of one candidate. :func:`select_direction` and the sharded
    selection (:func:`rdt_interp.distributed.selection.sharded_selection`) both score through it."""

    def __init__(self, model: ChatModel, candidates: CandidateDirections, harmful_val: PromptSet | Sequence[str],
                 harmless_val: PromptSet | Sequence[str], config: SelectionConfig) -> None:
        self.model, self.candidates, self.config = model, candidates, config
        self.refusal_ids = model.refusal_token_ids()
        self.h_all, self.hl_all = instructions(harmful_val), instructions(harmless_val)
        # per class: the filter leaves fewer harmful than harmless prompts on small models
        self.final_n = min(config.final_n, max(len(self.h_all), len(self.hl_all)))
        self.screen_n = min(config.screen_n, self.final_n)
        if not self.h_all or not self.hl_all:
            raise ConfigError("selection needs validation prompts of both classes")
        self.pairs = candidate_pairs(candidates, config, model.n_layers)
        self._batches: dict[int, tuple[PromptBatch, PromptBatch, torch.Tensor, torch.Tensor]] = {}

    @property
    def screens(self) -> bool:
        """Whether the candidates are screened on ``screen_n`` prompts before the final scoring."""
        return bool(self.screen_n) and len(self.pairs) > self.config.top_k

    def batches(self, n: int) -> tuple[PromptBatch, PromptBatch, torch.Tensor, torch.Tensor]:
        """Both classes' first ``n`` prompts, the harmless ones, and their unsteered log-probabilities."""
        if n not in self._batches:
            h = self.h_all[:n]  # may be shorter than n
            both = PromptBatch.build(self.model, h + self.hl_all[:n])
            harmless = PromptBatch.build(self.model, self.hl_all[:n])
            base = last_logprobs(self.model, both, batch_size=self.config.batch_size)
            self._batches[n] = (both, harmless, base[:len(h)], base[len(h):])
        return self._batches[n]

    def vector(self, layer: int, pos: int) -> torch.Tensor:
        c = self.candidates
        return c.vectors[c.layers.index(layer), c.positions.index(pos)].float()

    def ablation_and_kl(self, n: int, layer: int, pos: int) -> tuple[float, float]:
        batch, _, _, base_hl = self.batches(n)
        n_h = len(self.h_all[:n])
        lp = last_logprobs(self.model, batch, [AblateDirection(self.vector(layer, pos))],
                           batch_size=self.config.batch_size)
        return (float(refusal_score(lp[:n_h], self.refusal_ids).mean()),
                float(kl_divergence(base_hl, lp[n_h:]).mean()))

    def screen(self, layer: int, pos: int) -> CandidateScore:
        abl, kl = self.ablation_and_kl(self.screen_n, layer, pos)
        return CandidateScore(layer, pos, abl, kl, None, "screen", kl <= self.config.kl_threshold)

    def shortlist(self, screened: Sequence[CandidateScore]) -> list[tuple[int, int]]:
        # Screening KL is noisier (fewer prompts): keep candidates within twice the threshold.
        ok = [s for s in screened if s.kl <= 2 * self.config.kl_threshold] or list(screened)
        return [(s.layer, s.position) for s in sorted(ok, key=lambda s: s.ablation)[: self.config.top_k]]

    def final(self, layer: int, pos: int) -> CandidateScore:
        cfg = self.config
        abl, kl = self.ablation_and_kl(self.final_n, layer, pos)
        lp = last_logprobs(self.model, self.batches(self.final_n)[1],
                           [AddDirection(self.vector(layer, pos), cfg.steering_alpha, layer)],
                           batch_size=cfg.batch_size)
        steer = float(refusal_score(lp, self.refusal_ids).mean())
        return CandidateScore(layer, pos, abl, kl, steer, "final", passes_filters(kl, steer, abl, cfg))

    def result(self, scores: Sequence[CandidateScore], seconds: float) -> SelectionResult:
        """Pick among the final scores of ``scores`` (:func:`pick`) and report."""
        finals = [s for s in scores if s.stage == "final"]
        try:
            best, relaxation = pick(finals, self.config)
        except SelectionError as exc:
            exc.scores = tuple(scores)  # the whole table, screening included
            raise
        _, _, base_h, base_hl = self.batches(self.final_n)
        c = self.candidates
        norms = {f"{ly},{p}": float(c.vectors[c.layers.index(ly), c.positions.index(p)].norm()) for ly, p in self.pairs}
        return SelectionResult(
            layer=best.layer, position=best.position, filters_passed=relaxation is None, scores=tuple(scores),
            baseline_harmful=float(refusal_score(base_h, self.refusal_ids).mean()),
            baseline_harmless=float(refusal_score(base_hl, self.refusal_ids).mean()),
            config=self.config, n_layers=self.model.n_layers, seconds=seconds, candidate_norms=norms,
            relaxation=relaxation,
        )


def select_direction(
    model: ChatModel,
    candidates: CandidateDirections,
    harmful_val: PromptSet | Sequence[str],
    harmless_val: PromptSet | Sequence[str],
    config: SelectionConfig = SelectionConfig(),
    *,
    progress: bool = True,
    scored: Sequence[CandidateScore] | None = None,
) -> SelectionResult:
    """Score the candidates and pick one (module docstring). ``scored``: the table of an earlier
    selection on the same candidates and prompts (e.g. :class:`SelectionError`'s ``scores``), so
    that a relaxation chosen after a failure only re-picks instead of scoring again."""
    t0 = time.perf_counter()
    scorer = CandidateScorer(model, candidates, harmful_val, harmless_val, config)
    if scored is not None:
        # the filters are re-applied: only the pick's settings may differ from the earlier run
        scores = [dataclasses.replace(s, passes=passes_filters(s.kl, s.steering, s.ablation, config))
                  if s.stage == "final" else s for s in scored]
        finals = [s for s in scores if s.stage == "final"]
        if not finals or not {(s.layer, s.position) for s in finals} <= set(scorer.pairs):
            raise ConfigError("the reused selection table does not score these candidates",
                              fix="score afresh (drop the earlier table)")
    else:
        scores = []
        shortlist = scorer.pairs
        if scorer.screens:
            screened = [scorer.screen(layer, pos) for layer, pos in
                        tqdm(scorer.pairs, desc="screen candidates", disable=not progress, leave=False)]
            scores += screened
            shortlist = scorer.shortlist(screened)
        scores += [scorer.final(layer, pos) for layer, pos in
                   tqdm(shortlist, desc="score shortlist", disable=not progress, leave=False)]
    return scorer.result(scores, time.perf_counter() - t0)
