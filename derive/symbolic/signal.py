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

from derive.core import symbols as S
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
        cpar, cperp = chi_par(K), chi_perp(K)
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
    """Fixed points rho* of the correlation map at K*, with slope chi_c and depth scale xi."""
    d = derive_kernel(activation)
    two = _fn(d.numeric(d.expectation), S.K11, S.K12, S.K22)
    dtwo = _fn(d.numeric(d.derivative_expectation), S.K11, S.K12, S.K22)
    rho = np.linspace(-1.0, 1.0, grid)
    resid = (C_b + C_W * two(K_star, rho * K_star, K_star)) / K_star - rho
    out = []
    from scipy.optimize import brentq

    def r(x):
        return float((C_b + C_W * two(K_star, x * K_star, K_star)) / K_star - x)

    roots = [1.0] if abs(resid[-1]) < 1e-9 else []
    for i in range(grid - 1):
        if np.sign(resid[i]) != np.sign(resid[i + 1]) and resid[i] != 0 and abs(rho[i + 1] - 1.0) > 1e-12:
            roots.append(brentq(r, rho[i], rho[i + 1], xtol=1e-14))
    for x in sorted(set(roots)):
        chi_c = float(C_W * dtwo(K_star, x * K_star, K_star))
        xi = -1.0 / np.log(chi_c) if 0 < chi_c < 1 else float("inf")
        out.append({"rho": float(x), "chi_c": chi_c, "stable": bool(chi_c < 1), "depth_scale": float(xi)})
    return out
