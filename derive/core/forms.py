"""Canonical forms of activations and integrands: kinks and piecewise functions as Heaviside steps.

:func:`rewrite_specials` writes Abs, sign, Max, Min and reflected steps as Heaviside steps of a
positive multiple of their argument (and, on request, sin, cos, sinh, cosh as exponentials), so that
the expectation engine (:mod:`derive.symbolic.expectations`) and the activation rules
(:mod:`derive.rules.activations`, the almost-everywhere derivative) see one form of every kink;
:func:`canonical` also expands the result, and :func:`chunks` splits a sum without expanding.
"""

from __future__ import annotations

import sympy as sp


def linear_in_one(arg: sp.Expr, variables) -> tuple[sp.Symbol, sp.Expr, sp.Expr] | None:
    """(v, c, d) with arg == c*v + d for exactly one variable v, else None."""
    used = [v for v in variables if arg.has(v)]
    if len(used) != 1:
        return None
    v = used[0]
    poly = sp.Poly(arg, v) if arg.is_polynomial(v) else None
    if poly is None or poly.degree() != 1:
        return None
    c, d = poly.all_coeffs()
    if c.has(*variables) or d.has(*variables):
        return None
    return v, c, d


def _canonical_step(arg: sp.Expr, variables) -> sp.Expr:
    lin = linear_in_one(arg, variables)
    if lin is None:
        return sp.Heaviside(arg)
    v, c, d = lin
    if c.is_positive:
        return sp.Heaviside(v + d / c)
    if c.is_negative:  # a reflected step, kept as such: 1 - Heaviside(v) would cancel against big terms
        return sp.Heaviside(-v - d / c)
    return sp.Heaviside(arg)


def canonical(expr: sp.Expr, variables) -> sp.Expr:
    """Rewrite ``expr`` into the canonical, expanded form the engine reduces (see module doc)."""
    variables = tuple(variables)
    out = sp.expand(rewrite_specials(expr, variables), power_exp=True, mul=True, multinomial=True,
                    power_base=False, log=False)
    # Steps are idempotent: Heaviside(x)**k == Heaviside(x) for k >= 1.
    return out.replace(lambda e: e.is_Pow and isinstance(e.base, sp.Heaviside) and e.exp.is_Integer
                       and e.exp > 0, lambda e: e.base)


def chunks(expr: sp.Expr) -> list[sp.Expr]:
    """Top-level summands of ``expr``, distributing a product over its direct sums only.

    Unlike ``sp.expand`` this leaves denominators and powers alone, so pieces stay as written.
    """
    if expr.is_Add:
        return [c for a in expr.args for c in chunks(a)]
    if expr.is_Mul:
        parts = [[]]
        for f in expr.args:
            opts = chunks(f) if f.is_Add else [f]
            parts = [p + [o] for p in parts for o in opts]
        return [sp.Mul(*p) for p in parts]
    return [expr]


def rewrite_specials(expr: sp.Expr, variables, exponentials: bool = True) -> sp.Expr:
    """Abs, sign, Max, Min, reflected steps -> Heaviside of a positive multiple; erfc -> 1 - erf;
    with ``exponentials``, sin, cos, sinh, cosh -> exp. Nothing is expanded."""
    variables = tuple(variables)

    def has_var(e):
        return any(e.has(v) for v in variables)

    def step(a):
        return _canonical_step(a, variables)

    def rewrite(e: sp.Expr) -> sp.Expr:
        if not isinstance(e, sp.Basic) or e.is_Atom or not has_var(e):
            return e
        args = [rewrite(a) for a in e.args]
        f = e.func
        if f is sp.Abs:
            (a,) = args
            return a * (2 * step(a) - 1)
        if f is sp.sign:
            (a,) = args
            return 2 * step(a) - 1
        if f is sp.Heaviside:
            return step(args[0])
        if f in (sp.Max, sp.Min):
            acc = args[0]
            for b in args[1:]:
                acc = acc + (b - acc) * (step(b - acc) if f is sp.Max else step(acc - b))
            return acc
        if f is sp.erfc:
            return 1 - sp.erf(args[0])
        if exponentials and f in (sp.sin, sp.cos, sp.sinh, sp.cosh) and args[0].is_polynomial(*variables):
            return f(args[0]).rewrite(sp.exp)
        return f(*args)

    return rewrite(expr)


__all__ = ["canonical", "chunks", "linear_in_one", "rewrite_specials"]
