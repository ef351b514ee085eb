"""One style and one way to save for every figure fedskin draws (learning curves, confusion
matrices, sites, privacy-utility, audit ROC): a PNG to look at and an SVG beside it for a
paper (vector, its text kept as text so that it can be edited).

Plotting functions are wrapped in :func:`styled` (the style applies to what they create) and
end with :func:`save_figure`.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from common.fileio import atomic_write

# matplotlib is imported when a figure is drawn, not with this module: sites and most
# commands never draw one, and importing it costs about a third of a second.

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.bbox": "tight",
    "svg.fonttype": "none",  # text stays text in the SVG
    "svg.hashsalt": "fedskin",  # the same figure gives the same SVG bytes
}
DPI = 120  # the PNG's; the SVG is vector
P = ParamSpec("P")
R = TypeVar("R")


def styled(plot: Callable[P, R]) -> Callable[P, R]:
    """``plot`` run under :data:`STYLE` (matplotlib reads most settings when it creates)."""

    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        plt = pyplot()
        with plt.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: files only, never a window."""
    import matplotlib  # lazily: see above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def svg_path(png: str | Path) -> Path:
    """Where a figure's SVG lies: beside its PNG, same name."""
    return Path(png).with_suffix(".svg")


def save_figure(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    """``fig`` as a PNG at ``path`` and an SVG beside it, each written atomically; closes it."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        for fmt, where in (("png", Path(path)), ("svg", svg_path(path))):
            buf = io.BytesIO()  # no date in the SVG: the same figure gives the same bytes
            fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
            atomic_write(where, buf.getvalue())
    plt.close(fig)
    return Path(path)
