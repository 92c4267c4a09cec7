"""OpenVLA's ``config.json``: parsing, validation, and the sizes of the ViTs it names by timm id.

The checkpoint format is the one the public OpenVLA code writes (``model_type: "openvla"``):
the vision backbone is named by a Prismatic id (``dinosiglip-vit-so-224px``) and timm model
ids, the LLM by ``text_config`` (a transformers config dict). Sizes of a timm ViT are not in
``config.json``; they come from :data:`TIMM_VIT_SPECS` (the real models) or from
``vision_overrides`` (tiny test models), and are cross-checked against the weights on load.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig

from rdt_interp.errors import CheckpointError, ConfigError

ViTFamily = Literal["dinov2", "siglip"]


@dataclass(frozen=True)
class ViTSpec:
    """One timm ViT as OpenVLA builds it (``timm.create_model(id, num_classes=0, img_size=...)``)."""

    timm_id: str
    family: ViTFamily
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int = 14
    num_registers: int = 0
    class_token: bool = True
    layerscale: bool = False
    #: timm's ``act_layer``; OpenVLA passes ``None`` for both ViTs, so timm's default nn.GELU (exact)
    act: str = "gelu"
    #: set when the MLP width is not ``int(embed_dim * mlp_ratio)`` (e.g. read from the weights)
    mlp_dim_override: int | None = None
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    layer_norm_eps: float = 1e-6

    @property
    def mlp_dim(self) -> int:
        # timm: ``int(dim * mlp_ratio)``; so400m's 3.7362 gives 4304 at 1152 (and 149 at 40)
        return self.mlp_dim_override or int(self.embed_dim * self.mlp_ratio)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> ViTSpec:
        if not overrides:
            return self
        allowed = {"embed_dim", "depth", "num_heads", "mlp_ratio", "mlp_dim", "patch_size", "act"}
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise ConfigError(f"vision_overrides for {self.timm_id} has unknown keys {bad}",
                              fix=f"use only {sorted(allowed)}")
        kw = {k: v for k, v in overrides.items() if k != "mlp_dim"}
        out = replace(self, **kw)
        if "mlp_dim" in overrides:
            out = replace(out, mlp_dim_override=int(overrides["mlp_dim"]))
        if out.embed_dim % out.num_heads:
            raise ConfigError(f"{self.timm_id}: embed_dim {out.embed_dim} is not a multiple of "
                              f"num_heads {out.num_heads}", fix="fix vision_overrides")
        return out


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The ViTs OpenVLA uses, at the sizes timm 0.9.x builds them (224 px, patch 14 -> 256 patches).
TIMM_VIT_SPECS: dict[str, ViTSpec] = {
    "vit_large_patch14_reg4_dinov2.lvd142m": ViTSpec(
        "vit_large_patch14_reg4_dinov2.lvd142m", "dinov2", embed_dim=1024, depth=24, num_heads=16,
        mlp_ratio=4.0, num_registers=4, class_token=True, layerscale=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ),
    "vit_so400m_patch14_siglip_224": ViTSpec(
        "vit_so400m_patch14_siglip_224", "siglip", embed_dim=1152, depth=27, num_heads=16,
        mlp_ratio=3.7362, num_registers=0, class_token=False, layerscale=False,
    ),
}

#: Prismatic vision backbone id -> timm ids (and image size) supported here.
VISION_BACKBONES: dict[str, tuple[tuple[str, ...], int]] = {
    "dinosiglip-vit-so-224px": (
        ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"), 224),
    "siglip-vit-so400m": (("vit_so400m_patch14_siglip_224",), 224),
    "dinov2-vit-l": (("vit_large_patch14_reg4_dinov2.lvd142m",), 224),
}


@dataclass(frozen=True)
class OpenVLAConfig:
    """The fields of an OpenVLA ``config.json`` this implementation uses, validated."""

    vision_backbone_id: str
    use_fused_vision_backbone: bool
    vision: tuple[ViTSpec, ...]
    text_config: dict[str, Any]
    image_resize_strategy: str = "letterbox"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    norm_stats: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def vision_dim(self) -> int:
        return sum(v.embed_dim for v in self.vision)

    @property
    def llm_dim(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def num_patches(self) -> int:
        return self.vision[0].num_patches

    @property
    def image_size(self) -> int:
        return self.vision[0].image_size

    @property
    def text_model_type(self) -> str:
        return str(self.text_config.get("model_type", "llama"))

    @classmethod
    def from_dict(
        cls,
        cfg: Mapping[str, Any],
        *,
        vision_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        source: str = "config",
    ) -> OpenVLAConfig:
        """Validate an OpenVLA config dict; ``vision_overrides`` resizes ViTs by timm id."""
        model_type = cfg.get("model_type")
        if model_type != "openvla":
            hint = (
                "this is a plain causal LM checkpoint: load it with rdt_interp.models.load_chat_model"
                if model_type in {"llama", "qwen2", "mistral", "gemma", "gemma3"}
                else "point at an OpenVLA checkpoint directory (config.json with model_type 'openvla', "
                "e.g. a download of openvla/openvla-7b)"
            )
            raise CheckpointError(f"{source} is not an OpenVLA config (model_type={model_type!r})", fix=hint)
        backbone = cfg.get("vision_backbone_id")
        if backbone not in VISION_BACKBONES:
            raise CheckpointError(
                f"{source}: vision backbone {backbone!r} is not supported",
                fix=f"supported: {', '.join(sorted(VISION_BACKBONES))}",
            )
        default_ids, default_size = VISION_BACKBONES[backbone]
        timm_ids = tuple(cfg.get("timm_model_ids") or default_ids)
        if timm_ids != default_ids:
            raise CheckpointError(f"{source}: timm_model_ids {list(timm_ids)} do not match "
                                  f"{backbone} ({list(default_ids)})", fix="check config.json")
        fused = cfg.get("use_fused_vision_backbone")
        fused = bool(fused) if fused is not None else backbone.startswith(("dinoclip", "dinosiglip"))
        if fused != (len(timm_ids) == 2):
            raise CheckpointError(f"{source}: use_fused_vision_backbone={fused} but {len(timm_ids)} ViT(s)")
        sizes = list(cfg.get("image_sizes") or [default_size] * len(timm_ids))
        acts = list(cfg.get("timm_override_act_layers") or [None] * len(timm_ids))
        overrides = dict(vision_overrides or {})
        unknown = sorted(set(overrides) - set(timm_ids))
        if unknown:
            raise ConfigError(f"vision_overrides names {unknown}, the model has {list(timm_ids)}",
                              fix="key vision_overrides by the timm ids in config.json")
        specs = []
        for tid, size, act in zip(timm_ids, sizes, acts, strict=True):
            spec = replace(TIMM_VIT_SPECS[tid], image_size=int(size))
            if act is not None:
                spec = replace(spec, act=str(act))
            specs.append(spec.with_overrides(overrides.get(tid)))
        if len({s.num_patches for s in specs}) != 1:
            raise CheckpointError(f"{source}: fused ViTs yield different numbers of patches")
        text = dict(cfg.get("text_config") or {})
        text.setdefault("model_type", "llama")
        text = _complete_text_config(text)
        norm_stats = {k: v for k, v in dict(cfg.get("norm_stats") or {}).items()}
        return cls(
            vision_backbone_id=backbone,
            use_fused_vision_backbone=fused,
            vision=tuple(specs),
            text_config=text,
            image_resize_strategy=str(cfg.get("image_resize_strategy", "letterbox")),
            arch_specifier=str(cfg.get("arch_specifier", "")),
            pad_token_id=int(cfg.get("pad_token_id", 32000)),
            pad_to_multiple_of=int(cfg.get("pad_to_multiple_of", 0)),
            n_action_bins=int(cfg.get("n_action_bins", 256)),
            norm_stats=norm_stats,
            raw=copy.deepcopy(dict(cfg)),
        )

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> OpenVLAConfig:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist",
                                  fix="pass the directory that holds config.json and the weights")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} has no config.json",
                                  fix="point at an OpenVLA checkpoint directory (config.json + *.safetensors)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
        return cls.from_dict(cfg, source=str(cfg_path), **kw)

    def to_dict(self) -> dict[str, Any]:
        """The config in the on-disk format (what :meth:`from_dict` reads)."""
        out = copy.deepcopy(self.raw)
        out.update(
            model_type="openvla",
            vision_backbone_id=self.vision_backbone_id,
            use_fused_vision_backbone=self.use_fused_vision_backbone,
            timm_model_ids=[v.timm_id for v in self.vision],
            image_sizes=[v.image_size for v in self.vision],
            text_config=dict(self.text_config),
            image_resize_strategy=self.image_resize_strategy,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            n_action_bins=self.n_action_bins,
            norm_stats=copy.deepcopy(self.norm_stats),
        )
        return out


def _complete_text_config(text: dict[str, Any]) -> dict[str, Any]:
    """Fill what the LLM config needs from transformers' defaults for its model type.

    The real OpenVLA-7b ``text_config`` lists only model_type, vocab size and pad id; the
    reference built it with the ``LlamaConfig`` defaults (hidden 4096, 32 layers, 32 heads,
    intermediate 11008, ``rms_norm_eps`` 1e-6), which transformers 5 still has.
    """
    try:
        hf = AutoConfig.for_model(text["model_type"], **{k: v for k, v in text.items() if k != "model_type"})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"text_config model_type {text['model_type']!r} is unknown to transformers",
                              fix="use a text_config of a causal LM (llama, qwen2, mistral, ...)") from exc
    full = dict(text)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        full.setdefault(key, getattr(hf, key))
    return full


# Action statistics of the test fixture's ``bridge_orig`` entry (7-DoF: xyz, rpy, gripper).
_BRIDGE_ORIG_ACTION: dict[str, list[Any]] = {
    "mask": [True, True, True, True, True, True, False],
    "max": [1.0] * 7,
    "mean": [0.0] * 7,
    "min": [-1.0] * 7,
    "q01": [-0.03, -0.04, -0.02, -0.1, -0.1, -0.2, 0.0],
    "q99": [0.03, 0.04, 0.03, 0.1, 0.1, 0.2, 1.0],
    "std": [1.0] * 7,
}


def openvla_7b_config() -> dict[str, Any]:
    """The ``config.json`` of openvla/openvla-7b (Llama-2-7b + DINOv2/SigLIP at 224 px).

    ``norm_stats`` holds one entry, ``bridge_orig``, with the statistics of the test fixture (the
    real checkpoint lists many datasets); shapes and the forward pass are those of the real model.
    """
    return {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": {"bridge_orig": {"action": copy.deepcopy(_BRIDGE_ORIG_ACTION)}},
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": {
            "model_type": "llama",
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "pad_token_id": 32000,
            "torch_dtype": "bfloat16",
        },
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "torch_dtype": "bfloat16",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }
