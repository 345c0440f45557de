"""Criticality and universality of a dense network's single-input kernel map (PDLT ch. 5).

With g(K) = <sigma(z)^2>_K the single-input map is f(K) = C_b + C_W g(K), and

    chi_par(K)  = d f / dK = C_W g'(K)                       (PDLT eq. 5.9)
    chi_perp(K) = C_W <sigma'(z)^2>_K                        (PDLT eq. 5.10)

Because g'(K) = <sigma'^2>_K + <sigma sigma''>_K (heat equation / Stein), a fixed point
K* = f(K*) with chi_par = chi_perp = 1 needs <sigma sigma''>_{K*} = 0; then C_W = 1/<sigma'^2>_{K*}
and C_b = K* - C_W g(K*) (which must be >= 0). The module derives these maps with the expectation
engine and classifies the activation:

- ``scale-invariant``: sigma(z) = z sigma'(z) almost everywhere (a_+ z for z > 0, a_- z for z < 0);
  critical at C_b = 0, C_W = 1/A_2 with A_2 = g(K)/K, every K a fixed point (PDLT sec. 5.2);
- ``K*=0``: sigma_0 = 0, sigma_1 != 0 and the K = 0 fixed point attracts (a_1 < 0); critical at
  C_b = 0, C_W = 1/sigma_1^2, with f(K) = K + a_1 K^2 + ..., chi_perp = 1 + b_1 K + ..., both
  coefficients derived here from sigma's Taylor polynomial (PDLT sec. 5.3.3);
- ``half-stable``: a fixed point K* with chi_par = chi_perp = 1 where f''(K*) != 0, so K^(l)
  approaches it from one side only (PDLT sec. 5.3.4);
- ``none``: no critical initialisation, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mpmath
import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.core.display import aligned, markdown_table, markdown_text, number
from derive.rules.activations import Activation
from derive.symbolic.expectations import tidy, wick
from derive.symbolic.maps import activation_maps, ntk_coefficient
from derive.symbolic.numeric import evaluate
from derive.symbolic.quadrature import DEFAULT_TOL, GaussianExpectation, numeric_expectation, refine_nodes

#: Range of K searched for non-zero critical points, and the number of grid points.
K_SEARCH = (1e-6, 1e3)
K_GRID = 600
#: Upper end of the search when the maps need quadrature (the node's order is chosen up to it).
K_SEARCH_QUADRATURE = 100.0


@dataclass(frozen=True)
class CriticalPoint:
    """A critical initialisation (C_W, C_b, K*) with exact forms when the rules give them."""

    C_W: float
    C_b: float
    K_star: float
    exact: dict = field(default_factory=dict)
    stability: str = ""

    def as_dict(self) -> dict:
        finite = self.K_star == self.K_star
        out = {"C_W": self.C_W, "C_b": self.C_b, "K_star": self.K_star if finite else None}
        for k, v in self.exact.items():
            out[f"{k}_exact"] = str(v)
        if self.stability:
            out["stability"] = self.stability
        return out


@dataclass(frozen=True)
class SingleInputMaps:
    """g(K) = <sigma^2>_K, <sigma'^2>_K, chi_par, chi_perp as SymPy in K (and C_W, C_b)."""

    activation: Activation
    g: sp.Expr
    gp: sp.Expr

    @property
    def kernel_map(self) -> sp.Expr:
        return S.C_b + S.C_W * self.g

    @property
    def chi_par(self) -> sp.Expr:
        return S.C_W * tidy(sp.diff(self.g, S.K))

    @property
    def chi_perp(self) -> sp.Expr:
        return S.C_W * self.gp

    @property
    def closed_form(self) -> bool:
        return not (self.g.has(GaussianExpectation) or self.gp.has(GaussianExpectation))


def single_input_maps(activation: Activation, tol: float = DEFAULT_TOL) -> SingleInputMaps:
    """g(K) = <sigma^2>_K and <sigma'^2>_K from the activation layer rule's one-input maps, with every
    parameter at its value or default (:func:`derive.symbolic.maps.activation_maps`)."""
    maps = activation_maps(activation, tol, numeric=True)
    return SingleInputMaps(activation, maps.single_kernel, ntk_coefficient(maps.single_ntk, S.Theta))


def taylor_data(activation: Activation, order: int = 4) -> list[sp.Expr | None]:
    """sigma_p = sigma^(p)(0) for p = 0..order; None where sigma is not smooth at 0."""
    from derive.core.forms import rewrite_specials

    sigma = rewrite_specials(activation.sigma_numeric, (S.z,), exponentials=False)
    out: list[sp.Expr | None] = []
    d = sigma
    for _ in range(order + 1):
        val = sp.simplify(d.subs(S.z, 0))
        bad = d.has(sp.Heaviside, sp.DiracDelta, sp.Abs, sp.sign) or not val.is_finite
        out.append(None if bad else val)
        d = sp.diff(d, S.z)
    return out


def is_scale_invariant(activation: Activation) -> bool:
    """sigma(z) == z sigma'(z) almost everywhere: a_+ z for z > 0 and a_- z for z < 0."""
    from derive.core.forms import canonical

    sigma = activation.sigma_numeric
    diff = canonical(sigma - S.z * activation.derivative(numeric=True), (S.z,))
    return sp.simplify(diff) == 0


def k0_coefficients(taylor: list[sp.Expr]) -> tuple[sp.Expr, sp.Expr]:
    """a_1 and b_1 of the K*=0 class, derived from sigma's Taylor polynomial.

    At C_W = 1/sigma_1^2, C_b = 0: f(K) = C_W <sigma^2>_K = K + a_1 K^2 + O(K^3) and
    chi_perp(K) = C_W <sigma'^2>_K = 1 + b_1 K + O(K^2); the Gaussian moments of the Taylor
    polynomials are taken with Wick's theorem (PDLT eqs. 5.71-5.74 state the results).
    """
    s0, s1, s2, s3 = taylor[:4]
    poly = s0 + s1 * S.z + s2 * S.z**2 / 2 + s3 * S.z**3 / 6
    dpoly = sp.diff(poly, S.z)

    def moment(expr):
        p = sp.Poly(sp.expand(expr), S.z)
        return sum(c * wick((k,), sp.Matrix([[S.K]])) for (k,), c in p.terms())

    cw = 1 / s1**2
    f = sp.expand(cw * moment(poly**2))
    chi = sp.expand(cw * moment(dpoly**2))
    return sp.simplify(f.coeff(S.K, 2)), sp.simplify(chi.coeff(S.K, 1))


#: LaTeX of the names in :attr:`CriticalityReport.asymptotics` and ``learning_rates``.
_LATEX = {"K": "K", "chi_par": r"\chi_\parallel", "chi_perp": r"\chi_\perp", "lambda_b": r"\lambda_b",
          "lambda_W": r"\lambda_W"}


def _point_cell(exact, value: float) -> str:
    """A critical point's coordinate: its exact form in LaTeX and, unless an integer, its value."""
    if value != value:  # K* of a scale-invariant activation: every K
        return "any"
    if exact is None or isinstance(exact, str):
        return number(value)
    if isinstance(exact, sp.Integer):
        return f"${sp.latex(exact)}$"
    return f"${sp.latex(exact)}$ = {number(value)}"


