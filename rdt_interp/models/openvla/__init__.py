"""OpenVLA on modern transformers: checkpoint loading, batched generation, interpretability hooks.

``load_openvla(dir)`` reads an ``openvla/openvla-7b`` checkpoint directory; the ViTs are
transformers' DINOv2-with-registers and SigLIP (no timm), the LLM is built from ``text_config``
(Llama for OpenVLA; any causal LM transformers knows, e.g. Qwen2). See docs/openvla.md.
"""

from rdt_interp.models.openvla.adapter import OpenVLAAdapter, build_random_openvla, load_openvla
from rdt_interp.models.openvla.config import (
    TIMM_VIT_SPECS,
    OpenVLAConfig,
    ViTSpec,
    openvla_7b_config,
)
from rdt_interp.models.openvla.modeling import OpenVLAModel, OpenVLAOutput
from rdt_interp.models.openvla.processor import OpenVLAImageProcessor
from rdt_interp.models.openvla.prompt import OpenVLAPrompt, empty_token_id

__all__ = [
    "TIMM_VIT_SPECS", "OpenVLAAdapter", "OpenVLAConfig", "OpenVLAImageProcessor", "OpenVLAModel",
    "OpenVLAOutput", "OpenVLAPrompt", "ViTSpec", "build_random_openvla", "empty_token_id",
    "load_openvla", "openvla_7b_config",
]
