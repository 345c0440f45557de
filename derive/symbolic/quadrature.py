"""Numeric-quadrature nodes: Gaussian expectations that have no closed form in the rules.

When the expectation engine cannot close <f(z)>_K or <f(z1, z2)>_K with an identity, it returns a
:class:`GaussianExpectation` node instead of failing. The node keeps the integrand symbolically (as a
``Lambda``), the covariance entries it is taken under, and the quadrature order (points per dimension)
chosen so that the quadrature meets a requested accuracy.

Two-input expectations use the factorisation z1 = sqrt(K11) x, z2 = sqrt(K22) (rho x + sqrt(1 -
rho^2) y) with x, y independent standard normals, and a tensor rule in (x, y) (see
:func:`gaussian_rule`); it stays accurate as rho -> +-1 because y's contribution shrinks smoothly. Derivatives follow the heat equation, d<f>_K/dK = <f''>_K / 2 (single input) and
d<f>/dK12 = <d1 d2 f>, d<f>/dK11 = <d1^2 f> / 2 (Price's theorem), so nodes differentiate exactly.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.symbolic.numeric import evaluate

#: Orders (points per dimension) tried, in increasing cost, when choosing one for an accuracy.
ORDERS = (17, 25, 33, 49, 65, 97, 129, 193, 257, 385)
#: Half-width of the quadrature grid in standard deviations (Gaussian tail beyond: < 1e-17).
HALF_WIDTH = 9.0
#: Default requested accuracy (relative to <|f|>), and the variances the choice is probed at.
DEFAULT_TOL = 1e-11
PROBE_VARIANCES = (0.05, 1.0, 4.0)
PROBE_RHOS = (0.9, -0.6, 0.9999)


class GaussianExpectation(sp.Function):
    """<f>_K evaluated by quadrature on a Gaussian-weighted grid (see :func:`gaussian_rule`).

    Args (SymPy): ``(Lambda(z, f), K, order)`` for one input, or
    ``(Lambda((z1, z2), f), K11, K12, K22, order)`` for two.
    """

    nargs = (3, 5)

    @property
    def integrand(self) -> sp.Lambda:
        return self.args[0]

    @property
    def dimension(self) -> int:
        return len(self.args[0].variables)

    @property
    def covariance_args(self) -> tuple[sp.Expr, ...]:
        return self.args[1:-1]

    @property
    def order(self) -> int:
        return int(self.args[-1])

    @property
    def kinked(self) -> bool:
        """Whether the integrand has kinks or jumps (then the kink-aware rules are used)."""
        return is_kinked(self.integrand.expr)

    def _latex(self, printer) -> str:
        """``\\left\\langle f(z) \\right\\rangle_{K}`` (SymPy's LaTeX printer asks every head that has this
        method); the quadrature order is the node's numerics, not its meaning, and is left out."""
        under = ", ".join(printer._print(a) for a in self.covariance_args)
        return rf"\left\langle {printer._print(self.integrand.expr)} \right\rangle_{{{under}}}"

    def numpy_value(self, walk):
        """The node's value with NumPy (:func:`derive.symbolic.numeric.evaluate` asks every head that
        has this method; ``walk`` evaluates a subexpression)."""
        free = self.integrand.expr.free_symbols - set(self.integrand.variables)
        return expect_numpy(self, [walk(a) for a in self.covariance_args], {p: walk(p) for p in free})

    def fdiff(self, argindex: int = 1):
        lam = self.integrand
        if argindex == 1 or argindex == len(self.args):
            raise sp.ArgumentIndexError(self, argindex)
        if self.dimension == 1:
            (v,) = lam.variables
            g = sp.diff(lam.expr, v, 2) / 2
        else:
            a, b = lam.variables
            g = {2: sp.diff(lam.expr, a, 2) / 2, 3: sp.diff(lam.expr, a, b), 4: sp.diff(lam.expr, b, 2) / 2}[argindex]
        return GaussianExpectation(sp.Lambda(lam.variables, g), *self.args[1:])


@lru_cache(maxsize=None)
def gaussian_rule(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the ``order``-point rule for E[g(x)], x ~ N(0, 1).

    The trapezoidal rule on [-HALF_WIDTH, HALF_WIDTH] with the Gaussian weight. For integrands
    analytic in a strip |Im x| < d it converges like exp(-2 pi d / h) in the spacing h, much faster
    than Gauss-Hermite's exp(-c d sqrt(order)) for activations with poles near the real axis
    (tanh(sqrt(K) x) has d = pi / (2 sqrt K)); the truncated tail is below 1e-17.
    """
    x = np.linspace(-HALF_WIDTH, HALF_WIDTH, order)
    w = np.exp(-0.5 * x * x)
    return x, w / w.sum()


#: Orders for integrands with kinks: Gauss-Legendre points per angular arc (two-input) or per unit
#: panel (one input); see :func:`kinked_rule_1d` and :func:`polar_rule`.
KINKED_ORDERS = (6, 8, 12, 16, 24, 32, 48)
_KINKS = (sp.Heaviside, sp.Abs, sp.sign, sp.Max, sp.Min, sp.DiracDelta)


def is_kinked(expr: sp.Expr) -> bool:
    """True when ``expr`` contains a step, |.|, sign, Max or Min: it is only piecewise smooth."""
    return expr.has(*_KINKS)


@lru_cache(maxsize=None)
def _legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(order)


@lru_cache(maxsize=None)
def kinked_rule_1d(order: int) -> tuple[np.ndarray, np.ndarray]:
    """E[g(x)], x ~ N(0, 1), for g smooth on each side of 0: composite Gauss-Legendre with
    ``order`` points on each unit panel of [-HALF_WIDTH, 0] and [0, HALF_WIDTH] (no node at the
    kink, so each side converges at the rate of a smooth integrand)."""
    t, v = _legendre(order)
    edges = np.arange(-HALF_WIDTH, HALF_WIDTH + 0.5)
    x = np.concatenate([(a + b) / 2 + (b - a) / 2 * t for a, b in zip(edges[:-1], edges[1:])])
    w = np.concatenate([(b - a) / 2 * v for a, b in zip(edges[:-1], edges[1:])]) * np.exp(-0.5 * x * x)
    return x, w / np.sqrt(2.0 * np.pi)


@lru_cache(maxsize=None)
def polar_rule(order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of the two-input kink-aware rule: Gauss-Legendre nodes t, weights v on [-1, 1] for each
    angular arc (``order`` points), and radial nodes r, weights u for the measure r exp(-r^2/2) dr / (2 pi)
    on [0, HALF_WIDTH] (composite Gauss-Legendre, ``order`` points per unit panel).

    In polar coordinates of the standard normals (x, y), z1 = sqrt(K11) r cos(phi) and
    z2 = sqrt(K22) r cos(phi - theta) with theta = arccos(rho): the kink lines z1 = 0 and z2 = 0 sit
    at the fixed angles pi/2, 3 pi/2, theta + pi/2, theta + 3 pi/2, which split [0, 2 pi) into four
    arcs on each of which a piecewise-smooth integrand is smooth (Genz 2004 uses the same idea).
    """
    t, v = _legendre(order)
    edges = np.arange(0.0, HALF_WIDTH + 0.5)
    r = np.concatenate([(a + b) / 2 + (b - a) / 2 * t for a, b in zip(edges[:-1], edges[1:])])
    u = np.concatenate([(b - a) / 2 * v for a, b in zip(edges[:-1], edges[1:])]) * r * np.exp(-0.5 * r * r)
    return t, v, r, u / (2.0 * np.pi)


def polar_points(k11, k12, k22, order: int):
    """(z1, z2, weights) of the kink-aware two-input rule, batched over the covariance entries."""
    t, v, r, u = polar_rule(order)
    k11, k12, k22 = (np.asarray(c, dtype=float)[..., None] for c in (k11, k12, k22))
    s1, s2 = np.sqrt(np.maximum(k11, 0.0)), np.sqrt(np.maximum(k22, 0.0))
    theta = np.arctan2(np.sqrt(np.maximum(k11 * k22 - k12 * k12, 0.0)), k12)  # arccos(rho), stable
    two_pi = 2.0 * np.pi
    cuts = np.sort(np.concatenate([np.broadcast_to(np.array([0.5, 1.5]) * np.pi, theta.shape[:-1] + (2,)),
                                   np.mod(theta + np.array([0.5, 1.5]) * np.pi, two_pi)], axis=-1), axis=-1)
    lo = cuts
    hi = np.concatenate([cuts[..., 1:], cuts[..., :1] + two_pi], axis=-1)
    half = (hi - lo) / 2  # (..., 4)
    phi = (lo + half)[..., :, None] + half[..., :, None] * t  # (..., 4, order)
    wphi = half[..., :, None] * v
    phi = phi.reshape(phi.shape[:-2] + (-1,))[..., :, None]  # (..., 4*order, 1)
    wphi = wphi.reshape(wphi.shape[:-2] + (-1,))[..., :, None]
    th = theta[..., None]
    z1 = s1[..., None] * r * np.cos(phi)
    z2 = s2[..., None] * r * np.cos(phi - th)
    return z1, z2, wphi * u


def _integrand_numpy(lam: sp.Lambda, parameters: dict | None = None):
    variables = lam.variables
    parameters = parameters or {}

    def f(*zs):
        out = evaluate(lam.expr, {**parameters, **dict(zip(variables, zs))})
        return np.broadcast_to(np.asarray(out, dtype=float), np.broadcast(*zs).shape)

    return f


def gaussian_quadrature(f, cov: tuple, order: int, dimension: int, kinked: bool = False) -> np.ndarray:
    """E[f] under N(0, cov) with the tensor rule of :func:`gaussian_rule` (smooth integrands) or the
    kink-aware rules :func:`kinked_rule_1d` / :func:`polar_rule`; ``cov`` entries may be arrays."""
    if kinked:
        if dimension == 1:
            x, w = kinked_rule_1d(order)
            (k,) = cov
            k = np.asarray(k, dtype=float)[..., None]
            return np.sum(w * f(np.sqrt(np.maximum(k, 0.0)) * x), axis=-1)
        z1, z2, w = polar_points(*cov, order)
        return np.sum(w * f(z1, z2), axis=(-2, -1))
    x, w = gaussian_rule(order)
    if dimension == 1:
        (k,) = cov
        k = np.asarray(k, dtype=float)[..., None]
        return np.sum(w * f(np.sqrt(np.maximum(k, 0.0)) * x), axis=-1)
    k11, k12, k22 = (np.asarray(c, dtype=float)[..., None, None] for c in cov)
    s1, s2 = np.sqrt(np.maximum(k11, 0.0)), np.sqrt(np.maximum(k22, 0.0))
    # sqrt(K11 K22) in one rounding: on a diagonal sqrt(fl(k*k)) == k, so rho is exactly 1 there.
    rho = np.clip(k12 / np.maximum(np.sqrt(np.maximum(k11 * k22, 0.0)), 1e-300), -1.0, 1.0)
    X, Y = x[:, None], x[None, :]
    W = w[:, None] * w[None, :]
    z1 = s1 * X
    z2 = s2 * (rho * X + np.sqrt(np.maximum(1.0 - rho * rho, 0.0)) * Y)
    return np.sum(W * f(z1, z2), axis=(-2, -1))


def expect_numpy(node: GaussianExpectation, cov_values, parameters: dict | None = None) -> np.ndarray:
    """Evaluate a :class:`GaussianExpectation` node with NumPy at its recorded order.

    ``parameters`` gives values to symbols of the integrand other than its variables (scalars).
    """
    return gaussian_quadrature(_integrand_numpy(node.integrand, parameters), tuple(cov_values), node.order,
                               node.dimension, node.kinked)


def _probe_covariances(dimension: int, variances=PROBE_VARIANCES):
    if dimension == 1:
        return [(k,) for k in variances]
    out = []
    for k in variances:
        for r in PROBE_RHOS:
            out.append((k, r * k * 0.8, 0.64 * k))
    return out


def choose_order(lam: sp.Lambda, tol: float = DEFAULT_TOL, variances=PROBE_VARIANCES) -> int:
    """Smallest order in :data:`ORDERS` whose result agrees with the next order's to ``tol``.

    Agreement is measured relative to <|f|> (so that expectations near zero are judged on the
    integrand's own scale) at probe covariances with variances in :data:`PROBE_VARIANCES` and
    correlations in :data:`PROBE_RHOS`. Returns the largest order when none meets ``tol``.
    """
    dim = len(lam.variables)
    f = _integrand_numpy(lam)
    kinked = is_kinked(lam.expr)
    orders = KINKED_ORDERS if kinked else ORDERS
    probes = _probe_covariances(dim, variances)
    cols = tuple(np.array([p[i] for p in probes]) for i in range(len(probes[0])))

    def quadrature(g, order):
        with np.errstate(all="ignore"):  # overflow is reported below, as a refusal, not a warning
            out = gaussian_quadrature(g, cols, order, dim, kinked)
        _check_finite(lam, out, probes)
        return out

    prev = quadrature(f, orders[0])
    for lo, hi in zip(orders, orders[1:]):
        nxt = quadrature(f, hi)
        scale = quadrature(lambda *zs: np.abs(f(*zs)), hi)
        if np.all(np.abs(nxt - prev) <= tol * np.maximum(scale, 1e-300)):
            return lo
        prev = nxt
    return orders[-1]


def _check_finite(lam: sp.Lambda, values: np.ndarray, probes) -> None:
    """Refuse an expectation that is inf or NaN in float64 at a probe covariance: the integrand overflows
    on the quadrature grid (exp(exp(z))) or the Gaussian integral diverges (exp(z**2) at K >= 1/2)."""
    values = np.asarray(values)
    bad = ~np.isfinite(values)
    if bad.any():
        where = probes[int(np.flatnonzero(bad.ravel())[0])]
        at = ", ".join(f"{v:g}" for v in where)
        raise DeriveError(f"the Gaussian expectation of {lam.expr} does not exist or overflows float64 "
                          f"(inf or NaN at covariance {at}); an activation must be finite and grow slower "
                          "than exp(z**2/(4K)) for its kernel to exist")


def numeric_expectation(integrand: sp.Expr, variables: tuple, cov: tuple, tol: float = DEFAULT_TOL,
                        numeric_subs: dict | None = None, variances=PROBE_VARIANCES) -> GaussianExpectation:
    """Build the quadrature node for <integrand>_cov with an order chosen for ``tol``.

    ``numeric_subs`` gives values to parameters left symbolic in the integrand, used only while
    choosing the order; ``variances`` are the variances the choice is probed at.
    """
    if len(variables) == 1:
        lam = sp.Lambda(S.z, integrand.xreplace({variables[0]: S.z}))
    else:
        lam = sp.Lambda((S.z1, S.z2), integrand.xreplace({variables[0]: S.z1, variables[1]: S.z2}))
    probe = lam if not numeric_subs else sp.Lambda(lam.variables, lam.expr.xreplace(numeric_subs))
    return GaussianExpectation(lam, *cov, sp.Integer(choose_order(probe, tol, variances)))


def refine_nodes(expr: sp.Expr, variances, tol: float = DEFAULT_TOL) -> sp.Expr:
    """``expr`` with every quadrature node's order raised, if needed, to meet ``tol`` at ``variances``.

    Nodes are chosen for typical variances (:data:`PROBE_VARIANCES`); evaluating far outside them
    (a critical point at K* = 14, say) calls for a finer grid there.
    """
    def better(node):
        if node.integrand.expr.free_symbols - set(node.integrand.variables):
            return node  # symbolic parameters: cannot probe numerically
        order = max(node.order, choose_order(node.integrand, tol, tuple(variances)))
        return GaussianExpectation(node.integrand, *node.covariance_args, sp.Integer(order))

    return expr.replace(lambda e: isinstance(e, GaussianExpectation), better)
