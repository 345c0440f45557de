"""Every derive figure is a matplotlib Figure made without pyplot: drawing one leaves the backend, the
rcParams and pyplot's figures as they were (a notebook's ``plt.show()`` keeps working), returns the
figure, and saves it to .png, .pdf or .svg by the extension when given a file."""

from __future__ import annotations

import json

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

import derive
from derive import arch
from derive.core.errors import DeriveError
from derive.core.figures import save_figure
from derive.finite.single import finite_width_report
from derive.plots import arch_finite_width_plot, depth_profile_plot, finite_width_plot, phase_diagram
from derive.symbolic.signal import depth_profile
from derive.validation.validate import plot_validation

#: A backend derive never picks, so that switching to Agg (as derive once did) shows.
BACKEND = "svg"

RESIDUAL = arch.serial(arch.dense(1.0), arch.repeat(
    2, arch.residual(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.0), xi=0.8, gamma=0.9)))


@pytest.fixture(scope="module")
def matplotlib_state():
    """The backend set to BACKEND and no pyplot figure open; the state every figure must leave."""
    previous = matplotlib.get_backend()
    plt.close("all")
    matplotlib.use(BACKEND)
    yield matplotlib.get_backend(), dict(matplotlib.rcParams)
    matplotlib.use(previous)


@pytest.fixture(scope="module")
def tanh(matplotlib_state):
    return derive.criticality("tanh")


@pytest.fixture(scope="module")
def dense_validation(matplotlib_state):
    """Two widths, so that the figure has the 1/n panels too."""
    return derive.validate("tanh", 1.5, 0.05, 2, widths=[16, 32], samples=20, quantities="K,V")


@pytest.fixture(scope="module")
def arch_validation(matplotlib_state):
    return derive.validate(RESIDUAL, width=16, samples=20)


@pytest.fixture(scope="module")
def trained_validation(matplotlib_state):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(6, 3)), rng.normal(size=(3, 3))
    return derive.validate_trained("erf", x_train, np.sin(x_train[:, 0]), x_test, 1, 1.5, 0.05,
                                   widths=(8, 16, 32), n_networks=8, steps=(0, 5))


#: name -> draw(get, out): each derive figure, ``get(fixture name)`` giving the data it needs.
FIGURES = {
    "phase_diagram": lambda get, out: phase_diagram(
        get("tanh").activation, out, grid=8,
        critical_points=[p.as_dict() for p in get("tanh").critical_points]).figure,
    "depth_profile_plot": lambda get, out: depth_profile_plot(
        get("tanh").activation, depth_profile(get("tanh").activation, 1.0, 0.0, 20), out, 1.0, 0.0),
    "finite_width_plot": lambda get, out: finite_width_plot(
        finite_width_report(derive.activation("tanh"), 6, 1.0, 0.0, widths=64), out),
    "arch_finite_width_plot": lambda get, out: arch_finite_width_plot(
        derive.finite_width(RESIDUAL, width=64), out),
    "plot_validation": lambda get, out: plot_validation(get("dense_validation"), out),
    "ValidationReport.plot": lambda get, out: get("dense_validation").plot(out),
    "ArchValidation.plot": lambda get, out: get("arch_validation").plot(out),
    "TrainedValidation.plot": lambda get, out: get("trained_validation").plot(out),
}


@pytest.mark.parametrize("suffix", [".png", ".svg"])
@pytest.mark.parametrize("name", list(FIGURES))
def test_a_figure_leaves_matplotlib_alone_and_is_saved(matplotlib_state, request, tmp_path, name, suffix):
    backend, rc = matplotlib_state
    out = tmp_path / f"figure{suffix}"
    fig = FIGURES[name](request.getfixturevalue, str(out))
    assert isinstance(fig, Figure) and fig.axes
    assert matplotlib.get_backend() == backend == BACKEND
    assert dict(matplotlib.rcParams) == rc
    assert plt.get_fignums() == []
    assert out.stat().st_size > 0
    content = out.read_bytes()
    assert content.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in content[:1000]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left beside it


@pytest.mark.parametrize("name", list(FIGURES))
def test_without_a_file_the_figure_is_only_returned(matplotlib_state, request, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    fig = FIGURES[name](request.getfixturevalue, None)
    assert isinstance(fig, Figure) and fig.axes and plt.get_fignums() == []
    assert list(tmp_path.iterdir()) == []
    assert fig._repr_png_().startswith(b"\x89PNG")  # how a notebook shows it without pyplot


def test_phase_diagram_keeps_its_data(matplotlib_state, tanh, tmp_path):
    """The grid stays a JSON-ready dict with the same keys (the CLI prints it); the figure is an
    attribute, not a key."""
    data = phase_diagram(tanh.activation, str(tmp_path / "phase.pdf"), grid=6)
    assert isinstance(data, dict) and sorted(data) == ["C_W", "C_b", "chi_perp"]
    assert json.loads(json.dumps(data)) == data
    assert len(data["chi_perp"]) == len(data["C_b"]) == 6 and len(data["chi_perp"][0]) == len(data["C_W"])
    assert isinstance(data.figure, Figure)
    assert (tmp_path / "phase.pdf").read_bytes().startswith(b"%PDF")


def test_save_figure_chooses_the_format_by_extension_and_refuses_others(tmp_path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert save_figure(fig, tmp_path / "upper.PNG").read_bytes().startswith(b"\x89PNG")
    assert save_figure(fig, tmp_path / "figure.eps").read_bytes().startswith(b"%!PS")
    for name in ("figure.txt", "figure"):  # without a format's extension savefig would add one
        with pytest.raises(DeriveError, match=r"\.png, \.pdf or \.svg"):
            save_figure(fig, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.eps", "upper.PNG"]
