"""Fast guarded generation: static KV cache, CUDA-graph decode steps, RDT/RDT+ as static buffers.

``FastGenerator(adapter).predict_actions(requests, interventions=rdt_plus(...))`` gives the
tokens of ``VLAAdapter.predict_actions`` near the memory-bandwidth floor. See docs/fast_path.md.
"""

from rdt_interp.fast.decoder import DecoderStack, StackSpec
from rdt_interp.fast.engine import FastGenerator, FastStats
from rdt_interp.fast.steering import SteeringBuffers, SteeringLayout

__all__ = ["DecoderStack", "FastGenerator", "FastStats", "SteeringBuffers", "SteeringLayout", "StackSpec"]
