"""A layer rule's maps derived: parameters substituted and every E(...) a closed form or a quadrature node.

A rule (:mod:`derive.rules.layers`) states its kernel and NTK maps with the Gaussian expectation
operator ``E(f(z1, z2))`` and the activation's ``sigma``/``dsigma``; :func:`derive_maps` binds the
activation, substitutes the parameters and hands each expectation to the expectation engine
(:func:`derive.symbolic.expectations.gaussian_expectation`), once per integrand (one cache for the
whole engine). :func:`layer_maps` does it for a layer of an architecture description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from derive.arch.description import Layer
from derive.core import symbols as S
from derive.core.errors import DeriveError, RuleError
from derive.rules.layers import BK12, BTheta12, E, LayerRule, dsigma, sigma
from derive.symbolic.expectations import gaussian_expectation, tidy


@dataclass(frozen=True)
class LayerMaps:
    """One layer's derived maps, parameters substituted: two inputs and one input."""

    kernel: sp.Expr  # in K11, K12, K22 (and BK12, operators)
    ntk: sp.Expr  # in K11, K12, K22, Theta12 (and BK12, BTheta12, operators)
    single_kernel: sp.Expr  # in K (and BK)
    single_ntk: sp.Expr  # in K, Theta (and BK, BTheta)
    notes: tuple[str, ...] = field(default_factory=tuple)


BK = sp.Symbol("BK", positive=True)
BTheta = sp.Symbol("BTheta", nonnegative=True)


def _bind_activation(expr: sp.Expr, act_sigma: sp.Expr | None, act_dsigma: sp.Expr | None, where: str):
    def substitute(e):
        if isinstance(e, (sigma, dsigma)):
            if act_sigma is None:
                raise RuleError(f"{where}: the formula uses sigma but the layer has no activation")
            body = act_sigma if isinstance(e, sigma) else act_dsigma
            return body.xreplace({S.z: e.args[0]})
        return None

    return expr.replace(lambda e: isinstance(e, (sigma, dsigma)), substitute)


@lru_cache(maxsize=512)
def _expect2(integrand: sp.Expr, tol: float) -> sp.Expr:
    return tidy(gaussian_expectation(integrand, (S.z1, S.z2), tol=tol))


@lru_cache(maxsize=512)
def _expect1(integrand: sp.Expr, tol: float) -> sp.Expr:
    return tidy(gaussian_expectation(integrand.xreplace({S.z1: S.z, S.z2: S.z}), (S.z,), tol=tol))


def derive_maps(rule: LayerRule, values: dict[sp.Symbol, sp.Expr], act_sigma: sp.Expr | None = None,
                act_dsigma: sp.Expr | None = None, tol: float = 1e-11) -> LayerMaps:
    """The rule's maps with parameters ``values`` and every E(...) derived (module docstring).

    The one-input forms set K11 = K12 = K22 = K, Theta12 = Theta (and BK12 = BK, BTheta12 = BTheta);
    expectations there are derived as one-dimensional ones, <f(z) g(z)>_K.
    """
    where = f"layer '{rule.name}'"
    two, one = [], []
    single = {S.K11: S.K, S.K12: S.K, S.K22: S.K, S.Theta12: S.Theta, BK12: BK, BTheta12: BTheta}
    for expr in (rule.kernel, rule.ntk):
        bound = _bind_activation(expr.xreplace(values), act_sigma, act_dsigma, where)
        two.append(bound.replace(lambda e: isinstance(e, E), lambda e: _expect2(e.args[0], tol)))
        one_input = bound.replace(lambda e: isinstance(e, E), lambda e: _expect1(e.args[0], tol))
        one.append(one_input.xreplace(single))
    return LayerMaps(two[0], two[1], one[0], one[1])


@lru_cache(maxsize=None)
def layer_maps(layer: Layer, tol: float = 1e-11) -> LayerMaps:
    """The layer's maps with its parameter values substituted and every expectation derived
    (:func:`derive_maps`)."""
    sigma = dsigma = None
    if layer.activation is not None:
        act = layer.resolved_activation()
        sigma, dsigma = act.sigma_numeric, act.derivative(numeric=True)
    maps = derive_maps(layer.rule, layer.values(), sigma, dsigma, tol)
    for expr in (maps.kernel, maps.ntk):
        stray = {s.name for s in expr.free_symbols} - {"K11", "K12", "K22", "Theta12", "BK12", "BTheta12"}
        if stray:
            raise DeriveError(f"layer '{layer.type}': no value for {', '.join(sorted(stray))}")
    return maps


__all__ = ["BK", "BTheta", "LayerMaps", "derive_maps", "layer_maps"]
