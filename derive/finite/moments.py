"""Four-point functions <prod_i sigma(z_i)^p_i>_K on three or four distinct inputs, in NumPy or JAX.

The batch recursions of V and G1 (:mod:`derive.finite.batch`, :mod:`derive.finite.batch_jax`) need
Gaussian four-point functions of the activation at every quadruple of inputs. With one or two
distinct inputs they are closed forms or two-dimensional nodes of the expectation engine; this
module computes the others, by the rules described in the section comment below, each written once
against an array namespace so that NumPy and the generated JAX evaluate the same arithmetic. The
same rules take one factor per input: :func:`product_moment` gives the mixed expectations of the
activation and its derivative (<s'_a s'_b s_c s_d> and the like) the NTK's fluctuations over sites
need (:mod:`derive.finite.tensor_ntk`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.rules.activations import Activation
from derive.symbolic.expectations import gaussian_expectation
from derive.symbolic.numeric import evaluate
from derive.symbolic.quadrature import DEFAULT_TOL, GaussianExpectation

# ------------------------------------------------------------------------------------------------
# Four-point functions on three or four distinct inputs
#
# <prod_i sigma(z_i)^p_i>_K, z ~ N(0, K) on d = 3 or 4 distinct inputs (sum_i p_i = 4), by one of three
# rules (:class:`MomentRule`), each written once against an array namespace ``xp`` (NumPy or
# jax.numpy) so that the NumPy and the generated-JAX iterations evaluate the same arithmetic:
#
# * "exact": sigma piecewise polynomial with its only break at 0 (ReLU, leaky ReLU, |z|, step,
#   sign, polynomials). Then sigma(z)^p = A_p(z) + B_p(z) H(z) with polynomials A_p, B_p, and the
#   moment is a sum of E[prod_i z_i^k_i prod_{i in S} H(z_i)], reduced exactly by Stein's lemma
#   E[z_i F] = sum_j K_ij E[d_j F] (d_j H(z_j) = delta(z_j), a delta conditions the Gaussian on
#   z_j = 0) to orthant probabilities, closed up to three variables (Sheppard; 1/8 + sum asin/4pi)
#   and, for four, Plackett's (1954) one-dimensional integral. Error: that integral's quadrature,
#   below 1e-13 of the moment's scale for definite K; a numerically singular K is lifted to an
#   eigenvalue of EXACT_LIFT times its mean variance first (error then ~1e-10 to 1e-8).
# * "trapezoid": smooth sigma. In whitened coordinates z = L u (L the lower-triangular root of the
#   sub-covariance) the tensor trapezoid rule with the Gaussian weight on [-R, R]^(d-1), nested so
#   that sigma(z_k) is evaluated on the first k coordinates only; the last coordinate, which only
#   z_d depends on, is integrated beforehand: <sigma(m + s v)>_v (s = L_dd) in closed form where the
#   rules give one, else tabulated at TABLE_FACTOR * order intervals and interpolated by the
#   polynomial through the LAGRANGE_POINTS nearest nodes (adds < 1e-13). The trapezoid rule
#   converges geometrically for integrands analytic in a strip (tanh's poles at +-i pi/2 are what
#   limit Gauss-Hermite); the order is chosen from the largest variance (see :func:`moment_rule`).
#   Measured against exact and independent references: 1e-11 relative or better for tanh, erf,
#   GELU and swish at variances up to 3.4. The window [-R, R] (R = MOMENT_HALF_WIDTH) suits
#   integrands growing like |z|^4 at most; faster-growing activations lose digits to its tails.
# * "panels": other kinked sigma (ELU, SELU, ...). Nested Gauss-Legendre panels in the same
#   coordinates, split at the kink of the level's own factor (a known point given the outer
#   coordinates) and at 0; the first level also at +-LAYER_WIDTHS conditional widths of every
#   later factor, where smoothed later kinks curve the integrand most; last coordinate in closed
#   form where possible. About 1e-9 of the moment's scale for moderately correlated inputs, 1e-6 to
#   1e-4 when the sub-covariance is nearly singular with correlations of both signs.

#: Half-width, in standard deviations of the whitened coordinates, of the tensor rules (the tail
#: of u^4 exp(-u^2/2) beyond it is ~1e-12 of its integral).
MOMENT_HALF_WIDTH = 8.0
#: Trapezoid orders (points per whitened coordinate) ``quad_order="auto"`` chooses from.
AUTO_ORDERS = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192)
#: Gauss-Legendre points per panel of the "panels" rule under ``quad_order="auto"``.
PANEL_ORDER = 16
#: Gauss-Legendre nodes of Plackett's integral for four-variate orthant probabilities.
ORTHANT_ORDER = 128
#: The tabulated smoothed activation: TABLE_FACTOR * order intervals, interpolation through
#: LAGRANGE_POINTS nodes.
TABLE_FACTOR, LAGRANGE_POINTS = 8, 8
#: Extra first-level breakpoints of the "panels" rule, in conditional widths (see above).
LAYER_WIDTHS = 6.0
#: Largest polynomial degree of a piecewise-polynomial sigma taken by the "exact" rule.
MAX_EXACT_DEGREE = 4
#: Smallest eigenvalue, relative to the mean variance, the "exact" rule lifts a covariance of three
#: or four inputs to: its conditional variances then keep enough digits (errors about 1e-10 for
#: singular covariances of three inputs, 1e-8 of four; well-conditioned ones are not touched).
EXACT_LIFT = {3: 1e-11, 4: 1e-9}

#: The shift m and variance s^2 of the smoothed activation <sigma(m + s v)>_v, v ~ N(0, 1).
SHIFT, SMOOTH_VAR = sp.Symbol("m_shift", real=True), sp.Symbol("s2_smooth", positive=True)


@dataclass(frozen=True)
class MomentRule:
    """How :func:`distinct_moment` computes four-point functions on three or four distinct inputs.

    ``kind`` is "exact", "trapezoid" or "panels" (see the section comment above); ``order`` the
    trapezoid points per whitened coordinate or the Gauss-Legendre points per panel (0 for
    "exact"); ``pieces[p - 1]`` = (A_p, B_p), the ascending coefficients of sigma^p = A_p + B_p H(z)
    (p = 1, 2; "exact" only); ``smoothed`` = <sigma(SHIFT + sqrt(SMOOTH_VAR) v)>_v in closed form, or
    None; ``error`` the estimated relative error of the trapezoid order (a one-dimensional probe,
    :func:`trapezoid_probe_error`), None for the other rules.
    """

    kind: str
    order: int
    pieces: tuple | None = None
    smoothed: sp.Expr | None = None
    error: float | None = field(default=None, compare=False)


def _coefficients(poly: sp.Poly) -> tuple:
    return tuple(float(c) for c in reversed(poly.all_coeffs()))


def _sides(expr: sp.Expr) -> tuple | None:
    """(below, above): ``expr`` as a polynomial in z on each side of 0, or None."""
    sides = []
    for side in (sp.Symbol("z_below", negative=True), sp.Symbol("z_above", positive=True)):
        e = sp.expand(expr.xreplace({S.z: side}).doit()).xreplace({side: S.z})
        if e.free_symbols - {S.z} or not e.is_polynomial(S.z):
            return None
        sides.append(sp.Poly(e, S.z))
    return tuple(sides)


@lru_cache(maxsize=64)
def piecewise_polynomial(sigma: sp.Expr) -> tuple | None:
    """((A_1, B_1), (A_2, B_2)) with sigma^p = A_p(z) + B_p(z) H(z), A_p and B_p polynomials (ascending
    coefficients), when sigma is a polynomial on each side of 0 of degree <= MAX_EXACT_DEGREE; else None."""
    sides = _sides(sigma)
    if sides is None or max(side.degree() for side in sides) > MAX_EXACT_DEGREE:
        return None
    below, above = sides
    return tuple((_coefficients(below**p), _coefficients(above**p - below**p)) for p in (1, 2))


@lru_cache(maxsize=256)
def product_pieces(expr: sp.Expr) -> tuple | None:
    """(A, B) with ``expr`` = A(z) + B(z) H(z), ascending coefficients (a product of powers of a
    piecewise-polynomial activation and of its derivative), or None."""
    sides = _sides(expr)
    if sides is None:
        return None
    below, above = sides
    return _coefficients(below), _coefficients(above - below)


def _kinked_line_expectation(sigma_np, m: float, s: float) -> float:
    """<sigma(m + s v)>_v by composite Gauss-Legendre on [-12, 12] split at the kink v = -m/s."""
    t, v = np.polynomial.legendre.leggauss(40)
    edges = np.unique(np.clip(np.concatenate([np.linspace(-12, 12, 25), [-m / s]]), -12, 12))
    a, b = edges[:-1, None], edges[1:, None]
    x = ((a + b) / 2 + (b - a) / 2 * t).ravel()
    w = ((b - a) / 2 * v).ravel() * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    return float(np.sum(w * sigma_np(m + s * x)))


@lru_cache(maxsize=64)
def smoothed_activation(sigma: sp.Expr, tol: float = DEFAULT_TOL) -> sp.Expr | None:
    """<sigma(m + s v)>_v, v ~ N(0, 1), in SHIFT = m and SMOOTH_VAR = s^2, when the rules close it and
    it agrees with quadrature at a few (m, s^2) to 1e-9; else None."""
    shifted = sigma.xreplace({S.z: S.z + SHIFT})
    expr = gaussian_expectation(shifted, (S.z,), (SMOOTH_VAR,), tol=tol, numeric_subs={SHIFT: sp.Float(0.3)})
    if expr.has(GaussianExpectation) or expr.free_symbols - {SHIFT, SMOOTH_VAR}:
        return None

    def sigma_np(z):
        return np.asarray(evaluate(sigma, {S.z: z}), dtype=float)

    for m, s2 in ((0.0, 1.0), (0.7, 0.3), (-1.3, 2.5), (2.2, 0.01), (-0.4, 1e-4)):
        with np.errstate(all="ignore"):
            got = float(evaluate(expr, {SHIFT: m, SMOOTH_VAR: s2}))
            want = _kinked_line_expectation(sigma_np, m, np.sqrt(s2))
        if not np.isfinite(got) or abs(got - want) > 1e-9 * (1 + abs(want)):
            return None
    return expr


def trapezoid_rule(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and normalised Gaussian weights of the trapezoid rule on [-R, R], R = MOMENT_HALF_WIDTH."""
    x = np.linspace(-MOMENT_HALF_WIDTH, MOMENT_HALF_WIDTH, order)
    w = np.exp(-0.5 * x * x)
    return x, w / w.sum()


