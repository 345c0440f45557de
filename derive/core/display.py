"""Displays of result objects: one-line ``__repr__`` pieces and Jupyter's Markdown (formulas in LaTeX,
numbers in tables).

Numbers are written in full (:func:`number`: the shortest decimal that reads back as the same float);
a long table shows its first and last rows under a line that says so (:func:`markdown_table`), and a
wide matrix its first columns (:func:`matrix_table`): rows and columns are left out, never digits.
Standard errors and z-scores are statistics and show a few digits (:func:`rounded`). LaTeX goes
between ``$...$`` in Markdown; no table cell holds a ``|`` inside a formula (it would split the cell).

Pure Python and NumPy (no SymPy, no JAX), so every layer may use it.
"""

from __future__ import annotations

import math

import numpy as np

#: Most rows a table shows; a longer one shows its first and last MAX_ROWS // 2.
MAX_ROWS = 40
#: Most columns a matrix shows (its first ones).
MAX_COLUMNS = 8
#: What a table shows for a value that does not exist (an entry that is not a Gaussian point, ...).
MISSING = "—"

#: LaTeX of the quantities' names (kernel, finite-width and NTK-fluctuation quantities, as in PDLT).
QUANTITY_LATEX = {
    "K": "K", "V": "V", "G1": r"G^{\{1\}}", "Theta": r"\Theta", "A": "A", "B": "B", "D": "D", "F": "F",
    "P": "P", "Q": "Q", "Theta_var": r"n\,\mathrm{Var}\,\hat\Theta", "dNTK_P": "P", "dNTK_Q": "Q",
}


#: Largest denominator a float is shown as a rational with (1/3, 2/5: architecture parameters).
MAX_DENOMINATOR = 10**4


def exact_fraction(x: float):
    """The rational of denominator <= MAX_DENOMINATOR that equals the float ``x`` exactly (1/6 for
    0.16666666666666666), else None."""
    from fractions import Fraction

    q = Fraction(float(x)).limit_denominator(MAX_DENOMINATOR)
    return q if float(q) == float(x) else None


def number(x) -> str:
    """``x`` with every significant digit: the shortest decimal that reads back as the same float
    (a float32 as a float32), integers as integers, None as :data:`MISSING`."""
    if x is None:
        return MISSING
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, np.floating) and x.dtype != np.float64:
        return "NaN" if np.isnan(x) else str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(f):
        return "NaN"
    return repr(f)


def rounded(x, digits: int = 3) -> str:
    """A statistic (a standard error, a z-score) to ``digits`` significant digits."""
    if x is None:
        return MISSING
    f = float(x)
    return "NaN" if math.isnan(f) else f"{f:.{digits}g}"


def latex_text(text: str) -> str:
    """``text`` as an upright LaTeX name (``\\mathrm{leaky\\_relu}``), its special characters escaped."""
    out = []
    for ch in str(text):
        if ch in "_%&#${}":
            out.append("\\" + ch)
        elif ch == "\\":
            out.append(r"\backslash ")
        elif ch == "^":
            out.append(r"\hat{}")
        elif ch == "~":
            out.append(r"\sim ")
        elif ch == " ":
            out.append(r"\ ")
        else:
            out.append(ch)
    return r"\mathrm{" + "".join(out) + "}"


def markdown_text(text) -> str:
    """Plain ``text`` (a name, a reason, a SymPy-syntax expression) safe in Markdown and in a table cell: one
    line, with the characters Markdown would read as emphasis, code, HTML or a cell boundary escaped."""
    out = str(text).replace("\n", " ")
    for ch in "\\`*_|":
        out = out.replace(ch, "\\" + ch)
    return out.replace("<", "&lt;")


def code(text) -> str:
    """``text`` as inline code (SymPy syntax), safe in a table cell."""
    body = str(text).replace("\n", " ").replace("|", r"\|")
    return f"`` {body} ``" if "`" in body else f"`{body}`"


def math_cell(latex: str) -> str:
    """Inline math ``$latex$`` safe in a table cell: ``|`` (which would split the cell) as ``\\vert``."""
    return "$" + latex.replace(r"\|", r"\Vert ").replace("|", r"\vert ") + "$"


def aligned(lines: list[str]) -> str:
    """Display math: ``lines`` (each ``left &= right``) in an ``aligned`` block between ``$$``."""
    return "$$\\begin{aligned}" + " \\\\ ".join(lines) + "\\end{aligned}$$"


def markdown_table(header: list[str], rows: list[list], *, max_rows: int = MAX_ROWS) -> str:
    """A Markdown table; cells that are not strings are written with :func:`number`. Over ``max_rows``
    rows, the first and last ``max_rows // 2`` are shown, after a line that counts them."""
    def cell(v):
        return v if isinstance(v, str) else number(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = list(rows)
    note = ""
    if len(shown) > max_rows:
        half = max(max_rows // 2, 1)
        note = f"({len(shown)} rows, showing the first {half} and the last {half})\n\n"
        shown = shown[:half] + shown[-half:]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown]
    return note + "\n".join(lines)


def matrix_table(matrix, *, corner: str = "", max_rows: int = 2 * MAX_COLUMNS, max_columns: int = MAX_COLUMNS) -> str:
    """A 2-d array as a Markdown table, rows and columns labelled by their (0-based) index; over
    ``max_columns`` columns only the first are shown and over ``max_rows`` rows the first and last, each
    under a line that says so."""
    m = np.asarray(matrix)
    if m.ndim != 2:
        m = m.reshape(m.shape[0], -1) if m.ndim else m.reshape(1, 1)
    cols = min(m.shape[1], max_columns)
    note = (f"({m.shape[0]} × {m.shape[1]}, showing columns 0 to {cols - 1})\n\n" if cols < m.shape[1] else "")
    table = markdown_table([corner, *map(str, range(cols))],
                           [[f"**{i}**", *row[:cols]] for i, row in enumerate(m)], max_rows=max_rows)
    return note + table


def verdict(passed: bool, *, markdown: bool = False) -> str:
    """A check's verdict: "passed", or "FAILED" (``**failed**`` in Markdown)."""
    return "passed" if passed else ("**failed**" if markdown else "FAILED")


def worst_z(worst: dict | None) -> str:
    """"; worst |z| = 1.23" for a one-line repr, from the row with the largest |z| (None: "")."""
    return "" if worst is None else f"; worst |z| = {abs(worst['z']):.2f}"


def quantity_cell(name: str) -> str:
    """A quantity's name in a table cell: its LaTeX where :data:`QUANTITY_LATEX` has it, else as text."""
    return f"${QUANTITY_LATEX[name]}$" if name in QUANTITY_LATEX else markdown_text(name)


def upper_entries(n: int) -> list[tuple[int, int]]:
    """The pairs (a, b), a <= b < n: the distinct entries of a symmetric n x n matrix."""
    return [(a, b) for a in range(n) for b in range(a, n)]


__all__ = ["MAX_ROWS", "MAX_COLUMNS", "MISSING", "QUANTITY_LATEX", "number", "rounded", "latex_text",
           "markdown_text", "code", "math_cell", "aligned", "markdown_table", "matrix_table", "upper_entries",
           "verdict", "worst_z", "quantity_cell"]
