"""The model-adapter interface: what the tracing layer and analyses need to know about a model.

An adapter answers: where the decoder layers are, ``d_model`` and ``n_layers``, how to turn
requests (an instruction, plus an image for a VLA) into model inputs with a role for every
decoder position, and how to run one decode step with a KV cache. Chat LMs use one generic
adapter (:class:`rdt_interp.models.chat.ChatModel`); a VLA family is one adapter module.
Probes, captures, interventions and metrics take an adapter, never a model-specific object.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from rdt_interp.errors import TokenizerMismatchError
from rdt_interp.roles import Role

PaddingSide = Literal["left", "right"]


@dataclass
class EncodedBatch:
    """Inputs for one batch, and the role of every position the decoder layers see.

    ``roles``, ``attention_mask`` and ``position_ids`` are over decoder positions: for a VLA
    these include the image patches inserted after BOS, so they can be longer than
    ``inputs["input_ids"]``. ``roles`` live on the host (CPU) whatever the model's device.
    """

    inputs: dict[str, Tensor]
    roles: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    position_ids: Int[Tensor, "batch seq"]
    texts: list[str] = field(default_factory=list)
    padding_side: PaddingSide = "left"
    #: :meth:`ModelAdapter.tokenizer_id` of the adapter that encoded it (``None``: unknown)
    tokenizer_id: str | None = None

    def __len__(self) -> int:
        return int(self.roles.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.roles.shape[1])

    def to(self, device: torch.device | str) -> EncodedBatch:
        """Model inputs, mask and positions to ``device``; ``roles`` stay on the host, where role
        masks and selectors are resolved, so choosing positions never waits for the accelerator."""
        return replace(
            self,
            inputs={k: to_device(v, device) if isinstance(v, Tensor) else v for k, v in self.inputs.items()},
            attention_mask=to_device(self.attention_mask, device),
            position_ids=to_device(self.position_ids, device),
        )


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Copy to ``device``; host-to-GPU copies go through pinned memory and do not block the host
    (a pageable copy would wait for every kernel queued before it)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def position_ids_from_mask(mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Positions that ignore padding: the first real token of every row is position 0."""
    pos = mask.long().cumsum(dim=1) - 1
    return pos.clamp(min=0)


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    roles: Sequence[Sequence[int]],
    pad_id: int,
    side: PaddingSide,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad token ids and roles to one length; returns ``(ids, roles, attention_mask)``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    rl = torch.full((len(seqs), n), int(Role.PAD), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, r) in enumerate(zip(seqs, roles, strict=True)):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        rl[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, rl, mask


class ModelAdapter(abc.ABC):
    """Uniform access to a decoder-only model (a chat LM or a VLA's LLM backbone)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every adapter's ``encode`` stamps its batches with the tokenizer's identity, so a batch
        # run on another model's adapter is caught (:meth:`check_batch`) whoever wrote ``encode``.
        super().__init_subclass__(**kwargs)
        encode = cls.__dict__.get("encode")
        if encode is None or getattr(encode, "_stamps_tokenizer", False) or getattr(
                encode, "__isabstractmethod__", False):
            return

        @functools.wraps(encode)
        def stamped(self: ModelAdapter, *args: Any, **kw: Any) -> EncodedBatch:
            batch = encode(self, *args, **kw)
            if isinstance(batch, EncodedBatch) and batch.tokenizer_id is None:
                batch.tokenizer_id = self.tokenizer_id()
            return batch

        stamped._stamps_tokenizer = True  # type: ignore[attr-defined]
        cls.encode = stamped  # type: ignore[method-assign]

    #: registry name or path the model came from
    name: str
    #: the module that is called with ``**batch.inputs`` (what nnsight wraps)
    model: nn.Module
    #: role given to tokens fed back during decoding
    generated_role: Role = Role.GENERATED
    #: True when the weights are random (tests, benchmarks): shown in every output
    random_weights: bool = False

    # -- structure -----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @property
    @abc.abstractmethod
    def layers_path(self) -> str:
        """Dotted path of :attr:`layers` inside :attr:`model` (for nnsight envoys)."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    @abc.abstractmethod
    def d_model(self) -> int: ...

    @property
    def embed(self) -> nn.Module:
        """The token embedding."""
        return self.model.get_input_embeddings()

    @property
    @abc.abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    @abc.abstractmethod
    def lm_head(self) -> nn.Module: ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def attn_module(self, layer: int) -> nn.Module:
        """The attention block of a decoder layer (its output is written into the residual)."""
        return self.layers[layer].self_attn

    def mlp_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    # -- inputs --------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, requests: Sequence[Any], *, padding_side: PaddingSide = "left") -> EncodedBatch:
        """Tokenize requests into one padded batch with roles over decoder positions."""

    def prefill_kwargs(self, batch: EncodedBatch, *, use_cache: bool) -> dict[str, Any]:
        """Keyword arguments for ``model(**kw)`` that run the prompt."""
        return {**batch.inputs, "use_cache": use_cache}

    def step_kwargs(
        self,
        token_ids: Int[Tensor, "batch 1"],
        past_key_values: Any,
        attention_mask: Int[Tensor, "batch seq"],
        position_ids: Int[Tensor, "batch 1"],
    ) -> dict[str, Any]:
        """Keyword arguments for ``model(**kw)`` that run one decode step on a KV cache."""
        return {
            "input_ids": token_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            cache_kwarg(self.model): past_key_values,
            "use_cache": True,
        }

    def logits_of(self, output: Any) -> Float[Tensor, "batch seq vocab"]:
        return output.logits

    def cache_of(self, output: Any) -> Any:
        return cache_of(output)

    #: token ids generation may choose from (``None``: the whole vocabulary)
    def allowed_token_ids(self) -> Tensor | None:
        return None

    @property
    def eos_token_id(self) -> int | None:
        return None

    # -- identity ------------------------------------------------------------------------------
    def tokenizer_id(self) -> str | None:
        """Identity of the tokenizer: its size and a digest of its vocabulary (cached).

        ``None`` when the adapter has no tokenizer, or one without ``get_vocab``.
        """
        if "_tokenizer_id" not in self.__dict__:
            tok = getattr(self, "tokenizer", None)
            vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else None
            self._tokenizer_id = None if vocab is None else (
                f"{type(tok).__name__}/{len(vocab)}/"
                + hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16])
        return self._tokenizer_id

    def check_batch(self, batch: EncodedBatch) -> EncodedBatch:
        """Refuse a batch this model cannot read: encoded by another tokenizer, or holding token
        ids past the embedding table. Returns ``batch``.

        Raises
        ------
        TokenizerMismatchError
            The batch's :attr:`EncodedBatch.tokenizer_id` differs from :meth:`tokenizer_id`, or
            (for a batch on the host) a token id is not in the model's vocabulary.
        """
        fix = "encode the requests with this model's own adapter: adapter.encode(requests)"
        mine = self.tokenizer_id()
        if batch.tokenizer_id is not None and mine is not None and batch.tokenizer_id != mine:
            raise TokenizerMismatchError(
                f"the batch was encoded by another tokenizer ({batch.tokenizer_id}) than the one of "
                f"{self.name} ({mine})", fix=fix)
        ids = batch.inputs.get("input_ids")
        get_emb = getattr(self.model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else None
        # Only on the host: reading a maximum on an accelerator would make the host wait for it.
        if isinstance(ids, Tensor) and ids.device.type == "cpu" and ids.numel() and isinstance(emb, nn.Embedding):
            top = int(ids.max())
            if top >= emb.num_embeddings:
                raise TokenizerMismatchError(
                    f"the batch holds token id {top}, but {self.name} has {emb.num_embeddings} embeddings",
                    fix=fix)
        return batch

    def digest(self) -> str:
        """Content digest of the weights (names, shapes and a sample of values), cached."""
        cached = getattr(self, "_digest", None)
        if cached is None:
            cached = model_digest(self.model)
            self._digest = cached
        return cached

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "random_weights": self.random_weights,
            "digest": self.digest(),
        }


def cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (and in custom modules)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache of a model output, under either name."""
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "keys", lambda: ())() else None
    return cache if cache is not None else getattr(output, "past_key_values", None)


def model_digest(model: nn.Module, sample: int = 64) -> str:
    """Digest over every tensor's name, shape, dtype and its first/last ``sample`` values.

    Cheap for a 7B model (no full pass over the weights) yet changes with any retraining or
    re-initialisation, which is what activation caches need to key on.
    """
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if flat.numel():
            head = flat[:sample].float().cpu()
            tail = flat[-sample:].float().cpu()
            h.update(head.numpy().tobytes())
            h.update(tail.numpy().tobytes())
    return h.hexdigest()


def get_submodule(root: Any, path: str) -> Any:
    """``getattr`` along a dotted path; integer parts index (works on modules and nnsight envoys)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
