"""Direction specificity: the effect of ``r`` against random directions of the same norm.

:class:`SteeringEffect` evaluates many directions per forward pass (per-row directions) and,
for decode-only RDT, prefills every prompt batch once and decodes each direction from its KV
cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from rdt_interp.analysis.behaviour import zero_motion_mass
from rdt_interp.analysis.specificity import SpecificityResult, specificity_test
from rdt_interp.directions.direction import Direction
from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import EncodedBatch
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.studies.steering import SteeringSpec, direction_info
from rdt_interp.studies.store import ActionSet
from rdt_interp.studies.vla.config import SPEC_METRIC_NAMES, SPEC_METRICS, VLARDTConfig
from rdt_interp.studies.vla.predict import _allowed, as_direction, steering_layers
from rdt_interp.studies.vla.requests import LabeledRequest
from rdt_interp.tracing.generation import generate
from rdt_interp.tracing.interventions import check_mode, steer
from rdt_interp.tracing.vla import decode_from, direction_chunks, repeat_rows, run_prefill


def _select_batch(batch: EncodedBatch, rows: Tensor) -> EncodedBatch:
    idx = rows.to(batch.attention_mask.device)
    inputs = {k: v.index_select(0, idx.to(v.device)) if isinstance(v, Tensor) else v
              for k, v in batch.inputs.items()}
    return dataclasses.replace(
        batch, inputs=inputs, roles=batch.roles.index_select(0, rows.to(batch.roles.device)),
        attention_mask=batch.attention_mask.index_select(0, idx),
        position_ids=batch.position_ids.index_select(0, idx),
        texts=[batch.texts[i] for i in rows.tolist()] if batch.texts else [])


def effect_name(metric: str, mode: str, alpha: float) -> str:
    """How a steering effect is named in results and figures."""
    return f"{SPEC_METRIC_NAMES[metric]}, {mode} α = {float(alpha):g}"


class SteeringEffect:
    """``effect(directions[k, d]) -> [k]``: a scalar action metric after steering with each
    direction (``alpha`` times it, target ``mode``), averaged over ``requests``.

    Mode ``action`` (RDT) prefills every prompt batch once, keeps the KV caches and runs only
    the decode steps per direction; other modes rerun the prompts. Either way many directions
    share a forward pass: rows are (prompt, direction) pairs with per-row directions, at most
    ``max_rows`` per pass. The metric is averaged per prompt first, then over prompts.
    ``reuse_prefill=False`` forces full runs (for checking the reuse).

    The steering is ``steering`` (a :class:`SteeringSpec`, what the studies pass), or the same
    settings given one by one (``alpha``, ``layers``, ``mode``, ``alpha_text``, ``include_image``).
    """

    name = "steering effect"

    def __init__(self, adapter: VLAAdapter, requests: Sequence[VLARequest | LabeledRequest], *, alpha: float | None = None,
                 layers: Sequence[int] | None = None, mode: str = "action", metric: str = "zero_mass",
                 alpha_text: float | None = None, include_image: bool = False, batch_size: int = 16,
                 max_rows: int = 64, backend: str = "hooks", constrain_actions: bool = True,
                 window: int = 2, unnorm_key: str | None = None, partial_min: int = 4,
                 reuse_prefill: bool | None = None, steering: SteeringSpec | None = None) -> None:
        if metric not in SPEC_METRICS:
            raise ConfigError(f"unknown metric {metric!r}", fix=f"use one of {list(SPEC_METRICS)}")
        self.adapter = adapter
        self.reqs = [r.request if isinstance(r, LabeledRequest) else r for r in requests]
        if not self.reqs:
            raise ConfigError("the steering effect needs at least one request")
        if steering is not None:
            mode, alpha_text, include_image = steering.mode, steering.alpha_text, steering.include_image
            alpha, layers = steering.alpha, steering.layers
        elif alpha is None or layers is None:
            raise ConfigError("SteeringEffect needs steering= (a SteeringSpec) or alpha= and layers=")
        self.alpha, self.layers, self.mode, self.metric = float(alpha), tuple(layers), check_mode(mode), metric
        self.alpha_text = self.alpha if alpha_text is None else float(alpha_text)
        self.include_image, self.max_rows, self.backend = include_image, max_rows, backend
        self.window, self.unnorm_key, self.partial_min = window, unnorm_key, partial_min
        self.allowed = _allowed(adapter, constrain_actions)
        can_reuse = mode == "action"  # only RDT leaves the prefill unchanged
        if reuse_prefill and not can_reuse:
            raise ConfigError(f"mode {mode!r} edits the prefill: a stored prefill cannot be reused",
                              fix="use mode 'action' (RDT) or reuse_prefill=None")
        self.reuse = can_reuse if reuse_prefill is None else bool(reuse_prefill)
        self.name = effect_name(metric, mode, self.alpha)
        self.batches = [self.reqs[i:i + batch_size] for i in range(0, len(self.reqs), batch_size)]
        self.encoded = [adapter.encode(b) for b in self.batches]
        self.calls = 0
        self.rows_run = 0
        self.prefills = [run_prefill(adapter, b, backend=backend) for b in self.encoded] if self.reuse else []
        self.base_bins = [self._decode(k, None, torch.arange(len(b))).ids
                          for k, b in enumerate(self.encoded)] if metric == "abs_bin_shift" else []

    def _decode(self, k: int, dirs: Tensor | None, prompt_rows: Tensor) -> ActionSet:
        ad = self.adapter
        cols = ad.action_tokenizer.token_ids
        ivs = [] if dirs is None else steer(dirs, self.mode, self.alpha, self.layers, alpha_text=self.alpha_text,
                                            include_image=self.include_image, per_row=True)
        if self.reuse:
            gen = decode_from(ad, self.prefills[k], max_new_tokens=ad.action_dim, rows=prompt_rows,
                              interventions=ivs, backend=self.backend,  # type: ignore[arg-type]
                              allowed_token_ids=self.allowed, return_logits=True, logit_columns=cols)
            logits = gen.logits
        else:
            gen = generate(ad, _select_batch(self.encoded[k], prompt_rows), max_new_tokens=ad.action_dim,
                           interventions=ivs, backend=self.backend,  # type: ignore[arg-type]
                           allowed_token_ids=self.allowed, stop_at_eos=False, return_logits=True)
            logits = gen.logits[..., cols] if gen.logits is not None else None
        assert logits is not None
        self.rows_run += int(prompt_rows.numel())
        return ActionSet(gen.tokens.cpu(), logits.float())

    def _per_row(self, acts: ActionSet, base_bins: Tensor | None) -> Tensor:
        tok = self.adapter.action_tokenizer
        bins = tok.ids_to_bins(acts.ids)
        if self.metric == "zero_mass":
            return zero_motion_mass(tok, acts.logits, window=self.window, unnorm_key=self.unnorm_key).mean(1)
        if self.metric == "mean_bin":
            return bins.double().mean(1)
        if self.metric == "abs_bin_shift":
            assert base_bins is not None
            return (bins - tok.ids_to_bins(base_bins)).abs().double().mean(1)
        zb = torch.tensor(tok.zero_motion_bins(self.unnorm_key))[torch.arange(bins.shape[1]) % tok.action_dim]
        inside = ((bins - zb[None]).abs() <= self.window).sum(1)
        need = bins.shape[1] if self.metric == "hrr_strict" else self.partial_min
        return (inside >= need).double()

    def per_prompt(self, directions: Float[Tensor, "k d"]) -> Float[Tensor, "n_prompts k"]:
        """The metric of every prompt under every direction."""
        dirs = directions.float()
        out = torch.empty((len(self.reqs), dirs.shape[0]), dtype=torch.float64)
        start = 0
        for k, b in enumerate(self.batches):
            for sl in direction_chunks(len(b), dirs.shape[0], self.max_rows):
                n_dir = sl.stop - sl.start
                p_idx, d_idx = repeat_rows(len(b), n_dir)
                acts = self._decode(k, dirs[sl][d_idx], p_idx)
                base = self.base_bins[k][p_idx] if self.base_bins else None
                out[start:start + len(b), sl] = self._per_row(acts, base).reshape(len(b), n_dir)
            start += len(b)
        return out

    def __call__(self, directions: Float[Tensor, "k d"]) -> Float[Tensor, "k"]:
        self.calls += 1
        return self.per_prompt(directions).mean(0)

    def bootstrap(self, direction: Float[Tensor, "d"], n_boot: int, seed: int) -> Float[Tensor, "n_boot"]:
        """Replicates of one direction's effect, resampling prompts."""
        from rdt_interp.analysis.stats import bootstrap_distribution

        values = self.per_prompt(direction[None])[:, 0]
        return bootstrap_distribution(lambda v: v.mean(dim=0), values, n_boot=n_boot, seed=seed)



