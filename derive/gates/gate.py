"""Cheap learning: the four-neuron multiplication gate of Lin, Tegmark & Rolnick, for any activation.

Lin, Tegmark & Rolnick, "Why does deep and cheap learning work so well?", J. Stat. Phys. 168, 1223
(2017), arXiv:1608.08225 (the continuous multiplication gate: eqs. (10)-(11) and Fig. 2 of the arXiv
version; the no-flattening theorems, e.g. that n inputs cannot be multiplied with fewer than 2^n
neurons in one hidden layer, in its no-flattening section), show that one hidden layer of four
neurons multiplies two numbers. This module derives that network for an activation sigma = s,
symbolically, from the Taylor data s^(k)(c) = d^k s/dz^k at a point c:

    gate(x, y) = mu [ s(c + u + v) + s(c - u - v) - s(c + u - v) - s(c - u + v) ],
    u = lam x,  v = lam y,  mu = 1 / (4 lam^2 s''(c)),

hidden weights lam * [[1, 1], [-1, -1], [1, -1], [-1, 1]], every hidden bias c, output weights
mu * [1, 1, -1, -1], output bias -mu * (s(c) + s(c) - s(c) - s(c)) = 0. With p = x + y, q = x - y,
the odd Taylor terms cancel between s(c + lam p) and s(c - lam p), so

    gate(x, y) - x y = sum_{k >= 2} 2 s^(2k)(c) lam^(2k-2) (p^(2k) - q^(2k)) / ((2k)! 4 s''(c))
                     = lam^2 s''''(c) / (6 s''(c)) (x^3 y + x y^3)
                       + lam^4 s^(6)(c) / (120 s''(c)) (x^5 y + 10/3 x^3 y^3 + x y^5) + O(lam^6).

:func:`gate` derives these coefficients by expanding the network with a generic Taylor polynomial
(:func:`generic_error_series`), not from the closed form above, then substitutes the activation's
derivatives.

Existence. The gate needs s''(c) != 0 at a point c where s is smooth (so that the series holds):

- s''(0) != 0 (softplus, gelu, swish, exp): c = 0, no shift.
- otherwise (tanh, sigmoid, erf, sin: s'' is odd about 0; elu: s'' jumps at the kink 0) every neuron
  gets the bias c chosen by this rule: the local maximum of |s''| nearest the origin (a root of
  s''' with s'' s'''' < 0, searched in [-8, 8] away from kinks; positive on ties), given in closed
  form when the root is one of a polynomial in z, in exp(a z), or in one tanh/sin/cos (tanh:
  c = atanh(1/sqrt(3)); sigmoid: log(2 + sqrt(3)); erf: 1/sqrt(2)), else to 30 digits. When |s''|
  has no such maximum (elu: s'' = e^z on z < 0, 0 on z > 0) c is the first of 1, -1, 2, -2, 1/2,
  -1/2 inside a smooth piece with s''(c) != 0. Near a kink k the series holds only while
  lam (|x| + |y|) < |c - k| (reported as ``kink_distance``).
- s'' = 0 wherever it exists (linear, piecewise-linear: relu, leaky relu, |z|; piecewise constant:
  step, sign): no shift helps and the four-neuron gate does not exist. For ReLU-like activations the
  construction that works is Yarotsky's (Neural Networks 94, 2017): x^2 on [0, 1] to error eps from a
  sawtooth of composed tent maps, log(1/eps) neurons and layers, and xy = ((x+y)^2 - (x-y)^2)/4.
  This is reported, not built.

Products of n inputs (binary tree of gates, one hidden layer of one-hidden-layer networks, and the
2^n-neuron shallow network) and polynomials are counted in :mod:`derive.gates.networks`, which also
builds the JAX networks.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.core.forms import rewrite_specials
from derive.gates.counts import MAX_SHALLOW_DERIVATIVE, _wrap, polynomial_counts, product_counts
from derive.rules.activations import Activation, resolve
from derive.symbolic.numeric import evaluate

z = S.z
#: The gate's scale lambda (named ``lam`` in JSON: ``lambda`` is a Python keyword).
LAM = sp.Symbol("lam", positive=True)
X = sp.Symbol("x", real=True)
Y = sp.Symbol("y", real=True)

#: Where the shift c is searched, and the grid step of the search.
SEARCH_WINDOW = 8
GRID_POINTS = 1601
#: Deterministic fallback shifts, in order, when |s''| has no local maximum.
FALLBACK_SHIFTS = (sp.Integer(1), sp.Integer(-1), sp.Integer(2), sp.Integer(-2), sp.Rational(1, 2),
                   sp.Rational(-1, 2))
#: Largest number of inputs of the product network.
MAX_INPUTS = 64
#: Digits kept when the shift is only known numerically.
DIGITS = 30

#: Hidden weights of the gate in units of lam, and output weights in units of mu (LTR Fig. 2).
HIDDEN_SIGNS = ((1, 1), (-1, -1), (1, -1), (-1, 1))
OUTPUT_SIGNS = (1, 1, -1, -1)

YAROTSKY = ("a deeper construction (not built here): Yarotsky (2017) approximates t^2 on "
            "[0, 1] by t - sum_{s=1}^m g_s(t)/4^s, g_s the s-fold composed tent map (3 ReLUs each), "
            "to error 4^-(m+1), and xy = ((x+y)^2 - (x-y)^2)/4; neurons and layers grow like "
            "log(1/eps). Any continuous piecewise-linear activation with a kink builds ReLU by a "
            "linear map, so the same holds for it.")


# --------------------------------------------------------------------------------------------------
# The activation as smooth pieces between kinks


@dataclass(frozen=True)
class Piece:
    """s on the open interval (lo, hi) between kinks, as a smooth expression in z."""

    lo: sp.Expr
    hi: sp.Expr
    expr: sp.Expr
    derivatives: list = field(default_factory=list, compare=False, repr=False)

    def d(self, k: int) -> sp.Expr:
        """s^(k) on this piece (computed once, then cached)."""
        if not self.derivatives:
            self.derivatives.append(self.expr)
        while len(self.derivatives) <= k:
            self.derivatives.append(sp.diff(self.derivatives[-1], z))
        return self.derivatives[k]

    def contains(self, p: sp.Expr) -> bool:
        return bool(self.lo < p) and bool(p < self.hi)

    def mask(self, grid: np.ndarray) -> np.ndarray:
        """Which grid points lie strictly inside this piece."""
        return (grid > float(self.lo)) & (grid < float(self.hi))


def pieces(sigma: sp.Expr) -> tuple[tuple[sp.Expr, ...], tuple[Piece, ...]]:
    """The kinks of ``sigma`` (zeros of its step arguments) and its smooth pieces between them.

    Abs, sign, Max and Min are first written with Heaviside; each Heaviside is then replaced by
    its constant value on each interval, so derivatives are the almost-everywhere ones.
    """
    s = rewrite_specials(sigma, (z,), exponentials=False)
    steps = [h for h in s.atoms(sp.Heaviside) if h.args[0].has(z)]
    kinks: set[sp.Expr] = set()
    for h in steps:
        g = h.args[0]
        if not g.is_polynomial(z):
            raise DeriveError(f"gate: cannot locate the kinks of {h} (a step of a non-polynomial argument)")
        kinks.update(r for r in sp.Poly(g, z).real_roots())
    ordered = tuple(sorted(kinks, key=lambda r: float(r)))
    if len(ordered) > 64:
        raise DeriveError(f"gate: activation has {len(ordered)} kinks (at most 64)")
    bounds = (-sp.oo, *ordered, sp.oo)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo == -sp.oo and hi == sp.oo:
            rep = sp.Integer(0)
        elif lo == -sp.oo:
            rep = hi - 1
        elif hi == sp.oo:
            rep = lo + 1
        else:
            rep = (lo + hi) / 2
        values = {h: sp.Integer(1 if float(h.args[0].subs(z, rep)) > 0 else 0) for h in steps}
        out.append(Piece(lo, hi, s.xreplace(values)))
    return ordered, tuple(out)


def _numeric(expr: sp.Expr, points: np.ndarray) -> np.ndarray:
    """``expr`` at ``points`` with NumPy (tree walk, no code generated); non-finite where undefined."""
    with np.errstate(all="ignore"):
        try:
            out = evaluate(expr, {z: points})
        except (NotImplementedError, ValueError, TypeError, ZeroDivisionError, OverflowError):
            return np.full(points.shape, np.nan)
    out = np.broadcast_to(np.asarray(out, dtype=float), points.shape)
    return np.where(np.isfinite(out), out, np.nan)


def _precise(expr: sp.Expr, p, digits: int = 40) -> float:
    """``expr`` at ``z = p`` to ``digits`` significant digits (as an mpmath-backed Float), or nan."""
    v = expr.evalf(digits, subs={z: sp.Float(p, digits) if not isinstance(p, sp.Basic) else p})
    return v if v.is_real and v.is_finite else sp.nan


def _is_zero(expr: sp.Expr) -> bool:
    """Exact zero test for a constant: simplification first, then 40 digits."""
    if expr == 0:
        return True
    if expr.is_number:
        v = expr.evalf(40)
        if v.is_finite and abs(v) > sp.Float("1e-30"):
            return False
        return sp.simplify(expr) == 0 or (v.is_finite and abs(v) < sp.Float("1e-35"))
    return sp.simplify(expr) == 0


def _short(v: sp.Expr) -> sp.Expr:
    """``v`` for a message: a rational with many digits (selu's constants) as a 15-digit float."""
    if v.is_Rational and len(str(v)) > 24:
        return sp.Float(v, 15)
    return v


def _tidy(v: sp.Expr) -> sp.Expr:
    """A short exact form of a Taylor coefficient (cheap simplification only)."""
    if v.is_Number or v.has(sp.Float):
        return v
    if sp.count_ops(v) > 150:
        return v
    try:
        w = sp.simplify(v)
    except (TypeError, ValueError, NotImplementedError):  # pragma: no cover - SymPy corner cases
        return v
    return w if sp.count_ops(w) <= sp.count_ops(v) else v


# --------------------------------------------------------------------------------------------------
# Choosing the shift


_INVERSES = {
    sp.tanh: lambda t: [sp.atanh(t)] if abs(float(t)) < 1 else [],
    sp.sin: lambda t: [sp.asin(t), sp.pi - sp.asin(t), -sp.pi - sp.asin(t)] if abs(float(t)) <= 1 else [],
    sp.cos: lambda t: [sp.acos(t), -sp.acos(t)] if abs(float(t)) <= 1 else [],
}


def _exact_roots(expr: sp.Expr) -> list[sp.Expr]:
    """Exact real roots of ``expr`` that SymPy finds cheaply: factors polynomial in z, in exp(a z),
    or in one of tanh, sin, cos of a linear argument. May miss roots; never returns a wrong one
    (every candidate is checked against the numeric root by the caller)."""
    if sp.count_ops(expr) > 300:
        return []
    try:
        num, _ = sp.fraction(sp.factor(sp.together(expr)))
    except (sp.PolynomialError, NotImplementedError, TypeError):  # pragma: no cover
        return []
    out: list[sp.Expr] = []
    for f in sp.Mul.make_args(num):
        base = f.base if f.is_Pow and f.exp.is_positive else f
        if not base.has(z) or isinstance(base, sp.exp):
            continue
        out += _factor_roots(base)
    return out


def _real_polynomial_roots(p: sp.Expr, var: sp.Symbol) -> list[sp.Expr]:
    try:
        poly = sp.Poly(p, var)
    except sp.PolynomialError:
        return []
    if poly.degree() < 1 or poly.degree() > 8:
        return []
    roots = sp.roots(poly, filter="R")
    return [r for r in roots if not r.has(sp.CRootOf)]


def _factor_roots(base: sp.Expr) -> list[sp.Expr]:
    if base.is_polynomial(z):
        return _real_polynomial_roots(base, z)
    t = sp.Dummy("t", real=True)
    funcs = {a for a in base.atoms(sp.Function) if a.has(z)}
    if len(funcs) == 1:
        (g,) = funcs
        arg = g.args[0]
        if g.func in _INVERSES and arg.is_polynomial(z) and sp.degree(arg, z) == 1:
            a, b = sp.Poly(arg, z).all_coeffs()
            p = base.xreplace({g: t})
            if not p.has(z):
                return [(w - b) / a for r in _real_polynomial_roots(p, t) for w in _INVERSES[g.func](r)]
    exps = [a for a in base.atoms(sp.exp) if a.has(z)]
    if exps and len(funcs) == len(exps) and all(e.args[0].is_polynomial(z) and sp.degree(e.args[0], z) == 1
                                                 for e in exps):
        slopes = [sp.Poly(e.args[0], z).all_coeffs()[0] for e in exps]
        step = slopes[0]
        for s_ in slopes[1:]:
            step = sp.gcd(step, s_)
        tp = sp.Dummy("t", positive=True)
        p = sp.together(base.subs(z, sp.log(tp) / step))
        num, _ = sp.fraction(p)
        if not num.has(z) and num.is_polynomial(tp):
            return [sp.expand_log(sp.log(r) / step, force=True) for r in _real_polynomial_roots(num, tp)
                    if r.is_positive]
    if base.has(sp.tanh, sp.sinh, sp.cosh) and not base.has(sp.sin, sp.cos, sp.tan):
        rewritten = base.rewrite(sp.exp)
        if rewritten != base:
            return _factor_roots(sp.fraction(sp.together(rewritten))[0])
    return []


@dataclass(frozen=True)
class Shift:
    """The bias c of every hidden neuron, and why it was chosen."""

    point: sp.Expr
    rule: str
    exact: bool


def _refine_root(d3: sp.Expr, d4: sp.Expr, a: float, b: float) -> float:
    """A root of d3 in [a, b] (sign change), by bisection in float then Newton at 40 digits."""
    fa = _numeric(d3, np.array([a]))[0]
    for _ in range(60):
        m = 0.5 * (a + b)
        fm = _numeric(d3, np.array([m]))[0]
        if not np.isfinite(fm) or fm == 0:
            break
        if np.sign(fm) == np.sign(fa):
            a, fa = m, fm
        else:
            b = m
    r = sp.Float(0.5 * (a + b), 40)
    for _ in range(4):
        f, fp = _precise(d3, r), _precise(d4, r)
        if f is sp.nan or fp is sp.nan or fp == 0:
            break
        nxt = r - f / fp
        if abs(nxt - r) > 1e-6:
            break
        r = nxt
    return r


def _local_maxima_of_curvature(piece: Piece, grid: np.ndarray) -> list[sp.Expr]:
    """Roots of s''' inside ``piece`` where |s''| has a local maximum (s'' s'''' < 0)."""
    pts = grid[piece.mask(grid)]
    if pts.size < 2:
        return []
    d2, d3, d4 = piece.d(2), piece.d(3), piece.d(4)
    if d3 == 0:
        return []
    v3 = _numeric(d3, pts)
    if not np.any(np.abs(v3[np.isfinite(v3)]) > 1e-12):  # s'' constant on the piece
        return []
    out = []
    for i in range(pts.size - 1):
        a, b = v3[i], v3[i + 1]
        if not (np.isfinite(a) and np.isfinite(b)):
            continue
        if a == 0:
            r = sp.Float(pts[i], 40)
        elif a * b < 0:
            r = _refine_root(d3, d4, float(pts[i]), float(pts[i + 1]))
        else:
            continue
        v2, v4 = _precise(d2, r), _precise(d4, r)
        if v2 is sp.nan or v4 is sp.nan or abs(v2) < 1e-12 or not v2 * v4 < 0:
            continue
        out.append(r)
    return out


def choose_shift(kinks: Sequence[sp.Expr], parts: Sequence[Piece]) -> Shift | None:
    """The shift c of the rule in the module docstring, or None when s'' vanishes on the window."""
    grid = np.linspace(-SEARCH_WINDOW, SEARCH_WINDOW, GRID_POINTS)
    candidates: list[tuple[sp.Expr, Piece]] = []
    for piece in parts:
        candidates += [(r, piece) for r in _local_maxima_of_curvature(piece, grid)]
    if candidates:
        best = min(abs(r) for r, _ in candidates)
        near = [(r, p) for r, p in candidates if abs(r) - best < 1e-9 * (1 + best)]
        r, piece = max(near, key=lambda rp: rp[0])
        exact = [e for e in _exact_roots(piece.d(3))
                 if e.is_real is not False and abs(sp.N(e, 40) - r) < sp.Float("1e-20") * (1 + abs(r))]
        if exact:
            c = min(exact, key=sp.count_ops)
            return Shift(c, "the local maximum of |s''| nearest 0 (a root of s''' with s'' s'''' < 0), "
                            "in closed form", True)
        return Shift(sp.Float(r, DIGITS), "the local maximum of |s''| nearest 0 (a root of s''' with "
                                          f"s'' s'''' < 0), to {DIGITS} digits", False)
    for c in FALLBACK_SHIFTS:
        piece = next((p for p in parts if p.contains(c)), None)
        if piece is not None and not _is_zero(piece.d(2).subs(z, c)):
            return Shift(c, "|s''| has no local maximum away from kinks: the first of 1, -1, 2, -2, 1/2, "
                            "-1/2 where s is smooth and s''(c) != 0", True)
    best = None
    for piece in parts:
        pts = grid[piece.mask(grid)]
        if pts.size == 0:
            continue
        v = np.abs(_numeric(piece.d(2), pts))
        if np.any(np.isfinite(v)) and np.nanmax(v) > 1e-9:
            i = int(np.nanargmax(v))
            c = sp.Rational(int(round(pts[i] * 100)), 100)
            if best is None or v[i] > best[1]:
                best = (c, v[i])
    if best is not None:
        return Shift(best[0], "the grid point in [-8, 8] (step 1/100) with the largest |s''|", True)
    return None


# --------------------------------------------------------------------------------------------------
# The error series, derived once from a generic Taylor polynomial


def taylor_symbols(order: int) -> tuple[sp.Symbol, ...]:
    """sigma0, sigma1, ...: generic Taylor coefficients s^(k)(c)."""
    return tuple(sp.Symbol(f"sigma{k}", real=True) for k in range(order + 1))


@lru_cache(maxsize=8)
def generic_error_series(orders: int) -> tuple[tuple[int, sp.Expr], ...]:
    """gate(x, y) - x y as ((2j, coefficient of lam^(2j)), ...), j = 1..orders, in sigma0, sigma1, ...

    Derived by expanding the four-neuron network with the Taylor polynomial of s at c to order
    2 orders + 2 (so every listed coefficient is complete). Also checks that the constant, the
    odd powers of lam and the lam^0 term beyond x y cancel.
    """
    top = 2 * orders + 2
    sig = taylor_symbols(top)

    def taylor(u):
        return sum(sig[k] * u**k / sp.factorial(k) for k in range(top + 1))

    mu = 1 / (4 * LAM**2 * sig[2])
    args = [LAM * (a * X + b * Y) for a, b in HIDDEN_SIGNS]
    net = mu * sum(w * taylor(a) for w, a in zip(OUTPUT_SIGNS, args))
    err = sp.expand(net - X * Y)
    poly = sp.Poly(err, LAM, 1 / LAM)
    out = []
    for (p, q), coeff in poly.terms():
        power = p - q
        if power % 2 or power <= 0 or power > 2 * orders:
            if power <= 2 * orders and coeff != 0:
                raise AssertionError(f"unexpected lam^{power} term {coeff} in the gate's error")
            continue
        out.append((power, sp.factor(coeff)))
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class GateResult:
    """The four-neuron multiplication gate derived for one activation.

    Attributes:
        activation: the activation's name (or the expression typed).
        sigma: s(z) with parameter values substituted.
        family: the rule's family (smooth, piecewise-linear, ...).
        exists: whether a four-neuron gate exists (at some shift).
        reason: one or two sentences: s''(0), the shift and why, or why no gate exists.
        origin: what s'' is at 0 (value, or why it is undefined).
        shift: the hidden bias c (None when no gate exists).
        taylor: (s(c), s'(c), ..., s^(K)(c)) exact where possible.
        lam: the scale lambda (the symbol ``lam`` unless a value was given).
        hidden_weights, hidden_bias, output_weights, output_bias: the network (sympy matrices).
        error: ((2j, polynomial in x, y), ...): gate(x, y) - x y = sum lam^(2j) * polynomial.
        generic_error: the same in the symbols sigma2, sigma4, ... (s^(k)(c)).
        exact: True when the series terminates (s is a polynomial of degree <= 3 near c).
        kink_distance: distance from c to the nearest kink (the series needs lam(|x|+|y|) below it).
        alternative: what to use when no gate exists.
        product, polynomial: counts from :mod:`derive.gates.networks`.
    """

    activation: str
    sigma: sp.Expr
    family: str
    exists: bool
    reason: str
    origin: str
    shift: sp.Expr | None
    shift_rule: str
    taylor: tuple[sp.Expr, ...]
    lam: sp.Expr
    hidden_weights: sp.ImmutableMatrix | None
    hidden_bias: sp.ImmutableMatrix | None
    output_weights: sp.ImmutableMatrix | None
    output_bias: sp.Expr | None
    error: tuple[tuple[int, sp.Expr], ...]
    generic_error: tuple[tuple[int, sp.Expr], ...]
    exact: bool
    kink_distance: sp.Expr | None
    alternative: str
    product: object
    polynomial: object | None
    shallow: object | None

    @property
    def leading_coefficient(self) -> sp.Expr | None:
        """a with gate(x, y) - x y = a lam^2 (x^3 y + x y^3) + O(lam^4); equals s''''(c) / (6 s''(c))."""
        if not self.exists:
            return None
        lead = dict(self.error).get(2, sp.Integer(0))
        return lead.coeff(X, 3).coeff(Y, 1)

    @property
    def mu(self) -> sp.Expr | None:
        """The output scale 1 / (4 lam^2 s''(c))."""
        return None if not self.exists else 1 / (4 * self.lam**2 * self.taylor[2])

    # ---- serialisation ---------------------------------------------------------------------------

    def as_dict(self) -> dict:
        """A JSON-ready dict; expressions are SymPy-syntax strings in x, y, lam, sigma<k>."""
        def s(e):
            return None if e is None else str(e)

        def mat(m):
            return None if m is None else [[str(v) for v in m.row(i)] for i in range(m.rows)] if m.cols > 1 \
                else [str(v) for v in m]

        out = {
            "activation": self.activation,
            "sigma": str(self.sigma),
            "family": self.family,
            "exists": self.exists,
            "reason": self.reason,
            "origin": self.origin,
            "shift": s(self.shift),
            "shift_float": None if self.shift is None else float(self.shift),
            "shift_rule": self.shift_rule,
            "taylor": {f"sigma{k}": str(v) for k, v in enumerate(self.taylor)},
            "lam": str(self.lam),
            "neurons": 4 if self.exists else None,
            "hidden_weights": mat(self.hidden_weights),
            "hidden_bias": mat(self.hidden_bias),
            "output_weights": mat(self.output_weights),
            "output_bias": s(self.output_bias),
            "mu": s(self.mu),
            "leading_coefficient": s(self.leading_coefficient),
            "leading_coefficient_float": (None if self.leading_coefficient is None
                                          else float(self.leading_coefficient)),
            "error_series": {f"lam**{p}": str(e) for p, e in self.error},
            "generic_error_series": {f"lam**{p}": str(e) for p, e in self.generic_error},
            "exact": self.exact,
            "kink_distance": s(self.kink_distance),
            "alternative": self.alternative or None,
            "product": self.product.as_dict(),
        }
        if self.shallow is not None:
            out["shallow"] = self.shallow.as_dict()
        if self.polynomial is not None:
            out["polynomial"] = self.polynomial.as_dict()
        return out

    def to_latex(self) -> str:
        """Paste-ready LaTeX lines (an align-free sequence of equations separated by \\\\)."""
        names = {LAM: r"\lambda",
                 **{sig: rf"\sigma^{{({k})}}(c)" for k, sig in enumerate(taylor_symbols(12))}}

        def L(e):
            return sp.latex(e, symbol_names=names)

        lines = [rf"% {self.activation}: \sigma(z) = {sp.latex(self.sigma)}"]
        if not self.exists:
            lines.append(r"% no four-neuron gate")
            lines.append(r"\text{%s} \\" % self.reason.replace("_", r"\_").replace("^", r"\^{}"))
            lines += self._latex_counts()
            return "\n".join(lines)
        c = self.shift
        lines.append(rf"c = {L(c)},\quad \sigma''(c) = {L(self.taylor[2])},\quad "
                     rf"\mu = \frac{{1}}{{4\lambda^2 \sigma''(c)}} = {L(self.mu)} \\")
        lines.append(r"xy \approx \mu\left[\sigma(c + \lambda(x+y)) + \sigma(c - \lambda(x+y)) "
                     r"- \sigma(c + \lambda(x-y)) - \sigma(c - \lambda(x-y))\right] \\")
        lines.append(rf"W_1 = {L(self.hidden_weights)},\quad b_1 = {L(self.hidden_bias.T)},\quad "
                     rf"w_2 = {L(self.output_weights.T)},\quad b_2 = {L(self.output_bias)} \\")
        series = " + ".join(rf"\lambda^{{{p}}}\left({L(e)}\right)" for p, e in self.error)
        tail = "" if self.exact else rf" + O(\lambda^{{{self.error[-1][0] + 2 if self.error else 2}}})"
        lines.append(rf"\mathrm{{gate}}(x, y) - xy = {series or '0'}{tail} \\")
        generic = " + ".join(rf"\lambda^{{{p}}}\left({L(e)}\right)" for p, e in self.generic_error)
        lines.append(rf"\text{{generic: }} \mathrm{{gate}}(x, y) - xy = {generic} + \dots \\")
        lines += self._latex_counts()
        return "\n".join(lines)

    def _latex_counts(self) -> list[str]:
        def n_(k, word):
            return rf"{k}\ \text{{{word}{'' if k == 1 else 's'}}}"

        p = self.product
        out = [rf"\text{{product of {p.n} inputs, tree: }} {n_(p.gates, 'gate')},\ "
               rf"{n_(p.neurons, 'neuron')},\ {n_(p.layers, 'hidden layer')}"
               rf"\text{{; one hidden layer: }} 2^{{{p.n}}} = {n_(p.shallow_neurons, 'neuron')} \\"]
        if self.polynomial is not None:
            q = self.polynomial
            out.append(rf"\text{{polynomial }} {sp.latex(q.expression)}:\ {n_(q.neurons, 'neuron')},\ "
                       rf"{n_(q.layers, 'hidden layer')}\text{{; one hidden layer: }} "
                       rf"{n_(q.shallow_neurons, 'neuron')} \\")
        return out

    def _repr_latex_(self) -> str:
        body = self.to_latex().split("\n")
        eqs = [ln.rstrip("\\").rstrip() for ln in body if not ln.startswith("%")]
        return "$\\begin{gathered}" + r" \\ ".join(eqs) + "\\end{gathered}$"

    def __repr__(self) -> str:
        if not self.exists:
            return f"GateResult({self.activation}: no four-neuron gate)"
        return (f"GateResult({self.activation}: c = {self.shift}, s''(c) = {self.taylor[2]}, "
                f"error = {self.leading_coefficient}*lam**2*(x**3*y + x*y**3) + ...)")

    def to_text(self, width: int = 80) -> str:
        """A readable report, wrapped at ``width`` columns (formulas are wrapped, never cut)."""
        lines: list[str] = []

        def para(text, indent=""):
            lines.extend(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ",
                                       break_long_words=True, break_on_hyphens=False) or [""])

        para(f"{self.activation}: s(z) = {self.sigma}   [{self.family}]")
        para(f"at the origin: {self.origin}")
        if not self.exists:
            para(f"four-neuron gate: does not exist. {self.reason}")
            if self.alternative:
                para(f"instead: {self.alternative}")
        else:
            para(f"four-neuron gate: exists. {self.reason}")
            value = f" = {float(self.shift):.15g}" if not self.shift.is_Integer else ""
            para(f"shift c = {self.shift}{value}   ({self.shift_rule})")
            para("Taylor data at c: " + ", ".join(f"s{'' if k == 0 else '^(%d)' % k}(c) = {v}"
                                                   for k, v in enumerate(self.taylor)))
            para("gate(x, y) = mu [s(c + lam(x+y)) + s(c - lam(x+y)) - s(c + lam(x-y)) - s(c - lam(x-y))]")
            para(f"mu = 1/(4 lam^2 s''(c)) = {self.mu}")
            rows = [f"[{', '.join(str(v) for v in self.hidden_weights.row(i))}]" for i in range(4)]
            para(f"hidden weights (4 x 2) = [{', '.join(rows)}]; hidden biases = c")
            para(f"output weights = [{', '.join(str(v) for v in self.output_weights)}]; "
                 f"output bias = {self.output_bias}")
            terms = " + ".join(f"lam**{p}*({e})" for p, e in self.error) or "0"
            tail = " (exact: the series terminates)" if self.exact else f" + O(lam**{self.error[-1][0] + 2})"
            para(f"error gate(x, y) - x*y = {terms}{tail}")
            para(f"leading coefficient: gate - xy ~ a lam^2 (x^3 y + x y^3), a = s''''(c)/(6 s''(c)) = "
                 f"{self.leading_coefficient} = {float(self.leading_coefficient):.12g}")
            if self.kink_distance is not None:
                para(f"valid while lam (|x| + |y|) < {self.kink_distance} (distance from c to the nearest "
                     "kink)")
        lines.extend(self.product.text_lines(width))
        if self.shallow is not None:
            lines.extend(self.shallow.text_lines(width))
        if self.polynomial is not None:
            lines.extend(self.polynomial.text_lines(width))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The derivation