@dataclass(repr=False)
class CriticalityReport:
    """Everything :func:`analyse` finds; ``as_dict`` gives the documented JSON keys."""

    activation: Activation
    cls: str
    critical_points: list[CriticalPoint]
    maps: SingleInputMaps
    taylor: list
    reason: str = ""
    a1: sp.Expr | None = None
    b1: sp.Expr | None = None
    p_perp: sp.Expr | None = None
    A2: sp.Expr | None = None
    asymptotics: dict = field(default_factory=dict)
    learning_rates: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "activation": self.activation.name,
            "params": self.activation.describe_params(),
            "class": self.cls,
            "critical_points": [p.as_dict() for p in self.critical_points],
            "kernel_map": str(self.maps.kernel_map),
            "chi_par": str(self.maps.chi_par),
            "chi_perp": str(self.maps.chi_perp),
            "closed_form": self.maps.closed_form,
            "taylor": {f"sigma_{p}": (None if v is None else str(v)) for p, v in enumerate(self.taylor)},
            "asymptotics": {k: str(v) for k, v in self.asymptotics.items()},
            "learning_rates": {k: str(v) for k, v in self.learning_rates.items()},
        }
        if self.reason:
            out["reason"] = self.reason
        if self.A2 is not None:
            out["A2"] = str(self.A2)
        if self.a1 is not None:
            out.update(a1=float(self.a1), b1=float(self.b1), p_perp=float(self.p_perp),
                       a1_exact=str(self.a1), b1_exact=str(self.b1), p_perp_exact=str(self.p_perp))
        return out

    def __repr__(self) -> str:
        if not self.critical_points:
            return f"CriticalityReport({self.activation.name}: class {self.cls}, no critical initialisation)"
        p = self.critical_points[0]
        k_star = "any" if p.K_star != p.K_star else f"{p.K_star:.10g}"
        more = len(self.critical_points) - 1
        return (f"CriticalityReport({self.activation.name}: class {self.cls}, critical at C_W = {p.C_W:.10g}, "
                f"C_b = {p.C_b:.10g}, K* = {k_star}" + (f" (+{more} more)" if more else "") + ")")

    def _repr_markdown_(self) -> str:
        params = "".join(f", {k} = {v}" for k, v in self.activation.describe_params().items())
        lines = [f"**Criticality of {markdown_text(self.activation.name)}**{markdown_text(params)}: "
                 f"$\\sigma(z) = {sp.latex(self.activation.expression)}$, universality class `{self.cls}`"
                 + ("" if self.maps.closed_form else " (the maps need quadrature)"), ""]
        if self.reason:
            lines += [markdown_text(self.reason), ""]
        if self.critical_points:
            rows = []
            for p in self.critical_points:
                cells = []
                for key, value in (("C_W", p.C_W), ("C_b", p.C_b), ("K_star", p.K_star)):
                    cells.append(_point_cell(p.exact.get(key), value))
                rows.append([*cells, markdown_text(p.stability)])
            lines += [markdown_table(["$C_W$", "$C_b$", "$K^*$", "stability"], rows), ""]
        maps = [rf"\chi_\parallel(K) &= {sp.latex(self.maps.chi_par)}",
                rf"\chi_\perp(K) &= {sp.latex(self.maps.chi_perp)}"]
        lines += ["Susceptibilities of the single-input map $K \\mapsto C_b + C_W \\langle\\sigma^2\\rangle_K$ "
                  "(PDLT eqs. 5.9, 5.10):", "", aligned(maps), ""]
        known = [f"$\\sigma_{p} = {sp.latex(v)}$" for p, v in enumerate(self.taylor) if v is not None]
        if known:
            lines += ["Taylor data $\\sigma_p = \\sigma^{(p)}(0)$: " + ", ".join(known), ""]
        if self.a1 is not None:
            lines += [f"$a_1 = {sp.latex(self.a1)}$, $b_1 = {sp.latex(self.b1)}$, "
                      f"$p_\\perp = b_1/a_1 = {sp.latex(self.p_perp)}$", ""]
        if self.A2 is not None:
            lines += [f"$A_2 = \\langle\\sigma^2\\rangle_K / K = {sp.latex(self.A2)}$", ""]
        if self.asymptotics:
            lines += ["Large depth: " + ", ".join(f"${_LATEX.get(k, k)}^{{(\\ell)}} \\sim {sp.latex(v)}$"
                                                  for k, v in self.asymptotics.items()), ""]
        if self.learning_rates:
            lines += ["Depth-scaled learning rates: " + ", ".join(
                f"${_LATEX.get(k, k)}^{{(\\ell)}} = {sp.latex(v)}$" for k, v in self.learning_rates.items()), ""]
        return "\n".join(lines).rstrip()


