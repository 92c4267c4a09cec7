"""The testbed VLA: a Prismatic/OpenVLA-style VLA on the real Qwen2.5-Coder-0.5B-Instruct.

Architecture (what OpenVLA is, at toy size on the vision side)::

    64x64 image -> small SigLIP ViT (trained from scratch; patch 8 -> 64 patches)
                -> GELU MLP projector to d_model (OpenVLA's single-backbone ``Projector``)
                -> patches inserted right after the first prompt token
                -> Qwen2.5-Coder-0.5B-Instruct with LoRA on every decoder layer
                -> 7 action tokens = the last 256 rows of the vocabulary (OpenVLA's scheme)

Decisions that differ from OpenVLA because the backbone is Qwen:

* **BOS.** Qwen's tokenizer adds no BOS, but its config and the offline tokenizer name
  ``<|endoftext|>`` as ``bos_token`` (Qwen separates pretraining documents with it). The prompt
  is prefixed with it and the image patches go right after it, exactly where Prismatic puts them
  after Llama-2's ``<s>``. The prefix is a real, attended token (pads use the same id but are
  masked out).
* **Trailing token.** OpenVLA appends the bare word-boundary token ("▁", 29871) after ``Out:``;
  the same rule (:func:`rdt_interp.models.openvla.prompt.empty_token_id`) gives Qwen's space
  token ``" "`` (220), which is appended. The 7 action tokens follow it.
* **Action rows.** The offline checkpoint has 151 936 embedding rows while its tokenizer's text
  stops at id 151 664 (ids 151 665… are ``[PAD…]`` placeholders), so the last 256 rows
  (151 680 … 151 935) are unused by text and become the action tokens. The dequantized GGUF
  checkpoint is *untied* (``tie_word_embeddings=False``; input and output matrices differ by
  GGUF rounding), so the 256 input rows and the 256 output rows are trained separately, as in
  OpenVLA (Llama-2 is untied too).
* **Vision features** are the ViT's last layer after its final LayerNorm (a from-scratch ViT
  has no pretrained penultimate layer worth preferring, which is why Prismatic reads that one).

During training, LoRA stays a separate low-rank path (:class:`LoRALinear`) and the action rows
live in two small parameters (:attr:`TestbedVLA.action_embed`, :attr:`TestbedVLA.action_head`)
that overlay the frozen matrices. :meth:`TestbedVLA.merge_` folds both into the backbone's own
weights, after which ``language_model`` is a plain ``Qwen2ForCausalLM`` (what the adapter and
all interpretability code see).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from rdt_interp.errors import ConfigError, WeightMismatchError
from rdt_interp.models.openvla.modeling import MultimodalLayout, OpenVLAOutput, Projector
from rdt_interp.schema import strict_schema, validate

#: the linear layers of a Qwen2 decoder layer that get LoRA by default (OpenVLA: all of them)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class VisionSpec:
    """A SigLIP-style ViT (transformers' ``SiglipVisionModel``, no pooling head)."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_dim: int = 768

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapters ``W + (alpha / rank) B A`` on ``targets`` in every decoder layer."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_LINEAR

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = sorted(set(self.targets) - set(ALL_LINEAR))
        if bad or not self.targets:
            raise ConfigError(f"LoRA targets {list(self.targets)} are not Qwen2 decoder linears",
                              fix=f"choose from {list(ALL_LINEAR)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TestbedVLAConfig:
    """Sizes of the parts trained on top of the LLM backbone."""

    __test__ = False  # not a pytest class

    vision: VisionSpec = field(default_factory=VisionSpec)
    lora: LoRASpec = field(default_factory=LoRASpec)
    n_bins: int = 256
    action_dim: int = 7
    # RMSNorm on the projector's output, its gain starting at the RMS of the LLM's text
    # embeddings: unnormalized patches grew 126x longer than text tokens and mostly constant
    # (docs/testbed.md), outliers a rank-8 LoRA cannot use.
    projector_norm: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "testbed model config") -> TestbedVLAConfig:
        """A saved configuration (a manifest's ``config``); unknown keys and bad values are errors."""
        # manifests written before the projector norm existed describe a model without one
        return validate(cls, {"projector_norm": False, **d}, source=source,
                        fix="see TestbedVLAConfig in rdt_interp/testbed/model.py")


strict_schema(VisionSpec, LoRASpec, TestbedVLAConfig)


# -- pieces ---------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank path (``B`` starts at zero, as in LoRA)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        a = torch.empty(rank, base.in_features, dtype=w.dtype)
        # Kaiming-uniform with a = sqrt(5), as nn.Linear and peft initialise A
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with ``scale * B @ A`` added to its weight (in place)."""
        delta = (self.lora_B.double() @ self.lora_A.double()) * self.scale
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


class VisionEncoder(nn.Module):
    """A small SigLIP ViT from transformers, trained from scratch; returns every patch's features."""

    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.spec = spec
        cfg = SiglipVisionConfig(
            hidden_size=spec.hidden_size, intermediate_size=spec.mlp_dim, num_hidden_layers=spec.depth,
            num_attention_heads=spec.num_heads, image_size=spec.image_size, patch_size=spec.patch_size,
            num_channels=3, vision_use_head=False, attn_implementation="sdpa",
        )
        self.vit = SiglipVisionModel(cfg)

    @property
    def num_patches(self) -> int:
        return self.spec.num_patches

    def forward(self, pixel_values: Float[Tensor, "batch 3 h w"]) -> Float[Tensor, "batch patches dim"]:
        return self.vit(pixel_values=pixel_values).last_hidden_state


def images_to_pixels(images: Sequence[Any], size: int) -> Float[Tensor, "batch 3 size size"]:
    """RGB images (``HxWx3`` uint8 arrays or PIL) -> ``[-1, 1]`` pixels, resized to ``size`` if needed."""
    from PIL import Image

    arrs = []
    for im in images:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ConfigError(f"image must be HxWx3 RGB, got shape {a.shape}")
        if a.shape[:2] != (size, size):
            a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((size, size), Image.BILINEAR))
        arrs.append(a.astype(np.uint8, copy=False))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# -- the model ------------------------------------------------------------------------------------
