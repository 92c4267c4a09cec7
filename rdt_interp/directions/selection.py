"""Choosing the refusal direction the way Arditi et al. (2024) did, fast enough for a CPU.

For each candidate (layer, post-instruction position) diff-in-means vector r:

* ablation score — mean refusal score on harmful validation prompts with r projected out of
  every layer (lower: the direction mediates refusal);
* steering score — mean refusal score on harmless validation prompts with r added at its layer
  (higher: adding it induces refusal);
* KL — KL(base || ablated) of the next-token distribution on harmless validation prompts.

Filters: layer < ``max_layer_fraction * n_layers``, KL <= ``kl_threshold``, steering score > 0;
the lowest ablation score wins. Selection never sees the test split.

Speed: every score is read at the last position, so prompts share their template prefix (see
:mod:`rdt_interp.directions.scoring`), and candidates are *screened* on ``screen_n`` prompts per
class before the ``top_k`` best by ablation score are scored on ``final_n`` prompts per class.
Set ``screen_n=0`` to score every candidate on the full validation sets (Arditi's procedure
exactly, ~4x slower).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rdt_interp.directions.diff_in_means import CandidateDirections
from rdt_interp.directions.scoring import PromptBatch, kl_divergence, last_logprobs, refusal_score
from rdt_interp.errors import ConfigError
from rdt_interp.models.chat import ChatModel
from rdt_interp.prompts import PromptSet, instructions
from rdt_interp.tracing.interventions import AblateDirection, AddDirection


@dataclass(frozen=True)
class SelectionConfig:
    max_layer_fraction: float = 0.8
    kl_threshold: float = 0.1
    screen_n: int = 16
    final_n: int = 32
    top_k: int = 8
    batch_size: int = 32
    steering_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.max_layer_fraction <= 1:
            raise ConfigError("max_layer_fraction must be in (0, 1]")
        if self.final_n < 1 or self.top_k < 1 or self.screen_n < 0:
            raise ConfigError("final_n and top_k must be >= 1, screen_n >= 0")


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


def select_direction(
    model: ChatModel,
    candidates: CandidateDirections,
    harmful_val: PromptSet | Sequence[str],
    harmless_val: PromptSet | Sequence[str],
    config: SelectionConfig = SelectionConfig(),
    *,
    progress: bool = True,
) -> SelectionResult:
    t0 = time.perf_counter()
    refusal_ids = model.refusal_token_ids()
    h_all, hl_all = instructions(harmful_val), instructions(harmless_val)
    final_n = min(config.final_n, len(h_all), len(hl_all))
    screen_n = min(config.screen_n, final_n)
    max_layer = config.max_layer_fraction * model.n_layers
    norms_grid = candidates.norms
    # A candidate whose classes have identical means (e.g. layer 0 at a fixed template token)
    # is no direction at all.
    floor = 1e-6 * float(norms_grid.max())
    pairs = [(ly, p) for ly in candidates.layers if ly < max_layer for p in candidates.positions
             if float(norms_grid[candidates.layers.index(ly), candidates.positions.index(p)]) > floor]
    if not pairs:
        raise ConfigError("no candidate passes the max_layer_fraction filter with a non-zero vector")

    def scorer(n: int) -> tuple[PromptBatch, PromptBatch, torch.Tensor, torch.Tensor]:
        both = PromptBatch.build(model, h_all[:n] + hl_all[:n])
        harmless = PromptBatch.build(model, hl_all[:n])
        base = last_logprobs(model, both, batch_size=config.batch_size)
        return both, harmless, base[:n], base[n:]

    def ablation_and_kl(batch: PromptBatch, n: int, base_hl: torch.Tensor, layer: int, pos: int):
        r = candidates.vectors[candidates.layers.index(layer), candidates.positions.index(pos)].float()
        lp = last_logprobs(model, batch, [AblateDirection(r)], batch_size=config.batch_size)
        abl = float(refusal_score(lp[:n], refusal_ids).mean())
        kl = float(kl_divergence(base_hl, lp[n:]).mean())
        return abl, kl, r

    scores: list[CandidateScore] = []
    shortlist = pairs
    if screen_n and len(pairs) > config.top_k:
        batch, _, _, base_hl = scorer(screen_n)
        screened = []
        for layer, pos in tqdm(pairs, desc="screen candidates", disable=not progress, leave=False):
            abl, kl, _ = ablation_and_kl(batch, screen_n, base_hl, layer, pos)
            screened.append(CandidateScore(layer, pos, abl, kl, None, "screen", kl <= config.kl_threshold))
        scores += screened
        # Screening KL is noisier (fewer prompts): keep candidates within twice the threshold.
        ok = [s for s in screened if s.kl <= 2 * config.kl_threshold] or screened
        shortlist = [(s.layer, s.position) for s in sorted(ok, key=lambda s: s.ablation)[: config.top_k]]

    batch, harmless, base_h, base_hl = scorer(final_n)
    base_steer = float(refusal_score(base_hl, refusal_ids).mean())
    finals = []
    for layer, pos in tqdm(shortlist, desc="score shortlist", disable=not progress, leave=False):
        abl, kl, r = ablation_and_kl(batch, final_n, base_hl, layer, pos)
        lp = last_logprobs(model, harmless, [AddDirection(r, config.steering_alpha, layer)],
                           batch_size=config.batch_size)
        steer = float(refusal_score(lp, refusal_ids).mean())
        passes = kl <= config.kl_threshold and steer > 0
        finals.append(CandidateScore(layer, pos, abl, kl, steer, "final", passes))
    scores += finals
    passing = [s for s in finals if s.passes]
    best = min(passing or finals, key=lambda s: s.ablation)
    norms = {f"{ly},{p}": float(candidates.vectors[candidates.layers.index(ly), candidates.positions.index(p)].norm())
             for ly, p in pairs}
    return SelectionResult(
        layer=best.layer, position=best.position, filters_passed=bool(passing), scores=tuple(scores),
        baseline_harmful=float(refusal_score(base_h, refusal_ids).mean()), baseline_harmless=base_steer,
        config=config, n_layers=model.n_layers, seconds=time.perf_counter() - t0, candidate_norms=norms,
    )