def _numeric(expr: sp.Expr):
    def f(k):
        return np.asarray(evaluate(expr, {S.K: np.asarray(k, dtype=float)}), dtype=float)
    return f


def _refine_root(h: sp.Expr, lo: float, hi: float, closed: bool) -> float:
    """Root of h(K) in [lo, hi]: mpmath at 30 digits for closed forms, float bisection otherwise."""
    if closed:
        def fm(k):
            return mpmath.mpf(str(sp.N(h.xreplace({S.K: sp.Float(str(k), 40)}), 30)))
        with mpmath.workdps(30):
            try:
                return float(mpmath.findroot(fm, (mpmath.mpf(lo), mpmath.mpf(hi)), solver="anderson"))
            except (ValueError, ZeroDivisionError):
                pass
    from scipy.optimize import brentq

    f = _numeric(h)
    return float(brentq(lambda k: float(f(k)), lo, hi, xtol=1e-15, rtol=1e-15, maxiter=200))


def nonzero_critical_points(maps: SingleInputMaps) -> tuple[list[CriticalPoint], list[str]]:
    """Every K* in :data:`K_SEARCH` with <sigma sigma''>_{K*} = 0 and C_b >= 0."""
    if maps.closed_form:
        h = tidy(sp.diff(maps.g, S.K) - maps.gp)  # = <sigma sigma''>_K, exactly
        k_max = K_SEARCH[1]
    else:  # one quadrature node, its order chosen over the searched range: no cancellation
        act = maps.activation
        d2 = sp.diff(act.derivative(numeric=True), S.z)
        h = numeric_expectation(act.sigma_numeric * d2, (S.z,), (S.K,), variances=(1e-3, 1.0, 10.0, K_SEARCH_QUADRATURE))
        k_max = K_SEARCH_QUADRATURE
    if h == 0:
        return [], []
    grid = np.geomspace(K_SEARCH[0], k_max, K_GRID)
    with np.errstate(all="ignore"):
        hv = _numeric(h)(grid)
    points, rejected = [], []
    g, gp = _numeric(maps.g), _numeric(maps.gp)
    g2 = _numeric(tidy(sp.diff(maps.g, S.K, 2)))
    for i in range(len(grid) - 1):
        a, b = hv[i], hv[i + 1]
        if not (np.isfinite(a) and np.isfinite(b)) or a == 0 or np.sign(a) == np.sign(b):
            continue
        k = _refine_root(h, grid[i], grid[i + 1], maps.closed_form)
        if not maps.closed_form:  # evaluate at K* on a grid fine enough there
            kk = (0.5 * k, k, 1.5 * k)
            h_at = numeric_expectation(h.integrand.expr, (S.z,), (S.K,), variances=kk)
            k = _refine_root(h_at, grid[i], grid[i + 1], False)
            g, gp = _numeric(refine_nodes(maps.g, kk)), _numeric(refine_nodes(maps.gp, kk))
        cw = 1.0 / float(gp(k))
        cb = k - cw * float(g(k))
        if cb < -1e-12 * max(1.0, k):
            rejected.append(f"K*={k:.6g} would need C_b={cb:.4g} < 0")
            continue
        curv = cw * float(g2(k))
        side = "stable from below (K < K*), unstable above" if curv > 0 else "stable from above (K > K*), unstable below"
        points.append(CriticalPoint(cw, max(cb, 0.0), k, stability=side))
    return points, rejected


