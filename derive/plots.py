"""Figures: the order/chaos phase diagram, depth profiles and finite-width corrections.

Each function returns a matplotlib Figure (:class:`derive.core.figures.InlineFigure`, made without
pyplot: no backend switch, no global state, so a notebook's ``plt.show()`` keeps working; the figure
displays itself when it is a notebook cell's value) and saves it to ``out`` when given: .png, .pdf or
.svg by the extension, written atomically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PhaseDiagram(dict):
    """The grid of :func:`phase_diagram` as a JSON-ready dict (``C_W`` and ``C_b``: the axes;
    ``chi_perp``: rows over C_b, columns over C_W, None where not finite), with the drawn matplotlib
    Figure as the attribute ``figure`` (not a key, so the dict still serialises as before)."""

    def __init__(self, data: dict, figure: Figure):
        super().__init__(data)
        self.figure = figure


def phase_diagram(activation, out: str | None = None, cw_range=(0.25, 4.0), cb_range=(0.0, 1.0),
                  grid: int = 60, K0: float = 1.0, critical_points=()) -> PhaseDiagram:
    """chi_perp(K*) over the (C_b, C_W) plane with the chi_perp = 1 boundary, saved to ``out`` when
    given. Returns the data as a dict (keys C_W, C_b, chi_perp) whose ``.figure`` is the Figure."""
    from derive.core import budget
    from derive.core.figures import InlineFigure, save_figure

    budget.check(budget.phase_diagram(grid))
    from derive.symbolic.signal import chi_perp_at_fixed_point

    cw = np.linspace(*cw_range, grid)
    cb = np.linspace(*cb_range, grid)
    CW, CB = np.meshgrid(cw, cb)
    chi = chi_perp_at_fixed_point(activation, CW, CB, K0)
    fig = InlineFigure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    shown = np.log(np.clip(np.where(np.isfinite(chi), chi, 1e3), 1e-3, 1e3))
    mesh = ax.pcolormesh(CB, CW, shown, cmap="RdBu_r", vmin=-1, vmax=1, shading="auto")
    fig.colorbar(mesh, ax=ax, label=r"$\log \chi_\perp(K^*)$")
    if np.nanmin(shown) < 0 < np.nanmax(shown):
        ax.contour(CB, CW, shown, levels=[0.0], colors="k", linewidths=1.5)
    for p in critical_points:
        if cb_range[0] <= p["C_b"] <= cb_range[1] and cw_range[0] <= p["C_W"] <= cw_range[1]:
            ax.plot(p["C_b"], p["C_W"], "*", color="gold", markersize=14, markeredgecolor="k")
    ax.set_xlabel(r"$C_b$")
    ax.set_ylabel(r"$C_W$")
    ax.set_title(f"{activation.name}: ordered (blue, $\\chi_\\perp<1$) / chaotic (red)")
    ax.text(0.02, 0.02, r"black line: $\chi_\perp(K^*) = 1$", transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out, dpi=120)
    chi_perp = [[None if not np.isfinite(v) else float(v) for v in row] for row in chi]
    return PhaseDiagram({"C_W": cw.tolist(), "C_b": cb.tolist(), "chi_perp": chi_perp}, fig)


def depth_profile_plot(activation, profile, out: str | None = None, C_W: float | None = None,
                       C_b: float | None = None) -> Figure:
    """K^(l), rho^(l), chi_par and chi_perp of a :func:`derive.symbolic.signal.depth_profile` against
    depth (log-log where helpful); C_W and C_b, when given, go into the title. Returns the matplotlib
    Figure, saved to ``out`` when given."""
    from derive.core.figures import InlineFigure, save_figure

    layers = np.arange(1, len(profile.K) + 1)
    fig = InlineFigure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].loglog(layers, profile.K, label=r"$K^{(\ell)}$")
    axes[0].set_title("kernel")
    axes[1].semilogx(layers, profile.rho, color="C1", label=r"$\rho^{(\ell)}$")
    axes[1].set_title("correlation of two inputs")
    axes[2].semilogx(layers, profile.chi_par, label=r"$\chi_\parallel$")
    axes[2].semilogx(layers, profile.chi_perp, label=r"$\chi_\perp$")
    axes[2].axhline(1.0, color="k", lw=0.8, ls=":")
    axes[2].set_title("susceptibilities")
    for ax in axes:
        ax.set_xlabel(r"layer $\ell$")
        ax.legend()
    setting = ", ".join(f"{name} = {value:g}" for name, value in (("C_W", C_W), ("C_b", C_b))
                        if value is not None)
    fig.suptitle(f"{activation.name}: {setting}" if setting else activation.name)
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig


def finite_width_plot(report: dict, out: str | None = None) -> Figure:
    """Normalised finite-width fluctuations V/(n K^2), G1/(n K), Var(H)/Theta^2 and the dNTK's
    (P + 2Q)/(n Theta^2) of a :func:`derive.finite.single.finite_width_report` with widths against
    depth. Returns the matplotlib Figure, saved to ``out`` when given."""
    from derive.core.figures import InlineFigure, save_figure

    norm = report["normalised"]
    layers = np.arange(1, report["depth"] + 1)
    fig = InlineFigure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for key, label in (("V_over_nK2", r"$V/(n K^2)$"), ("G1_over_nK", r"$G^{\{1\}}/(n K)$"),
                       ("varH_over_Theta2", r"$\mathrm{Var}(H)/\Theta^2$"),
                       ("dH_over_nTheta2", r"$(P + 2Q)/(n \Theta^2)$ (dNTK)")):
        y = np.array([np.nan if v is None else v for v in norm[key]], dtype=float)
        ax.plot(layers, y, label=label)
    ax.axhline(0.1, color="k", ls=":", lw=0.8)
    ax.set_xlabel(r"layer $\ell$")
    ax.set_title(f"{report['activation']}: leading 1/n corrections")
    ax.legend()
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig


def arch_finite_width_plot(result, out: str | None = None) -> Figure:
    """V/(n K^2), G1/(n K) and, where derived, Var(H)/Theta^2 at every Gaussian-point output of an
    architecture (a :func:`derive.finite.arch.arch_finite_width` result with a width), with the 0.1
    line beyond which the 1/n expansion is no longer trustworthy. Returns the matplotlib Figure,
    saved to ``out`` when given."""
    from matplotlib.ticker import MaxNLocator

    from derive.core.figures import InlineFigure, save_figure

    norm = result.normalised()
    x = np.arange(1, len(result.labels) + 1)
    fig = InlineFigure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for key, label, style in (("V_over_nK2", r"$V/(nK^2)$", "o-"), ("G1_over_nK", r"$G_1/(nK)$", "s--"),
                              ("varH_over_Theta2", r"$\mathrm{Var}\,H/\Theta^2 = (A+2B)/(n\Theta^2)$", "^-.")):
        y = norm[key]
        keep = np.isfinite(y)
        if keep.any():
            ax.plot(x[keep], y[keep], style, ms=3, label=label)
    ax.axhline(0.1, color="0.4", lw=0.8, ls=":", label="0.1: the 1/n expansion stops being trustworthy")
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("recorded output (layer or block)")
    ax.set_ylabel("normalised 1/n correction")
    ax.set_title(f"{result.name or 'architecture'}, width n = {result.width}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig
