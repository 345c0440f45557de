"""Infinite-width layer recursions of a deep dense network: the kernel (NNGP) and the NTK.

For sigma from the rules, with <.>_K the Gaussian expectation (derive.symbolic.expectations):

    K^(l+1)_12     = C_b + C_W <sigma(z1) sigma(z2)>_{K^(l)}                      (PDLT eq. 4.118)
    Theta^(l+1)_12 = lambda_b + lambda_W <sigma(z1) sigma(z2)>_{K^(l)}
                     + C_W <sigma'(z1) sigma'(z2)>_{K^(l)} Theta^(l)_12          (PDLT eq. 8.63)

and for a single input K^(l+1) = C_b + C_W <sigma(z)^2>_{K^(l)}, Theta^(l+1) = lambda_b +
lambda_W <sigma^2>_K + C_W <sigma'^2>_K Theta^(l). sigma' is the almost-everywhere derivative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.rules.activations import Activation
from derive.symbolic.expectations import gaussian_expectation, tidy
from derive.symbolic.quadrature import DEFAULT_TOL, GaussianExpectation


@dataclass(frozen=True)
class KernelDerivation:
    """Everything derived for one activation at infinite width (see module docstring)."""

    activation: Activation
    expectation: sp.Expr
    derivative_expectation: sp.Expr
    single_expectation: sp.Expr
    single_derivative_expectation: sp.Expr
    tol: float = DEFAULT_TOL
    notes: list = field(default_factory=list)

    @property
    def recursion(self) -> sp.Expr:
        """K12 at layer l+1 in C_W, C_b, K11, K12, K22."""
        return S.C_b + S.C_W * self.expectation

    @property
    def ntk_recursion(self) -> sp.Expr:
        """Theta12 at layer l+1 in lambda_W, lambda_b, C_W, K11, K12, K22, Theta12."""
        return S.lambda_b + S.lambda_W * self.expectation + S.C_W * self.derivative_expectation * S.Theta12

    @property
    def single_input(self) -> sp.Expr:
        """K at layer l+1 in C_W, C_b, K."""
        return S.C_b + S.C_W * self.single_expectation

    @property
    def single_input_ntk(self) -> sp.Expr:
        """Theta at layer l+1 in lambda_W, lambda_b, C_W, K, Theta."""
        return S.lambda_b + S.lambda_W * self.single_expectation + S.C_W * self.single_derivative_expectation * S.Theta

    def nodes(self) -> list[GaussianExpectation]:
        """The numeric-quadrature nodes left in the derivation (empty when fully closed)."""
        out = []
        for e in (self.expectation, self.derivative_expectation, self.single_expectation,
                  self.single_derivative_expectation):
            out.extend(e.atoms(GaussianExpectation))
        return out

    @property
    def closed_form(self) -> bool:
        return not self.nodes()

    @property
    def quadrature_order(self) -> int | None:
        """Largest quadrature order (points per dimension) among the nodes, or None."""
        nodes = self.nodes()
        return max(n.order for n in nodes) if nodes else None

    def numeric(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every activation parameter replaced by its value (given or default)."""
        return expr.xreplace(self.activation.defaults)


def _pair(f: sp.Expr, g: sp.Expr) -> sp.Expr:
    return f.xreplace({S.z: S.z1}) * g.xreplace({S.z: S.z2})


@lru_cache(maxsize=256)
def _derive(sigma: sp.Expr, dsigma: sp.Expr, subs_items: tuple, tol: float):
    subs = dict(subs_items)
    two = tidy(gaussian_expectation(_pair(sigma, sigma), (S.z1, S.z2), tol=tol, numeric_subs=subs))
    dtwo = tidy(gaussian_expectation(_pair(dsigma, dsigma), (S.z1, S.z2), tol=tol, numeric_subs=subs))
    one = tidy(gaussian_expectation(sigma ** 2, (S.z,), tol=tol, numeric_subs=subs))
    done = tidy(gaussian_expectation(dsigma ** 2, (S.z,), tol=tol, numeric_subs=subs))
    return two, dtwo, one, done


def derive_kernel(activation: Activation, tol: float = DEFAULT_TOL) -> KernelDerivation:
    """Derive <sigma sigma>_K, <sigma' sigma'>_K (two inputs and one) for ``activation``.

    Parameters without a given value stay symbolic; their defaults are used only to choose the
    order of any quadrature node.
    """
    sigma = activation.sigma
    dsigma = activation.derivative()
    subs = tuple(sorted(activation.defaults.items(), key=lambda kv: kv[0].name))
    two, dtwo, one, done = _derive(sigma, dsigma, subs, tol)
    return KernelDerivation(activation, two, dtwo, one, done, tol)


def numeric_kernel_expressions(derivation: KernelDerivation) -> tuple[sp.Expr, sp.Expr]:
    """<sigma sigma>_K and <sigma' sigma'>_K with parameters at their values, ready for codegen."""
    e = derivation.numeric(derivation.expectation)
    d = derivation.numeric(derivation.derivative_expectation)
    free = (e.free_symbols | d.free_symbols) - {S.K11, S.K12, S.K22}
    if free:
        raise DeriveError(f"parameters without a value: {', '.join(sorted(map(str, free)))}")
    return e, d