def _lambda_value(lam) -> sp.Expr:
    if lam is None:
        return LAM
    if isinstance(lam, str):
        from derive.core.parse import parse_expression

        try:
            as_float = float(lam)
        except ValueError:
            as_float = 0.0
        if not math.isfinite(as_float):
            raise DeriveError(f"lambda must be a finite number > 0, got {lam.strip()}")
        val = parse_expression(lam, {}, where="--lambda")
    elif isinstance(lam, (int, float, np.floating, np.integer)) and not isinstance(lam, bool):
        if not math.isfinite(float(lam)):
            raise DeriveError(f"lambda must be a finite number > 0, got {lam}")
        val = sp.Rational(repr(float(lam))) if isinstance(lam, (float, np.floating)) else sp.Integer(int(lam))
    elif isinstance(lam, sp.Expr):
        val = lam
    else:
        raise DeriveError(f"lambda must be a number, got {type(lam).__name__}")
    if not val.is_number or not val.is_real or not val.is_finite or val.is_zero:
        raise DeriveError(f"lambda must be a finite number > 0, got {lam}")
    if not bool(val > 0):
        raise DeriveError(f"lambda must be > 0, got {lam}")
    return val


def _describe_origin(kinks, parts) -> tuple[str, sp.Expr | None]:
    """What s''(0) is: its value, or which one-sided derivative jumps at 0; and the value (or None)."""
    inside = next((p for p in parts if p.contains(sp.Integer(0))), None)
    if inside is not None:
        v = _tidy(inside.d(2).subs(z, 0))
        return f"s''(0) = {_short(v)}", v
    left = next(p for p in parts if p.hi == 0)
    right = next(p for p in parts if p.lo == 0)
    for k in range(0, 5):
        a, b = _tidy(left.d(k).subs(z, 0)), _tidy(right.d(k).subs(z, 0))
        if not _is_zero(a - b):
            a, b = _short(a), _short(b)
            name = "s" + "'" * k if k <= 3 else f"s^({k})"
            if k <= 1:
                return (f"undefined: 0 is a kink where {name} jumps from {a} to {b}, so s'' has a Dirac "
                        f"delta there", None)
            if k == 2:
                return f"undefined: s'' jumps from {a} (z < 0) to {b} (z > 0) at the kink 0", None
            v = _tidy(left.d(2).subs(z, 0))
            return (f"s''(0) = {v}, but {name} jumps at the kink 0, so the Taylor series (and the gate's "
                    f"error series) does not hold there", None)
    return "s is smooth at 0 to order 4 although 0 is a kink", _tidy(left.d(2).subs(z, 0))


