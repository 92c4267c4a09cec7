"""RDT and RDT+ on a VLA: inject a chat model's refusal direction into the VLA's LLM backbone.

Works on any :class:`~rdt_interp.models.vla.VLAAdapter`. The pieces, one module each:

* :mod:`.config` -- :class:`VLARDTConfig`, everything the study does in one value;
* :mod:`.requests` -- :func:`load_requests`: instructions (the robot-instruction set, or a user
  JSON/JSONL/CSV file through :func:`rdt_interp.prompts.load_prompt_file`) paired with images: a
  testbed scene per harmful/benign *pair* (both instructions see the same image, so only the
  text differs), rendered at the VLA's input size, or seeded noise. Pairs are split into
  ``val`` (choosing alpha) and ``test`` (every reported number);
* :mod:`.predict` -- greedy action predictions (:func:`predict`);
* :mod:`.sweeps` -- :func:`alpha_sweep` / :func:`target_mode_sweep`: action metrics
  (:func:`rdt_interp.analysis.behaviour.action_metrics`) and the paired bin shift against the
  unsteered actions, for harmful and benign instructions, per (target mode, alpha);
* :mod:`.specificity` -- :func:`direction_specificity`: the effect of ``r`` against >= 100
  random directions of the same norm, many directions per forward pass, with the prefill
  reused for decode-only RDT (:class:`SteeringEffect`);
* :mod:`.decoupling` -- :func:`decoupling`: projection AUC along ``r``, Cohen's d and CV-probe
  AUC of harmful vs benign per layer at image / text / last text / first action / later action
  positions;
* :mod:`.results` -- the result values (what :mod:`rdt_interp.viz.vla` draws);
* :mod:`.pipeline` -- :func:`run_vla_rdt`: all of it in a resumable run directory, through an
  executor (one process, or sharded over ranks).

``alpha`` multiplies the direction's ``vector`` as given (a raw diff-in-means vector keeps its
norm; rescale with :meth:`Direction.scaled` to steer in other units). Greedy decoding is
restricted to the action tokens by default (``constrain_actions``): the action metrics need
action tokens, and random or weak VLAs would otherwise emit text. Steering itself is a
:class:`~rdt_interp.studies.steering.SteeringSpec` (:meth:`VLARDTConfig.steering`).
"""

from rdt_interp.studies.store import ActionSet
from rdt_interp.studies.vla.config import (
    LABELS,
    METRICS,
    SPEC_METRIC_NAMES,
    SPEC_METRICS,
    VLARDTConfig,
)
from rdt_interp.studies.vla.decoupling import decoupling
from rdt_interp.studies.vla.pipeline import run_vla_rdt
from rdt_interp.studies.vla.predict import as_direction, predict, steering_layers
from rdt_interp.studies.vla.requests import (
    LabeledRequest,
    config_requests,
    load_requests,
    scene_image,
    specificity_requests,
    subset,
    vla_image_size,
)
from rdt_interp.studies.vla.results import (
    ConditionResult,
    DecouplingResult,
    SweepResult,
    VLARDTResult,
    load_vla_rdt,
)
from rdt_interp.studies.vla.specificity import SteeringEffect, direction_specificity
from rdt_interp.studies.vla.sweeps import (
    alpha_sweep,
    choose_alpha,
    condition_metrics,
    target_mode_sweep,
)

__all__ = [
    "LABELS", "METRICS", "SPEC_METRICS", "SPEC_METRIC_NAMES", "ActionSet", "ConditionResult", "DecouplingResult",
    "LabeledRequest", "SteeringEffect", "SweepResult", "VLARDTConfig", "VLARDTResult", "alpha_sweep",
    "as_direction", "choose_alpha", "condition_metrics", "config_requests", "decoupling", "direction_specificity",
    "load_requests", "load_vla_rdt", "predict", "run_vla_rdt", "scene_image", "specificity_requests",
    "steering_layers", "subset", "target_mode_sweep", "vla_image_size",
]