def trapezoid_probe_error(sigma_np, scale: float, order: int) -> float:
    """Relative error of the ``order``-point trapezoid rule for <sigma(a x + b)^P>, x ~ N(0, 1),
    a = ``scale``, b in {0, 0.37 a}, P in {2, 4}, against a rule four times finer.

    P = 4 is the worst case of a four-point function: all four inputs aligned, every factor then
    has its poles (or growth) along the same whitened coordinate.
    """
    x, w = trapezoid_rule(order)
    xr, wr = trapezoid_rule(4 * order + 1)
    worst = 0.0
    with np.errstate(all="ignore"):
        for b in (0.0, 0.37 * scale):
            s, sr = sigma_np(scale * x + b), sigma_np(scale * xr + b)
            for P in (2, 4):
                ref, size = np.sum(wr * sr**P), np.sum(wr * np.abs(sr) ** P)
                err = abs(np.sum(w * s**P) - ref) / max(size, 1e-300)
                worst = max(worst, err if np.isfinite(err) else np.inf)
    return worst


def moment_rule(activation: Activation, quad_order="auto", variance: float = 1.0, tol: float = DEFAULT_TOL
                ) -> MomentRule:
    """The rule for four-point functions on three or four distinct inputs (section comment above).

    Piecewise-polynomial activations get the exact reduction (``quad_order`` is not used), other
    kinked ones Gauss-Legendre panels of ``quad_order`` points (auto: :data:`PANEL_ORDER`), smooth ones
    the trapezoid rule of ``quad_order`` points per coordinate; ``"auto"`` takes the smallest order
    in :data:`AUTO_ORDERS` whose probe error (:func:`trapezoid_probe_error`) at the scale
    sqrt(``variance``), the largest variance of the inputs, is at most ``tol`` (the largest order
    if none is).
    """
    from derive.symbolic.quadrature import is_kinked

    check_quad_order(quad_order)
    sigma = activation.sigma_numeric
    pieces = piecewise_polynomial(sigma)
    if pieces is not None:
        return MomentRule("exact", 0, pieces=pieces)
    smoothed = smoothed_activation(sigma, tol)
    if is_kinked(sigma):
        order = PANEL_ORDER if quad_order == "auto" else int(quad_order)
        return MomentRule("panels", order, smoothed=smoothed)
    scale = float(np.sqrt(max(variance, 0.0)))
    if quad_order != "auto":
        order = int(quad_order)
        return MomentRule("trapezoid", order, smoothed=smoothed, error=_probe(sigma, scale, order))
    for order in AUTO_ORDERS:
        err = _probe(sigma, scale, order)
        if err <= tol:
            break
    return MomentRule("trapezoid", order, smoothed=smoothed, error=err)


