"""The OpenVLA network: vision backbone -> projector -> patches inserted after BOS -> causal LM.

:class:`OpenVLAModel` is a plain ``nn.Module`` whose state dict uses the checkpoint's names for
the projector and the LLM (``projector.fc1``, ``language_model.model.layers.0...``). Its forward
takes what the reference's ``forward`` takes (``input_ids``, ``attention_mask``,
``pixel_values``) and, unlike the reference, also batched decode steps (``input_ids [b, 1]`` with
``past_key_values``, ``attention_mask`` and ``position_ids`` over all decoder positions) and
left-padded batches: the patches go right after each row's BOS, i.e. after its padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import position_ids_from_mask
from rdt_interp.models.meta_init import fill_random_, materialize_, parameters_on_meta
from rdt_interp.models.openvla.config import OpenVLAConfig
from rdt_interp.models.openvla.vision import VisionBackbone


class Projector(nn.Module):
    """OpenVLA's GELU MLP projector (3 layers when the vision backbone is fused, else 2)."""

    def __init__(self, vision_dim: int, llm_dim: int, *, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.act_fn1 = nn.GELU()
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.act_fn2 = nn.GELU()
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.act_fn1 = nn.GELU()
            self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: Float[Tensor, "batch patches vision_dim"]) -> Float[Tensor, "batch patches llm_dim"]:
        x = self.fc2(self.act_fn1(self.fc1(x)))
        if self.fused:
            x = self.fc3(self.act_fn2(x))
        return x


@dataclass
class MultimodalLayout:
    """Where each decoder position comes from when ``n_patches`` are inserted after BOS.

    Row ``b``'s first real token (its BOS) sits at ``bos[b]``; decoder position ``j`` holds text
    token ``text_index[b, j]`` unless ``is_patch[b, j]``, then patch ``patch_index[b, j]``.
    """

    text_index: Int[Tensor, "batch seq"]
    patch_index: Int[Tensor, "batch seq"]
    is_patch: Bool[Tensor, "batch seq"]

    @classmethod
    def of(cls, text_mask: Int[Tensor, "batch text"], n_patches: int) -> MultimodalLayout:
        if bool((text_mask.sum(dim=1) == 0).any()):
            raise ConfigError("a row of the batch has no real token", fix="drop empty prompts")
        n, t = text_mask.shape
        bos = text_mask.long().argmax(dim=1, keepdim=True)  # first 1 in each row
        j = torch.arange(t + n_patches, device=text_mask.device).expand(n, -1)
        is_patch = (j > bos) & (j <= bos + n_patches)
        text_index = torch.where(j <= bos, j, j - n_patches).clamp(0, t - 1)
        patch_index = (j - bos - 1).clamp(0, n_patches - 1)
        return cls(text_index, patch_index, is_patch)

    def merge(self, text: Tensor, patches: Tensor) -> Tensor:
        """Interleave ``text [b, t, ...]`` and ``patches [b, n, ...]`` (or scalars) into ``[b, t+n, ...]``."""
        extra = text.shape[2:]
        ti = self.text_index.view(*self.text_index.shape, *([1] * len(extra))).expand(-1, -1, *extra)
        from_text = text.gather(1, ti)
        if patches.ndim == 0:
            from_patch = patches.to(text.dtype).expand_as(from_text)
        else:
            pi = self.patch_index.view(*self.patch_index.shape, *([1] * len(extra))).expand(-1, -1, *extra)
            from_patch = patches.to(text.dtype).gather(1, pi)
        cond = self.is_patch.view(*self.is_patch.shape, *([1] * len(extra)))
        return torch.where(cond, from_patch, from_text)


@dataclass
class OpenVLAOutput:
    """What :meth:`OpenVLAModel.forward` returns (``hidden_states`` only when asked)."""

    logits: Float[Tensor, "batch seq vocab"]
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    #: the projector's output for this batch (multimodal forward only)
    projected_patches: Tensor | None = None
    #: the attention mask over decoder positions (multimodal forward only)
    attention_mask: Tensor | None = None


