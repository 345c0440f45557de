"""The symbolic verdict: claim - derivation brought to a canonical form on the domain and tested for zero,
then handed to ``simplify`` within a time budget."""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp

from derive.claims.budget import Timeout, deadline
from derive.claims.quantities import Quantity
from derive.core import symbols as S
from derive.symbolic.quadrature import GaussianExpectation

# ----------------------------------------------------------------------------------------------
# Symbolic verdict

_RHO = sp.Symbol("rho", real=True)
_THETA = sp.Symbol("theta", real=True)
_SIN = sp.Symbol("sin_theta", positive=True)  # sqrt(1 - rho^2) = sin(theta) >= 0


def _rationalise(expr: sp.Expr) -> sp.Expr:
    return sp.nsimplify(expr, rational=True) if expr.has(sp.Float) else expr


def _factor_radicals(expr: sp.Expr) -> sp.Expr:
    """Factor the base of every fractional power, so that positive factors leave the radical."""
    def fix(p):
        return sp.Pow(sp.factor(p.base), p.exp)

    return expr.replace(lambda e: e.is_Pow and e.exp.is_Rational and not e.exp.is_Integer, fix)


def canonical(expr: sp.Expr, two_input: bool, display: dict | None = None) -> sp.Expr:
    """``expr`` on the domain, in independent symbols where the domain allows.

    K12 = rho sqrt(K11 K22); arcsin(x) = pi/2 - arccos(x); trigonometric functions of sums and
    multiples expanded; radicals factored; each class of equal arccos arguments becomes one symbol
    (arccos(rho) -> theta), and (1 - rho^2)^(k/2) -> sin_theta^k with sin_theta = sqrt(1 - rho^2).
    """
    e = _rationalise(expr)
    if two_input:
        e = e.xreplace({S.K12: _RHO * sp.sqrt(S.K11 * S.K22)})
    e = e.replace(lambda x: isinstance(x, sp.asin), lambda x: sp.pi / 2 - sp.acos(x.args[0]))
    e = sp.expand_trig(e)
    e = _factor_radicals(e)
    classes: list[tuple[sp.Expr, sp.Symbol]] = []
    mapping = {}
    for atom in sorted(e.atoms(sp.acos), key=sp.default_sort_key):
        arg = sp.cancel(_factor_radicals(atom.args[0]))
        for other, sym in classes:
            if sp.cancel(arg - other) == 0:
                mapping[atom] = sym
                break
        else:
            sym = _THETA if arg == _RHO else sp.Dummy(f"theta_{len(classes) + 1}", real=True)
            classes.append((arg, sym))
            mapping[atom] = sym
    e = e.xreplace(mapping)
    if display is not None:
        display.update({sym: sp.acos(arg) for arg, sym in classes if sym is not _THETA})
    if two_input:
        one_minus = 1 - _RHO**2

        def is_sin_power(p):
            return (p.is_Pow and p.exp.is_Rational and p.exp.q == 2
                    and sp.expand(p.base - one_minus) == 0)

        e = e.replace(is_sin_power, lambda p: _SIN ** (2 * p.exp))
    return e


def _reduced_numerator(e: sp.Expr, two_input: bool) -> sp.Expr:
    """Numerator of ``e`` over a common denominator, expanded, reduced modulo sin_theta^2 = 1 - rho^2."""
    num = sp.expand(sp.numer(sp.together(e)))
    if two_input and num.has(_SIN):
        num = sp.expand(sp.rem(sp.Poly(num, _SIN), sp.Poly(_SIN**2 - (1 - _RHO**2), _SIN)).as_expr())
    return num


def _is_zero(e: sp.Expr, two_input: bool) -> bool:
    return _reduced_numerator(e, two_input) == 0


