"""Structure read off a derivation (SymPy, once per expression): homogeneity, branch points at rho = +-1,
separable quadrature nodes for Mehler's expansion, per-row subexpressions to hoist (:mod:`derive.kernels.gram`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.kernels.direct import _at_correlation
from derive.symbolic.numeric import evaluate as evaluate_numpy
from derive.symbolic.quadrature import GaussianExpectation

_RHO = sp.Symbol("rho", real=True)


class _SqrtOneMinusSquare(sp.Function):
    """sqrt(1 - x^2), compiled to :func:`derive.backends.safe.fast_sqrt_one_minus_square`."""

    nargs = 1


def _sine_forms(expr: sp.Expr) -> sp.Expr:
    """Mark square roots of 1 - u^2 (any arrangement) as :class:`_SqrtOneMinusSquare`, so that with
    arccos(u) they share one square root once compiled."""
    def matches(e):
        if not (e.is_Pow and e.exp == sp.Rational(1, 2)):
            return False
        base = sp.expand(e.base)
        poly = sp.Poly(base, *base.free_symbols) if base.free_symbols else None
        if poly is None or len(base.free_symbols) != 1:
            return False
        (u,) = base.free_symbols
        return sp.expand(base - (1 - u**2)) == 0

    return expr.replace(matches, lambda e: _SqrtOneMinusSquare(next(iter(e.base.free_symbols))))


def _probe_points(count: int = 4, seed: int = 7):
    """Random valid covariances (K11, K12, K22) for numeric checks of symbolic rewrites."""
    rng = np.random.default_rng(seed)
    k11 = rng.uniform(0.3, 3.0, count)
    k22 = rng.uniform(0.3, 3.0, count)
    rho = rng.uniform(-0.95, 0.95, count)
    return k11, rho * np.sqrt(k11 * k22), k22


def _same_values(a: sp.Expr, b: sp.Expr, values: dict, rtol: float = 1e-11) -> bool:
    """Whether two expressions agree numerically (NumPy evaluator) at the given points."""
    try:
        with np.errstate(all="ignore"):
            va = np.asarray(evaluate_numpy(a, values), dtype=float)
            vb = np.asarray(evaluate_numpy(b, values), dtype=float)
    except (NotImplementedError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return False
    va, vb = np.broadcast_arrays(va, vb)
    if not (np.all(np.isfinite(va)) and np.all(np.isfinite(vb))):
        return False
    return bool(np.all(np.abs(va - vb) <= rtol * np.maximum(np.abs(vb), 1.0)))


def _split_roots(expr: sp.Expr) -> sp.Expr:
    """Factor the bases of fractional powers, so that SymPy pulls positive factors out of roots:
    sqrt(a^2 b^2 - a^2 b^2 r^2) -> a b sqrt(-(r - 1)(r + 1))."""
    def split(e):
        return sp.Pow(sp.factor(e.base), e.exp)

    return expr.replace(lambda e: e.is_Pow and not e.exp.is_Integer and not e.base.is_Atom, split)


@dataclass(frozen=True)
class _Homogeneous:
    """expr(K11, K12, K22) = (K11 K22)^(degree/2) form(rho), rho = K12 / sqrt(K11 K22)."""

    degree: sp.Rational
    form: sp.Expr


def _homogeneous(expr: sp.Expr) -> _Homogeneous | None:
    """Detect E(t K) = t^p E(K) (t > 0) and derive e(rho) = E(1, rho, 1), or None.

    K11 = a^2, K22 = b^2, K12 = a b rho turns a homogeneous map into (a b)^p e(rho); the degree p
    (a multiple of 1/2) is read from one numeric rescaling, then the quotient by (a b)^p is
    simplified until a and b drop out, and the result is checked numerically against ``expr``.
    """
    if expr.has(GaussianExpectation):
        return None
    if expr == 0:
        return _Homogeneous(sp.Integer(0), sp.Integer(0))
    a, b = sp.Dummy("a", positive=True), sp.Dummy("b", positive=True)
    scaled = expr.xreplace({S.K11: a**2, S.K22: b**2, S.K12: a * b * _RHO})
    degree = None
    for rho in (0.37, -0.61, 0.05):
        try:
            with np.errstate(all="ignore"):
                v1 = float(evaluate_numpy(scaled, {a: 1.3, b: 0.8, _RHO: rho}))
                v2 = float(evaluate_numpy(scaled, {a: 2.6, b: 1.6, _RHO: rho}))
        except (NotImplementedError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        if np.isfinite(v1) and np.isfinite(v2) and v1 != 0 and v2 / v1 > 0:
            twice = 2 * math.log(v2 / v1) / math.log(4.0)
            if abs(twice - round(twice)) > 1e-9:
                return None
            degree = sp.Rational(round(twice), 2)
            break
    if degree is None:
        return None
    quotient = _split_roots(scaled) / (a * b) ** degree
    form = sp.expand(quotient, deep=False, mul=True, multinomial=False, power_exp=False,
                     power_base=False, log=False)
    if form.free_symbols & {a, b}:
        form = sp.simplify(form)
        if form.free_symbols & {a, b}:
            return None
    k11, k12, k22 = _probe_points()
    rebuilt = (S.K11 * S.K22) ** (degree / 2) * form.xreplace({_RHO: S.K12 / sp.sqrt(S.K11 * S.K22)})
    if not _same_values(rebuilt, expr, {S.K11: k11, S.K12: k12, S.K22: k22}):
        return None
    return _Homogeneous(degree, form)


def _branch_arguments(expr: sp.Expr):
    """Arguments that make ``expr`` singular where they reach a boundary: (arg, kind) with kind
    'unit' for arccos/arcsin (singular at +-1) and 'zero' for fractional or negative powers."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.acos, sp.asin)):
            yield node.args[0], "unit"
        elif node.is_Pow and node.exp.is_number and not (node.exp.is_Integer and node.exp >= 0):
            yield node.base, "zero"


