"""Analysis: probes, cross-model alignment, subspaces, direction specificity and behaviour metrics.

Every estimate comes with an interval (percentile bootstrap) and, where there is a null, a
p-value (label permutation, random directions or random subspaces). Results are frozen
dataclasses with ``to_dict``/``from_dict`` and ``save``/``load`` (JSON, written atomically).
"""

from rdt_interp.analysis.alignment import (
    AlignmentResult,
    align_directions,
    cosine_matrix,
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
from rdt_interp.analysis.probes import (
    Labeled,
    LayerSelection,
    LinearProbe,
    ProbeGrid,
    TransferResult,
    class_mean_difference,
    evaluate_selected,
    fit_probe,
    probe_grid,
    select_layer,
    transfer_auc,
)
from rdt_interp.analysis.specificity import (
    ProjectionAUC,
    ProjectionCohenD,
    SpecificityResult,
    label_shuffled_direction,
    random_directions,
    specificity_test,
)
from rdt_interp.analysis.stats import (
    auc,
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
    "REFUSAL_PHRASES", "ActionMetrics", "AlignmentResult", "BinShift", "Labeled", "LayerSelection",
    "LinearProbe", "ProbeGrid", "ProjectionAUC", "ProjectionCohenD", "RefusalRate", "SpecificityResult",
    "Spectrum", "SubspaceComparison", "TransferResult", "action_metrics", "align_directions",
    "auc", "bin_shift", "bootstrap_ci", "cohens_d", "empirical_pvalue", "holm", "permutation_test",
    "wilson_interval", "class_mean_difference", "compare_subspaces", "cosine_matrix", "cosine_similarity",
    "evaluate_selected", "fit_probe", "is_refusal", "label_shuffled_direction", "principal_angles",
    "probe_grid", "random_directions", "refusal_rate", "select_layer", "spectrum", "specificity_test",
    "top_subspace", "transfer_auc", "zero_motion_mass",
]
