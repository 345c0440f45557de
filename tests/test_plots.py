"""Every derive figure is a matplotlib Figure made without pyplot: drawing one leaves the backend, the
rcParams and pyplot's figures as they were (a notebook's ``plt.show()`` keeps working), returns the
figure, and saves it to .png, .pdf or .svg by the extension when given a file. And every figure is one
a referee would accept: labelled axes, a legend wherever lines share an axis, Okabe-Ito colours,
visible error bars on estimates, the phase diagram's colours centred at chi_perp = 1, readable log
ticks, the parameters in the title."""

from __future__ import annotations

import json

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import TwoSlopeNorm, to_rgb
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

import derive
from derive import arch
from derive.core.errors import DeriveError
from derive.core.figures import PALETTE, save_figure
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
        finite_width_report(derive.activation("tanh"), 6, 1.0, 0.0, widths=64), out, C_W=1.0, C_b=0.0),
    "arch_finite_width_plot": lambda get, out: arch_finite_width_plot(
        derive.finite_width(RESIDUAL, width=64), out),
    "plot_validation": lambda get, out: plot_validation(get("dense_validation"), out),
    "ValidationReport.plot": lambda get, out: get("dense_validation").plot(out),
    "ArchValidation.plot": lambda get, out: get("arch_validation").plot(out),
    "TrainedValidation.plot": lambda get, out: get("trained_validation").plot(out),
}


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------
# What a referee looks at

#: The figures that show Monte Carlo estimates, which must carry error bars.
ESTIMATES = ("plot_validation", "ValidationReport.plot", "ArchValidation.plot", "TrainedValidation.plot")


def _panels(fig):
    """The axes of a figure other than colour bars."""
    bars = {c.colorbar.ax for ax in fig.axes for c in ax.collections if getattr(c, "colorbar", None)}
    return [ax for ax in fig.axes if ax not in bars]


def _is_grey(colour) -> bool:
    r, g, b = to_rgb(colour)
    return abs(r - g) < 1e-6 and abs(g - b) < 1e-6


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_axis_is_labelled_and_every_shared_axis_has_a_legend(matplotlib_state, request, name):
    fig = FIGURES[name](request.getfixturevalue, None)
    for ax in _panels(fig):
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (name, ax.get_title())
        assert ax.get_title().strip() or (fig._suptitle is not None and fig._suptitle.get_text().strip())
        if len(ax.get_lines()) > 1:
            assert ax.get_legend() is not None, (name, ax.get_title())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIGURES))
def test_lines_and_markers_use_the_okabe_ito_palette(matplotlib_state, request, name):
    """No matplotlib default colours: every line and marker is an Okabe-Ito colour or a grey (reference
    lines, black data points)."""
    fig = FIGURES[name](request.getfixturevalue, None)
    palette = {to_rgb(c) for c in PALETTE}
    for ax in _panels(fig):
        for line in ax.get_lines():
            colour = line.get_color()
            assert to_rgb(colour) in palette or _is_grey(colour), (name, line.get_label(), colour)


@pytest.mark.parametrize("name", ESTIMATES)
def test_estimates_carry_visible_error_bars(matplotlib_state, request, name):
    """Every panel of a figure of estimates draws error bars with caps, above the lines, and long
    enough to see: the median bar spans at least 5% of the panel's height (estimates of very different
    sizes on one axis would make them specks; the figures show the deviation from the theory)."""
    fig = FIGURES[name](request.getfixturevalue, None)
    for ax in _panels(fig):
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert bars, (name, ax.get_title())
        lengths = []
        for container in bars:
            data, caps, segments = container.lines
            assert caps and segments and all(cap.get_markersize() > 0 for cap in caps)
            assert min(s.get_linewidth()[0] for s in segments) >= 1.0
            assert data.get_zorder() > 2  # above lines (2) and reference lines
            lengths += [abs(seg[1][1] - seg[0][1]) for s in segments for seg in s.get_segments()]
        lo, hi = ax.get_ylim()
        assert np.median(lengths) >= 0.05 * (hi - lo), (name, ax.get_title())
        assert ax.get_legend() is not None


