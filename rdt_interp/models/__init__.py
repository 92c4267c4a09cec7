"""Model loading and the adapter interface (chat LMs here; VLA families in subpackages)."""

from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.models.chat import ChatModel
from rdt_interp.models.loading import load_chat_model
from rdt_interp.models.registry import REGISTRY

__all__ = ["REGISTRY", "ChatModel", "EncodedBatch", "ModelAdapter", "load_chat_model"]
