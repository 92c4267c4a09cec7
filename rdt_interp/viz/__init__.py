"""Paper figures from saved results (one style, Agg canvas, never a model)."""

from rdt_interp.viz.figures import (
    action_bars,
    action_sweep,
    alignment_layers,
    alignment_matrix,
    principal_angles_plot,
    probe_layers,
    specificity_plot,
    spectrum_plot,
)
from rdt_interp.viz.style import (
    COLUMN_WIDTH,
    OKABE_ITO,
    PAGE_WIDTH,
    new_figure,
    paper_style,
    save_figure,
    use_paper_style,
)

__all__ = [
    "COLUMN_WIDTH", "OKABE_ITO", "PAGE_WIDTH", "action_bars", "action_sweep", "alignment_layers",
    "alignment_matrix", "new_figure", "paper_style", "principal_angles_plot", "probe_layers",
    "save_figure", "specificity_plot", "spectrum_plot", "use_paper_style",
]
