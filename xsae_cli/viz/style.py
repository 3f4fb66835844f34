"""One look for every static plot: Agg backend, sizes readable at README width, units on axes.

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas, never ``pyplot``, so
no global state or display is touched and plots render on headless machines.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A README column is ~800-900 px wide: 8 x 5 inches at 150 dpi keeps 10-11 pt text legible there.
FIGSIZE = (8.0, 5.0)
DPI = 150
FORMATS = ("png", "svg", "html")

# Colour-blind-safe qualitative palette (Okabe & Ito), then tab10 for more groups.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

RC: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "figure.titlesize": 14,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 6,
    "axes.prop_cycle": None,  # filled in by rc() (needs matplotlib imported)
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.15,
    "svg.fonttype": "none",  # text stays text in SVG: searchable, small
    "svg.hashsalt": "xsae",  # stable ids: the same data gives the same SVG
    "figure.facecolor": "white",
    "axes.facecolor": "white",
}


def _mpl() -> Any:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg", force=True)
    return matplotlib


def rc() -> dict[str, Any]:
    """The rcParams of the house style."""
    from cycler import cycler

    _mpl()
    params = dict(RC)
    params["axes.prop_cycle"] = cycler(color=PALETTE)
    return params


def color(i: int) -> str:
    """The i-th colour of the palette (tab20 past the first eight)."""
    if i < len(PALETTE):
        return PALETTE[i]
    import matplotlib

    _mpl()
    r, g, b, _ = matplotlib.colormaps["tab20"]((i - len(PALETTE)) % 20)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


@contextmanager
def styled() -> Iterator[None]:
    """Apply the house style for the duration of the block."""
    matplotlib = _mpl()
    with matplotlib.rc_context(rc()):
        yield


def figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A new Agg-backed figure and its axes (call inside :func:`styled`)."""
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize or FIGSIZE, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=nrows * ncols == 1, **kwargs)
    return fig, axes


def save(fig: Any, path: str | os.PathLike[str], fmt: str = "png", dpi: int = DPI) -> Path:
    """Write ``fig`` atomically as png or svg."""
    from xsae_cli.core.io import atomic_path

    if fmt not in ("png", "svg"):
        raise ValueError(f"static plots are png or svg, not {fmt}")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format=fmt, dpi=dpi, metadata={"Software": "xsae"} if fmt == "png" else {"Date": None, "Creator": "xsae"})
    return path


def to_bytes(fig: Any, fmt: str = "png", dpi: int = DPI) -> bytes:
    """``fig`` as png or svg bytes, for pages that embed their pictures (call inside :func:`styled`)."""
    import io

    if fmt not in ("png", "svg"):
        raise ValueError(f"static plots are png or svg, not {fmt}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Software": "xsae"} if fmt == "png" else {"Date": None, "Creator": "xsae"})
    return buf.getvalue()