@lru_cache(maxsize=4096)
def _probe(sigma: sp.Expr, scale: float, order: int) -> float:
    """:func:`trapezoid_probe_error` of the SymPy ``sigma``, memoised."""

    def sigma_np(z):
        return np.asarray(evaluate(sigma, {S.z: z}), dtype=float)

    return trapezoid_probe_error(sigma_np, scale, order)


def check_quad_order(quad_order) -> None:
    """Raise DeriveError unless ``quad_order`` is "auto" or an integer >= 1."""
    if isinstance(quad_order, str):
        if quad_order != "auto":
            raise DeriveError(f"quad_order must be 'auto' or an integer >= 1, got '{quad_order}'")
        return
    if isinstance(quad_order, bool) or int(quad_order) != quad_order or quad_order < 1:
        raise DeriveError(f"quad_order must be 'auto' or an integer >= 1, got {quad_order}")


def diagonal_profile(s2: sp.Expr, k1: np.ndarray, depth: int, C_W: float, C_b: float) -> np.ndarray:
    """K_aa of layers 1..depth (the single-input recursion K' = C_b + C_W <sigma^2>_K), shape (depth, N)."""
    out = np.empty((depth, len(k1)))
    out[0] = k1
    for layer in range(1, depth):
        with np.errstate(all="ignore"):
            out[layer] = C_b + C_W * np.asarray(evaluate(s2, {S.K: out[layer - 1]}), dtype=float)
    return out


