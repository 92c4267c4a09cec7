"""OpenVLA's vision backbone on transformers' own ViTs (no timm).

OpenVLA builds its ViTs with timm and reads the patch tokens of the second-to-last block
(``get_intermediate_layers(n={depth - 2})``): prefix tokens (class, registers) dropped, no
final norm. Here the same networks are transformers' ``Dinov2WithRegistersModel`` and
``SiglipVisionModel``; :func:`vit_weight_plan` maps the checkpoint's timm-style names onto them
(fused ``qkv`` split into q/k/v, ``ls*.scale_factor`` -> LayerScale, ``pos_embed`` without a
class slot -> a zero class position, the SigLIP MAP head ``attn_pool`` -> ``head``).

Module paths inside the transformers models differ between transformers releases (e.g. DINOv2
attention is ``attention.q_proj`` in 5.24 and ``attention.attention.query`` earlier), so the
plan resolves them from the modules that exist rather than hard-coding one layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from rdt_interp.errors import CheckpointError, ConfigError
from rdt_interp.models.openvla.config import ViTSpec

# timm act_layer name -> transformers ACT2FN name
_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


@dataclass(frozen=True)
class WeightAssign:
    """One model tensor filled from checkpoint tensors.

    ``sources`` lists, per argument of ``fn``, the accepted checkpoint names (first present
    wins). With no sources ``fn`` synthesises the value (a parameter timm does not have).
    """

    target: str
    sources: tuple[tuple[str, ...], ...]
    fn: Callable[..., Tensor] | None = None


def build_hf_vit(spec: ViTSpec) -> nn.Module:
    """transformers' model for a timm ViT spec (random init; weights come from the plan)."""
    if spec.act not in _ACTS:
        raise CheckpointError(f"{spec.timm_id}: activation {spec.act!r} is not supported",
                              fix=f"supported: {sorted(_ACTS)}")
    common = dict(
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=3,
        hidden_act=_ACTS[spec.act],
        layer_norm_eps=spec.layer_norm_eps,
        attn_implementation="sdpa",
    )
    if spec.family == "dinov2":
        if not spec.layerscale or not spec.class_token:
            raise CheckpointError(f"{spec.timm_id}: only DINOv2 with class token and LayerScale is supported")
        if spec.mlp_dim % spec.embed_dim:
            raise CheckpointError(f"{spec.timm_id}: MLP width {spec.mlp_dim} is not a multiple of "
                                  f"embed_dim {spec.embed_dim}, which transformers' DINOv2 cannot build")
        cfg = Dinov2WithRegistersConfig(
            **common, mlp_ratio=spec.mlp_dim // spec.embed_dim, num_register_tokens=spec.num_registers,
            layerscale_value=1e-5, qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0,
        )
        model = Dinov2WithRegistersModel(cfg)
        fc1 = model.encoder.layer[0].mlp.fc1 if spec.depth else None
    elif spec.family == "siglip":
        if spec.class_token or spec.num_registers or spec.layerscale:
            raise CheckpointError(f"{spec.timm_id}: SigLIP without class/register tokens expected")
        cfg = SiglipVisionConfig(**common, intermediate_size=spec.mlp_dim, vision_use_head=True)
        model = SiglipVisionModel(cfg)
        fc1 = _siglip_base(model).encoder.layers[0].mlp.fc1 if spec.depth else None
    else:  # pragma: no cover - ViTSpec.family is a Literal
        raise CheckpointError(f"unknown ViT family {spec.family!r}")
    if fc1 is not None and fc1.out_features != spec.mlp_dim:
        raise CheckpointError(f"{spec.timm_id}: built an MLP of width {fc1.out_features}, want {spec.mlp_dim}")
    return model


def _siglip_base(model: nn.Module) -> nn.Module:
    # transformers < 5.2x nests the tower in ``vision_model``; later releases do not
    return getattr(model, "vision_model", model)


def _first_path(root: nn.Module, candidates: Sequence[str]) -> str:
    for path in candidates:
        try:
            root.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise CheckpointError(
        f"none of {list(candidates)} exists in {type(root).__name__}",
        fix="this transformers release lays out the ViT differently; update rdt_interp.models.openvla.vision",
    )


