"""examples/plotting.ipynb runs in a Jupyter kernel: derive's figures show inline, and they leave the
notebook's matplotlib alone, so that a pyplot figure after them still shows with ``plt.show()``
(derive used to switch matplotlib to Agg, after which pyplot showed nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "plotting.ipynb"

#: Run by the test just before the pyplot cell, after every derive figure.
BACKEND_CHECK = "import matplotlib\nprint(matplotlib.get_backend())"


def _pngs(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def _tagged(nb, tag: str) -> list:
    return [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]


@pytest.mark.slow
def test_plotting_notebook_shows_derive_and_pyplot_figures(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    derive_cells, pyplot_cells = _tagged(nb, "derive-figure"), _tagged(nb, "pyplot-figure")
    assert derive_cells and len(pyplot_cells) == 1
    pyplot_at = nb.cells.index(pyplot_cells[0])
    assert all(nb.cells.index(c) < pyplot_at for c in derive_cells)
    check = nbformat.v4.new_code_cell(BACKEND_CHECK)
    nb.cells.insert(pyplot_at, check)

    # The kernel imports this checkout's derive (installed or not) and starts with Jupyter's default
    # backend (the inline one), whatever MPLBACKEND the test runs under.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError on any error

    for cell in derive_cells:
        assert _pngs(cell) == 1, cell.source
    backend = "".join(out.get("text", "") for out in check.outputs if out.output_type == "stream").strip()
    assert backend and backend.lower() != "agg" and "inline" in backend, backend
    assert _pngs(pyplot_cells[0]) == 1
    assert not [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]


@pytest.mark.slow
def test_tour_notebook_displays_every_result(tmp_path):
    """examples/tour.ipynb: every code cell runs and displays its result object as LaTeX or Markdown
    (the results' notebook representations), with no error output."""
    nb = nbformat.read(ROOT / "examples" / "tour.ipynb", as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert len(code) >= 5
    shown = [cell for cell in code
             if any({"text/latex", "text/markdown"} & set(out.get("data", {})) for out in cell.outputs)]
    assert len(shown) >= 5, [cell.source for cell in code if cell not in shown]
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
