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
from derive.rules.layers import BK12, BTheta12, E, LayerRule, dsigma, find_layer_rule, sigma
from derive.symbolic.expectations import expect


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


def derive_maps(rule: LayerRule, values: dict[sp.Symbol, sp.Expr], act_sigma: sp.Expr | None = None,
                act_dsigma: sp.Expr | None = None, tol: float = 1e-11, numeric_subs: tuple = ()) -> LayerMaps:
    """The rule's maps with parameters ``values`` and every E(...) derived (module docstring).

    The one-input forms set K11 = K12 = K22 = K, Theta12 = Theta (and BK12 = BK, BTheta12 = BTheta);
    expectations there are derived as one-dimensional ones, <f(z) g(z)>_K. Parameters left without a
    value stay symbolic; ``numeric_subs`` ((symbol, value) pairs) then choose the order of any
    quadrature node.
    """
    where = f"layer '{rule.name}'"
    two, one = [], []
    single = {S.K11: S.K, S.K12: S.K, S.K22: S.K, S.Theta12: S.Theta, BK12: BK, BTheta12: BTheta}
    pair, alone = (S.z1, S.z2), {S.z1: S.z, S.z2: S.z}
    for expr in (rule.kernel, rule.ntk):
        bound = _bind_activation(expr.xreplace(values), act_sigma, act_dsigma, where)
        two.append(bound.replace(lambda e: isinstance(e, E), lambda e: expect(e.args[0], pair, tol, numeric_subs)))
        one_input = bound.replace(lambda e: isinstance(e, E),
                                  lambda e: expect(e.args[0].xreplace(alone), (S.z,), tol, numeric_subs))
        one.append(one_input.xreplace(single))
    return LayerMaps(two[0], two[1], one[0], one[1])


@lru_cache(maxsize=256)
def _activation_maps(sigma_expr: sp.Expr, dsigma_expr: sp.Expr, tol: float, numeric_subs: tuple) -> LayerMaps:
    return derive_maps(find_layer_rule("activation"), {}, sigma_expr, dsigma_expr, tol, numeric_subs)


def activation_maps(activation, tol: float = 1e-11, numeric: bool = True) -> LayerMaps:
    """The maps of an activation layer (rules/layers/activation.toml) for ``activation``: with
    ``numeric`` every parameter at its value or default, else the given values only (the others
    symbolic, their defaults choosing any quadrature order)."""
    if numeric:
        return _activation_maps(activation.sigma_numeric, activation.derivative(numeric=True), tol, ())
    subs = tuple(sorted(activation.defaults.items(), key=lambda kv: kv[0].name))
    return _activation_maps(activation.sigma, activation.derivative(), tol, subs)


def ntk_coefficient(ntk: sp.Expr, theta: sp.Symbol) -> sp.Expr:
    """c in an NTK map c * Theta (an elementwise layer's: no term without the input NTK)."""
    c = sp.diff(ntk, theta)
    if sp.expand(ntk - c * theta) != 0 or c.has(theta):
        raise RuleError(f"expected an NTK map linear in {theta} without a constant term, got {ntk}")
    return c


@lru_cache(maxsize=None)
def _dense_maps() -> LayerMaps:
    return derive_maps(find_layer_rule("dense"), {})


def after_dense(inner: sp.Expr, which: str, derivative: sp.Expr | None = None) -> sp.Expr:
    """The dense rule's map (rules/layers/dense.toml, parameters symbolic) after a layer whose output
    kernel entry is ``inner`` and whose NTK entry is ``derivative`` times the input's:
    ``which`` is "kernel" / "ntk" (two inputs) or "single_kernel" / "single_ntk" (one input)."""
    dense = _dense_maps()
    if which == "kernel":
        return dense.kernel.xreplace({S.K12: inner})
    if which == "ntk":
        return dense.ntk.xreplace({S.K12: inner, S.Theta12: derivative * S.Theta12})
    if which == "single_kernel":
        return dense.single_kernel.xreplace({S.K: inner})
    return dense.single_ntk.xreplace({S.K: inner, S.Theta: derivative * S.Theta})


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


__all__ = ["BK", "BTheta", "LayerMaps", "activation_maps", "after_dense", "derive_maps", "layer_maps", "ntk_coefficient"]