def specificity_kwargs(direction: Direction, config: VLARDTConfig,
                       shuffled: Float[Tensor, "n_shuffled d"] | None = None) -> dict[str, Any]:
    """The arguments of :func:`~rdt_interp.analysis.specificity.specificity_test` a study uses
    (``shuffled``: label-shuffled directions for the second null, or ``None``: off)."""
    out = {"n_random": config.n_random, "batch_size": max(config.n_random, 1), "controls": {"-r": -direction.vector},
           "alternative": "two-sided" if config.specificity_metric == "mean_bin" else "greater",
           "n_boot": config.n_boot, "seed": config.seed}
    if shuffled is not None:
        out["shuffled"] = shuffled
    return out


def specificity_effect(adapter: VLAAdapter, config: VLARDTConfig, steering: SteeringSpec
                       ) -> Callable[[Sequence[VLARequest | LabeledRequest]], SteeringEffect]:
    """``requests -> SteeringEffect`` with the study's metric and decoding settings."""
    def make(requests: Sequence[VLARequest | LabeledRequest]) -> SteeringEffect:
        return SteeringEffect(adapter, requests, steering=steering, metric=config.specificity_metric,
                              batch_size=config.batch_size, max_rows=config.specificity_rows,
                              backend=config.backend, constrain_actions=config.constrain_actions,
                              window=config.window, unnorm_key=config.unnorm_key, partial_min=config.partial_min)
    return make


