"""Finite-width corrections of a batch: the tensor form of V and G1 through a dense network (NumPy).

For N inputs the four-point vertex V_(a1a2)(a3a4) and the NLO kernel G1_ab follow PDLT eqs. 4.90 and
4.115 in their index-raised form (see :func:`iterate_batch`); :mod:`derive.finite.batch_jax`
generates the same iteration as JAX, from the same coefficients (:func:`batch_terms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.core.display import markdown_table, upper_entries
from derive.core.errors import DeriveError
from derive.finite.moments import (
    MomentRule,
    NumpyMoments,
    _root,
    check_quad_order,
    diagonal_profile,
    distinct_moment,
    moment_rule,
)
from derive.finite.single import single_expectations
from derive.rules.activations import Activation
from derive.symbolic.expectations import expect
from derive.symbolic.numeric import evaluate
from derive.symbolic.quadrature import DEFAULT_TOL


@dataclass(frozen=True)
class BatchExpectations:
    """Two-input Gaussian expectations (SymPy in K11, K12, K22) the batch recursions need.

    ``E`` = <sigma(z1) sigma(z2)>_K and its K-derivatives of order 1 and 2 give every
    <sigma^(i)(z1) sigma^(j)(z2)>_K with i + j <= 4 by Price's theorem (d/dK11 = <d1^2>/2,
    d/dK12 = <d1 d2>, d/dK22 = <d2^2>/2); ``quartic[(p, q)]`` = <sigma(z1)^p sigma(z2)^q>_K for
    p + q = 4 (four-point functions on two distinct inputs).
    """

    E: sp.Expr
    dE: dict
    d2E: dict
    quartic: dict


def _pair(f: sp.Expr, g: sp.Expr) -> sp.Expr:
    """f(z1) g(z2) for f, g in z."""
    return f.xreplace({S.z: S.z1}) * g.xreplace({S.z: S.z2})


@lru_cache(maxsize=32)
def _batch_expectations(sigma: sp.Expr, tol: float) -> BatchExpectations:
    K11, K12, K22 = S.K11, S.K12, S.K22
    E = expect(_pair(sigma, sigma), (S.z1, S.z2), tol)
    keys = {"11": K11, "12": K12, "22": K22}
    dE = {k: sp.diff(E, v) for k, v in keys.items()}
    d2E = {a + "," + b: sp.diff(E, keys[a], keys[b]) for a in keys for b in keys}
    quartic = {}
    for p, q in ((2, 2), (3, 1), (1, 3)):
        quartic[(p, q)] = expect(_pair(sigma**p, sigma**q), (S.z1, S.z2), tol)
    return BatchExpectations(E, dE, d2E, quartic)


def batch_expectations(activation: Activation, tol: float = DEFAULT_TOL) -> BatchExpectations:
    return _batch_expectations(activation.sigma_numeric, tol)


@dataclass(frozen=True)
class BatchTerms:
    """Every SymPy coefficient of the batch recursions (parameters at their values).

    ``pairs`` holds the two-input expectations in K11, K12, K22 (:class:`BatchExpectations`) and
    ``E2`` = <sigma(z1) sigma(z2)>_K as the kernel derivation writes it; the single-input ones are
    in K: ``s2`` = <sigma^2>_K, ``s4`` = <sigma^4>_K, ``g1`` = d<sigma^2>_K/dK and
    ``g2`` = d^2<sigma^2>_K/dK^2 (so <d^2 sigma^2/dz^2>_K = 2 g1, <d^4 sigma^2/dz^4>_K = 4 g2).
    """

    pairs: BatchExpectations
    E2: sp.Expr
    s2: sp.Expr
    s4: sp.Expr
    g1: sp.Expr
    g2: sp.Expr


_BATCH_TERMS: dict = {}


def batch_terms(activation: Activation, tol: float = DEFAULT_TOL) -> BatchTerms:
    """The coefficients :func:`iterate_batch` evaluates (and the JAX batch iteration compiles); derived
    once per activation function and tolerance (a transformer's blocks share them)."""
    key = (activation.sigma_numeric, tol)
    if key not in _BATCH_TERMS:
        if len(_BATCH_TERMS) >= 32:
            _BATCH_TERMS.pop(next(iter(_BATCH_TERMS)))
        _BATCH_TERMS[key] = _batch_terms(activation, tol)
    return _BATCH_TERMS[key]


def _batch_terms(activation: Activation, tol: float) -> BatchTerms:
    from derive.symbolic.recursions import derive_kernel

    # The single-input expectations only (the same ones finite_width_maps holds, not its NTK maps).
    e = single_expectations(activation.sigma_numeric, activation.derivative(numeric=True), tol)
    s2 = e["s2"]
    d = derive_kernel(activation, tol)
    return BatchTerms(batch_expectations(activation, tol), d.numeric(d.expectation), s2,
                      e["s4"], sp.diff(s2, S.K), sp.diff(s2, S.K, 2))


def _pair_values(expr: sp.Expr, k11, k12, k22):
    with np.errstate(all="ignore"):
        return float(evaluate(expr, {S.K11: k11, S.K12: k12, S.K22: k22}))


def _derivative_table(bx: BatchExpectations, single: dict, K: np.ndarray, a: int, b: int) -> dict:
    """<d_a^i d_b^j (sigma_a sigma_b)>_K for i + j in {2, 4}, keyed by the multiset of indices."""
    if a == b:
        k = K[a, a]
        g1 = float(evaluate(single["g1"], {S.K: k}))
        g2 = float(evaluate(single["g2"], {S.K: k}))
        return {2: {(a, a): 2 * g1}, 4: {(a, a, a, a): 4 * g2}}
    v = (K[a, a], K[a, b], K[b, b])
    d1 = {k: _pair_values(e, *v) for k, e in bx.dE.items()}
    d2 = {k: _pair_values(e, *v) for k, e in bx.d2E.items()}
    two = {(a, a): 2 * d1["11"], (a, b): d1["12"], (b, b): 2 * d1["22"]}
    four = {(a, a, a, a): 4 * d2["11,11"], (a, a, a, b): 2 * d2["11,12"], (a, a, b, b): 4 * d2["11,22"],
            (a, b, b, b): 2 * d2["12,22"], (b, b, b, b): 4 * d2["22,22"]}
    return {2: two, 4: four}


def _lookup(table: dict, idx: tuple) -> float:
    return table[tuple(sorted(idx))] if tuple(sorted(idx)) in table else table[tuple(sorted(idx, reverse=True))]


def _four_point(bx: BatchExpectations, single_s4: sp.Expr, K: np.ndarray, idx: tuple, rule: MomentRule,
                numeric: NumpyMoments) -> float:
    """<sigma_a1 sigma_a2 sigma_a3 sigma_a4>_K: closed/two-input forms when at most two inputs are
    distinct, :func:`distinct_moment` over the distinct inputs otherwise."""
    distinct = sorted(set(idx))
    if len(distinct) == 1:
        return float(evaluate(single_s4, {S.K: K[idx[0], idx[0]]}))
    if len(distinct) == 2:
        a, b = distinct
        p = idx.count(a)
        v = (K[a, a], K[a, b], K[b, b])
        if p == 2:
            return _pair_values(bx.quartic[(2, 2)], *v)
        return _pair_values(bx.quartic[(3, 1)] if p == 3 else bx.quartic[(1, 3)], *v)
    cov = K[np.ix_(distinct, distinct)]
    with np.errstate(all="ignore"):
        return float(distinct_moment(np, rule, numeric.sigma, numeric.smoothed, cov,
                                     tuple(idx.count(c) for c in distinct), _root))


@dataclass
class ChannelMeans:
    """P_st = mean_i sigma(z_is) sigma(z_it) over the channels of a Gaussian point (K, V, G1) of width
    n, to order 1/n: ``value`` <s_s s_t>_K, ``cov`` n Cov(P_st, P_uv), ``bias`` n (E P_st - <s_s s_t>)
    (the formulas in :func:`iterate_batch`), and with ``second`` the table
    ``second[s, t, c, d]`` = <d_c d_d (s_s s_t)>_K (zero unless c, d are in {s, t})."""

    value: np.ndarray
    cov: np.ndarray
    bias: np.ndarray
    second: np.ndarray | None = None


def channel_means(terms: BatchTerms, K: np.ndarray, V: np.ndarray, G: np.ndarray, r: float, rule: MomentRule,
                  numeric: NumpyMoments, second: bool = False, quartic: dict | None = None) -> ChannelMeans:
    """The statistics of the channel means of sigma sigma at a Gaussian point (:class:`ChannelMeans`);
    ``quartic`` four-point functions computed beforehand, by sorted quadruple of sites."""
    bx, E2, s2, s4 = terms.pairs, terms.E2, terms.s2, terms.s4
    single = {"g1": terms.g1, "g2": terms.g2}
    M = K.shape[0]
    pairs = [(a, b) for a in range(M) for b in range(M)]
    deriv = {(a, b): _derivative_table(bx, single, K, a, b) for a, b in pairs}
    two = np.empty((M, M))
    for a, b in pairs:
        two[a, b] = (float(evaluate(s2, {S.K: K[a, a]})) if a == b else _pair_values(E2, K[a, a], K[a, b], K[b, b]))
    cov = np.empty((M,) * 4)
    quartic = dict(quartic or {})
    for a1, a2, a3, a4 in np.ndindex(*cov.shape):
        key = tuple(sorted((a1, a2, a3, a4)))
        if key not in quartic:
            quartic[key] = _four_point(bx, s4, K, (a1, a2, a3, a4), rule, numeric)
        m12, m34 = deriv[(a1, a2)][2], deriv[(a3, a4)][2]
        acc = 0.0
        for c1 in {a1, a2}:
            for c2 in {a1, a2}:
                for c3 in {a3, a4}:
                    for c4 in {a3, a4}:
                        acc += V[c1, c2, c3, c4] * _lookup(m12, (c1, c2)) * _lookup(m34, (c3, c4))
        cov[a1, a2, a3, a4] = quartic[key] - two[a1, a2] * two[a3, a4] + r / 4 * acc
    bias = np.empty((M, M))
    table = np.zeros((M,) * 4) if second else None
    for a, b in pairs:
        m2, m4 = deriv[(a, b)][2], deriv[(a, b)][4]
        ids = {a, b}
        acc2 = sum(G[c, d] * _lookup(m2, (c, d)) for c in ids for d in ids)
        acc4 = sum(V[c1, c2, c3, c4] * _lookup(m4, (c1, c2, c3, c4))
                   for c1 in ids for c2 in ids for c3 in ids for c4 in ids)
        bias[a, b] = r * (acc2 / 2 + acc4 / 8)
        if second:
            for c in ids:
                for d in ids:
                    table[a, b, c, d] = _lookup(m2, (c, d))
    return ChannelMeans(two, cov, bias, table)


@dataclass(repr=False)
class BatchProfile:
    """Per-layer tensors (index 0 = layer 1): K (L, N, N), V (L, N, N, N, N), G1 (L, N, N), and how
    four-point functions on three or four distinct inputs were computed (:func:`describe_rules`)."""

    K: np.ndarray
    V: np.ndarray
    G1: np.ndarray
    quadrature: dict = field(default_factory=dict)

    def _rule(self) -> str:
        q = self.quadrature
        if not q:
            return ""
        orders = ", ".join(map(str, q.get("orders", [])))
        return f"{q.get('rule', '')} rule" + (f", orders {orders}" if orders else "")

    def __repr__(self) -> str:
        L, N = np.shape(self.K)[:2]
        rule = f"; {self._rule()}" if self.quadrature else ""
        return f"BatchProfile({L} layers, {N} inputs: K, G1 ({L}, {N}, {N}), V ({L}, {N}, {N}, {N}, {N}){rule})"

    def _repr_markdown_(self) -> str:
        L, N = np.shape(self.K)[:2]
        rows = [[l + 1, a, b, self.K[l, a, b], self.G1[l, a, b], self.V[l, a, b, a, b], self.V[l, a, a, b, b]]
                for l in range(L) for a, b in upper_entries(N)]
        rule = f" Four-point functions of three or four inputs: {self._rule()}." if self.quadrature else ""
        return "\n".join([
            f"**Finite-width corrections of a batch**: {N} inputs, {L} layers (PDLT eqs. 4.90, 4.115); "
            "$G^{\\{1\\}}_{ab}$ and $V_{(a_1a_2)(a_3a_4)}$ as coefficients of 1/n, two of $V$'s entries per pair "
            f"shown (`V` holds all {N**4} per layer).{rule}", "",
            markdown_table(["layer", "$a$", "$b$", "$K_{ab}$", "$G^{\\{1\\}}_{ab}$", "$V_{(ab)(ab)}$",
                            "$V_{(aa)(bb)}$"], rows)])


def batch_moment_rules(activation: Activation, s2: sp.Expr, k1: np.ndarray, depth: int, C_W: float,
                       C_b: float, quad_order="auto", tol: float = DEFAULT_TOL) -> tuple[MomentRule, ...]:
    """:func:`moment_rule` for each step of a batch iteration (entry l: the four-point functions of
    layer l + 1, l = 0 .. depth - 2; one entry when depth = 1), probed at that layer's largest K_aa
    from the single-input recursion (``s2`` = <sigma^2>_K), so the NumPy and JAX iterations choose
    the same rules. Batches of fewer than three inputs have no such functions: one rule throughout."""
    depth = int(depth)
    if len(k1) < 3 or depth < 2:
        return (moment_rule(activation, quad_order, 1.0, tol),) * max(depth - 1, 1)
    variances = diagonal_profile(s2, k1, depth, C_W, C_b)[:depth - 1].max(axis=1)
    return tuple(moment_rule(activation, quad_order, float(v), tol) for v in variances)


def describe_rules(rules: tuple) -> dict:
    """What :class:`BatchProfile` records: the rule, and the order and error estimate per step."""
    return {"rule": rules[0].kind, "orders": [r.order for r in rules],
            "error_estimates": [None if r.error is None else float(r.error) for r in rules],
            "smoothed_closed_form": rules[0].smoothed is not None}


def iterate_batch(activation: Activation, inputs, depth: int, C_W: float, C_b: float, *, widths=None,
                  quad_order="auto", tol: float = DEFAULT_TOL) -> BatchProfile:
    """Multi-input V_{(a1 a2)(a3 a4)} and G1_{ab} through depth (PDLT eqs. 4.90 and 4.115, with the
    raised indices contracted by Gaussian integration by parts).

    <(z_b1 z_b2 - K_b1b2) F>_K = sum_cd K_b1c K_b2d <d_c d_d F>_K turns the K^{-1}-raised sums of the
    reference recursion into lowered ones, so with f = sigma_a1 sigma_a2 and c's over {a1, a2}:

        V'_{(a1a2)(a3a4)} = C_W^2 [<s_a1 s_a2 s_a3 s_a4> - <s_a1 s_a2><s_a3 s_a4>]
                            + r C_W^2 / 4 sum_{c} V_{(c1c2)(c3c4)} <d_c1 d_c2 (s_a1 s_a2)> <d_c3 d_c4 (s_a3 s_a4)>
        G1'_{ab} = r C_W [ 1/2 sum_{cd} G1_{cd} <d_c d_d (s_a s_b)> + 1/8 sum_{c1..c4} V_{(c1c2)(c3c4)} <d^4 (s_a s_b)> ]

    On the diagonal (all indices equal) these are the single-input recursions. Four-point functions
    on three or four distinct inputs follow :func:`moment_rule` (``quad_order``: "auto" or an
    integer; see the section comment above :data:`MOMENT_HALF_WIDTH`): exact for piecewise-polynomial
    activations, a nested trapezoid rule meeting ``tol`` in its probe at each layer's largest variance
    for smooth ones, kink-aware Gauss-Legendre panels for other kinked ones. ``quadrature`` of the
    result describes the rule (:func:`describe_rules`).
    """
    from derive.core.inputs import check_inputs

    x = check_inputs(inputs)
    N = x.shape[0]
    if int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    n = np.broadcast_to(np.asarray(1.0 if widths is None else widths, dtype=float), (depth,)).astype(float)
    check_quad_order(quad_order)
    terms = batch_terms(activation, tol)
    s2 = terms.s2

    Ks = np.empty((depth, N, N))
    Vs = np.zeros((depth, N, N, N, N))
    Gs = np.zeros((depth, N, N))
    K = C_b + C_W * x @ x.T / x.shape[1]
    rules = batch_moment_rules(activation, s2, np.diag(K).copy(), depth, C_W, C_b, quad_order, tol)
    numeric = NumpyMoments(activation.sigma_numeric, rules[0].smoothed)
    V = np.zeros((N,) * 4)
    G = np.zeros((N, N))
    for layer in range(depth):
        Ks[layer], Vs[layer], Gs[layer] = K, V, G
        if layer == depth - 1:
            break
        r_ = n[layer] / n[layer - 1] if layer >= 1 else 1.0
        means = channel_means(terms, K, V, G, r_, rules[layer], numeric)
        two, newV, newG = means.value, C_W**2 * means.cov, C_W * means.bias
        K = C_b + C_W * two
        V, G = newV, newG
    return BatchProfile(Ks, Vs, Gs, describe_rules(rules))
