"""Tracing: capture and edit residual streams (nnsight research path + fast hook path)."""

from rdt_interp.tracing.capture import Activations, capture
from rdt_interp.tracing.generation import Generation, generate
from rdt_interp.tracing.hooks import HookRunner
from rdt_interp.tracing.interventions import (
    AblateDirection,
    AddDirection,
    InterventionPlan,
    Site,
    StepContext,
    rdt,
    rdt_plus,
)
from rdt_interp.tracing.recorder import Recorder
from rdt_interp.tracing.session import NNsightRunner, TraceSession

__all__ = [
    "AblateDirection", "Activations", "AddDirection", "Generation", "HookRunner", "InterventionPlan",
    "NNsightRunner", "Recorder", "Site", "StepContext", "TraceSession", "capture", "generate", "rdt",
    "rdt_plus",
]
