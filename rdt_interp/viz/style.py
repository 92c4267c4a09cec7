"""One look for every figure: paper fonts and sizes, column widths, a colour-blind-safe palette.

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas -- no pyplot, no
global backend switch, no window -- so building one never touches the caller's matplotlib
state. The style is applied with ``rc_context`` while a figure is built and saved.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rdt_interp.errors import ConfigError
from rdt_interp.storage import atomic_path

#: Widths in inches of a one-column and a two-column (full page) figure in a two-column paper.
COLUMN_WIDTH = 3.35
PAGE_WIDTH = 7.0
DPI = 300

#: Okabe & Ito (2008), distinguishable under the common colour-vision deficiencies.
OKABE_ITO = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "orange": "#E69F00",
    "purple": "#CC79A7",
    "sky": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
}
PALETTE = tuple(OKABE_ITO.values())
NULL_COLOR = "#A0A0A0"  # chance levels, null bands and histograms
NULL_BAND_ALPHA = 0.25
CI_ALPHA = 0.22

RC: dict[str, Any] = {
    "font.family": "serif",
    "font.serif": ["STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "legend.handlelength": 1.6,
    "legend.borderaxespad": 0.3,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=list(PALETTE)),
    "axes.titlepad": 4.0,
    "axes.labelpad": 2.0,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.0,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.5,
    "patch.linewidth": 0.5,
    "hatch.linewidth": 0.5,
    "savefig.dpi": DPI,
    # No tight bbox: constrained layout fits the margins, and the file keeps the exact paper
    # width, so 8 pt text is 8 pt when the PDF is included at column width.
    "savefig.bbox": None,
    "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
    "ps.fonttype": 42,
}

Width = Literal["column", "page"] | float


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Apply the project style for the duration of the block."""
    with matplotlib.rc_context(RC):
        yield


def use_paper_style() -> None:
    """Apply the project style globally (scripts, notebooks): text added to a figure after it
    was built (titles, annotations) then matches the figure."""
    matplotlib.rcParams.update(RC)


def _width(width: Width) -> float:
    if width == "column":
        return COLUMN_WIDTH
    if width == "page":
        return PAGE_WIDTH
    if isinstance(width, (int, float)) and width > 0:
        return float(width)
    raise ConfigError(f"width must be 'column', 'page' or inches > 0, got {width!r}")


def new_figure(
    width: Width = "column", height: float | None = None, *, nrows: int = 1, ncols: int = 1,
    **subplots: Any,
) -> tuple[Figure, list[Axes]]:
    """A figure of paper width on an Agg canvas, with constrained layout, and its axes (flat list).

    Call inside :func:`paper_style` so that text picks up the style.
    """
    w = _width(width)
    h = height if height is not None else w * 0.62 * nrows / max(ncols, 1) ** 0.35
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplots)
    return fig, [ax for row in axes for ax in row]


def save_figure(
    fig: Figure, path: str | os.PathLike[str], *, dpi: int = DPI, formats: tuple[str, ...] = ("pdf", "png")
) -> list[Path]:
    """Write ``path.pdf`` and ``path.png`` (``dpi``) atomically; returns the written paths.

    ``path`` has no suffix: the formats add theirs. PDFs carry no creation date, so the same
    figure gives the same bytes.
    """
    base = Path(path)
    if base.suffix.lower() in {f".{f}" for f in ("pdf", "png", "svg", "jpg", "jpeg")}:
        raise ConfigError(f"save_figure takes a path without suffix, got {base}",
                          fix=f"pass {base.with_suffix('')}")
    written = []
    with paper_style():
        for fmt in formats:
            target = base.parent / f"{base.name}.{fmt}"
            meta = {"CreationDate": None} if fmt == "pdf" else {}
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
            written.append(target)
    return written
