"""Figures built without pyplot, so that plotting leaves a notebook's matplotlib alone.

Every derive figure is an :class:`InlineFigure`: a plain :class:`matplotlib.figure.Figure`, made
directly rather than through ``matplotlib.pyplot``. Nothing global changes: no backend is chosen, no
rcParams are set, no figure is registered with pyplot (so ``plt.show()`` in a notebook keeps
working and the figure is freed with its last reference). Returned as the last value of a notebook
cell, the figure shows itself as a PNG even when pyplot was never imported; where the inline backend
is active its own formatter draws it instead. :func:`save_figure` writes one to a .png, .pdf or .svg
file (or another format matplotlib writes) atomically (:func:`derive.core.files.write_atomic`).

One style for every derive figure, set per figure and per axis (never through rcParams): the
colour-blind-safe palette of Okabe & Ito (:data:`PALETTE`), each series also told apart by a marker
and a line style (:func:`series_style`), so that curves lying on top of each other stay distinct
in grey print too; grey dashed reference lines with a legend entry (:func:`reference_line`); error
bars with caps drawn above the lines (:func:`error_bars`); mathtext labels, a light grid, plain
numbers on log axes and a legend wherever an axis holds more than one labelled series
(:func:`style_axis`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from derive.core.errors import DeriveError
from derive.core.files import write_atomic


class InlineFigure(Figure):
    """A matplotlib Figure that displays itself in IPython and Jupyter (``_repr_png_``)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


