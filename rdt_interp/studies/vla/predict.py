"""Greedy action predictions of a VLA, and the direction / layers a study steers with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.storage import digest_tensor
from rdt_interp.studies.store import ActionSet
from rdt_interp.studies.vla.requests import LabeledRequest
from rdt_interp.tracing.generation import generate


def _allowed(adapter: VLAAdapter, constrain: bool) -> Tensor | None:
    return adapter.action_tokenizer.token_ids if constrain else adapter.allowed_token_ids()


def predict(
    adapter: VLAAdapter,
    requests: Sequence[VLARequest | LabeledRequest],
    interventions: Sequence[Any] = (),
    *,
    batch_size: int = 16,
    backend: str = "hooks",
    constrain_actions: bool = True,
) -> ActionSet:
    """Greedy actions of ``requests`` (length-sorted batches, returned in the caller's order)."""
    reqs = [r.request if isinstance(r, LabeledRequest) else r for r in requests]
    if not reqs:
        raise ConfigError("predict needs at least one request")
    allowed = _allowed(adapter, constrain_actions)
    cols = adapter.action_tokenizer.token_ids
    order = sorted(range(len(reqs)), key=lambda i: (len(reqs[i].instruction), i))
    ids = torch.empty((len(reqs), adapter.action_dim), dtype=torch.long)
    logits = torch.empty((len(reqs), adapter.action_dim, int(cols.numel())), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        gen = generate(adapter, adapter.encode([reqs[i] for i in chunk]), max_new_tokens=adapter.action_dim,
                       interventions=interventions, backend=backend,  # type: ignore[arg-type]
                       allowed_token_ids=allowed, stop_at_eos=False, return_logits=True)
        assert gen.logits is not None
        idx = torch.as_tensor(chunk)
        ids[idx] = gen.tokens.cpu()
        logits[idx] = gen.logits[..., cols].float()
    return ActionSet(ids, logits)



def as_direction(direction: Direction | Tensor, d_model: int) -> Direction:
    """A :class:`Direction` of width ``d_model`` (a bare tensor gets a ``given`` provenance)."""
    if isinstance(direction, Tensor):
        direction = Direction(direction, Provenance("given", digest_tensor(direction)[:16], -1, "", "", "given",
                                                    created=""))
    return direction.check_d_model(d_model)


def steering_layers(adapter: VLAAdapter, direction: Direction, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``layers``, or the layer the direction was extracted at."""
    if layers is None:
        layer = direction.provenance.layer
        if not 0 <= layer < adapter.n_layers:
            raise ConfigError(f"the direction's layer {layer} is not a layer of {adapter.name} "
                              f"({adapter.n_layers} layers)", fix="set VLARDTConfig(layers=(...))")
        return (layer,)
    out = tuple(int(x) for x in layers)
    if not out or any(not 0 <= x < adapter.n_layers for x in out):
        raise ConfigError(f"layers {list(out)} must be a non-empty subset of 0..{adapter.n_layers - 1}")
    return out



__all__ = ["as_direction", "predict", "steering_layers"]
