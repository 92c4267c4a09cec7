"""``OpenVLAAdapter``: OpenVLA through the VLA adapter interface, batched; and how to get one.

* :func:`load_openvla` reads a real checkpoint directory (``openvla/openvla-7b`` layout).
* :func:`build_random_openvla` builds any OpenVLA config with random weights directly on the
  target device (meta parameters, then ``N(0, 0.02)`` in place): a 7B model in seconds on a GPU.

Positions seen by the decoder are ``[pads] BOS [256 image patches] text... empty-token``; the
adapter's roles, attention mask and position ids are over those positions, so captures,
interventions and :func:`rdt_interp.tracing.generation.generate` work unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import AutoTokenizer

from rdt_interp.errors import CheckpointError, ConfigError
from rdt_interp.models.action_tokenizer import ActionTokenizer
from rdt_interp.models.adapter import (
    EncodedBatch,
    PaddingSide,
    pad_sequences,
    position_ids_from_mask,
)
from rdt_interp.models.architectures import model_components
from rdt_interp.models.openvla.config import OpenVLAConfig
from rdt_interp.models.openvla.modeling import (
    MultimodalLayout,
    OpenVLAModel,
    build_empty_model,
    fill_random_,
)
from rdt_interp.models.openvla.processor import OpenVLAImageProcessor
from rdt_interp.models.openvla.prompt import OpenVLAPrompt
from rdt_interp.models.openvla.weights import SafetensorsCheckpoint, load_weights
from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.roles import Role


class OpenVLAAdapter(VLAAdapter):
    """An :class:`OpenVLAModel` with its tokenizer, image processor and action tokenizer."""

    def __init__(
        self,
        model: OpenVLAModel,
        tokenizer: Any = None,
        processor: OpenVLAImageProcessor | None = None,
        *,
        name: str = "openvla",
        constrain_actions: bool = False,
        random_weights: bool = False,
        empty_token_id: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.config: OpenVLAConfig = model.config
        self.name = name
        self.tokenizer = tokenizer
        self.processor = processor or OpenVLAImageProcessor.from_openvla_config(self.config)
        if self.processor.channels != model.vision_backbone.in_channels:
            raise ConfigError(f"the image processor makes {self.processor.channels} channels, the "
                              f"vision backbone takes {model.vision_backbone.in_channels}")
        self.constrain_actions = constrain_actions
        self.random_weights = random_weights
        self._prompt = OpenVLAPrompt.for_tokenizer(tokenizer, empty_token_id) if tokenizer is not None else None
        self._action_tokenizer = ActionTokenizer.from_openvla_config(self.config.to_dict())
        n = int(self.config.text_config["num_hidden_layers"])
        self.components = model_components(model, n_layers=n)

    # -- structure -----------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.components.layers

    @property
    def layers_path(self) -> str:
        return self.components.paths.layers

    @property
    def d_model(self) -> int:
        return self.config.llm_dim

    @property
    def embed(self) -> nn.Module:
        return self.components.embed

    @property
    def final_norm(self) -> nn.Module:
        return self.components.final_norm

    @property
    def lm_head(self) -> nn.Module:
        return self.components.lm_head

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        return self._action_tokenizer

    @property
    def num_patches(self) -> int:
        return self.model.num_patches

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image's ``pixel_values`` (6 channels when the
        two vision towers get their own normalisation)."""
        size = int(self.model.config.image_size)
        return int(self.model.vision_backbone.in_channels), size, size

    @property
    def prompt(self) -> OpenVLAPrompt:
        if self._prompt is None:
            raise ConfigError(
                f"{self.name} has no tokenizer, so it cannot tokenize instructions",
                fix="pass tokenizer=... (the checkpoint's Llama-2 tokenizer, or a test tokenizer)",
            )
        return self._prompt

    @property
    def pad_token_id(self) -> int:
        tok_pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(tok_pad) if tok_pad is not None else self.config.pad_token_id

    # -- inputs --------------------------------------------------------------------------------
    def encode(self, requests: Sequence[Any], *, padding_side: PaddingSide = "left") -> EncodedBatch:
        """Prompts + images -> one padded batch; roles etc. over ``text + patches`` positions."""
        reqs = [_as_request(r) for r in requests]
        if not reqs:
            raise ConfigError("encode() needs at least one request")
        pairs = [self.prompt.tokenize(r.instruction) for r in reqs]
        pixel_values = self.processor([r.image_array() for r in reqs])
        return self.encode_tokens([p[0] for p in pairs], pixel_values, roles=[p[1] for p in pairs],
                                  padding_side=padding_side, texts=[r.instruction for r in reqs])

    def encode_tokens(
        self,
        input_ids: Sequence[Sequence[int]] | Int[Tensor, "batch seq"],
        pixel_values: Float[Tensor, "images channels h w"],
        *,
        roles: Sequence[Sequence[int]] | None = None,
        padding_side: PaddingSide = "left",
        texts: Sequence[str] = (),
    ) -> EncodedBatch:
        """A batch from token ids (BOS first) and ``pixel_values``, e.g. a reference's inputs.

        Without ``roles`` every token is ``TEXT`` (the first also ``BOS``): the instruction span
        is unknown for raw ids.
        """
        seqs = [list(map(int, s)) for s in (input_ids.tolist() if isinstance(input_ids, Tensor) else input_ids)]
        if roles is None:
            roles = [[int(Role.TEXT | Role.BOS)] + [int(Role.TEXT)] * (len(s) - 1) for s in seqs]
        if len(seqs) != pixel_values.shape[0]:
            raise ConfigError(f"{len(seqs)} prompts for {pixel_values.shape[0]} images")
        if any(len(s) == 0 for s in seqs):
            raise ConfigError("empty prompt", fix="every prompt needs at least BOS")
        ids, text_roles, text_mask = pad_sequences(seqs, roles, self.pad_token_id, padding_side)
        layout = MultimodalLayout.of(text_mask, self.num_patches)
        mask = layout.merge(text_mask, torch.tensor(1))
        rl = layout.merge(text_roles, torch.tensor(int(Role.IMAGE)))
        pos = position_ids_from_mask(mask)
        return EncodedBatch(
            inputs={"input_ids": ids, "attention_mask": text_mask, "pixel_values": pixel_values.to(self.dtype),
                    "position_ids": pos},
            roles=rl,
            attention_mask=mask,
            position_ids=pos,
            texts=list(texts),
            padding_side=padding_side,
        ).to(self.device)

    def prefill_kwargs(self, batch: EncodedBatch, *, use_cache: bool) -> dict[str, Any]:
        kw = super().prefill_kwargs(batch, use_cache=use_cache)
        if use_cache:
            kw["logits_to_keep"] = 1  # generation reads the last position only
        return kw

    def __repr__(self) -> str:
        kind = "random" if self.random_weights else "pretrained"
        return (f"OpenVLAAdapter({self.name!r}, {kind}, vision={self.config.vision_backbone_id}, "
                f"n_layers={self.n_layers}, d_model={self.d_model})")


