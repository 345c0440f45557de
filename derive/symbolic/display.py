"""Formulas as people read them: Gaussian integrals instead of quadrature nodes, rationals as rationals.

The JSON outputs keep SymPy's own text (``str``), which tools read back; the text outputs of the
``derive`` command print :func:`readable` instead:

- a quadrature node ``GaussianExpectation(Lambda(z, f), K, 129)`` prints as the integral it stands
  for, ``E[f; z ~ N(0, K)]`` (two inputs: ``E[f; (z1, z2) ~ N(0, [[K11, K12], [K12, K22]])]``);
  its LaTeX (``GaussianExpectation._latex``) is ``\\mathbb{E}_{z \\sim \\mathcal{N}(0, K)}[f]``;
- a float that is a small rational exactly (``1.0``, ``0.5``, ``0.16666666666666666`` = 1/6 in
  float64: the layer parameters of an architecture file) prints as that rational, so that
  ``1.0*K12`` reads ``K12``; other floats keep every digit (``1.0e-12``).
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.str import StrPrinter

from derive.core.display import exact_fraction


def rationalise(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every float that equals a small rational exactly (in float64,
    :func:`derive.core.display.exact_fraction`) replaced by that rational; the others kept."""
    if not isinstance(expr, sp.Basic):
        return expr
    swap = {}
    for f in expr.atoms(sp.Float):
        q = exact_fraction(f)
        if q is not None:
            swap[f] = sp.Rational(q.numerator, q.denominator)
    return expr.xreplace(swap) if swap else expr


class _Readable(StrPrinter):
    def _print_GaussianExpectation(self, e) -> str:
        f = self._print(e.integrand.expr)
        cov = [self._print(c) for c in e.covariance_args]
        if e.dimension == 1:
            return f"E[{f}; {self._print(e.integrand.variables[0])} ~ N(0, {cov[0]})]"
        z1, z2 = (self._print(v) for v in e.integrand.variables)
        return f"E[{f}; ({z1}, {z2}) ~ N(0, [[{cov[0]}, {cov[1]}], [{cov[1]}, {cov[2]}]])]"


def readable(expr) -> str:
    """Text of a formula for people (module docstring)."""
    if not isinstance(expr, sp.Basic):
        return str(expr)
    return _Readable({"order": None}).doprint(rationalise(expr))


__all__ = ["rationalise", "readable"]
