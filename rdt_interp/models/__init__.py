"""Model loading and the adapter interface (chat LMs here; VLA families in subpackages).

Each supported architecture has an explicit adapter in :mod:`rdt_interp.models.architectures`
mapping it onto canonical components (embed, decoder layers, final norm, LM head).
"""

from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.models.architectures import (
    ARCHITECTURES,
    BackboneArchitecture,
    DecoderArchitecture,
    ModelComponents,
    architecture_of,
    model_components,
    register_architecture,
)
from rdt_interp.models.chat import ChatModel
from rdt_interp.models.loading import load_chat_model
from rdt_interp.models.registry import REGISTRY
from rdt_interp.models.vla import ActionPrediction, VLAAdapter, VLARequest

__all__ = [
    "ARCHITECTURES", "REGISTRY", "ActionPrediction", "BackboneArchitecture", "ChatModel",
    "DecoderArchitecture", "EncodedBatch", "ModelAdapter", "ModelComponents", "VLAAdapter",
    "VLARequest", "architecture_of", "load_chat_model", "model_components", "register_architecture",
]