def save_figure(fig: Figure, out: str | Path, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``out`` in the format its extension names, in any case (.png, .pdf, .svg or
    another that matplotlib writes, such as .eps or .jpg), atomically: an interrupted or failed write
    leaves the previous file. A file name without such an extension is refused (matplotlib would add
    one, and the file named would stay empty). Returns the path written."""
    fmt = Path(out).suffix.lower()[1:]
    if fmt not in fig.canvas.get_supported_filetypes():
        raise DeriveError(f"cannot write the figure to '{out}': give a .png, .pdf or .svg file name")
    return write_atomic(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


# ----------------------------------------------------------------------------------------------
# Style

#: Okabe & Ito (2008), "Color Universal Design": distinguishable under every common form of colour
#: blindness. Ordered for lines on white; yellow, faint on white, comes last.
OKABE_ITO = {"blue": "#0072B2", "vermillion": "#D55E00", "bluish green": "#009E73", "reddish purple": "#CC79A7",
             "orange": "#E69F00", "sky blue": "#56B4E9", "black": "#000000", "yellow": "#F0E442"}
PALETTE = tuple(OKABE_ITO.values())
#: One marker and one line style per series, cycled with the colours (the lengths are coprime with
#: 8, so that no two of the first dozens of series share colour, marker and line style at once).
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
#: Reference lines (zero, chi = 1, the trust limit of the 1/n expansion): dark grey, dashed.
REFERENCE = "#4D4D4D"
#: Font sizes (points) of axis labels, titles, tick labels and legends.
LABEL_SIZE, TITLE_SIZE, TICK_SIZE, LEGEND_SIZE = 10, 10, 9, 8


def series_style(i: int, *, line: bool = True, marker: bool = True, markevery=None) -> dict:
    """Keyword arguments for ``ax.plot`` of the ``i``-th series: its Okabe-Ito colour, marker and
    line style (``line``/``marker`` False drop one of them). ``markevery`` thins the markers of a long
    curve: every so many points (an int) or at that spacing along the curve (a float, a fraction of
    the axes' diagonal); each series starts at its own offset, so that the markers of curves lying on
    top of each other do not hide one another."""
    style = {"color": PALETTE[i % len(PALETTE)], "linewidth": 1.6 if line else 0,
             "linestyle": LINESTYLES[i % len(LINESTYLES)] if line else "none"}
    if marker:
        style.update(marker=MARKERS[i % len(MARKERS)], markersize=5, markeredgewidth=1.0)
        if isinstance(markevery, (int, np.integer)) and markevery > 1:
            style["markevery"] = (int(i % markevery), int(markevery))
        elif isinstance(markevery, float):
            style["markevery"] = ((i % 3) * markevery / 3, markevery)
    return style


def markevery_for(n: int, target: int = 12):
    """Every how many points a curve of ``n`` points carries a marker: about ``target`` markers."""
    return max(1, int(np.ceil(n / target)))


def reference_line(ax, *, y: float | None = None, x: float | None = None, label: str | None = None,
                   linestyle="--", linewidth: float = 1.2):
    """A horizontal (``y``) or vertical (``x``) reference line in dark grey, below the data, with
    a legend entry when ``label`` is given."""
    kwargs = {"color": REFERENCE, "linestyle": linestyle, "linewidth": linewidth, "zorder": 1.5, "label": label}
    return ax.axhline(y, **kwargs) if y is not None else ax.axvline(x, **kwargs)


def error_bars(ax, x, y, yerr, i: int = 0, *, label: str | None = None, hollow: bool = False, color=None,
               marker: str | None = None, markersize: float = 5.5):
    """Estimates with +-``yerr`` bars, the ``i``-th series' colour and marker: caps, a line width
    that shows at print size, drawn above lines and reference lines (``hollow``: an open marker, for
    a derived value such as a fitted intercept)."""
    color = PALETTE[i % len(PALETTE)] if color is None else color
    marker = MARKERS[i % len(MARKERS)] if marker is None else marker
    return ax.errorbar(x, y, yerr=yerr, fmt=marker, color=color, markersize=markersize,
                       markerfacecolor="white" if hollow else color, markeredgecolor=color, markeredgewidth=1.2,
                       ecolor=color, elinewidth=1.3, capsize=3.5, capthick=1.3, zorder=3, label=label)


def plain_number(value: float, _pos=None) -> str:
    """A tick label on a log axis: 0.01, 1, 10, 1000 as they are, other magnitudes as powers of ten."""
    if not np.isfinite(value) or value <= 0:
        return ""
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    exponent = np.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return rf"$10^{{{int(round(exponent))}}}$"
    mantissa, exponent = f"{value:.1e}".split("e")
    return rf"${mantissa}\times 10^{{{int(exponent)}}}$"


def spans_decades(values, decades: float = 1.0) -> bool:
    """Whether the finite positive ``values`` span at least ``decades`` decades (and are all > 0),
    the case for a log axis."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(len(v) and v.min() > 0 and np.log10(v.max() / v.min()) >= decades)


def log_axis(ax, which: str = "x") -> None:
    """Put the ``which`` axis ("x" or "y") on a log scale with readable labels: plain numbers at the
    decades (1, 10, 100, 1000), 2 and 5 in between where the axis spans less than three decades,
    and no crowded minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    few = lo > 0 and np.log10(hi / lo) < 3
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if few else (1.0,)))
    axis.set_major_formatter(plain_number)
    axis.set_minor_formatter(NullFormatter())


def style_axis(ax, xlabel: str, ylabel: str, title: str | None = None, *, legend: bool | None = None,
               legend_loc: str = "best", legend_columns: int = 1, grid: bool = True) -> None:
    """Label an axis (mathtext welcome) and give it the common look: tick and label sizes, a light
    grid behind the data, no offset or scientific notation hiding the values of a linear axis, and a
    legend when ``legend`` is true or, by default, when more than one series carries a label."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    if title is not None:
        ax.set_title(title, fontsize=TITLE_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "linear" and isinstance(axis.get_major_formatter(), ScalarFormatter):
            formatter = ScalarFormatter(useOffset=False, useMathText=True)
            formatter.set_powerlimits((-3, 4))
            axis.set_major_formatter(formatter)
    if grid:
        ax.grid(True, which="major", color="#D9D9D9", linewidth=0.6, zorder=0)
        ax.set_axisbelow(True)
    handles, _ = ax.get_legend_handles_labels()
    if legend or (legend is None and len(handles) > 1):
        ax.legend(fontsize=LEGEND_SIZE, loc=legend_loc, ncol=legend_columns, framealpha=0.92,
                  edgecolor="#BFBFBF")


def setting(**values) -> str:
    """The parameters of a figure for its title, in mathtext: ``setting(C_W=1.5, C_b=None, n=256)``
    gives "$C_W = 1.5$, $n = 256$" (None left out, numbers with up to 6 significant digits)."""
    symbols = {"C_W": "C_W", "C_b": "C_b", "n": "n", "L": "L", "K0": "K^{(0)}", "lambda_W": r"\lambda_W",
               "lambda_b": r"\lambda_b"}
    parts = []
    for name, value in values.items():
        if value is None:
            continue
        shown = f"{value:.6g}" if isinstance(value, (float, np.floating)) else str(value)
        parts.append(f"${symbols.get(name, name)} = {shown}$")
    return ", ".join(parts)


__all__ = ["InlineFigure", "save_figure", "OKABE_ITO", "PALETTE", "MARKERS", "LINESTYLES", "REFERENCE",
           "series_style", "markevery_for", "reference_line", "error_bars", "plain_number", "spans_decades",
           "log_axis", "style_axis", "setting"]
