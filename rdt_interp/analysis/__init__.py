"""Analysis: probes, cross-model alignment, subspaces, direction specificity and behaviour metrics.

Every estimate comes with an interval (percentile bootstrap) and, where there is a null, a
p-value (label permutation, random directions or random subspaces). Results are frozen
dataclasses with ``to_dict``/``from_dict`` and ``save``/``load`` (JSON, written atomically).
A layer picked from a grid reports its p-value adjusted across the grid (:func:`pick_layer`,
:func:`holm`, :func:`benjamini_hochberg`).
"""

from rdt_interp.analysis.alignment import (
    AlignmentResult,
    PermutationCosine,
    align_directions,
    cosine_matrix,
    cosine_permutation_null,
    cosine_similarity,
)
from rdt_interp.analysis.behaviour import (
    REFUSAL_PHRASES,
    ActionMetrics,
    BinShift,
    RefusalRate,
    action_metrics,
    bin_shift,
    is_refusal,
    refusal_rate,
    zero_motion_mass,
)
from rdt_interp.analysis.layer_pick import LayerPick, grid_peaks, pick_layer
from rdt_interp.analysis.permutation import permuted_labels, shuffled_mean_differences
from rdt_interp.analysis.probe_grid import (
    LayerSelection,
    ProbeGrid,
    TransferResult,
    evaluate_selected,
    probe_grid,
    select_layer,
    transfer_auc,
)
from rdt_interp.analysis.probes import (
    Labeled,
    LinearProbe,
    class_mean_difference,
    fit_probe,
)
from rdt_interp.analysis.specificity import (
    ProjectionAUC,
    ProjectionCohenD,
    SpecificityResult,
    label_shuffled_direction,
    label_shuffled_directions,
    random_directions,
    specificity_test,
)
from rdt_interp.analysis.stats import (
    auc,
    benjamini_hochberg,
    bootstrap_ci,
    cohens_d,
    empirical_pvalue,
    holm,
    permutation_test,
    wilson_interval,
)
from rdt_interp.analysis.subspace import (
    Spectrum,
    SubspaceComparison,
    compare_subspaces,
    principal_angles,
    spectrum,
    top_subspace,
)

__all__ = [
    "REFUSAL_PHRASES", "ActionMetrics", "AlignmentResult", "BinShift", "Labeled", "LayerPick",
    "LayerSelection", "LinearProbe", "PermutationCosine", "ProbeGrid", "ProjectionAUC", "ProjectionCohenD",
    "RefusalRate", "SpecificityResult", "Spectrum", "SubspaceComparison", "TransferResult", "action_metrics",
    "align_directions", "auc", "benjamini_hochberg", "bin_shift", "bootstrap_ci", "class_mean_difference",
    "cohens_d", "compare_subspaces", "cosine_matrix", "cosine_permutation_null", "cosine_similarity",
    "empirical_pvalue", "evaluate_selected", "fit_probe", "grid_peaks", "holm", "is_refusal",
    "label_shuffled_direction", "label_shuffled_directions", "permutation_test", "permuted_labels",
    "pick_layer", "principal_angles", "probe_grid", "random_directions", "refusal_rate", "select_layer",
    "shuffled_mean_differences", "specificity_test", "spectrum", "top_subspace", "transfer_auc",
    "wilson_interval", "zero_motion_mass",
]