class TestbedVLA(nn.Module):
    """Vision encoder + projector + a causal LM with LoRA and trainable action rows."""

    __test__ = False  # not a pytest class

    def __init__(self, language_model: nn.Module, config: TestbedVLAConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vision = VisionEncoder(config.vision)
            d = int(language_model.config.hidden_size)
            self.projector = Projector(config.vision.hidden_size, d, fused=False)
            self.projector_norm: nn.Module | None = None
            if config.projector_norm:
                emb = language_model.get_input_embeddings().weight.detach()
                text_rms = float(emb.float().pow(2).mean().sqrt())
                self.projector_norm = nn.RMSNorm(d, eps=1e-6)
                nn.init.constant_(self.projector_norm.weight, text_rms)
        self.language_model = language_model
        for p in language_model.parameters():
            p.requires_grad_(False)
        for layer in self.decoder_layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in config.lora.targets:
                    base = getattr(parent, name, None)
                    if isinstance(base, nn.Linear):
                        setattr(parent, name, LoRALinear(base, config.lora.rank, config.lora.alpha, gen))
        emb = language_model.get_input_embeddings().weight
        head = language_model.get_output_embeddings().weight
        if emb.shape[0] <= config.n_bins or head.shape[0] != emb.shape[0]:
            raise ConfigError(f"the LLM has {emb.shape[0]} input and {head.shape[0]} output rows; need "
                              f"more than {config.n_bins} of each")
        self.action_embed: nn.Parameter | None = nn.Parameter(emb[-config.n_bins:].detach().clone())
        self.action_head: nn.Parameter | None = nn.Parameter(head[-config.n_bins:].detach().clone())
        self.merged = False
        self._cache_arg = "cache" if "cache" in _forward_params(language_model) else "past_key_values"

    # -- structure -----------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    @property
    def num_patches(self) -> int:
        return self.config.vision.num_patches

    @property
    def vocab_size(self) -> int:
        return int(self.language_model.get_input_embeddings().weight.shape[0])

    @property
    def first_action_id(self) -> int:
        return self.vocab_size - self.config.n_bins

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {n: m for n, m in self.language_model.named_modules() if isinstance(m, LoRALinear)}

    # -- the trained delta ---------------------------------------------------------------------
    def delta_state_dict(self) -> dict[str, Tensor]:
        """Everything training changes: vision, projector, LoRA A/B, action rows (before merging)."""
        if self.merged:
            raise ConfigError("the model is merged: its delta is folded into the backbone",
                              fix="take the delta before calling merge_()")
        out = {f"vision.{k}": v for k, v in self.vision.state_dict().items()}
        out.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        if self.projector_norm is not None:
            out.update({f"projector_norm.{k}": v for k, v in self.projector_norm.state_dict().items()})
        for name, m in self.lora_layers().items():
            out[f"language_model.{name}.lora_A"] = m.lora_A.data
            out[f"language_model.{name}.lora_B"] = m.lora_B.data
        assert self.action_embed is not None and self.action_head is not None
        out["action_embed"] = self.action_embed.data
        out["action_head"] = self.action_head.data
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def load_delta_(self, state: dict[str, Tensor], *, where: str = "delta") -> None:
        """Copy a :meth:`delta_state_dict` into the model (strict: same keys and shapes)."""
        own = self.delta_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or wrong:
            raise WeightMismatchError(missing=missing, unexpected=unexpected, mismatched=wrong, where=where)
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups: vision + projector, LoRA, action rows."""
        if self.merged:
            raise ConfigError("a merged model has nothing separate to train")
        assert self.action_embed is not None and self.action_head is not None
        lora = [p for m in self.lora_layers().values() for p in (m.lora_A, m.lora_B)]
        return {"vision": list(self.vision.parameters()), "projector": self.projector_parameters(), "lora": lora,
                "action_rows": [self.action_embed, self.action_head]}

    def projector_parameters(self) -> list[nn.Parameter]:
        norm = [] if self.projector_norm is None else list(self.projector_norm.parameters())
        return [*self.projector.parameters(), *norm]

    @torch.no_grad()
    def merge_(self) -> TestbedVLA:
        """Fold LoRA and the action rows into the LLM's weights; ``language_model`` becomes plain."""
        if self.merged:
            return self
        for layer in self.decoder_layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, LoRALinear):
                        setattr(parent, name, child.merged())
        assert self.action_embed is not None and self.action_head is not None
        n = self.config.n_bins
        self.language_model.get_input_embeddings().weight[-n:] = self.action_embed
        self.language_model.get_output_embeddings().weight[-n:] = self.action_head
        self.action_embed = None
        self.action_head = None
        self.merged = True
        return self

    # -- forward -------------------------------------------------------------------------------
    def image_features(
        self, pixel_values: Float[Tensor, "batch 3 h w"]
    ) -> tuple[Float[Tensor, "batch patches vision_dim"], Float[Tensor, "batch patches llm_dim"]]:
        patches = self.vision(pixel_values.to(next(self.vision.parameters()).dtype))
        projected = self.projector(patches)
        if self.projector_norm is not None:
            projected = self.projector_norm(projected)
        return patches, projected

    def embed(self, input_ids: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d"]:
        """Token embeddings; action ids read the trainable rows until the model is merged."""
        e = self.get_input_embeddings()(input_ids)
        if self.action_embed is None:
            return e
        k = input_ids - self.first_action_id
        is_action = k >= 0
        rows = self.action_embed[k.clamp(min=0)]
        return torch.where(is_action[..., None], rows.to(e.dtype), e)

    def head(self, hidden: Float[Tensor, "batch seq d"]) -> Float[Tensor, "batch seq vocab"]:
        """Output logits; the action rows come from the trainable rows until merged."""
        w = self.language_model.get_output_embeddings().weight
        if self.action_head is None:
            return F.linear(hidden, w)
        text = F.linear(hidden, w[: self.first_action_id])
        return torch.cat([text, F.linear(hidden, self.action_head.to(hidden.dtype))], dim=-1)

    def multimodal_inputs(
        self,
        input_ids: Int[Tensor, "batch seq"],
        text_mask: Int[Tensor, "batch seq"],
        pixel_values: Float[Tensor, "n_images 3 h w"],
    ) -> tuple[Float[Tensor, "batch mm d"], Int[Tensor, "batch mm"], Int[Tensor, "batch mm"]]:
        """Embeddings with the projected patches after each row's first real token, its mask and positions."""
        from rdt_interp.models.adapter import position_ids_from_mask

        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ConfigError(f"{pixel_values.shape[0]} images for {input_ids.shape[0]} prompts",
                              fix="give one image per prompt")
        _, projected = self.image_features(pixel_values)
        layout = MultimodalLayout.of(text_mask, self.num_patches)
        embeds = layout.merge(self.embed(input_ids), projected)
        mask = layout.merge(text_mask, torch.tensor(1, device=text_mask.device))
        return embeds, mask, position_ids_from_mask(mask)

    def forward(
        self,
        input_ids: Int[Tensor, "batch seq"] | None = None,
        attention_mask: Int[Tensor, "batch mask_seq"] | None = None,
        pixel_values: Float[Tensor, "n_images 3 h w"] | None = None,
        position_ids: Int[Tensor, "batch pos_seq"] | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        cache: Any = None,
    ) -> OpenVLAOutput:
        """Multimodal prefill (``pixel_values`` given: text-level ``attention_mask``, decoder-level
        ``position_ids``) or a text-only / cached decode step (everything over decoder positions)."""
        lm = self.language_model
        if past_key_values is None:
            past_key_values = cache
        if input_ids is None:
            raise ConfigError("forward needs input_ids")
        if pixel_values is None:
            if attention_mask is not None and position_ids is None and past_key_values is None:
                from rdt_interp.models.adapter import position_ids_from_mask

                position_ids = position_ids_from_mask(attention_mask)
            embeds = self.embed(input_ids)
            mask = attention_mask
        else:
            if past_key_values is not None and _cache_len(past_key_values) > 0:
                raise ConfigError("pixel_values were given with a non-empty KV cache",
                                  fix="pass pixel_values only in the prefill call")
            text_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            if text_mask.shape != input_ids.shape:
                raise ConfigError(f"attention_mask has shape {tuple(text_mask.shape)}, input_ids "
                                  f"{tuple(input_ids.shape)}: a multimodal call takes the text-level mask")
            embeds, mask, pos = self.multimodal_inputs(input_ids, text_mask, pixel_values)
            if position_ids is None:
                position_ids = pos
            elif position_ids.shape != mask.shape:
                raise ConfigError(f"position_ids have shape {tuple(position_ids.shape)}, the decoder sees "
                                  f"{tuple(mask.shape)} positions (text + {self.num_patches} patches)")
        out = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                       use_cache=use_cache, output_hidden_states=output_hidden_states,
                       **{self._cache_arg: past_key_values})
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        cache_out = getattr(out, "cache", None) if self._cache_arg == "cache" else None
        if cache_out is None:
            cache_out = getattr(out, "past_key_values", None)
        return OpenVLAOutput(self.head(hidden), cache_out, out.hidden_states,
                             None, mask if pixel_values is not None else None)

    def action_logits(
        self,
        input_ids: Int[Tensor, "batch seq"],
        text_mask: Int[Tensor, "batch seq"],
        pixel_values: Float[Tensor, "batch 3 h w"],
        n_last: int,
    ) -> Float[Tensor, "batch n_last vocab"]:
        """Full-vocabulary logits at the last ``n_last`` positions of left-padded rows (training:
        the LM head runs on those positions only)."""
        embeds, mask, pos = self.multimodal_inputs(input_ids, text_mask, pixel_values)
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                           use_cache=False).last_hidden_state
        return self.head(hidden[:, -n_last:])


def _forward_params(module: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _cache_len(cache: Any) -> int:
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0