@dataclass(frozen=True)
class NumpyMoments:
    """sigma(z) and the smoothed activation as NumPy callables (the JAX iteration compiles its own)."""

    sigma_expr: sp.Expr
    smoothed_expr: sp.Expr | None

    def sigma(self, z):
        return np.asarray(evaluate(self.sigma_expr, {S.z: z}), dtype=float)

    def smoothed(self, m, s2):
        return np.asarray(evaluate(self.smoothed_expr, {SHIFT: m, SMOOTH_VAR: s2}), dtype=float)


def distinct_moment(xp, rule: MomentRule, sigma, smoothed, cov, powers: tuple, root):
    """E[prod_i sigma(z_i)^p_i], z ~ N(0, cov), by ``rule`` (see the section comment).

    ``xp`` is numpy or jax.numpy; ``sigma(z)`` and ``smoothed(m, s2)`` evaluate the activation and
    its smoothing in that namespace (``smoothed`` unused unless ``rule.smoothed``); ``root(cov)``
    returns the lower-triangular root. The quadrature rules put the inputs in decreasing order of
    their power, so that the last, integrated beforehand, has power 1.
    """
    if rule.kind == "exact":
        return exact_moment(xp, rule.pieces, cov, powers)
    order = np.argsort([-p for p in powers], kind="stable")
    cov = cov[order[:, None], order[None, :]]
    powers = tuple(powers[i] for i in order)
    L = root(cov)
    last = smoothed if rule.smoothed is not None else None
    factors = [(lambda z, p=p: sigma(z) ** p) for p in powers]
    if rule.kind == "trapezoid":
        return _trapezoid_moment(xp, factors, last, L, rule.order)
    return _panel_moment(xp, factors, last, L, rule.order)


@lru_cache(maxsize=256)
def _numeric_factor(expr: sp.Expr):
    def f(z):
        with np.errstate(all="ignore"):  # a constant factor (sigma^0 sigma'^0) on every point too
            return np.broadcast_to(np.asarray(evaluate(expr, {S.z: z}), dtype=float), np.shape(z))

    return f


def product_moment(rule: MomentRule, factors: tuple, cov: np.ndarray) -> float:
    """E[prod_i f_i(z_i)], z ~ N(0, cov) on d <= 4 distinct inputs, each f_i a SymPy expression in z
    (products of powers of the activation and of its derivative, as the NTK's fluctuations need them):
    by ``rule``'s kind, one factor per coordinate (exact reduction of piecewise polynomials; the
    trapezoid rule with the last factor tabulated; Gauss-Legendre panels split at 0)."""
    cov = np.asarray(cov, dtype=float)
    if rule.kind == "exact":
        pieces = [product_pieces(f) for f in factors]
        if all(p is not None for p in pieces):
            return float(exact_product(np, pieces, cov))
    fns = [_numeric_factor(f) for f in factors]
    if len(factors) == 1:
        x, w = trapezoid_rule(4 * max(rule.order, AUTO_ORDERS[-1]) + 1)
        if rule.kind != "trapezoid":  # kinked at 0: Gauss-Legendre panels on each side
            u, w = _panels(np, [np.zeros(())], 4 * PANEL_ORDER)
            x = u
        return float(np.sum(w * fns[0](np.sqrt(max(cov[0, 0], 0.0)) * x)))
    L = _root(cov)
    if rule.kind == "trapezoid":
        return float(_trapezoid_moment(np, fns, None, L, rule.order))
    return float(_panel_moment(np, fns, None, L, max(rule.order, PANEL_ORDER)))


# ----- exact rule


class _SteppedMoments:
    """E[prod_i z_i^k_i prod_{i in S} H(z_i) | z_J = 0] for z ~ N(0, C), C of shape (..., d, d),
    memoised over (J, k, S) (see the section comment; one instance per covariance batch)."""

    def __init__(self, xp, C):
        self.xp = xp
        self.conditioned = {frozenset(): C}
        self.memo: dict = {}

    def cov(self, J: frozenset):
        """The covariance given z_J = 0 (rows and columns of J left as they fall)."""
        if J not in self.conditioned:
            xp, j = self.xp, max(J)
            C = self.cov(J - {j})
            cjj = C[..., j, j]
            positive = cjj > 0
            update = C[..., :, j, None] * C[..., None, j, :] / xp.where(positive, cjj, 1.0)[..., None, None]
            self.conditioned[J] = C - xp.where(positive[..., None, None], update, 0.0)
        return self.conditioned[J]

    def moment(self, J: frozenset, k: tuple, steps: frozenset):
        key = (J, k, steps)
        if key in self.memo:
            return self.memo[key]
        i = next((a for a, ka in enumerate(k) if ka > 0), None)
        if i is None:
            out = self.orthant(J, sorted(steps))
        else:
            xp, C = self.xp, self.cov(J)
            rest = list(k)
            rest[i] -= 1
            out = 0.0
            for j in range(len(k)):
                if j in J:
                    continue
                if rest[j] > 0:  # d_j z_j^r = r z_j^(r-1)
                    lower = list(rest)
                    lower[j] -= 1
                    out = out + C[..., i, j] * rest[j] * self.moment(J, tuple(lower), steps)
                elif j in steps:  # d_j H(z_j) = delta(z_j): density at 0 times the conditioned moment
                    density = 1.0 / xp.sqrt(2 * np.pi * xp.maximum(C[..., j, j], 1e-300))
                    out = out + C[..., i, j] * density * self.moment(J | {j}, tuple(rest), steps - {j})
        self.memo[key] = out
        return out

    def orthant(self, J: frozenset, steps: list):
        """P(z_i > 0 for i in steps | z_J = 0)."""
        m = len(steps)
        if m == 0:
            return 1.0
        if m == 1:
            return 0.5
        C = self.cov(J)
        if m == 2:
            return 0.25 + _asin_correlation(self.xp, C, *steps) / (2 * np.pi)
        if m == 3:
            a, b, c = steps
            angles = (_asin_correlation(self.xp, C, a, b) + _asin_correlation(self.xp, C, a, c)
                      + _asin_correlation(self.xp, C, b, c))
            return 0.125 + angles / (4 * np.pi)
        return _orthant4(self.xp, C, steps)


