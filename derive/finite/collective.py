"""Order-1/n statistics of channel means: the delta method behind every ``[finite_width]`` table.

At a Gaussian point z (width n: E[z_i z_j] = delta_ij (K + G1/n), Cov(z_i^2, z_j^2) = V/n for
i != j, PDLT ch. 4) the means over channels m_f = (1/n) sum_i f(z_i) of fixed functions satisfy, to
order 1/n,

    n Cov(m_f, m_g) = Cov_K(f, g) + r V d<f>/dK d<g>/dK
    n (E m_f - <f>_K) = r (G1 d<f>/dK + (V/2) d^2<f>/dK^2)

(the single-channel term, and the collective one through V; r = n / n_prev when V and G1 are
normalised by the previous width), with <.>_K the Gaussian expectation at variance K derived by the
expectation engine and the derivatives at a fixed function taken by Hermite weights,
d<f>/dK = <f (z^2 - K)>/(2K^2), d^2<f>/dK^2 = <f (z^4 - 6Kz^2 + 3K^2)>/(4K^4) (heat equation).

A layer's next conditional variance is a function F of such means, which may be nested (LayerNorm's
channel mean and variance inside a mean of sigma(LayerNorm(z))^2). Each mean m = mean g(z; m') gets
an influence function iota_m = g + sum <dg/dm'> iota_m' (its first-order change is
mean iota_m - <iota_m>) and a bias B_m = n (E m - <g>) that collects the terms above with the cross
and second-order terms of the inner means; then

    K' = F(<g>),  V' = n Var F = Var_K(iota_F) + r V (d<iota_F>/dK)^2,
    G1' = n (E F - K') = sum_a dF/dm_a B_a + (1/2) sum_ab d^2F/dm_a dm_b n Cov(m_a, m_b).

For a dense layer after sigma, F = C_b + C_W mean(sigma^2), this is PDLT's V' = C_W^2 Var(sigma^2)
+ r chi_par^2 V (eq. 4.90) and G1' = r [chi_par G1 + (C_W/8K^4) <sigma^2 (z^4 - 6Kz^2 + 3K^2)> V]
(eq. 4.115). Activations enter as act(k, d, u), the d-th almost-everywhere derivative of the k-th
activation of the run (the derivative backpropagation sees, as everywhere in derive).
"""

from __future__ import annotations

from functools import lru_cache

import sympy as sp

from derive.core import symbols as S
from derive.rules.layers import (
    FW_DRUN,
    FW_RUN,
    FW_SITES,
    FW_STATISTIC_OPERATORS,
    E,
    act,
    dK,
    find_layer_rule,
    mean,
    ncov,
)
from derive.symbolic.expectations import expect, tidy
from derive.symbolic.quadrature import GaussianExpectation

z, K, V, G1 = S.z, S.K, S.V, S.G1
r = S.r


# ------------------------------------------------------------------------------------------------
# Gaussian expectations at variance K of functions of one channel z


@lru_cache(maxsize=4096)
def _E(f: sp.Expr, tol: float) -> sp.Expr:
    """<f>_K, linear over the terms of f with their z-free factors outside the expectation."""
    if not f.has(z):
        return f
    # Coefficients that are expectations already (quadrature nodes) are constants here.
    held = {node: sp.Dummy("c", real=True) for node in sorted(f.atoms(GaussianExpectation), key=sp.default_sort_key)}
    by_function: dict = {}
    for term in sp.Add.make_args(sp.expand(f.xreplace(held))):
        coeff, dep = term.as_independent(z, as_Add=False)
        by_function[dep] = by_function.get(dep, sp.Integer(0)) + coeff
    out = sp.Add(*(coeff * _E1(dep, tol) for dep, coeff in by_function.items()))
    out = out.xreplace({d: node for node, d in held.items()})
    # Tidying (for display) a long sum of closed forms costs more than it is worth (minutes for the
    # covariance of two influence functions after LayerNorm); those are only evaluated.
    return tidy(out) if len(by_function) <= _TIDY_TERMS else out


#: Sums of at most this many expectations are tidied by :func:`_E`.
_TIDY_TERMS = 12


def _E1(f: sp.Expr, tol: float) -> sp.Expr:
    # A K inside f (LayerNorm's statistics at their infinite-width values) is a parameter of the
    # integrand; the quadrature order is chosen with it at 1 (the integrand is then at unit scale).
    return expect(f, (z,), tol, ((K, sp.Integer(1)),) if f.has(K) else ())


def _dE(f: sp.Expr, tol: float) -> sp.Expr:
    """d<f>_K/dK at fixed f (a K inside f is a parameter), by the Hermite weight."""
    return _E(f * (z**2 - K), tol) / (2 * K**2)


