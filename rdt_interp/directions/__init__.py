"""Directions: difference-in-means candidates, their selection, and rank-k subspace directions.

A :class:`Direction` is a vector with its provenance (source model, layer, position, the prompt
sets it came from); it saves and loads with that record, and steers through
:class:`rdt_interp.tracing.AddDirection` / :class:`rdt_interp.tracing.AblateDirection`.
"""

from rdt_interp.directions.diff_in_means import (
    CandidateDirections,
    extract_candidates,
    mean_difference,
)
from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.directions.scoring import kl_divergence, last_logprobs, refusal_score
from rdt_interp.directions.selection import (
    CandidateScore,
    SelectionConfig,
    SelectionResult,
    filter_prompts,
    select_direction,
)
from rdt_interp.directions.subspace import (
    ContrastSubspace,
    contrast_subspace,
    random_direction,
    subspace_direction,
)

__all__ = [
    "CandidateDirections", "CandidateScore", "ContrastSubspace", "Direction", "Provenance",
    "SelectionConfig", "SelectionResult", "contrast_subspace", "extract_candidates", "filter_prompts",
    "kl_divergence", "last_logprobs", "mean_difference", "random_direction", "refusal_score",
    "select_direction", "subspace_direction",
]
