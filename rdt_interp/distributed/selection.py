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
from rdt_interp.directions.selection import (
    CandidateScore,
    CandidateScorer,
    SelectionConfig,
    SelectionResult,
    passes_filters,
)
from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.plan import Shard, ShardPlan
from rdt_interp.distributed.shards import ShardData, run_sharded
from rdt_interp.models.chat import ChatModel
from rdt_interp.prompts import PromptSet
from rdt_interp.storage import digest_strings, digest_tensor
from rdt_interp.studies.rundir import RunDir


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
    """Step ``name`` of ``run``: ``select_direction`` with candidates scored over the ranks
    (the same :class:`CandidateScorer`, one shard per candidate)."""
    config = config or SelectionConfig()
    if ctx.broadcast(bool(run.done(name))):
        return SelectionResult.from_dict(run.load(name))
    t0 = time.perf_counter()
    scorer = CandidateScorer(model, candidates, harmful_val, harmless_val, config)
    pairs = scorer.pairs
    inputs = {"model": model.digest(), "candidates": digest_tensor(candidates.vectors),
              "layers": list(candidates.layers), "positions": list(candidates.positions),
              "harmful": digest_strings(scorer.h_all), "harmless": digest_strings(scorer.hl_all),
              "config": {k: getattr(config, k) for k in config.__dataclass_fields__}}

    def sharded(step: str, keys: list[tuple[int, int]], score: Callable[[int, int], CandidateScore],
                n: int, extra: dict[str, Any]) -> list[CandidateScore]:
        def compute(shard: Shard) -> tuple[dict[str, Tensor], dict[str, Any]]:
            c = score(shard.spec["layer"], shard.spec["pos"])
            vals = [c.ablation, c.kl] + ([] if c.steering is None else [c.steering])
            return {"v": torch.tensor(vals, dtype=torch.float64)}, {}

        def merge(shards: dict[str, ShardData]) -> dict[str, Any]:
            return {"rows": [[ly, p, *shards[_key(ly, p)][0]["v"].tolist()] for ly, p in keys]}

        plan = ShardPlan.build(step, [Shard(_key(ly, p), 1.0, {"layer": ly, "pos": p}) for ly, p in keys],
                               {**inputs, "n": n, **extra})
        rows = run_sharded(ctx, run, step, plan, compute, merge, say=say)["rows"]
        if step.endswith("_screen"):
            return [CandidateScore(int(ly), int(p), abl, kl, None, "screen", kl <= config.kl_threshold)
                    for ly, p, abl, kl in rows]
        return [CandidateScore(int(ly), int(p), abl, kl, steer, "final", passes_filters(kl, steer, abl, config))
                for ly, p, abl, kl, steer in rows]

    scores: list[CandidateScore] = []
    shortlist = pairs
    if scorer.screens:
        screened = sharded(f"{name}_screen", pairs, scorer.screen, scorer.screen_n, {})
        scores += screened
        shortlist = scorer.shortlist(screened)
    scores += sharded(f"{name}_final", shortlist, scorer.final, scorer.final_n,
                      {"shortlist": [list(x) for x in shortlist]})
    if ctx.is_main:
        run.save(name, scorer.result(scores, time.perf_counter() - t0).to_dict())
    ctx.barrier()
    return SelectionResult.from_dict(run.load(name))


__all__ = ["sharded_selection"]