def _flat_reason(kinks, parts, grid) -> str | None:
    """Why s'' vanishes identically (every piece linear or constant), or None if it does not."""
    for p in parts:
        pts = grid[p.mask(grid)]
        v = _numeric(p.d(2), pts)
        if np.any(np.abs(v[np.isfinite(v)]) > 1e-9):
            return None
        if sp.simplify(p.d(2)) != 0:
            return None
    constant = all(sp.simplify(p.d(1)) == 0 for p in parts)
    if not kinks:
        return ("s is affine: s'' = 0 everywhere, so every network with this activation computes an affine "
                "map and x*y cannot be approximated at all.")
    if constant:
        return ("s is piecewise constant: s' = s'' = 0 wherever they exist (at the jumps they are Dirac "
                "deltas), so s''(c) = 0 at every shift c; a step network is piecewise constant and "
                "approximates x*y only by tiling the input box, with a neuron count growing like a power "
                "of 1/eps.")
    return ("s is piecewise linear: s'' = 0 wherever it exists (at the kinks it is a Dirac delta), so "
            "s''(c) = 0 at every shift c and no bias makes the four-neuron gate work.")


def gate(spec: str | Activation, params: Mapping[str, str] | Sequence[str] | None = None, *,
         lam=None, inputs: int = 2, polynomial: str | None = None, orders: int = 2,
         rule_dirs: Sequence[str] = ()) -> GateResult:
    """Derive the four-neuron multiplication gate (Lin, Tegmark & Rolnick 2017) for ``spec``.

    Args:
        spec: a rule name or alias (``"softplus"``), or an expression in z (``"z*erf(z)"``).
        params: activation parameters, ``{"a": "0.2"}`` or ``["a=0.2"]``.
        lam: the scale lambda (a number > 0, or text such as ``"1/100"``); symbolic ``lam`` if None.
        inputs: n for the product of n inputs (2..64): tree and one-hidden-layer counts.
        polynomial: a polynomial in x1..xk (text, safe parser) to count neurons and layers for.
        orders: how many terms of the error series (lam^2, lam^4, ...), 1..4.

    Example:
        >>> import derive
        >>> derive.gate("softplus").leading_coefficient
        -1/12
    """
    act = spec if isinstance(spec, Activation) else resolve(spec, params, tuple(rule_dirs))
    lam_v = _lambda_value(lam)
    if isinstance(inputs, bool) or not isinstance(inputs, (int, np.integer)):
        raise DeriveError(f"inputs must be an integer in [2, {MAX_INPUTS}], got {inputs!r}")
    if not 2 <= int(inputs) <= MAX_INPUTS:
        raise DeriveError(f"inputs must be an integer in [2, {MAX_INPUTS}], got {inputs}")
    if not (isinstance(orders, int) and 1 <= orders <= 4):
        raise DeriveError(f"orders must be an integer in [1, 4], got {orders!r}")
    poly = polynomial_counts(polynomial) if polynomial is not None else None
    product = product_counts(int(inputs))

    sigma = act.sigma_numeric
    kinks, parts = pieces(sigma)
    grid = np.linspace(-SEARCH_WINDOW, SEARCH_WINDOW, GRID_POINTS)
    origin, s2_origin = _describe_origin(kinks, parts)
    common = dict(activation=act.name, sigma=sigma, family=act.family, lam=lam_v, product=product,
                  polynomial=poly)
    flat = _flat_reason(kinks, parts, grid)
    if flat is not None:
        alternative = YAROTSKY if kinks and not all(sp.simplify(p.d(1)) == 0 for p in parts) else ""
        return _absent(flat, origin, alternative, common)

    if s2_origin is not None and not _is_zero(s2_origin):
        shift = Shift(sp.Integer(0), "s''(0) != 0: no shift", True)
        reason = f"s''(0) = {_short(s2_origin)} != 0, so the gate works at the origin (every hidden bias 0)."
    else:
        shift = choose_shift(kinks, parts)
        if shift is None:
            return _absent("s'' vanishes wherever it was searched ([-8, 8]); no shift found with "
                           "s''(c) != 0.", origin, "", common)
        why = "s''(0) = 0" if s2_origin is not None else "s''(0) is undefined"
        reason = (f"{why}, so every hidden neuron gets the bias c = {shift.point}, where s is smooth and "
                  f"s''(c) != 0.")

    c = shift.point
    piece = next(p for p in parts if p.contains(c))
    top = 2 * orders + 2
    if shift.exact:
        taylor = tuple(_tidy(piece.d(k).subs(z, c)) for k in range(top + 1))
    else:
        taylor = tuple(sp.Float(piece.d(k).evalf(DIGITS, subs={z: c}), DIGITS) for k in range(top + 1))
    s2 = taylor[2]
    mu = 1 / (4 * lam_v**2 * s2)
    W1 = sp.ImmutableMatrix([[lam_v * a, lam_v * b] for a, b in HIDDEN_SIGNS])
    b1 = sp.ImmutableMatrix([c] * 4)
    w2 = sp.ImmutableMatrix([mu * w for w in OUTPUT_SIGNS])
    b2 = sp.simplify(-sum(w * taylor[0] for w in w2))
    generic = generic_error_series(orders)
    values = dict(zip(taylor_symbols(top), taylor))
    error = tuple((p, sp.expand(_tidy_ratio(e, values))) for p, e in generic)
    exact = piece.expr.is_polynomial(z) and sp.degree(piece.expr, z) <= 3
    if exact:
        error = tuple((p, e) for p, e in error if e != 0)
    kd = min((abs(c - k) for k in kinks), key=lambda d: float(d)) if kinks else None
    shallow = shallow_product(product.n, parts, c)
    return GateResult(exists=True, reason=reason, origin=origin, shift=c, shift_rule=shift.rule,
                      taylor=taylor,
                      hidden_weights=W1, hidden_bias=b1, output_weights=w2, output_bias=b2, error=error,
                      generic_error=generic, exact=bool(exact), kink_distance=kd, alternative="",
                      shallow=shallow, **common)


def _absent(reason: str, origin: str, alternative: str, common: dict) -> GateResult:
    """The result when no four-neuron gate exists."""
    return GateResult(exists=False, reason=reason, origin=origin, shift=None, shift_rule="", taylor=(),
                      hidden_weights=None, hidden_bias=None, output_weights=None, output_bias=None, error=(),
                      generic_error=(), exact=False, kink_distance=None, alternative=alternative,
                      shallow=None, **common)


def _tidy_ratio(generic: sp.Expr, values: Mapping[sp.Symbol, sp.Expr]) -> sp.Expr:
    """Substitute the Taylor values into a generic coefficient, simplifying each sigma ratio once."""
    expanded = sp.expand(generic)
    out = sp.Integer(0)
    for term in sp.Add.make_args(expanded):
        coeff, mono = term.as_independent(X, Y)
        out += _tidy(coeff.xreplace(values)) * mono
    return out


@dataclass(frozen=True)
class ShallowProduct:
    """The one-hidden-layer product network: 2^n neurons s(c + lam e.x), e in {-1, 1}^n."""

    n: int
    neurons: int
    shift: sp.Expr | None
    derivative: sp.Expr | None
    leading_ratio: sp.Expr | None
    note: str

    @property
    def output_scale(self):
        """Output weight of neuron e is prod(e) times this: 1 / (2^n lam^n s^(n)(c))."""
        if self.derivative is None:
            return None
        return 1 / (2**self.n * LAM**self.n * self.derivative)

    def as_dict(self) -> dict:
        return {"n": self.n, "neurons": self.neurons,
                "shift": None if self.shift is None else str(self.shift),
                "derivative": None if self.derivative is None else str(self.derivative),
                "output_scale": None if self.output_scale is None else str(self.output_scale),
                "leading_error": (None if self.leading_ratio is None else
                                  f"lam**2*({self.leading_ratio})*(sum of x_i**2)*(x1*...*x{self.n})"),
                "note": self.note}

    def text_lines(self, width: int = 80) -> list[str]:
        if self.derivative is None:
            return _wrap(f"one hidden layer, built: {self.note}", width)
        n = self.n
        return _wrap(f"one hidden layer, built: {self.neurons} neurons s(c + lam e.x), e in {{-1,1}}^{n}, "
                     f"c = {self.shift}, output weights prod(e)/(2^{n} lam^{n} s^({n})(c)) with "
                     f"s^({n})(c) = {self.derivative}; error lam^2 ({self.leading_ratio}) "
                     f"(x1^2 + ... + x{self.n}^2) x1...x{self.n} + O(lam^4)", width)


def shallow_product(n: int, parts, gate_shift: sp.Expr) -> ShallowProduct:
    """The 2^n-neuron network for x1...xn with the shift rule: the first of 0, the gate's shift,
    1, -1, 1/2, -1/2 inside a smooth piece with s^(n)(c) != 0 (derived for n <= 12)."""
    if n > MAX_SHALLOW_DERIVATIVE:
        return ShallowProduct(n, 2**n, None, None, None,
                              f"2^{n} neurons; s^({n})(c) is not derived for n > {MAX_SHALLOW_DERIVATIVE}")
    tried = []
    shifts = (sp.Integer(0), gate_shift, sp.Integer(1), sp.Integer(-1), sp.Rational(1, 2), sp.Rational(-1, 2))
    for c in shifts:
        if c in tried:
            continue
        tried.append(c)
        piece = next((p for p in parts if p.contains(c)), None)
        if piece is None:
            continue
        exact = not c.has(sp.Float)
        if exact:
            dn = _tidy(piece.d(n).subs(z, c))
        else:
            dn = sp.Float(piece.d(n).evalf(30, subs={z: c}), 30)
        if _is_zero(dn):
            continue
        if exact:
            dn2 = _tidy(piece.d(n + 2).subs(z, c))
        else:
            dn2 = sp.Float(piece.d(n + 2).evalf(30, subs={z: c}), 30)
        ratio = _tidy(dn2 / (6 * dn)) if exact else dn2 / (6 * dn)
        return ShallowProduct(n, 2**n, c, dn, ratio, "needs s^(n)(c) != 0")
    return ShallowProduct(n, 2**n, None, None, None,
                          f"2^{n} neurons by the paper's bound, but this construction needs "
                          f"s^({n})(c) != 0 and s^({n}) vanishes at 0, {gate_shift}, +-1, +-1/2")