def _singular_at(expr: sp.Expr, substitution: dict, values: dict) -> bool:
    """Whether ``expr`` has a branch point where ``substitution`` holds (checked at ``values``)."""
    for arg, kind in _branch_arguments(expr):
        if not arg.free_symbols & set(substitution):
            continue
        at = arg.xreplace(substitution)
        try:
            with np.errstate(all="ignore"):
                v = np.asarray(evaluate_numpy(at, values), dtype=float)
        except (NotImplementedError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return True
        target = 1.0 if kind == "unit" else 0.0
        magnitude = np.abs(v)
        close = np.abs(magnitude - target) <= 1e-12 * np.maximum(magnitude, 1.0)
        if np.any(~np.isfinite(v)) or np.any(close):
            return True
    return False


def _boundary_value(form: sp.Expr, sign: int) -> sp.Expr | None:
    """form(rho = sign) when finite, else None."""
    value = form.xreplace({_RHO: sp.Integer(sign)})
    if value.has(sp.zoo, sp.nan, sp.oo, sp.S.NegativeInfinity) or value.free_symbols:
        return None
    return value


@dataclass(frozen=True)
class _Factor:
    """One separable term c p(z1) q(z2) of a node's integrand; p, q index :attr:`_Plan.functions`
    (None for a constant factor)."""

    coefficient: float
    p: int | None
    q: int | None


@dataclass(frozen=True)
class _MehlerNode:
    """A two-input quadrature node evaluated by Mehler's expansion."""

    symbol: sp.Symbol
    terms: tuple[_Factor, ...]


def _parity(f: sp.Expr) -> int:
    """+1 if f(-z) = f(z), -1 if f(-z) = -f(z), 0 otherwise (decided symbolically)."""
    mirrored = f.xreplace({S.z: -S.z})
    for sign in (1, -1):
        difference = sp.simplify(mirrored - sign * f)
        if difference == 0:
            return sign
    return 0


def _separate(integrand: sp.Expr, z1: sp.Symbol, z2: sp.Symbol):
    """[(c, p(z), q(z))] with integrand = sum c p(z1) q(z2), or None if it does not separate."""
    pieces = sp.separatevars(integrand, [z1, z2], dict=True)
    terms = [integrand] if pieces is not None else sp.Add.make_args(sp.expand(integrand))
    out = []
    for term in terms:
        pieces = sp.separatevars(term, [z1, z2], dict=True)
        if pieces is None or not pieces["coeff"].is_number:
            return None
        out.append((float(pieces["coeff"]), pieces[z1].xreplace({z1: S.z}), pieces[z2].xreplace({z2: S.z})))
    return out


def _mehler_nodes(expr: sp.Expr, functions: list, nodes: dict) -> sp.Expr:
    """Replace every separable node <f(z1, z2)> taken at (K11, K12, K22) by a symbol (recorded in
    ``nodes``, with its factor functions added to ``functions``)."""
    def replace(node):
        if node in nodes:
            return nodes[node].symbol
        if node.dimension != 2 or tuple(node.covariance_args) != (S.K11, S.K12, S.K22):
            return node
        lam = node.integrand
        if lam.expr.free_symbols - set(lam.variables):
            return node
        separated = _separate(lam.expr, *lam.variables)
        if separated is None:
            return node
        terms = []
        for c, p, q in separated:
            ids = []
            for f in (p, q):
                if not f.has(S.z):
                    c *= float(f)
                    ids.append(None)
                    continue
                if f not in functions:
                    functions.append(f)
                ids.append(functions.index(f))
            terms.append(_Factor(c, *ids))
        symbol = sp.Dummy(f"node{len(nodes)}", real=True)
        nodes[node] = _MehlerNode(symbol, tuple(terms))
        return symbol

    return expr.replace(lambda e: isinstance(e, GaussianExpectation), replace)


def _worth_hoisting(e: sp.Basic) -> bool:
    return any(isinstance(n, (sp.Function, GaussianExpectation))
               or (n.is_Pow and not (n.exp.is_Integer and n.exp >= 0))
               for n in sp.preorder_traversal(e))


def _hoist(expr: sp.Expr, hoisted: dict) -> sp.Expr:
    """Replace maximal subexpressions of K11 alone (or K22 alone) that cost more than arithmetic by
    symbols; ``hoisted`` maps each K11-expression to its (row symbol, column symbol). The K22
    version of a K11-expression h(K11) is h(K22), so both sides share one per-row table."""
    def walk(e):
        free = e.free_symbols
        for own in (S.K11, S.K22):
            if free == {own} and not e.is_Symbol and _worth_hoisting(e):
                as_row = e if own is S.K11 else e.xreplace({S.K22: S.K11})
                if as_row not in hoisted:
                    i = len(hoisted)
                    hoisted[as_row] = (sp.Dummy(f"row{i}", real=True), sp.Dummy(f"col{i}", real=True))
                return hoisted[as_row][0 if own is S.K11 else 1]
        if e.is_Atom or isinstance(e, GaussianExpectation) or not e.args:
            return e
        args = tuple(walk(a) for a in e.args)
        return e if args == e.args else e.func(*args)

    return walk(expr)


def _on_diagonal(expr: sp.Expr) -> sp.Expr:
    """``expr`` at K11 = K12 = K22 = K. Two-input nodes at (K11, K12, K22) become one-input nodes
    of f(z, z) (at rho = 1 the tensor rule collapses to the one-dimensional rule exactly)."""
    def collapse(node):
        if node.dimension == 2 and tuple(node.covariance_args) == (S.K11, S.K12, S.K22):
            z1, z2 = node.integrand.variables
            f = node.integrand.expr.xreplace({z1: S.z, z2: S.z})
            return GaussianExpectation(sp.Lambda(S.z, f), S.K, node.args[-1])
        return node

    collapsed = expr.replace(lambda e: isinstance(e, GaussianExpectation), collapse)
    special = _at_correlation(collapsed, 1) if not collapsed.has(GaussianExpectation) else None
    base = collapsed if special is None else special
    return base.xreplace({S.K11: S.K, S.K12: S.K, S.K22: S.K})
