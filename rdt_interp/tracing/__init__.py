"""Tracing: capture and edit residual streams (nnsight research path + fast hook path)."""

from rdt_interp.tracing.capture import Activations, capture
from rdt_interp.tracing.generation import Generation, generate
from rdt_interp.tracing.hooks import HookRunner
from rdt_interp.tracing.interventions import (
    AblateDirection,
    AddDirection,
    DirectionLike,
    InterventionPlan,
    Site,
    StepContext,
    rdt,
    rdt_plus,
)
from rdt_interp.tracing.recorder import Recorder
from rdt_interp.tracing.vla import RoleActivations, capture_roles, predict_actions, steer_vla


def __getattr__(name: str):
    # nnsight is imported on first use, so the hook path works where nnsight is not installed
    if name in ("NNsightRunner", "TraceSession"):
        from rdt_interp.tracing import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AblateDirection", "Activations", "AddDirection", "DirectionLike", "Generation", "HookRunner",
    "InterventionPlan", "NNsightRunner", "Recorder", "RoleActivations", "Site", "StepContext",
    "TraceSession", "capture", "capture_roles", "generate", "predict_actions", "rdt", "rdt_plus",
    "steer_vla",
]
