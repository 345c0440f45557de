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


#: Round numbers for the ticks of the phase diagram's colour bar (chi_perp, times powers of ten).
_ROUND = (1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0, 7.0, 8.0, 9.0, 9.5, 9.8)


def _chi_ticks(log_min: float, log_max: float, per_side: int = 5) -> list[float]:
    """Round values of chi between 10**log_min < 1 < 10**log_max, about ``per_side`` on each side of 1
    (the two sides of a TwoSlopeNorm colour bar are equally long however unequal their ranges)."""
    ticks = [1.0]
    for side, extent in ((1, log_max), (-1, -log_min)):
        last, gap = 0.0, extent / per_side
        mantissas = (1.0,) if gap > 0.7 else (1.0, 2.0, 5.0) if gap > 0.2 else _ROUND
        candidates = sorted({m * 10.0**k for m in mantissas for k in range(-6, 7)})
        for c in (candidates if side > 0 else candidates[::-1]):
            x = np.log10(c) * side
            if x > extent * (1 + 1e-9):
                break
            if x >= last + gap * 0.999:
                ticks.append(c)
                last = x
    return sorted(ticks)


def phase_diagram(activation, out: str | None = None, cw_range=(0.25, 4.0), cb_range=(0.0, 1.0),
                  grid: int = 60, K0: float = 1.0, critical_points=()) -> PhaseDiagram:
    """chi_perp(K*) over the (C_b, C_W) plane with the chi_perp = 1 boundary, saved to ``out`` when
    given. The colours show log chi_perp on a diverging scale centred at chi_perp = 1 (white) whose two
    halves stretch to the smallest and the largest value (a TwoSlopeNorm), so that neither the ordered
    nor the chaotic side saturates; points without a finite fixed point K* are grey; ``critical_points``
    (dicts with C_b and C_W) are stars. Returns the data as a dict (keys C_W, C_b, chi_perp) whose
    ``.figure`` is the Figure."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from derive.core import budget
    from derive.core.figures import REFERENCE, InlineFigure, plain_number, save_figure, style_axis

    budget.check(budget.phase_diagram(grid))
    from derive.symbolic.signal import chi_perp_at_fixed_point

    cw = np.linspace(*cw_range, grid)
    cb = np.linspace(*cb_range, grid)
    CW, CB = np.meshgrid(cw, cb)
    chi = chi_perp_at_fixed_point(activation, CW, CB, K0)
    finite = np.isfinite(chi) & (chi > 0)
    with np.errstate(all="ignore"):
        shown = np.ma.masked_invalid(np.where(finite, np.log10(np.where(finite, chi, 1.0)), np.nan))
    lo, hi = (float(shown.min()), float(shown.max())) if finite.any() else (-1.0, 1.0)
    reach = max(abs(lo), abs(hi), 1e-3)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=min(lo, -reach) if lo >= 0 else lo, vmax=max(hi, reach) if hi <= 0 else hi)
    fig = InlineFigure(figsize=(6.6, 5.6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("#BFBFBF")  # where K* is not finite (masked)
    mesh = ax.pcolormesh(CB, CW, shown, cmap="RdBu_r", norm=norm, shading="auto", rasterized=True)
    bar = fig.colorbar(mesh, ax=ax)
    ticks = _chi_ticks(norm.vmin, norm.vmax)
    bar.set_ticks([np.log10(t) for t in ticks], labels=[plain_number(t) for t in ticks])
    bar.ax.tick_params(labelsize=9)
    bar.set_label(r"$\chi_\perp(K^*)$   (ordered $< 1 <$ chaotic; log scale)", fontsize=10)
    handles = []
    if finite.any() and lo < 0 < hi:
        ax.contour(CB, CW, shown.filled(np.nan), levels=[0.0], colors="k", linewidths=1.8)
        handles.append(Line2D([], [], color="k", lw=1.8, label=r"order-chaos boundary $\chi_\perp(K^*) = 1$"))
    if not finite.all():
        handles.append(Patch(facecolor="#BFBFBF", edgecolor=REFERENCE,
                             label=r"no finite fixed point $K^*$ (the kernel diverges)"))
    for k, p in enumerate(critical_points):
        if cb_range[0] <= p["C_b"] <= cb_range[1] and cw_range[0] <= p["C_W"] <= cw_range[1]:
            ax.plot(p["C_b"], p["C_W"], "*P^D"[k % 4], color="#F0E442", markersize=17 if k % 4 == 0 else 11,
                    markeredgecolor="k", markeredgewidth=1.2, clip_on=False, zorder=5,
                    label=rf"critical point ($\chi_\parallel = \chi_\perp = 1$): "
                          rf"$C_b = {p['C_b']:.4g}$, $C_W = {p['C_W']:.4g}$")
    handles += ax.get_legend_handles_labels()[0]
    style_axis(ax, r"bias variance $C_b$", r"weight variance $C_W$",
               f"{activation.name}: order-to-chaos phase diagram\n"
               rf"$\chi_\perp$ at the fixed point $K^*$ reached from $K = {K0:g}$", grid=False)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), framealpha=1.0,
                  edgecolor="#BFBFBF")
    if out is not None:
        save_figure(fig, out, dpi=120)
    chi_perp = [[None if not np.isfinite(v) else float(v) for v in row] for row in chi]
    return PhaseDiagram({"C_W": cw.tolist(), "C_b": cb.tolist(), "chi_perp": chi_perp}, fig)


def _layer_axis(ax, depth: int) -> None:
    """Layers 1..depth: a log axis from 50 layers on, integer ticks below."""
    from matplotlib.ticker import MaxNLocator

    from derive.core.figures import log_axis

    if depth >= 50:
        log_axis(ax, "x")
    else:
        ax.set_xlim(0.5, depth + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def depth_profile_plot(activation, profile, out: str | None = None, C_W: float | None = None,
                       C_b: float | None = None) -> Figure:
    """K^(l), rho^(l), chi_par and chi_perp of a :func:`derive.symbolic.signal.depth_profile` against
    depth (log axes where the values span decades, the chi = 1 line of criticality marked); C_W and
    C_b, when given, go into the title. Returns the matplotlib Figure, saved to ``out`` when given."""
    from derive.core.figures import (
        InlineFigure,
        log_axis,
        reference_line,
        save_figure,
        series_style,
        setting,
        spans_decades,
        style_axis,
    )

    depth = len(profile.K)
    layers = np.arange(1, depth + 1)
    every = 0.09 if depth >= 50 else max(2, depth // 10) if depth >= 6 else 1  # markers spaced along the curve
    fig = InlineFigure(figsize=(13, 4.3), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].plot(layers, profile.K, label=r"$K^{(\ell)}$", **series_style(0, markevery=every))
    axes[1].plot(layers, profile.rho, label=r"$\rho^{(\ell)}$", **series_style(1, markevery=every))
    axes[2].plot(layers, profile.chi_par, label=r"parallel $\chi_\parallel(K^{(\ell)})$",
                 **series_style(0, markevery=every))
    axes[2].plot(layers, profile.chi_perp, label=r"perpendicular $\chi_\perp(K^{(\ell)})$",
                 **series_style(1, markevery=every))
    reference_line(axes[2], y=1.0, label=r"$\chi = 1$ (criticality)")
    for ax, values in ((axes[0], profile.K), (axes[2], np.r_[profile.chi_par, profile.chi_perp])):
        if spans_decades(values):
            log_axis(ax, "y")
    for ax in axes:
        ax.margins(y=0.08)
        _layer_axis(ax, depth)
    style_axis(axes[0], r"layer $\ell$", r"kernel $K^{(\ell)}$", "diagonal kernel (one input)")
    style_axis(axes[1], r"layer $\ell$", r"correlation $\rho^{(\ell)} = K^{(\ell)}_{12} / K^{(\ell)}$",
               "correlation of two inputs")
    style_axis(axes[2], r"layer $\ell$", r"susceptibility $\chi$", r"susceptibilities at $K^{(\ell)}$")
    title = ", ".join(t for t in (setting(C_W=C_W, C_b=C_b), f"depth $L = {depth}$") if t)
    fig.suptitle(f"{activation.name} network: {title}", fontsize=11)
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig


def _width_text(widths) -> str:
    """The width for a title: "n = 256" when uniform, "n_l = 64 to 256" otherwise; "" without widths."""
    ws = [w for w in np.atleast_1d(widths if widths is not None else []) if w is not None]
    if not ws:
        return ""
    lo, hi = min(ws), max(ws)
    return f"$n = {lo:g}$" if lo == hi else rf"$n_\ell = {lo:g}$ to ${hi:g}$"


def _trust_limit(ax, x, curves: dict, limit: float, unit: str) -> None:
    """The trust limit of the 1/n expansion on a plot of normalised corrections: the +-``limit``
    lines (the negative one only where a curve goes below -limit / 2), and from the first ``x`` where a
    curve exceeds it in size a shaded band, each with its legend entry. ``unit``: what x counts."""
    from derive.core.figures import reference_line

    low = min((np.nanmin(y) for y in curves.values() if np.isfinite(y).any()), default=0.0)
    first = None
    for label, y in curves.items():
        beyond = np.flatnonzero(np.isfinite(y) & (np.abs(y) > limit))
        if len(beyond) and (first is None or x[beyond[0]] < first[0]):
            first = (x[beyond[0]], label)
    reached = "" if first is not None else f" (not reached up to {unit} {x[-1]:g})"
    reference_line(ax, y=limit, linestyle=(0, (4, 2)),
                   label=rf"trust limit $|\mathrm{{correction}}| = {limit:g}$ of the $1/n$ expansion{reached}")
    if low < -limit / 2:
        reference_line(ax, y=-limit, linestyle=(0, (4, 2)))
    if first is not None:
        ax.axvspan(first[0] - 0.5, x[-1] + 0.5, facecolor="#F0F0F0", edgecolor="#B3B3B3", hatch="/", lw=0,
                   zorder=0.5,
                   label=f"beyond the trust limit: from {unit} {first[0]:g} ({first[1]})")
    ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)


def finite_width_plot(report: dict, out: str | None = None, C_W: float | None = None,
                      C_b: float | None = None) -> Figure:
    """Normalised finite-width fluctuations V/(n K^2), G1/(n K), Var(H)/Theta^2 and the dNTK's
    (P + 2Q)/(n Theta^2) of a :func:`derive.finite.single.finite_width_report` with widths against
    depth, with the trust limit (|correction| = 0.1) and the layers beyond it marked. The width comes
    from the report; C_W and C_b, when given, go into the title. Returns the matplotlib Figure, saved to
    ``out`` when given."""
    from matplotlib.ticker import MaxNLocator

    from derive.core.figures import (
        InlineFigure,
        markevery_for,
        reference_line,
        save_figure,
        series_style,
        setting,
        style_axis,
    )
    from derive.finite.single import TRUST_LIMIT

    norm = report["normalised"]
    layers = np.arange(1, report["depth"] + 1)
    fig = InlineFigure(figsize=(7.2, 5.6), layout="constrained")
    ax = fig.add_subplot()
    curves = {}
    every = markevery_for(len(layers))
    for i, (key, name, symbol) in enumerate((("V_over_nK2", "four-point vertex", r"$V/(n K^2)$"),
                                             ("G1_over_nK", "NLO kernel", r"$G^{\{1\}}/(n K)$"),
                                             ("varH_over_Theta2", "NTK variance", r"$\mathrm{Var}(H)/\Theta^2$"),
                                             ("dH_over_nTheta2", "dNTK", r"$(P + 2Q)/(n \Theta^2)$"))):
        y = np.array([np.nan if v is None else v for v in norm[key]], dtype=float)
        curves[symbol] = y
        ax.plot(layers, y, label=f"{name} {symbol}", zorder=2.5 - 0.1 * i,
                **series_style(i, markevery=every))
    reference_line(ax, y=0.0, linestyle="-", linewidth=0.8)
    _trust_limit(ax, layers, curves, TRUST_LIMIT, "layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    parameters = ", ".join(t for t in (setting(C_W=C_W, C_b=C_b), _width_text(report.get("widths")),
                                       f"depth $L = {report['depth']}$") if t)
    style_axis(ax, r"layer $\ell$", r"normalised $1/n$ correction",
               f"{report['activation']}: leading $1/n$ corrections\n{parameters}", legend=False)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, framealpha=1.0,
              edgecolor="#BFBFBF")
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig


def arch_finite_width_plot(result, out: str | None = None) -> Figure:
    """V/(n K^2), G1/(n K) and, where derived, Var(H)/Theta^2 at every Gaussian-point output of an
    architecture (a :func:`derive.finite.arch.arch_finite_width` result with a width), with the 0.1
    line beyond which the 1/n expansion is no longer trustworthy and the outputs beyond it marked.
    Returns the matplotlib Figure, saved to ``out`` when given."""
    from matplotlib.ticker import MaxNLocator

    from derive.core.figures import InlineFigure, reference_line, save_figure, series_style, style_axis
    from derive.finite.single import TRUST_LIMIT

    norm = result.normalised()
    x = np.arange(1, len(result.labels) + 1)
    fig = InlineFigure(figsize=(7.2, 5.6), layout="constrained")
    ax = fig.add_subplot()
    curves = {}
    for i, (key, name, symbol) in enumerate((("V_over_nK2", "four-point vertex", r"$V/(n K^2)$"),
                                             ("G1_over_nK", "NLO kernel", r"$G^{\{1\}}/(n K)$"),
                                             ("varH_over_Theta2", "NTK variance",
                                              r"$\mathrm{Var}(H)/\Theta^2 = (A + 2B)/(n \Theta^2)$"))):
        y = np.asarray(norm[key], dtype=float)
        keep = np.isfinite(y)
        if keep.any():
            curves[symbol.split(" = ")[0] + ("$" if " = " in symbol else "")] = y
            ax.plot(x[keep], y[keep], label=f"{name} {symbol}", zorder=2.5 - 0.1 * i, **series_style(i))
    reference_line(ax, y=0.0, linestyle="-", linewidth=0.8)
    _trust_limit(ax, x, curves, TRUST_LIMIT, "output")
    if len(x) <= 6 and max(len(label) for label in result.labels) <= 14:  # the labels fit side by side
        ax.set_xticks(x, labels=result.labels)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    style_axis(ax, "recorded output (top-level layer or repeated block)", r"normalised $1/n$ correction",
               f"{result.name or 'architecture'}: leading $1/n$ corrections, width $n = {result.width}$",
               legend=False)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, framealpha=1.0,
              edgecolor="#BFBFBF")
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig
