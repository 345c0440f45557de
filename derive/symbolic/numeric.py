"""Plain NumPy evaluation of SymPy trees, by walking the tree against a table of heads.

No code is generated or executed: :func:`evaluate` recurses over ``expr.func``/``expr.args`` and
calls the NumPy callable registered for each head. This is the reference the JAX code generator is
compared with, and what the engine uses for numeric work that must not import JAX (choosing a
quadrature order, evaluating a derivation in a symbolic command).
"""

from __future__ import annotations

import operator
from collections import ChainMap
from collections.abc import Callable, Mapping
from functools import reduce

import numpy as np
import sympy as sp


def _erf(x):
    from scipy import special  # imported on first use: it costs a fifth of a second at start-up

    return special.erf(x)


def _erfc(x):
    from scipy import special

    return special.erfc(x)


def _heaviside(x):
    return np.heaviside(x, 0.5)


def _pow(base, exponent):
    base = np.asarray(base, dtype=float)
    if np.ndim(exponent) == 0 and float(exponent) in (0.5, -0.5):
        root = np.sqrt(np.maximum(base, 0.0))
        return root if float(exponent) > 0 else 1.0 / root
    return np.power(base, exponent)


NUMPY_TABLE: Mapping[type, Callable] = {
    sp.Add: lambda *a: reduce(operator.add, a),
    sp.Mul: lambda *a: reduce(operator.mul, a),
    sp.Pow: _pow,
    sp.exp: np.exp,
    sp.log: np.log,
    sp.sin: np.sin,
    sp.cos: np.cos,
    sp.tan: np.tan,
    sp.sinh: np.sinh,
    sp.cosh: np.cosh,
    sp.tanh: np.tanh,
    sp.asin: lambda x: np.arcsin(np.clip(x, -1.0, 1.0)),
    sp.acos: lambda x: np.arccos(np.clip(x, -1.0, 1.0)),
    sp.atan: np.arctan,
    sp.atan2: np.arctan2,
    sp.erf: _erf,
    sp.erfc: _erfc,
    sp.Abs: np.abs,
    sp.sign: np.sign,
    sp.Heaviside: lambda x, *h: _heaviside(x),
    sp.Max: lambda *a: reduce(np.maximum, a),
    sp.Min: lambda *a: reduce(np.minimum, a),
    sp.DiracDelta: lambda x, *k: np.zeros_like(np.asarray(x, dtype=float)),
}


def stable_form(expr: sp.Expr) -> sp.Expr:
    """Rewrite inverse cosines and sines of ratios into ``atan2`` forms that stay accurate at |rho| = 1.

    acos(p/q) = atan2(sqrt(q^2 - p^2), p) and asin(p/q) = atan2(p, sqrt(q^2 - p^2)) for q > 0.
    With q^2 - p^2 expanded (K11*K22 - K12**2 for the arc-cosine kernels), the angle and the
    sqrt(1 - rho^2) terms of a kernel share one rounding, so their singular slopes cancel
    numerically as they do analytically; on the diagonal (K12 = K11 = K22) the angle is exactly 0
    instead of ~1e-8 from acos(1 - eps).
    """
    def rewrite(e):
        if isinstance(e, (sp.acos, sp.asin)) and not e.args[0].is_number:
            p, q = sp.fraction(sp.together(e.args[0]))
            if q.is_positive and p != 0:
                r = sp.sqrt(sp.expand(q**2 - p**2))
                return sp.atan2(r, p) if isinstance(e, sp.acos) else sp.atan2(p, r)
        return e

    return expr.replace(lambda e: isinstance(e, (sp.acos, sp.asin)), rewrite)


def evaluate(expr: sp.Expr, values: Mapping[sp.Symbol, object], table: Mapping[type, Callable] | None = None):
    """Evaluate ``expr`` with NumPy, symbols replaced by ``values`` (scalars or arrays).

    The expression is first put in :func:`stable_form`. A head with a ``numpy_value(walk)`` method
    evaluates itself (the numerical-quadrature nodes of :mod:`derive.symbolic.quadrature`, at their
    recorded order), so that this module needs to know none of them. Unknown heads raise
    ``NotImplementedError`` naming the head.

    With the default table the tree is read once into a program (its distinct subexpressions in
    evaluation order, numbers already converted) that later calls replay: the finite-width engine
    evaluates the same maps at every layer, thousands of times.
    """
    if not isinstance(expr, sp.Basic):
        return float(expr)
    stable = _stable(expr)
    if table is None:
        program = _PROGRAMS.get(stable)
        if program is None:
            program = _PROGRAMS[stable] = _compile(stable)
        return _run(program, values)
    tab = ChainMap(dict(table), dict(NUMPY_TABLE))
    cache: dict[sp.Basic, object] = {}

    def walk(e: sp.Basic):
        if e in cache:
            return cache[e]
        if e.is_Symbol:
            if e not in values:
                raise KeyError(f"no value given for symbol '{e}'")
            out = values[e]
        elif e.is_Number or e.is_NumberSymbol:
            out = float(e)
        elif hasattr(e.func, "numpy_value"):
            out = e.numpy_value(walk)
        else:
            fn = tab.get(e.func)
            if fn is None:
                raise NotImplementedError(f"no NumPy rule for SymPy head '{e.func.__name__}'")
            out = fn(*[walk(a) for a in e.args])
        cache[e] = out
        return out

    return walk(stable)


_PROGRAMS: dict = {}
_CONST, _SYMBOL, _CALL, _SELF = range(4)


def _compile(expr: sp.Basic) -> tuple:
    """The distinct subexpressions of ``expr`` in evaluation order: (kind, payload, argument indices)."""
    steps: list[tuple] = []
    index: dict[sp.Basic, int] = {}

    def visit(e: sp.Basic) -> int:
        found = index.get(e)
        if found is not None:
            return found
        if e.is_Symbol:
            step = (_SYMBOL, e, ())
        elif e.is_Number or e.is_NumberSymbol:
            step = (_CONST, float(e), ())
        elif hasattr(e.func, "numpy_value"):
            step = (_SELF, e, ())
        else:
            fn = NUMPY_TABLE.get(e.func)
            if fn is None:
                raise NotImplementedError(f"no NumPy rule for SymPy head '{e.func.__name__}'")
            step = (_CALL, fn, tuple(visit(a) for a in e.args))
        index[e] = len(steps)
        steps.append(step)
        return index[e]

    visit(expr)
    return tuple(steps)


def _run(program: tuple, values: Mapping[sp.Symbol, object]):
    out: list = [None] * len(program)
    for i, (kind, payload, args) in enumerate(program):
        if kind == _CALL:
            out[i] = payload(*[out[j] for j in args])
        elif kind == _CONST:
            out[i] = payload
        elif kind == _SYMBOL:
            if payload not in values:
                raise KeyError(f"no value given for symbol '{payload}'")
            out[i] = values[payload]
        else:
            out[i] = payload.numpy_value(lambda e: evaluate(e, values))
    return out[-1]


_STABLE_CACHE: dict = {}


def _stable(expr: sp.Expr) -> sp.Expr:
    if expr not in _STABLE_CACHE:
        _STABLE_CACHE[expr] = stable_form(expr)
    return _STABLE_CACHE[expr]
