"""Signal propagation through depth: kernel, correlation and susceptibility profiles, the
order/chaos boundary and depth scales (Poole et al. 2016; Schoenholz et al. 2017; PDLT ch. 5).

Two inputs of equal norm with K^(1)_11 = K^(1)_22 = K0 and correlation rho0 evolve by the derived
recursions; with K* the single-input fixed point, the correlation map is

    rho -> (C_b + C_W <sigma(z1) sigma(z2)>_{K11 = K22 = K*, K12 = rho K*}) / K*,

whose slope is chi_c(rho) = C_W <sigma'(z1) sigma'(z2)>_{K*, rho} (Price's theorem), equal to
chi_perp(K*) at rho = 1. Correlations converge to a fixed point rho* over the depth scale
xi = -1 / log chi_c(rho*). The ordered phase has chi_perp(K*) < 1 (rho* = 1), the chaotic phase
chi_perp(K*) > 1; the boundary chi_perp(K*) = 1 is traced in the (C_b, C_W) plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from derive.core import budget
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.symbolic.critical import single_input_maps
from derive.symbolic.numeric import evaluate
from derive.symbolic.recursions import derive_kernel

#: K above which a fixed-point iteration is declared divergent.
K_DIVERGED = 1e12


@dataclass
class Profile:
    """Per-layer values, index 0 = layer 1 (PDLT convention)."""

    K: np.ndarray
    K12: np.ndarray
    rho: np.ndarray
    chi_par: np.ndarray
    chi_perp: np.ndarray

    def as_dict(self) -> dict:
        return {k: [None if not np.isfinite(v) else float(v) for v in getattr(self, k)]
                for k in ("K", "K12", "rho", "chi_par", "chi_perp")}


def _fn(expr: sp.Expr, *symbols):
    def f(*values):
        with np.errstate(all="ignore"):
            return np.asarray(evaluate(expr, dict(zip(symbols, values))), dtype=float)
    return f


def depth_profile(activation, C_W: float, C_b: float, depth: int, K0: float = 1.0, rho0: float = 0.5) -> Profile:
    """K^(l), K12^(l), rho^(l), chi_par(K^(l)), chi_perp(K^(l)) for l = 1..depth."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth!r}")
    budget.check(budget.depth_profile(depth))
    d = derive_kernel(activation)
    maps = single_input_maps(activation)
    two = _fn(d.numeric(d.expectation), S.K11, S.K12, S.K22)
    one = _fn(maps.g, S.K)
    chi_par = _fn(maps.chi_par.xreplace({S.C_W: C_W}), S.K)
    chi_perp = _fn(maps.chi_perp.xreplace({S.C_W: C_W}), S.K)
    K = np.empty(depth)
    K12 = np.empty(depth)
    k, k12 = C_b + C_W * K0, C_b + C_W * rho0 * K0
    for i in range(depth):
        K[i], K12[i] = k, k12
        if not np.isfinite(k) or k > K_DIVERGED:
            K[i:], K12[i:] = np.inf, np.nan
            break
        k, k12 = C_b + C_W * float(one(k)), C_b + C_W * float(two(k, k12, k))
    with np.errstate(all="ignore"):
        rho = np.clip(K12 / K, -1.0, 1.0)
        # a constant susceptibility (relu's, say) evaluates to a scalar: one value per layer all the same
        cpar, cperp = (np.array(np.broadcast_to(f(K), K.shape), dtype=float) for f in (chi_par, chi_perp))
    return Profile(K, K12, rho, cpar, cperp)


def fixed_point_K(activation, C_W, C_b, K0: float = 1.0, layers: int = 400) -> np.ndarray:
    """The single-input fixed point reached from K0 (vectorised over arrays of C_W, C_b);
    inf where the iteration diverges."""
    maps = single_input_maps(activation)
    g = _fn(maps.g, S.K)
    C_W, C_b = np.broadcast_arrays(np.asarray(C_W, float), np.asarray(C_b, float))
    k = C_b + C_W * K0
    for _ in range(layers):
        k = np.where(np.isfinite(k) & (k < K_DIVERGED), C_b + C_W * g(np.minimum(k, K_DIVERGED)), np.inf)
    return k


def chi_perp_at_fixed_point(activation, C_W, C_b, K0: float = 1.0, layers: int = 400) -> np.ndarray:
    """chi_perp(K*) over arrays of (C_W, C_b); > 1 chaotic, < 1 ordered (inf where K diverges)."""
    maps = single_input_maps(activation)
    k = fixed_point_K(activation, C_W, C_b, K0, layers)
    gp = _fn(maps.gp, S.K)
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(k), np.asarray(C_W) * gp(np.where(np.isfinite(k), k, 1.0)), np.inf)


