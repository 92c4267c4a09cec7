"""Defenses for a VLA, as values that compose with any :class:`~rdt_interp.models.vla.VLAAdapter`:

* :class:`DefensivePrompt` -- AdaShield-style defensive prompting (an input transform);
* :func:`vlm_guard` / :class:`SafetySubspace` -- VLM-Guard-style projection of a chat model's
  safety subspace out of the residual stream (or a clamp of its component);
* :class:`HarmGate` / :func:`gated_generate` -- probe-gated RDT+ (RDT+ only on flagged rows).

RDT and RDT+ themselves are :func:`rdt_interp.tracing.vla.steer_vla` modes ``action`` and
``text+action``. :mod:`rdt_interp.studies.defenses` compares them all.
"""

from rdt_interp.defenses.gate import (
    GatedGeneration,
    GateRates,
    HarmGate,
    chat_harm_probe,
    fit_gate,
    gate_rates,
    gated_generate,
    gated_interventions,
    threshold_for_fpr,
)
from rdt_interp.defenses.prompting import DEFAULT_DEFENSE_TEXT, DefensivePrompt
from rdt_interp.defenses.subspace import (
    ClampSubspace,
    SafetySubspace,
    safety_subspace,
    subspace_from_activations,
    vlm_guard,
)

__all__ = [
    "DEFAULT_DEFENSE_TEXT", "ClampSubspace", "DefensivePrompt", "GateRates", "GatedGeneration", "HarmGate",
    "SafetySubspace", "chat_harm_probe", "fit_gate", "gate_rates", "gated_generate", "gated_interventions",
    "safety_subspace", "subspace_from_activations", "threshold_for_fpr", "vlm_guard",
]
