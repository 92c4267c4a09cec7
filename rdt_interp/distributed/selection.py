"""Direction selection (Arditi et al.) across processes: candidates scored in shards.

:func:`sharded_selection` returns what :func:`rdt_interp.directions.selection.select_direction`
returns for the same arguments (``seconds`` aside). Every candidate ``(layer, position)`` is a
shard: in the screening step (``NAME_screen``) its ablation score and KL on ``screen_n`` prompts
per class; in the final step (``NAME_final``) the shortlist's ablation score, KL and steering
score on ``final_n``. Each rank builds the scoring batches and the unsteered log-probabilities
once; rank 0 merges, filters and picks exactly as the single-process code does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rdt_interp.directions.diff_in_means import CandidateDirections
from rdt_interp.directions.scoring import PromptBatch, kl_divergence, last_logprobs, refusal_score
from rdt_interp.directions.selection import (
    CandidateScore,
    SelectionConfig,
    SelectionResult,
    candidate_pairs,
    passes_filters,
    pick,
)
from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.plan import Shard, ShardPlan
from rdt_interp.distributed.shards import ShardData, run_sharded
from rdt_interp.errors import ConfigError
from rdt_interp.models.chat import ChatModel
from rdt_interp.prompts import PromptSet, instructions
from rdt_interp.storage import digest_strings, digest_tensor
from rdt_interp.studies.rundir import RunDir
from rdt_interp.tracing.interventions import AblateDirection, AddDirection


def _key(layer: int, pos: int) -> str:
    return f"L{layer:03d}-P{pos}"


def sharded_selection(
    ctx: DistContext,
    run: RunDir,
    name: str,
    model: ChatModel,
    candidates: CandidateDirections,
    harmful_val: PromptSet | Sequence[str],
    harmless_val: PromptSet | Sequence[str],
    config: SelectionConfig | None = None,
    *,
    say: Callable[[str], None] | None = None,
) -> SelectionResult:
    """Step ``name`` of ``run``: ``select_direction`` with candidates scored over the ranks."""
    config = config or SelectionConfig()
    if ctx.broadcast(bool(run.done(name))):
        return SelectionResult.from_dict(run.load(name))
    t0 = time.perf_counter()
    refusal_ids = model.refusal_token_ids()
    h_all, hl_all = instructions(harmful_val), instructions(harmless_val)
    # per class: the filter leaves fewer harmful than harmless prompts on small models
    final_n = min(config.final_n, max(len(h_all), len(hl_all)))
    screen_n = min(config.screen_n, final_n)
    if not h_all or not hl_all:
        raise ConfigError("selection needs validation prompts of both classes")
    pairs = candidate_pairs(candidates, config, model.n_layers)
    inputs = {"model": model.digest(), "candidates": digest_tensor(candidates.vectors),
              "layers": list(candidates.layers), "positions": list(candidates.positions),
              "harmful": digest_strings(h_all), "harmless": digest_strings(hl_all),
              "config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    scorers: dict[int, tuple[PromptBatch, PromptBatch, Tensor, Tensor]] = {}

    def scorer(n: int) -> tuple[PromptBatch, PromptBatch, Tensor, Tensor]:
        if n not in scorers:
            both = PromptBatch.build(model, h_all[:n] + hl_all[:n])  # h_all[:n] may be shorter than n
            harmless = PromptBatch.build(model, hl_all[:n])
            base = last_logprobs(model, both, batch_size=config.batch_size)
            scorers[n] = (both, harmless, base[:len(h_all[:n])], base[len(h_all[:n]):])
        return scorers[n]

    def vector(layer: int, pos: int) -> Tensor:
        return candidates.vectors[candidates.layers.index(layer), candidates.positions.index(pos)].float()

    def ablation_and_kl(n: int, layer: int, pos: int) -> tuple[float, float]:
        batch, _, _, base_hl = scorer(n)
        lp = last_logprobs(model, batch, [AblateDirection(vector(layer, pos))], batch_size=config.batch_size)
        return float(refusal_score(lp[:len(h_all[:n])], refusal_ids).mean()), float(kl_divergence(base_hl, lp[len(h_all[:n]):]).mean())

    def as_rows(shards: dict[str, ShardData], keys: list[tuple[int, int]]) -> dict[str, Any]:
        return {"rows": [[ly, p, *shards[_key(ly, p)][0]["v"].tolist()] for ly, p in keys]}

    scores: list[CandidateScore] = []
    shortlist = pairs
    if screen_n and len(pairs) > config.top_k:
        def screen(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
            abl, kl = ablation_and_kl(screen_n, shard.spec["layer"], shard.spec["pos"])
            return {"v": torch.tensor([abl, kl], dtype=torch.float64)}, {}

        plan = ShardPlan.build(f"{name}_screen", [Shard(_key(ly, p), 1.0, {"layer": ly, "pos": p}) for ly, p in pairs],
                               {**inputs, "n": screen_n})
        rows = run_sharded(ctx, run, f"{name}_screen", plan, screen, lambda s: as_rows(s, pairs), say=say)["rows"]
        screened = [CandidateScore(int(ly), int(p), abl, kl, None, "screen", kl <= config.kl_threshold)
                    for ly, p, abl, kl in rows]
        scores += screened
        # Screening KL is noisier (fewer prompts): keep candidates within twice the threshold.
        ok = [s for s in screened if s.kl <= 2 * config.kl_threshold] or screened
        shortlist = [(s.layer, s.position) for s in sorted(ok, key=lambda s: s.ablation)[: config.top_k]]

    def final(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
        layer, pos = shard.spec["layer"], shard.spec["pos"]
        abl, kl = ablation_and_kl(final_n, layer, pos)
        lp = last_logprobs(model, scorer(final_n)[1], [AddDirection(vector(layer, pos), config.steering_alpha, layer)],
                           batch_size=config.batch_size)
        steer = float(refusal_score(lp, refusal_ids).mean())
        return {"v": torch.tensor([abl, kl, steer], dtype=torch.float64)}, {}

    plan = ShardPlan.build(f"{name}_final", [Shard(_key(ly, p), 1.0, {"layer": ly, "pos": p}) for ly, p in shortlist],
                           {**inputs, "n": final_n, "shortlist": [list(x) for x in shortlist]})
    rows = run_sharded(ctx, run, f"{name}_final", plan, final, lambda s: as_rows(s, shortlist), say=say)["rows"]
    finals = [CandidateScore(int(ly), int(p), abl, kl, steer, "final", passes_filters(kl, steer, abl, config))
              for ly, p, abl, kl, steer in rows]
    scores += finals

    def result() -> dict[str, Any]:
        _, _, base_h, base_hl = scorer(final_n)
        best, relaxation = pick(finals, config)
        vecs, index = candidates.vectors, (candidates.layers.index, candidates.positions.index)
        norms = {f"{ly},{p}": float(vecs[index[0](ly), index[1](p)].norm()) for ly, p in pairs}
        return SelectionResult(
            layer=best.layer, position=best.position, filters_passed=relaxation is None, scores=tuple(scores),
            baseline_harmful=float(refusal_score(base_h, refusal_ids).mean()),
            baseline_harmless=float(refusal_score(base_hl, refusal_ids).mean()), config=config,
            n_layers=model.n_layers, seconds=time.perf_counter() - t0, candidate_norms=norms,
            relaxation=relaxation).to_dict()

    if ctx.is_main:
        run.save(name, result())
    ctx.barrier()
    return SelectionResult.from_dict(run.load(name))


__all__ = ["sharded_selection"]