def _asin_correlation(xp, C, a: int, b: int):
    """asin(rho_ab) = atan2(C_ab, sqrt(C_aa C_bb - C_ab^2)), accurate as |rho| -> 1."""
    det = C[..., a, a] * C[..., b, b] - C[..., a, b] ** 2
    return xp.arctan2(C[..., a, b], xp.sqrt(xp.maximum(det, 0.0)))


@lru_cache(maxsize=None)
def _orthant_nodes(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractions u = 1 - (1 - s)^2 of the angle and weights (Gauss-Legendre in s on [0, 1], times
    du/ds): the substitution removes the square-root end point singularity of a singular R."""
    t, v = np.polynomial.legendre.leggauss(n)
    s, w = (t + 1) / 2, v / 2
    return 1 - (1 - s) ** 2, w * 2 * (1 - s), s


def _orthant4(xp, C, steps: list):
    """P(z > 0) for four Gaussian variables (Plackett 1954): along R(t) = I + t (R - I),

        P(R) = 1/16 + (1/2 pi) sum_{i<j} int_0^{asin rho_ij} P(z_k > 0, z_l > 0 | z_i = z_j = 0; R(t)) dtheta,

    t = sin(theta) / rho_ij, with the bivariate orthant probability 1/4 + asin(rho_kl|ij)/(2 pi) of
    the conditional correlation. The angle is integrated by :data:`ORTHANT_ORDER` Gauss nodes.
    """
    sd = [xp.sqrt(xp.maximum(C[..., a, a], 1e-300)) for a in steps]
    rho = {(x, y): C[..., steps[x], steps[y]] / (sd[x] * sd[y]) for x in range(4) for y in range(4) if x != y}
    u, w, _ = _orthant_nodes(ORTHANT_ORDER)
    total = 1.0 / 16
    for i in range(4):
        for j in range(i + 1, 4):
            k, l = (x for x in range(4) if x not in (i, j))
            top = _asin_correlation(xp, C, steps[i], steps[j])[..., None]
            flat = xp.abs(top) < 1e-8
            t = xp.where(flat, u, xp.sin(top * u) / xp.where(flat, 1.0, xp.sin(top)))
            r = {key: value[..., None] * t for key, value in rho.items()}
            rij = r[i, j]
            # Schur complement of the (i, j) block, times 1 - r_ij^2.
            gap = 1 - rij * rij
            ckl = r[k, l] * gap - (r[k, i] * r[l, i] - rij * (r[k, i] * r[l, j] + r[k, j] * r[l, i])
                                   + r[k, j] * r[l, j])
            ckk = gap - (r[k, i] ** 2 - 2 * rij * r[k, i] * r[k, j] + r[k, j] ** 2)
            cll = gap - (r[l, i] ** 2 - 2 * rij * r[l, i] * r[l, j] + r[l, j] ** 2)
            angle = xp.arctan2(ckl, xp.sqrt(xp.maximum(ckk * cll - ckl * ckl, 0.0)))
            total = total + top[..., 0] * xp.sum(w * (0.25 + angle / (2 * np.pi)), axis=-1) / (2 * np.pi)
    return total


def _lift(xp, cov):
    """cov + max(0, EXACT_LIFT[d] * mean(diag cov) - lambda_min) I: a (numerically) singular
    covariance, whose conditional variances the reduction divides by, is made definite by that much."""
    d = cov.shape[-1]
    floor = EXACT_LIFT.get(d, EXACT_LIFT[4]) * xp.trace(cov, axis1=-2, axis2=-1) / d
    lift = xp.maximum(floor - xp.linalg.eigvalsh(cov)[..., 0], 0.0)
    return cov + lift[..., None, None] * np.eye(d)


def exact_moment(xp, pieces: tuple, cov, powers: tuple):
    """E[prod_i sigma(z_i)^p_i] for sigma^p = A_p + B_p H (``pieces``), z ~ N(0, cov), cov of shape
    (..., d, d): the expansion into E[prod z_i^k_i prod_{i in S} H(z_i)], each reduced exactly."""
    return exact_product(xp, [pieces[p - 1] for p in powers], cov)


def exact_product(xp, factors: list, cov):
    """E[prod_i f_i(z_i)] for f_i = A_i + B_i H with polynomials (A_i, B_i) = ``factors[i]`` (ascending
    coefficients), z ~ N(0, cov): the same exact reduction as :func:`exact_moment`, one factor per input."""
    from itertools import product

    moments = _SteppedMoments(xp, _lift(xp, cov))
    choices = []
    for below, step in factors:
        choices.append([(k, c, False) for k, c in enumerate(below) if c != 0]
                       + [(k, c, True) for k, c in enumerate(step) if c != 0])
    total = 0.0
    for combo in product(*choices):
        coeff = float(np.prod([c for _, c, _ in combo]))
        k = tuple(kk for kk, _, _ in combo)
        steps = frozenset(i for i, (_, _, s) in enumerate(combo) if s)
        total = total + coeff * moments.moment(frozenset(), k, steps)
    return total


# ----- quadrature rules


def _along(x: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    return x.reshape((1,) * axis + (-1,) + (1,) * (ndim - 1 - axis))


def _last_factor(xp, sigma, smoothed, m, s2, kdd):
    """<sigma(m + s v)>_v in closed form; sigma(m) itself where s^2 is negligible (singular K)."""
    live = s2 > 1e-100 * kdd
    return xp.where(live, smoothed(m, xp.where(live, s2, kdd)), sigma(m))


@lru_cache(maxsize=None)
def _interpolation_matrix(q: int) -> np.ndarray:
    """P with P @ f = the monomial coefficients, in tau = t - 1/2, of the polynomial through
    (t_j, f_j) at the q nodes t_j = j - q/2 + 1 (j = 0 .. q - 1) around the interval [0, 1]."""
    offsets = np.arange(q) - q / 2 + 0.5
    return np.linalg.inv(offsets[:, None] ** np.arange(q)[None, :])


def _tabulated_last_factor(xp, sigma, m, s, spread, x, w):
    """<sigma(m + s v)>_v tabulated with the trapezoid rule (x, w) at spacing delta on
    [-R spread, R spread] (TABLE_FACTOR * len(x) intervals, R = MOMENT_HALF_WIDTH, spread = the
    standard deviation of m; m is clipped to it, where the weight is below exp(-R^2/2)), and
    interpolated by the degree LAGRANGE_POINTS - 1 polynomial through the nodes around m's interval,
    kept per interval as monomial coefficients and evaluated by Horner's rule."""
    size, q = TABLE_FACTOR * len(x), LAGRANGE_POINTS
    pad = q // 2
    half = xp.maximum(MOMENT_HALF_WIDTH * spread, 1e-300)
    delta = 2 * half / size
    nodes = delta * (np.arange(size + 2 * pad + 1) - pad) - half
    table = xp.sum(w * sigma(nodes[:, None] + s * x), axis=-1)
    stencil = xp.stack([table[j + 1: j + 1 + size] for j in range(q)])  # (q, size): nodes i+1 .. i+q
    coefficients = _interpolation_matrix(q) @ stencil  # (q, size)
    offset = (xp.clip(m, -half, half) + half) / delta
    interval = xp.clip(xp.floor(offset).astype(np.int64), 0, size - 1)
    tau = offset - interval - 0.5
    out = coefficients[q - 1][interval]
    for k in range(q - 2, -1, -1):
        out = out * tau + coefficients[k][interval]
    return out


def _trapezoid_moment(xp, factors: list, smoothed, L, order: int):
    """The nested tensor trapezoid rule (section comment): coordinates u_0 .. u_(d-2) on the grid,
    ``factors[k]`` (the factor of z_k) on the first k + 1 of them, z_(d-1) integrated beforehand
    (``smoothed``: the last factor's closed-form smoothing, else tabulated)."""
    x, w = trapezoid_rule(order)
    d = len(factors)
    outer = d - 1
    m = sum(L[outer, j] * _along(x, j, outer) for j in range(outer))
    s2 = L[outer, outer] ** 2
    if smoothed is not None:
        G = _last_factor(xp, factors[-1], smoothed, m, s2, s2 + sum(L[outer, j] ** 2 for j in range(outer)))
    else:
        spread = xp.sqrt(sum(L[outer, j] ** 2 for j in range(outer)))
        G = _tabulated_last_factor(xp, factors[-1], m, L[outer, outer], spread, x, w)
    for k in reversed(range(outer)):
        z = sum(L[k, j] * _along(x, j, k + 1) for j in range(k + 1))
        G = xp.sum(_along(w, k, k + 1) * factors[k](z) * G, axis=-1)
    return G


def _panels(xp, breaks: list, order: int):
    """Gauss-Legendre nodes and Gaussian-weighted weights, ``order`` per panel between the sorted
    ``breaks`` (arrays of one shape, clipped to [-R, R]) and +-R; shape breaks' + (panels * order,)."""
    R = MOMENT_HALF_WIDTH
    t, v = np.polynomial.legendre.leggauss(order)
    shape = breaks[0].shape
    edges = xp.sort(xp.stack([xp.clip(b, -R, R) for b in breaks]
                             + [xp.full(shape, -R), xp.full(shape, R)], axis=-1), axis=-1)
    lo, hi = edges[..., :-1, None], edges[..., 1:, None]
    half = (hi - lo) / 2
    u = lo + half * (t + 1)
    weights = half * v * xp.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)
    return u.reshape(shape + (-1,)), weights.reshape(shape + (-1,))