def correlation_fixed_points(activation, C_W: float, C_b: float, K_star: float, grid: int = 2001) -> list[dict]:
    """Fixed points rho* of the correlation map at K*, with slope chi_c and depth scale xi.

    The map is rho -> (C_b + C_W <sigma(z1) sigma(z2)>) / (C_b + C_W <sigma^2>), both at
    (K*, rho K*, K*): the next layer's correlation, normalised by the next layer's diagonal, so that
    rho = 1 (identical inputs stay identical) is a fixed point exactly, also where K* is reached
    only slowly (a power law at a half-stable point) and the profile's last K is not yet K*. At the
    fixed point of the single-input map the normalisation is K* itself (PDLT sec. 5.1). Roots are
    found where the residual changes sign on a ``grid`` of rho (or vanishes on it) and where it
    touches zero without changing sign (a tangent, double root: refined at the zero of its slope).
    The slope is chi_c = C_W <sigma' sigma'> K* / K' (at rho = 1 and the fixed point, chi_perp)
    for a continuous sigma, and the map's difference quotient where sigma jumps (step, sign: there
    the slope at rho = 1 is infinite and identical inputs separate). ``marginal``:
    |chi_c - 1| < 1e-6 (the map is tangent there; the approach is a power law, no depth scale).
    """
    from scipy.optimize import brentq

    d = derive_kernel(activation)
    two = _fn(d.numeric(d.expectation), S.K11, S.K12, S.K22)
    dtwo = _fn(d.numeric(d.derivative_expectation), S.K11, S.K12, S.K22)
    K_next = float(C_b + C_W * two(K_star, K_star, K_star))

    def r(x):
        return float((C_b + C_W * two(K_star, x * K_star, K_star)) / K_next - x)

    def price_slope(x):
        return float(C_W * dtwo(K_star, x * K_star, K_star) * K_star / K_next)

    def difference_slope(x, h=1e-7):
        lo, hi = max(-1.0, x - h), min(1.0, x + h)
        return (r(hi) - r(lo)) / (hi - lo) + 1.0

    # d<sigma sigma>/dK12 = <sigma' sigma'> (Price's theorem) needs a continuous sigma; a jump (step,
    # sign) puts a delta function in sigma' that the almost-everywhere derivative leaves out, and the
    # slope is then the map's own (by differences; infinite at rho = +-1 for a jump).
    probe = difference_slope(0.3, 1e-5)
    slope = price_slope if abs(price_slope(0.3) - probe) <= 1e-4 * max(1.0, abs(probe)) else difference_slope

    rho = np.linspace(-1.0, 1.0, grid)
    with np.errstate(all="ignore"):
        resid = (C_b + C_W * two(K_star, rho * K_star, K_star)) / K_next - rho
    scale = max(1.0, float(np.max(np.abs(resid[np.isfinite(resid)]), initial=0.0)))
    roots = [1.0] if abs(resid[-1]) <= 1e-12 * scale else []
    if abs(resid[0]) <= 1e-12 * scale:
        roots.append(-1.0)
    for i in range(grid - 1):
        a, b = resid[i], resid[i + 1]
        if a == 0:
            roots.append(float(rho[i]))  # an exact root on the grid (rho = 0 of an odd activation, say)
        elif np.sign(a) != np.sign(b) and b != 0:
            roots.append(brentq(r, rho[i], rho[i + 1], xtol=1e-14))
        elif 0 < i and np.sign(resid[i - 1]) == np.sign(a) == np.sign(b) and abs(a) < 1e-6 * scale \
                and abs(a) <= abs(resid[i - 1]) and abs(a) <= abs(b):
            # a local minimum of |residual| near zero: a tangent root is where the slope is 1
            lo, hi = rho[i - 1], rho[i + 1]
            if np.sign(slope(lo) - 1) != np.sign(slope(hi) - 1):
                x = brentq(lambda t: slope(t) - 1, lo, hi, xtol=1e-14)
                if abs(r(x)) < 1e-9 * scale:
                    roots.append(x)
    out = []
    for x in sorted(set(roots)):
        chi_c = slope(x)
        marginal = abs(chi_c - 1) < 1e-6
        xi = -1.0 / np.log(chi_c) if 0 < chi_c < 1 and not marginal else float("inf")
        out.append({"rho": float(x), "chi_c": chi_c, "stable": bool(chi_c < 1 and not marginal),
                    "marginal": bool(marginal), "depth_scale": float(xi)})
    return out