"""The VLA side of the adapter interface: requests with images, action vocabularies, actions.

A VLA family implements :class:`VLAAdapter` (one module + its tests). Everything downstream —
captures by role, RDT/RDT+ interventions, action metrics — takes a ``VLAAdapter``.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

from rdt_interp.models.action_tokenizer import ActionTokenizer
from rdt_interp.models.adapter import ModelAdapter
from rdt_interp.roles import Role


@dataclass(frozen=True, eq=False)
class VLARequest:
    """One instruction and the camera image it refers to (PIL image or ``HxWx3`` uint8 array)."""

    instruction: str
    image: Any

    def image_array(self) -> np.ndarray:
        arr = np.asarray(self.image.convert("RGB") if hasattr(self.image, "convert") else self.image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"image must be HxWx3 RGB, got shape {arr.shape}")
        return arr.astype(np.uint8, copy=False)

    def cache_key(self) -> str:
        h = hashlib.sha256(self.instruction.encode())
        arr = self.image_array()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
        return f"{self.instruction}#{h.hexdigest()[:16]}"


@dataclass
class ActionPrediction:
    """Greedy action tokens for a batch, decoded."""

    token_ids: Int[Tensor, "batch action_dim"]
    bins: Int[Tensor, "batch action_dim"]
    normalized: Float[Tensor, "batch action_dim"]
    actions: Float[Tensor, "batch action_dim"] | None  # unnormalized (None without unnorm_key)
    action_logits: Float[Tensor, "batch action_dim n_bins"] | None = None  # over action tokens


class VLAAdapter(ModelAdapter):
    """A VLA whose LLM backbone emits ``action_dim`` action tokens per step."""

    generated_role = Role.ACTION

    @property
    @abc.abstractmethod
    def action_tokenizer(self) -> ActionTokenizer: ...

    @property
    def action_dim(self) -> int:
        return self.action_tokenizer.action_dim

    def allowed_token_ids(self) -> Tensor | None:
        """Constrain greedy decoding to action tokens when ``constrain_actions`` is set."""
        return self.action_tokenizer.token_ids if getattr(self, "constrain_actions", False) else None

    @property
    def eos_token_id(self) -> int | None:
        return None  # a VLA emits exactly action_dim tokens

    def decode_actions(
        self,
        tokens: Int[Tensor, "batch action_dim"],
        logits: Float[Tensor, "batch action_dim vocab"] | None = None,
        *,
        unnorm_key: str | None = None,
    ) -> ActionPrediction:
        """Generated action tokens (and their logits over the vocabulary) -> bins, normalized and
        (with ``unnorm_key``) unnormalized actions, logits over the action tokens."""
        tok = self.action_tokenizer
        bins = tok.ids_to_bins(tokens)
        normalized = tok.bins_to_normalized(bins).float()
        actions = tok.unnormalize(normalized, unnorm_key).float() if unnorm_key else None
        action_logits = logits[..., tok.token_ids.to(logits.device)] if logits is not None else None
        return ActionPrediction(tokens, bins, normalized, actions, action_logits)

    def predict_actions(
        self,
        requests: Sequence[VLARequest],
        *,
        unnorm_key: str | None = None,
        interventions: Sequence[Any] = (),
        backend: str = "hooks",
        recorders: Sequence[Any] = (),
        return_logits: bool = False,
    ) -> ActionPrediction:
        """Greedy action prediction for a batch (every row gets what it gets alone).

        The convenience form of :func:`rdt_interp.tracing.vla.predict_actions`, which runs it.
        """
        # Lazy on purpose: generation lives in rdt_interp.tracing, the layer above the models.
        # This one upward import is listed (and only it) in the layers contract (.importlinter).
        from rdt_interp.tracing.vla import predict_actions

        return predict_actions(self, requests, unnorm_key=unnorm_key, interventions=interventions,
                               backend=backend, recorders=recorders, return_logits=return_logits)