class ViTFeaturizer(nn.Module):
    """A transformers ViT that returns OpenVLA's features: second-to-last block, patches only."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.vit = build_hf_vit(spec)

    @property
    def base(self) -> nn.Module:
        return self.vit if self.spec.family == "dinov2" else _siglip_base(self.vit)

    @property
    def blocks(self) -> nn.ModuleList:
        base = self.base
        return base.encoder.layer if self.spec.family == "dinov2" else base.encoder.layers

    def forward(self, pixel_values: Float[Tensor, "batch 3 h w"]) -> Float[Tensor, "batch patches dim"]:
        h = self.base.embeddings(pixel_values.to(next(self.vit.parameters()).dtype))
        # The last block's output is never used: OpenVLA reads block depth-2 (0-based).
        for block in self.blocks[: self.spec.depth - 1]:
            out = block(h) if self.spec.family == "dinov2" else block(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return h[:, self.spec.num_prefix_tokens:]


def _chunk(i: int, n: int = 3) -> Callable[[Tensor], Tensor]:
    def fn(t: Tensor) -> Tensor:
        if t.shape[0] % n:
            return t  # wrong shape: reported as a mismatch by the loader
        return t.chunk(n, dim=0)[i]

    return fn


def _zero_class_position(pe: Tensor) -> Tensor:
    # timm no_embed_class=True: the class token gets no position; transformers adds slot 0 to it.
    return torch.cat([pe.new_zeros(pe.shape[0], 1, pe.shape[-1]), pe], dim=1)


def vit_weight_plan(featurizer: ViTFeaturizer, src: str, dst: str) -> list[WeightAssign]:
    """Checkpoint (timm names under ``src``) -> model (transformers names under ``dst``)."""
    spec = featurizer.spec
    vit = featurizer.vit
    plan: list[WeightAssign] = []

    def add(target: str, *sources: str | tuple[str, ...], fn: Callable[..., Tensor] | None = None) -> None:
        alts = tuple((s,) if isinstance(s, str) else s for s in sources)
        plan.append(WeightAssign(dst + target, tuple(tuple(src + a for a in alt) for alt in alts), fn))

    def linear(target: str, source: str) -> None:
        add(f"{target}.weight", f"{source}.weight")
        add(f"{target}.bias", f"{source}.bias")

    def qkv(layer_path: str, layer: nn.Module, i: int, names: Sequence[Sequence[str]]) -> None:
        for j, cands in enumerate(names):
            path = f"{layer_path}.{_first_path(layer, cands)}"
            add(f"{path}.weight", f"blocks.{i}.attn.qkv.weight", fn=_chunk(j))
            add(f"{path}.bias", f"blocks.{i}.attn.qkv.bias", fn=_chunk(j))

    if spec.family == "dinov2":
        emb = "embeddings."
        linear(emb + "patch_embeddings.projection", "patch_embed.proj")
        add(emb + "cls_token", "cls_token")
        add(emb + "register_tokens", "reg_token")
        add(emb + "position_embeddings", "pos_embed", fn=_zero_class_position)
        d = spec.embed_dim
        add(emb + "mask_token", fn=lambda: torch.zeros(1, d))  # unused at inference, absent in timm
        for i, layer in enumerate(vit.encoder.layer):
            lp = f"encoder.layer.{i}"
            linear(f"{lp}.norm1", f"blocks.{i}.norm1")
            qkv(lp, layer, i, (("attention.q_proj", "attention.attention.query"),
                               ("attention.k_proj", "attention.attention.key"),
                               ("attention.v_proj", "attention.attention.value")))
            linear(f"{lp}.{_first_path(layer, ('attention.o_proj', 'attention.output.dense'))}",
                   f"blocks.{i}.attn.proj")
            # the reference renames timm's LayerScale ``gamma`` to ``scale_factor``; accept both
            add(f"{lp}.layer_scale1.lambda1", (f"blocks.{i}.ls1.scale_factor", f"blocks.{i}.ls1.gamma"))
            linear(f"{lp}.norm2", f"blocks.{i}.norm2")
            linear(f"{lp}.mlp.fc1", f"blocks.{i}.mlp.fc1")
            linear(f"{lp}.mlp.fc2", f"blocks.{i}.mlp.fc2")
            add(f"{lp}.layer_scale2.lambda1", (f"blocks.{i}.ls2.scale_factor", f"blocks.{i}.ls2.gamma"))
        linear("layernorm", "norm")
        return plan

    base = "vision_model." if _siglip_base(vit) is not vit else ""
    emb = base + "embeddings."
    linear(emb + "patch_embedding", "patch_embed.proj")
    add(emb + "position_embedding.weight", "pos_embed", fn=lambda pe: pe[0])
    for i, layer in enumerate(_siglip_base(vit).encoder.layers):
        lp = f"{base}encoder.layers.{i}"
        linear(f"{lp}.layer_norm1", f"blocks.{i}.norm1")
        qkv(lp, layer, i, (("self_attn.q_proj",), ("self_attn.k_proj",), ("self_attn.v_proj",)))
        linear(f"{lp}.self_attn.out_proj", f"blocks.{i}.attn.proj")
        linear(f"{lp}.layer_norm2", f"blocks.{i}.norm2")
        linear(f"{lp}.mlp.fc1", f"blocks.{i}.mlp.fc1")
        linear(f"{lp}.mlp.fc2", f"blocks.{i}.mlp.fc2")
    linear(base + "post_layernorm", "norm")
    # timm's MAP head (attn_pool) = transformers' SiglipMultiheadAttentionPoolingHead; OpenVLA
    # never runs it, but its weights are in the checkpoint and are loaded for strictness.
    head = base + "head."
    add(head + "probe", "attn_pool.latent")
    add(head + "attention.in_proj_weight", "attn_pool.q.weight", "attn_pool.kv.weight",
        fn=lambda q, kv: torch.cat([q, kv], dim=0))
    add(head + "attention.in_proj_bias", "attn_pool.q.bias", "attn_pool.kv.bias",
        fn=lambda q, kv: torch.cat([q, kv], dim=0))
    linear(head + "attention.out_proj", "attn_pool.proj")
    linear(head + "layernorm", "attn_pool.norm")
    linear(head + "mlp.fc1", "attn_pool.mlp.fc1")
    linear(head + "mlp.fc2", "attn_pool.mlp.fc2")
    return plan


class VisionBackbone(nn.Module):
    """One ViT, or two fused on the channel axis (``pixel_values`` stacks 3 channels per ViT)."""

    def __init__(self, specs: Sequence[ViTSpec]) -> None:
        super().__init__()
        if len(specs) not in (1, 2):
            raise CheckpointError(f"OpenVLA uses one or two ViTs, config names {len(specs)}")
        self.specs = tuple(specs)
        self.featurizer = ViTFeaturizer(specs[0])
        self.fused_featurizer = ViTFeaturizer(specs[1]) if len(specs) == 2 else None

    @property
    def embed_dim(self) -> int:
        return sum(s.embed_dim for s in self.specs)

    @property
    def in_channels(self) -> int:
        return 3 * len(self.specs)

    def forward(self, pixel_values: Float[Tensor, "batch channels h w"]) -> Float[Tensor, "batch patches dim"]:
        if pixel_values.shape[1] != self.in_channels:
            raise ConfigError(
                f"pixel_values have {pixel_values.shape[1]} channels, this vision backbone takes "
                f"{self.in_channels} (3 per ViT)",
                fix="make pixel_values with the model's processor (OpenVLAImageProcessor)",
            )
        feats = [vit(pixel_values[:, channels]) for vit, channels in self.towers()]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=2)

    def towers(self) -> list[tuple[ViTFeaturizer, slice]]:
        """Each ViT with the ``pixel_values`` channels it reads; their features, concatenated on
        the feature axis in this order, are the backbone's output. They are independent until
        then, which the fast path uses to run them side by side."""
        vits = [self.featurizer] if self.fused_featurizer is None else [self.featurizer, self.fused_featurizer]
        return [(vit, slice(3 * i, 3 * i + 3)) for i, vit in enumerate(vits)]

    def weight_plan(self, src: str, dst: str) -> list[WeightAssign]:
        plan = vit_weight_plan(self.featurizer, f"{src}featurizer.", f"{dst}featurizer.vit.")
        if self.fused_featurizer is not None:
            plan += vit_weight_plan(self.fused_featurizer, f"{src}fused_featurizer.",
                                    f"{dst}fused_featurizer.vit.")
        return plan