def _safe_ratio(xp, num, den, fallback):
    ok = xp.abs(den) > 1e-300
    return xp.where(ok, num / xp.where(ok, den, 1.0), fallback)


def _panel_moment(xp, factors: list, smoothed, L, order: int):
    """The nested kink-aware rule (section comment), ``factors[k]`` the factor of z_k (kinked at 0);
    the last coordinate in closed form when ``smoothed`` is given, else as one more level."""
    R = MOMENT_HALF_WIDTH
    d = len(factors)
    levels = d - 1 if smoothed is not None else d
    coords, weighted = [], []
    for k in range(levels):
        m = sum(L[k, j] * coords[j] for j in range(k)) if k else xp.zeros(())
        if k == 0:
            breaks = [m]
            for j in range(1, d):
                spread = xp.sqrt(sum(L[j, i] ** 2 for i in range(1, d)))
                width = _safe_ratio(xp, LAYER_WIDTHS * spread, xp.abs(L[j, 0]), R)
                breaks += [-width, width]
        else:
            breaks = [_safe_ratio(xp, -m, L[k, k], 0.0), xp.zeros(m.shape)]
        u, wk = _panels(xp, [xp.broadcast_to(b, m.shape) for b in breaks], order)
        coords = [c[..., None] for c in coords] + [u]
        weighted.append(wk * factors[k](m[..., None] + L[k, k] * u))
    G = 1.0
    if smoothed is not None:
        last = d - 1
        m = sum(L[last, j] * coords[j] for j in range(last))
        s2 = L[last, last] ** 2
        G = _last_factor(xp, factors[-1], smoothed, m, s2, s2 + sum(L[last, j] ** 2 for j in range(last)))
    for k in reversed(range(levels)):
        G = xp.sum(weighted[k] * G, axis=-1)
    return G


def _root(cov: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L L^T = cov: the Cholesky factor, or, where cov is singular
    (including in floating point only, where the eigenvalues are all positive but Cholesky breaks
    down), the triangular factor of the eigen-root (:func:`lower_triangular`)."""
    if np.all(np.linalg.eigvalsh(cov) > 0):
        try:
            return np.linalg.cholesky(cov + 1e-300 * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            pass
    return lower_triangular(np, _psd_root(cov))


def lower_triangular(xp, root):
    """L = R^T from the QR factorisation root^T = Q R, columns signed so that diag(L) >= 0: lower
    triangular with L L^T = root root^T, with no division by small pivots."""
    L = xp.linalg.qr(root.T, mode="r").T
    return L * xp.where(xp.diagonal(L) < 0, -1.0, 1.0)


def _psd_root(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return v * np.sqrt(np.clip(w, 0.0, None))