class OpenVLAModel(nn.Module):
    """Vision backbone + projector + causal LM, as in the reference, batched."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config.vision)
        self.projector = Projector(config.vision_dim, config.llm_dim, fused=config.use_fused_vision_backbone)
        text = {k: v for k, v in config.text_config.items() if k not in ("model_type", "torch_dtype", "dtype")}
        text_cfg = AutoConfig.for_model(config.text_model_type, **text)
        self.language_model = AutoModelForCausalLM.from_config(text_cfg, attn_implementation="sdpa")
        # transformers 5.24 renamed the LLM's ``past_key_values`` argument and output to ``cache``
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def image_features(
        self, pixel_values: Float[Tensor, "batch channels h w"]
    ) -> tuple[Float[Tensor, "batch patches vision_dim"], Float[Tensor, "batch patches llm_dim"]]:
        """Vision patches (fused ViT features) and their projection into the LLM."""
        patches = self.vision_backbone(pixel_values)
        return patches, self.projector(patches)

    def forward(
        self,
        input_ids: Int[Tensor, "batch seq"] | None = None,
        attention_mask: Int[Tensor, "batch mask_seq"] | None = None,
        pixel_values: Float[Tensor, "images channels h w"] | None = None,
        position_ids: Int[Tensor, "batch pos_seq"] | None = None,
        past_key_values: Any = None,
        inputs_embeds: Float[Tensor, "batch seq d"] | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        cache: Any = None,
    ) -> OpenVLAOutput:
        """Multimodal prefill (``pixel_values`` given) or a text-only / cached decode step.

        Multimodal: ``input_ids``/``attention_mask`` are text-level (as the processor returns
        them; a mask over all ``seq + n_patches`` decoder positions is accepted too) and
        ``position_ids``, if given, are over decoder positions. Otherwise the call goes to the
        LLM unchanged.
        """
        lm = self.language_model
        if past_key_values is None:
            past_key_values = cache
        if pixel_values is None:
            if past_key_values is None and input_ids is not None and position_ids is None and attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)
            out = lm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     position_ids=position_ids, use_cache=use_cache, output_hidden_states=output_hidden_states,
                     logits_to_keep=logits_to_keep, **{self._cache_arg: past_key_values})
            return OpenVLAOutput(out.logits, _cache_of(out), out.hidden_states)
        if input_ids is None:
            raise ConfigError("a multimodal forward needs input_ids (the prompt with BOS first)")
        if past_key_values is not None and _cache_len(past_key_values) > 0:
            raise ConfigError("pixel_values were given with a non-empty KV cache",
                              fix="pass pixel_values only in the prefill call")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ConfigError(f"{pixel_values.shape[0]} images for {input_ids.shape[0]} prompts",
                              fix="give one image per prompt")
        n_patch = self.num_patches
        b, t = input_ids.shape
        text_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if text_mask.shape[1] == t + n_patch:
            # a decoder-level mask: recover the text-level one (patches are always attended)
            text_mask = _text_mask_from_decoder_mask(text_mask, n_patch)
        elif text_mask.shape[1] != t:
            raise ConfigError(f"attention_mask has {text_mask.shape[1]} positions; input_ids have {t} "
                              f"(or {t + n_patch} with the image patches)")
        _, projected = self.image_features(pixel_values)
        layout = MultimodalLayout.of(text_mask, n_patch)
        embeds = self.get_input_embeddings()(input_ids)
        merged = layout.merge(embeds, projected)
        mm_mask = layout.merge(text_mask, torch.tensor(1, device=text_mask.device))
        if position_ids is None:
            position_ids = position_ids_from_mask(mm_mask)
        elif position_ids.shape != mm_mask.shape:
            raise ConfigError(f"position_ids have shape {tuple(position_ids.shape)}, the decoder sees "
                              f"{tuple(mm_mask.shape)} positions (text + {n_patch} patches)")
        out = lm(inputs_embeds=merged, attention_mask=mm_mask, position_ids=position_ids,
                 use_cache=use_cache, output_hidden_states=output_hidden_states,
                 logits_to_keep=logits_to_keep, **{self._cache_arg: past_key_values})
        return OpenVLAOutput(out.logits, _cache_of(out), out.hidden_states, projected, mm_mask)


def _cache_of(out: Any) -> Any:
    fields = getattr(type(out), "__dataclass_fields__", {})
    return out.get("cache") if "cache" in fields else out.get("past_key_values")


def _cache_len(cache: Any) -> int:
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def _text_mask_from_decoder_mask(mask: Tensor, n_patch: int) -> Tensor:
    """Drop the ``n_patch`` positions after each row's first real token."""
    n, s = mask.shape
    bos = mask.long().argmax(dim=1, keepdim=True)
    j = torch.arange(s - n_patch, device=mask.device).expand(n, -1)
    src = torch.where(j <= bos, j, j + n_patch)
    return mask.gather(1, src)


# -- construction without paying for initialisation (rdt_interp.models.meta_init) -------------


def build_empty_model(config: OpenVLAConfig, *, dtype: torch.dtype, device: torch.device | str) -> OpenVLAModel:
    """The architecture on ``device`` with uninitialised parameters (fill them before use)."""
    with parameters_on_meta():
        model = OpenVLAModel(config)
    materialize_(model, device, dtype)
    return model.eval()


__all__ = ["MultimodalLayout", "OpenVLAModel", "OpenVLAOutput", "Projector", "build_empty_model", "fill_random_"]