def _as_request(r: Any) -> VLARequest:
    if isinstance(r, VLARequest):
        return r
    if isinstance(r, Mapping) and "instruction" in r and "image" in r:
        return VLARequest(str(r["instruction"]), r["image"])
    raise ConfigError(f"cannot make a VLA request from {type(r).__name__}",
                      fix="pass VLARequest(instruction, image) objects")


def load_openvla(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vision_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    tokenizer: Any = None,
    constrain_actions: bool = False,
    empty_token_id: int | None = None,
) -> OpenVLAAdapter:
    """Load an OpenVLA checkpoint directory (config.json + safetensors) into an adapter.

    The tokenizer is loaded from the directory with ``AutoTokenizer`` when it ships one and
    ``tokenizer`` is not given; the image processor from ``preprocessor_config.json`` when
    present, else derived from ``config.json``. ``vision_overrides`` resizes ViTs by timm id
    (tiny test checkpoints; the sizes of real ones are known).
    """
    t0 = time.perf_counter()
    root = Path(path).expanduser()
    config = OpenVLAConfig.from_dir(root, vision_overrides=vision_overrides)
    ckpt = SafetensorsCheckpoint(root)
    _check_vision_sizes(config, ckpt, vision_overrides)
    model = build_empty_model(config, dtype=dtype, device=device)
    load_weights(model, ckpt, where=str(root))
    if tokenizer is None and _has_tokenizer(root):
        try:
            tokenizer = AutoTokenizer.from_pretrained(root)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"could not load the tokenizer in {root}: {exc}".splitlines()[0],
                                  fix="pass tokenizer=... explicitly") from exc
    pre = root / "preprocessor_config.json"
    processor = (OpenVLAImageProcessor.from_file(pre) if pre.is_file()
                 else OpenVLAImageProcessor.from_openvla_config(config))
    adapter = OpenVLAAdapter(model, tokenizer, processor, name=root.name,
                             constrain_actions=constrain_actions, empty_token_id=empty_token_id)
    adapter.load_seconds = time.perf_counter() - t0
    return adapter