def _d2E(f: sp.Expr, tol: float) -> sp.Expr:
    return _E(f * (z**4 - 6 * K * z**2 + 3 * K**2), tol) / (4 * K**4)


def _cov(f: sp.Expr, g: sp.Expr, tol: float) -> sp.Expr:
    return _E(f * g, tol) - _E(f, tol) * _E(g, tol)


# ------------------------------------------------------------------------------------------------
# The delta method over nested channel means


def _top_means(expr: sp.Expr) -> list[sp.Expr]:
    """mean(...) nodes of ``expr`` not inside another mean, in a fixed order."""
    found: list[sp.Expr] = []

    def walk(e):
        if isinstance(e, mean):
            if e not in found:
                found.append(e)
            return
        for a in e.args:
            walk(a)

    walk(expr)
    return found


def _diff(expr: sp.Expr, *means) -> sp.Expr:
    """Partial derivative of ``expr`` with respect to some of its top-level means, the others held."""
    dummies = {m: sp.Dummy(f"m{i}") for i, m in enumerate(_top_means(expr))}
    out = sp.diff(expr.xreplace(dummies), *(dummies[m] for m in means))
    return out.xreplace({d: m for m, d in dummies.items()})


class _Collective:
    """Values, influence functions and biases of the means in one collective expression."""

    def __init__(self, activations: tuple, tol: float):
        self.activations, self.tol = activations, tol
        self._bar: dict = {}
        self._iota: dict = {}
        self._bias: dict = {}

    # activations: act(k, d, u) is the d-th almost-everywhere derivative of activation k at u
    def bind(self, e: sp.Expr) -> sp.Expr:
        def sub(node):
            k, d, u = node.args
            return self.activations[int(k)][int(d)].xreplace({z: u})

        return e.replace(lambda x: isinstance(x, act), sub)

    def bar(self, e: sp.Expr) -> sp.Expr:
        """``e`` with every mean replaced by its infinite-width value, activations bound."""
        means = _top_means(e)
        return self.bind(e.xreplace({m: self.mean_value(m) for m in means}))

    def mean_value(self, m) -> sp.Expr:
        if m not in self._bar:
            self._bar[m] = _E(self.bar(m.args[0]), self.tol)
        return self._bar[m]

    def iota(self, m) -> sp.Expr:
        """Influence function of the mean ``m`` = mean g(z; inner): g + sum <dg/dm'> iota_m'."""
        if m not in self._iota:
            g = m.args[0]
            out = self.bar(g)
            for inner in _top_means(g):
                out += _E(self.bar(_diff(g, inner)), self.tol) * self.iota(inner)
            self._iota[m] = out
        return self._iota[m]

    def ncov(self, f: sp.Expr, g: sp.Expr) -> sp.Expr:
        """n Cov(mean f, mean g) for fixed functions f, g of z."""
        return _cov(f, g, self.tol) + r * V * _dE(f, self.tol) * _dE(g, self.tol)

    def bias(self, m) -> sp.Expr:
        """n (E m - <g>) for the mean m = mean g(z; inner means)."""
        if m not in self._bias:
            g = m.args[0]
            gbar = self.bar(g)
            out = r * (G1 * _dE(gbar, self.tol) + V / 2 * _d2E(gbar, self.tol))
            inner = _top_means(g)
            for a in inner:
                dg = _diff(g, a)
                out += _E(self.bar(dg), self.tol) * self.bias(a) + self.ncov(self.bar(dg), self.iota(a))
                for b in inner:
                    d2 = _E(self.bar(_diff(g, a, b)), self.tol)
                    if d2 != 0:
                        out += d2 / 2 * self.ncov(self.iota(a), self.iota(b))
            self._bias[m] = out
        return self._bias[m]

    def influence(self, F: sp.Expr) -> sp.Expr:
        """The influence function of the statistic F(means): sum_a dF/dm_a iota_a."""
        return sp.expand(sum((self.bar(_diff(F, a)) * self.iota(a) for a in _top_means(F)), sp.Integer(0)))

    def diota(self, m) -> sp.Expr:
        """d iota_m / dz: the derivative of the mean's own function (its means held at their values),
        plus the inner means' through their weights; activations differentiated before binding."""
        g = m.args[0]
        held = g.xreplace({inner: self.mean_value(inner) for inner in _top_means(g)})
        out = self.bind(sp.diff(held, z))
        for inner in _top_means(g):
            out += _E(self.bar(_diff(g, inner)), self.tol) * self.diota(inner)
        return out

    def dz(self, F: sp.Expr) -> sp.Expr:
        """d iota_F / dz: n times the statistic's gradient in one channel, as a function of that channel."""
        return sp.expand(sum((self.bar(_diff(F, a)) * self.diota(a) for a in _top_means(F)), sp.Integer(0)))

    def collective(self, F: sp.Expr) -> dict:
        """K' = F(<g>), the influence function, n Var and n (E - K') of F(means)."""
        means = _top_means(F)
        value = self.bar(F)
        iota = sp.Integer(0)
        g1 = sp.Integer(0)
        for a in means:
            dF = self.bar(_diff(F, a))
            iota += dF * self.iota(a)
            g1 += dF * self.bias(a)
            for b in means:
                d2 = self.bar(_diff(F, a, b))
                if d2 != 0:
                    g1 += d2 / 2 * self.ncov(self.iota(a), self.iota(b))
        iota = sp.expand(iota)
        return {"K": value, "iota": iota, "V": self.ncov(iota, iota), "G1": g1}