def analyse(activation: Activation, tol: float = DEFAULT_TOL) -> CriticalityReport:
    """Classify ``activation`` and find its critical initialisations (see module docstring)."""
    maps = single_input_maps(activation, tol)
    taylor = taylor_data(activation)
    l, L = S.l, sp.Symbol("L", positive=True, integer=True)
    lam_b, lam_W = sp.Symbol("lambdatilde_b", nonnegative=True), sp.Symbol("lambdatilde_W", nonnegative=True)

    if is_scale_invariant(activation):
        A2 = sp.simplify(maps.g / S.K)
        if A2 == 0:
            return CriticalityReport(activation, "none", [], maps, taylor, reason="sigma vanishes identically")
        exact = {"C_W": 1 / A2, "C_b": sp.Integer(0), "K_star": sp.Symbol("any")}
        point = CriticalPoint(float(1 / A2), 0.0, float("nan"), exact, stability="every K is a fixed point")
        rep = CriticalityReport(activation, "scale-invariant", [point], maps, taylor, A2=A2,
                                reason="K* is arbitrary: at C_b = 0, C_W = 1/A_2 every K is a fixed point")
        rep.asymptotics = {"K": sp.Symbol("K1"), "chi_par": sp.Integer(1), "chi_perp": sp.Integer(1)}
        rep.learning_rates = {"lambda_b": lam_b / L, "lambda_W": lam_W / L}
        return rep

    points, rejected = nonzero_critical_points(maps)
    s0, s1 = taylor[0], taylor[1]
    if s0 is not None and s1 is not None and s0 == 0 and s1 != 0:
        a1, b1 = k0_coefficients(taylor)
        p_perp = sp.simplify(b1 / a1) if a1 != 0 else sp.oo
        k0 = CriticalPoint(float(1 / s1**2), 0.0, 0.0, {"C_W": 1 / s1**2, "C_b": sp.Integer(0), "K_star": sp.Integer(0)},
                           stability="attracting (a1 < 0)" if a1 < 0 else "repelling for K > 0 (a1 >= 0)")
        if a1 < 0:
            rep = CriticalityReport(activation, "K*=0", [k0, *points], maps, taylor, a1=a1, b1=b1, p_perp=p_perp)
            rep.asymptotics = {"K": 1 / (-a1 * l), "chi_perp": 1 - p_perp / l}
            rep.learning_rates = {"lambda_b": lam_b * L ** (p_perp - 1) / l**p_perp,
                                  "lambda_W": lam_W * L ** (p_perp - 1) / l ** (p_perp - 1)}
            return rep
        if points:
            rep = CriticalityReport(activation, "half-stable", [*points, k0], maps, taylor, a1=a1, b1=b1, p_perp=p_perp,
                                    reason="K* = 0 repels (a1 > 0); non-zero critical points found")
            _half_stable_asymptotics(rep, l)
            return rep
        reason = "sigma(0) = 0 but the K* = 0 fixed point repels (a1 = %s >= 0) and no non-zero K* exists" % a1
        return CriticalityReport(activation, "none", [], maps, taylor, a1=a1, b1=b1, p_perp=p_perp,
                                 reason=reason + _also(rejected))
    if points:
        rep = CriticalityReport(activation, "half-stable", points, maps, taylor)
        _half_stable_asymptotics(rep, l)
        return rep
    why = []
    if s0 is not None and s0 != 0:
        why.append(f"sigma(0) = {s0} != 0, so K* = 0 is not a fixed point")
    elif s0 is None:
        why.append("sigma is not smooth at 0")
    elif s1 == 0:
        why.append("sigma'(0) = 0, so chi_perp(0) = 0")
    k_max = K_SEARCH[1] if maps.closed_form else K_SEARCH_QUADRATURE
    why.append(f"<sigma sigma''>_K has no root with C_b >= 0 for K in [{K_SEARCH[0]:g}, {k_max:g}]")
    return CriticalityReport(activation, "none", [], maps, taylor, reason="; ".join(why) + _also(rejected))


def _also(rejected: list[str]) -> str:
    return f" (rejected: {'; '.join(rejected)})" if rejected else ""


def _half_stable_asymptotics(rep: CriticalityReport, l: sp.Symbol) -> None:
    p = rep.critical_points[0]
    g2 = float(evaluate(sp.diff(rep.maps.g, S.K, 2), {S.K: p.K_star}))
    f2 = p.C_W * g2
    # delta_{l+1} = delta_l + f''/2 delta_l^2  =>  delta_l ~ -2 / (f'' l) on the stable side.
    rep.asymptotics = {"K": sp.Float(p.K_star, 12) - sp.Float(2 / f2, 12) / l, "chi_par": sp.Integer(1) + 0 * l}