def _has_tokenizer(root: Path) -> bool:
    return any((root / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _check_vision_sizes(
    config: OpenVLAConfig, ckpt: SafetensorsCheckpoint, overrides: Mapping[str, Any] | None
) -> None:
    """Compare the ViT sizes the config implies with the weights' shapes before building.

    The number of heads cannot be read from the weights, so a checkpoint whose ViTs are not the
    standard size needs ``vision_overrides``; say so instead of failing on 400 shape mismatches.
    """
    prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."]
    problems = []
    for spec, prefix in zip(config.vision, prefixes, strict=False):
        key = prefix + "patch_embed.proj.weight"
        if key not in ckpt.names():
            continue  # reported as missing by the strict loader
        dim, _, ps, _ = ckpt.shape(key)
        depth = len({k.split(".")[3] for k in ckpt.names() if k.startswith(prefix + "blocks.")})
        fc1 = ckpt.shape(prefix + "blocks.0.mlp.fc1.weight")[0] if depth else spec.mlp_dim
        found = {"embed_dim": dim, "depth": depth, "mlp_dim": fc1, "patch_size": ps}
        want = {"embed_dim": spec.embed_dim, "depth": spec.depth, "mlp_dim": spec.mlp_dim,
                "patch_size": spec.patch_size}
        diff = {k: (want[k], found[k]) for k in want if want[k] != found[k]}
        if diff:
            problems.append(f"{spec.timm_id}: " + ", ".join(f"{k} {a} in config vs {b} in weights"
                                                          for k, (a, b) in diff.items()))
    if problems:
        hint = "" if overrides else " (the ViTs are not the standard size: the weights are a smaller model)"
        raise CheckpointError(
            "vision backbone sizes do not match the weights" + hint + ":\n  " + "\n  ".join(problems),
            fix="pass vision_overrides={timm_id: {'embed_dim': ..., 'depth': ..., 'num_heads': ...}} "
            "(heads cannot be read from the weights; tiny fixtures list them in manifest.json)",
        )


def build_random_openvla(
    config: Mapping[str, Any] | OpenVLAConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    vision_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    tokenizer: Any = None,
    constrain_actions: bool = False,
) -> OpenVLAAdapter:
    """An OpenVLA of ``config``'s shapes with random weights, built directly on ``device``.

    Parameters start on the meta device and get ``N(0, 0.02)`` in place on ``device`` (norm
    gains 1, biases 0), so no CPU-side initialisation of 7B parameters happens. Without a
    ``tokenizer`` a byte-level one is used (ids < 260, never action tokens) so ``encode`` works.
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, OpenVLAConfig) else OpenVLAConfig.from_dict(
        config, vision_overrides=vision_overrides, source="random OpenVLA config")
    model = build_empty_model(cfg, dtype=dtype, device=device)
    fill_random_(model, seed)
    if tokenizer is None:
        tokenizer = byte_tokenizer(TINY_SPECS["tiny-llama"])
    adapter = OpenVLAAdapter(model, tokenizer, name=f"random-{cfg.vision_backbone_id}",
                             constrain_actions=constrain_actions, random_weights=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    adapter.load_seconds = time.perf_counter() - t0
    return adapter