def quadratic(iota: sp.Expr) -> bool:
    try:
        poly = sp.Poly(sp.expand(iota), z)
    except sp.PolynomialError:
        return False
    return all(d[0] in (0, 2) for d in poly.monoms())


@lru_cache(maxsize=512)
def segment_maps(F: sp.Expr, activations: tuple, tol: float, cross: bool) -> dict:
    """K', V', G1' (and for branches X, the cross with the skip, and J = dK'/dK) of a dense layer
    whose conditional variance is F, in K, V, G1, r."""
    c = _Collective(activations, tol)
    out = c.collective(F)
    if cross:
        out["X"] = _cov(z**2, out["iota"], tol) + r * V * _dE(out["iota"], tol)
        out["J"] = _dE(out["iota"], tol)
    return out


def channel_derivative(run: sp.Expr) -> sp.Expr:
    """d run / dz with the channel means in ``run`` held (the diagonal of the run's Jacobian; the
    means' own dependence on each channel is O(1/n) per entry, carried by the influence functions)."""
    held = {m: sp.Dummy(f"m{i}") for i, m in enumerate(_top_means(run))}
    return sp.diff(run.xreplace(held), z).xreplace({d: m for m, d in held.items()})


@lru_cache(maxsize=512)
def ntk_maps(maps: tuple, values: tuple, run: sp.Expr, activations: tuple, tol: float) -> dict:
    """A dense layer's ``[finite_width.ntk]`` (or ``.jacobian``) maps (rules/layers/dense.toml) after the
    run ``run`` (one channel of the last Gaussian point z, in act(k, d, z) and mean(...) nodes):
    parameters ``values`` ((symbol, value) pairs; the others stay symbolic) substituted, s = run(z)
    and ds = run'(z) bound (channel means held at their infinite-width values inside E(...)), and

        E(f)        <f>_K
        ncov(X, Y)  n Cov(X, Y) = Cov_K(iota_X, iota_Y) + r V d<iota_X>/dK d<iota_Y>/dK
        dK(X)       d<iota_X>/dK (the derivative of X's infinite-width value in K)
        dz(X)       d iota_X / dz

    for channel statistics X, Y (expressions in mean(...) of s and ds) with influence functions iota
    by the delta method over nested means (module docstring). Whether a map holds for a run with
    channel means is the rule's statement (``finite_width.ntk_after_means``); the caller asks only
    for those."""
    c = _Collective(activations, tol)
    bound = {FW_RUN: run, FW_DRUN: channel_derivative(run)}
    influence = {}

    def iota(X):
        if X not in influence:
            influence[X] = c.influence(X.xreplace(bound))
        return influence[X]

    def statistic(node):
        if isinstance(node, ncov):
            return c.ncov(iota(node.args[0]), iota(node.args[1]))
        if isinstance(node, dK):
            return _dE(iota(node.args[0]), tol)
        return c.dz(node.args[0].xreplace(bound))

    out = {}
    for key, expr in maps:
        expr = expr.xreplace(dict(values))
        expr = expr.replace(lambda e: isinstance(e, FW_STATISTIC_OPERATORS), statistic)
        out[key] = expr.replace(lambda e: isinstance(e, E), lambda e: _E(c.bar(e.args[0].xreplace(bound)), tol))
    return out


def activation_table(activation) -> tuple:
    """sigma and its almost-everywhere derivatives of orders 1 and 2, in z, for act(k, d, u)."""
    s, ds = activation.sigma_numeric, activation.derivative(numeric=True)
    d2s = sp.diff(ds, z).replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    return (s, ds, d2s)


def dense_after_activation(activation, tol: float) -> dict:
    """K', V', G1' of the dense rule after ``activation`` on a Gaussian point, in K, V, G1, r, C_W, C_b:
    the single-input dense-network recursions, derived from rules/layers/dense.toml."""
    F = find_layer_rule("dense").finite_width["variance"].xreplace({h: act(0, 0, z) for h in FW_SITES})
    return segment_maps(F, (activation_table(activation),), tol, False)


__all__ = ["activation_table", "channel_derivative", "dense_after_activation", "ntk_maps", "quadratic", "r",
           "segment_maps"]