def _provably_nonzero(e: sp.Expr, two_input: bool) -> bool:
    """True when the reduced numerator is a non-zero polynomial in independent quantities.

    With K = c^2 (K11 = a^2, K22 = b^2) the square roots of variances disappear; what remains must be
    a polynomial in the variables, pi, theta = arccos(rho) and sin_theta (degree <= 1 after the
    reduction) with algebraic coefficients (no other function or constant), one of which is
    non-zero (to 50 digits). pi and theta are transcendental over the algebraic functions of the
    others and sqrt(1 - rho^2) is not a rational function of rho, so such a polynomial is a non-zero
    function on the domain (|rho| < 1 is an interval).
    """
    num = _reduced_numerator(e, two_input)
    if num == 0:
        return False
    roots = {k: sp.Dummy(f"sqrt_{k}", positive=True) for k in (S.K, S.K11, S.K22)}
    num = num.xreplace({k: v**2 for k, v in roots.items()}).xreplace({sp.pi: sp.Dummy("pi", positive=True)})
    if num.atoms(sp.Function) or num.atoms(sp.NumberSymbol):
        return False  # transcendental constants or functions: no independence argument
    symbols = sorted(num.free_symbols, key=sp.default_sort_key)
    if any(getattr(sym, "name", "").startswith("theta_") for sym in symbols):
        return False  # arccos of other arguments: possibly algebraically related
    if symbols and not num.is_polynomial(*symbols):
        return False
    coeffs = sp.Poly(num, *symbols).coeffs() if symbols else [num]
    return any(abs(sp.N(c, 50)) > 1e-30 for c in coeffs)


def _display(e: sp.Expr, angles: Mapping) -> sp.Expr:
    """A canonical residual with sin_theta shown as sin(theta) and other angles as arccos(...)."""
    return e.xreplace({_SIN: sp.sin(_THETA), **angles})


def symbolic_verdict(claim: sp.Expr, engine: sp.Expr, q: Quantity, budget: float = 10.0) -> dict:
    """Does claim - engine simplify to zero on the domain? ``equal``; ``not-equal`` when the residual is
    provably not identically zero (:func:`_provably_nonzero`); else ``undecided`` (no closed form, out
    of time, or a residual SymPy cannot decide)."""
    if engine.has(GaussianExpectation):
        return {"result": "undecided", "residual": None,
                "detail": "the derivation needs numerical quadrature (no closed form), so no symbolic "
                          "comparison"}
    how = ("canonical form (K12 = rho sqrt(K11 K22), theta = arccos(rho), sin(theta) = sqrt(1 - rho^2), "
           "|rho| <= 1, K11, K22 > 0)" if q.two_input else "canonical form (K > 0)")
    residual = None
    angles: dict = {}
    try:
        with deadline(budget):
            diff = sp.expand(claim - engine)
            if diff == 0:
                return {"result": "equal", "residual": "0", "detail": "claim - derivation expands to 0"}
            canon = canonical(claim - engine, q.two_input, angles)
            if _is_zero(canon, q.two_input):
                return {"result": "equal", "residual": "0", "detail": f"claim - derivation is 0 in {how}"}
            residual = sp.factor_terms(sp.together(canon))
            if sp.count_ops(canon) < 400:
                residual = sp.simplify(canon)
                if residual == 0 or _is_zero(residual, q.two_input):
                    return {"result": "equal", "residual": "0",
                            "detail": f"claim - derivation simplifies to 0 ({how}, then simplify)"}
    except Timeout:
        shown = None if residual is None else str(_display(residual, angles))
        return {"result": "undecided", "residual": shown,
                "detail": f"could not decide within the time budget of {budget:g} s"}
    except (TypeError, ValueError, NotImplementedError, AttributeError, sp.PolynomialError,
            RecursionError) as exc:
        return {"result": "undecided", "residual": None,
                "detail": f"SymPy could not simplify the difference ({type(exc).__name__})"}
    shown = str(_display(residual, angles))
    try:
        with deadline(budget):
            nonzero = _provably_nonzero(canon, q.two_input)
    except (Timeout, TypeError, ValueError, NotImplementedError, sp.PolynomialError):
        nonzero = False
    if nonzero:
        return {"result": "not-equal", "residual": shown,
                "detail": f"claim - derivation = {shown}, which is not identically zero"}
    return {"result": "undecided", "residual": shown,
            "detail": f"claim - derivation reduces to {shown}, which SymPy cannot show to vanish"}


