"""Figures built without pyplot, so that plotting leaves a notebook's matplotlib alone.

Every derive figure is an :class:`InlineFigure`: a plain :class:`matplotlib.figure.Figure`, made
directly rather than through ``matplotlib.pyplot``. Nothing global changes: no backend is chosen, no
rcParams are set, no figure is registered with pyplot (so ``plt.show()`` in a notebook keeps
working and the figure is freed with its last reference). Returned as the last value of a notebook
cell, the figure shows itself as a PNG even when pyplot was never imported; where the inline backend
is active its own formatter draws it instead. :func:`save_figure` writes one to a .png, .pdf or .svg
file (or another format matplotlib writes) atomically (:func:`derive.core.files.write_atomic`).
"""

from __future__ import annotations

import io
from pathlib import Path

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


__all__ = ["InlineFigure", "save_figure"]
