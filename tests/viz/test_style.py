import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from rdt_interp.errors import ConfigError
from rdt_interp.viz.style import (
    COLUMN_WIDTH,
    DPI,
    OKABE_ITO,
    PAGE_WIDTH,
    new_figure,
    paper_style,
    save_figure,
)


def test_new_figure_has_paper_width_and_style_fonts():
    with paper_style():
        fig, axes = new_figure("page", 2.0, ncols=2)
        label = axes[0].set_xlabel("layer")
    assert fig.get_size_inches() == pytest.approx((PAGE_WIDTH, 2.0))
    assert len(axes) == 2
    assert label.get_fontsize() == 8
    assert label.get_fontfamily() == ["serif"]
    assert new_figure(COLUMN_WIDTH)[0].get_size_inches()[0] == pytest.approx(3.35)
    with pytest.raises(ConfigError):
        new_figure(-1.0)


def test_palette_is_okabe_ito():
    assert OKABE_ITO["blue"] == "#0072B2" and OKABE_ITO["vermillion"] == "#D55E00"
    assert len(set(OKABE_ITO.values())) == 8


def test_save_figure_writes_pdf_and_png_atomically_at_300_dpi(tmp_path):
    with paper_style():
        fig, (ax,) = new_figure("column", 2.0)
        ax.plot([0, 1], [0, 1])
    paths = save_figure(fig, tmp_path / "sub" / "fig1")
    assert [p.name for p in paths] == ["fig1.pdf", "fig1.png"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    with Image.open(paths[1]) as im:
        # The exact paper size: no tight bbox cropping.
        assert im.size == (round(COLUMN_WIDTH * DPI), round(2.0 * DPI))
        assert np.asarray(im).std() > 0  # something was drawn
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig1.pdf", "fig1.png"]  # no temp files
    # Deterministic PDF bytes (no creation date).
    again = save_figure(fig, tmp_path / "again")
    assert again[0].read_bytes() == paths[0].read_bytes()
    with pytest.raises(ConfigError, match="without suffix"):
        save_figure(fig, tmp_path / "fig.png")
    assert plt.get_fignums() == []  # never went through pyplot