def specificity_of(effect: Any, direction: Direction, requests: Sequence[LabeledRequest | VLARequest],
                   config: VLARDTConfig, steering: SteeringSpec, t0: float,
                   shuffled: Float[Tensor, "n_shuffled d"] | None = None) -> SpecificityResult:
    """The specificity test over ``effect`` (a :class:`SteeringEffect`, or the same values merged
    from shards), with the study's meta data; ``shuffled`` adds the label-shuffled null."""
    labels = [getattr(r, "label", "unknown") for r in requests]
    res = specificity_test(effect, direction.vector, **specificity_kwargs(direction, config, shuffled),
                           effect_name=effect.name, meta={
                               "mode": steering.mode, "alpha": float(steering.alpha),
                               "layers": list(steering.layers), "metric": config.specificity_metric,
                               "n_prompts": len(effect.reqs),
                               "n_harmful": labels.count("harmful"), "n_benign": labels.count("benign"),
                               "prefill_reuse": effect.reuse, "rows_per_pass": config.specificity_rows,
                               "direction": direction_info(direction)})
    return dataclasses.replace(res, meta={**res.meta, "rows_run": effect.rows_run,
                                          "seconds": time.perf_counter() - t0})


def direction_specificity(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    requests: Sequence[LabeledRequest | VLARequest],
    config: VLARDTConfig,
    alpha: float,
    *,
    shuffled: Float[Tensor, "n_shuffled d"] | None = None,
) -> SpecificityResult:
    """``config.specificity_metric`` after steering with ``r`` (mode ``config.specificity_mode``,
    at ``alpha``) against ``config.n_random`` random directions of the same norm, and ``-r``;
    with ``shuffled`` (``[N, d]`` label-shuffled directions, N >= 19) also against those,
    rescaled to ``r``'s norm (``shuffled_p`` beside ``p``)."""
    d = as_direction(direction, adapter.d_model)
    steering = config.steering(config.specificity_mode, alpha, steering_layers(adapter, d, config.layers))
    t0 = time.perf_counter()
    effect = specificity_effect(adapter, config, steering)(requests)
    return specificity_of(effect, d, requests, config, steering, t0, shuffled)


__all__ = ["SteeringEffect", "direction_specificity", "effect_name", "specificity_effect", "specificity_kwargs", "specificity_of"]