def test_phase_diagram_colours_are_centred_at_chi_one(matplotlib_state, tanh):
    """log chi_perp on a TwoSlopeNorm centred at 0 (chi_perp = 1) that reaches both extremes (neither
    side saturates); the critical point has a legend entry."""
    data = phase_diagram(tanh.activation, grid=12, critical_points=[p.as_dict() for p in tanh.critical_points])
    ax = _panels(data.figure)[0]
    (mesh,) = [c for c in ax.collections if getattr(c, "colorbar", None)]
    assert isinstance(mesh.norm, TwoSlopeNorm) and mesh.norm.vcenter == 0.0
    chi = np.array(data["chi_perp"], dtype=float)
    assert np.allclose(np.ma.filled(mesh.get_array(), np.nan).ravel(), np.log10(chi).ravel())
    assert mesh.norm.vmin <= np.log10(chi.min()) < 0 < np.log10(chi.max()) <= mesh.norm.vmax
    assert mesh.norm(np.log10(chi.min())) == pytest.approx(0.0) and mesh.norm(np.log10(chi.max())) == pytest.approx(1.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("critical point" in t for t in labels) and any(r"\chi_\perp(K^*) = 1" in t for t in labels)
    assert "tanh" in ax.get_title()


def test_phase_diagram_where_no_fixed_point_is_grey_and_says_so(matplotlib_state):
    data = phase_diagram(derive.activation("relu"), grid=8, cw_range=(1.0, 3.0))
    ax = _panels(data.figure)[0]
    assert any("no finite fixed point" in t.get_text() for t in ax.get_legend().get_texts())
    assert any(v is None for row in data["chi_perp"] for v in row)


def test_depth_profile_has_plain_log_ticks_and_a_labelled_chi_one_line(matplotlib_state, tanh):
    fig = depth_profile_plot(tanh.activation, depth_profile(tanh.activation, 1.0, 0.0, 200), None, 1.0, 0.0)
    fig.draw_without_rendering()
    kernel, _, chi = _panels(fig)
    assert kernel.get_xscale() == "log"
    ticks = {t.get_text() for t in kernel.get_xticklabels()}
    assert {"1", "10", "100"} <= ticks and not any("times" in t for t in ticks)
    assert any("criticality" in t.get_text() for t in chi.get_legend().get_texts())
    lo, hi = chi.get_ylim()
    assert lo < 1.0 < hi and (hi - 1.0) > 0.02 * (hi - lo)  # the chi = 1 line is inside, not on the frame
    assert "C_W = 1" in fig._suptitle.get_text() and "L = 200" in fig._suptitle.get_text()


def test_finite_width_plot_marks_the_trust_limit_and_states_the_setting(matplotlib_state):
    """Where a normalised correction exceeds 0.1 the layers beyond are shaded, with the first such
    layer in the legend; the 0.1 line is labelled; the title has C_W, C_b and the width."""
    fig = finite_width_plot(finite_width_report(derive.activation("relu"), 12, 2.0, 0.0, widths=32), None,
                            C_W=2.0, C_b=0.0)
    (ax,) = _panels(fig)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("trust limit") for t in texts)
    (beyond,) = [t for t in texts if t.startswith("beyond the trust limit")]
    first = int(beyond.split("layer ")[1].split()[0])
    assert 1 < first <= 12
    assert "C_W = 2" in ax.get_title() and "n = 32" in ax.get_title() and "relu" in ax.get_title()
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")
              and "trust" not in line.get_label()]
    assert len(curves) == 4 and len({(line.get_marker(), str(line.get_linestyle())) for line in curves}) == 4


def test_finite_width_plot_says_when_the_trust_limit_is_not_reached(matplotlib_state):
    fig = FIGURES["finite_width_plot"](None, None)
    (ax,) = _panels(fig)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("not reached" in t for t in texts) and not any(t.startswith("beyond") for t in texts)


def test_arch_finite_width_plot_states_the_width(matplotlib_state):
    fig = FIGURES["arch_finite_width_plot"](None, None)
    (ax,) = _panels(fig)
    assert "n = 64" in ax.get_title()
    assert any(t.get_text().startswith("trust limit") for t in ax.get_legend().get_texts())


def test_validation_figure_states_the_setting(matplotlib_state, dense_validation):
    fig = dense_validation.plot()
    title = fig._suptitle.get_text()
    assert "tanh" in title and "C_W = 1.5" in title and "C_b = 0.05" in title and "16, 32" in title
    assert len(_panels(fig)) == 4  # K and V, against depth and against 1/n
