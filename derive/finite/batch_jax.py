"""The multi-input four-point vertex and NLO kernel through depth, code-generated to JAX.

For N inputs, K = K^(l), r = n_l / n_{l-1}, s_a = sigma(z_a) and d_c = d/dz_c, the one-step maps
(PDLT eqs. 4.90 and 4.115 in their general, index-raised form, with the raised indices contracted
by Gaussian integration by parts, <(z_b1 z_b2 - K_b1b2) F>_K = sum_cd K_b1c K_b2d <d_c d_d F>_K;
Roberts, Yaida & Hanin 2022, ch. 4; Yaida 2019) are

    K'_ab             = C_b + C_W <s_a s_b>_K                                            (PDLT 4.118)
    V'_(a1a2)(a3a4)   = C_W^2 [<s_a1 s_a2 s_a3 s_a4>_K - <s_a1 s_a2>_K <s_a3 s_a4>_K]
                        + (r C_W^2 / 4) sum_{c} V_(c1c2)(c3c4) M_a1a2^c1c2 M_a3a4^c3c4
    G1'_ab            = r C_W [ (1/2) sum_{cd} G1_cd M_ab^cd + (1/8) sum_{c} V_(c1c2)(c3c4) M_ab^c1c2c3c4 ]

with V = G1 = 0 at layer 1 and M_ab^{c1..ck} = <d_c1 ... d_ck (s_a s_b)>_K, which vanishes unless
every c_i is a or b. Each sum therefore runs over the distinct tuples of the local indices {a, b}:
2^k of them for a != b and one for a = b. By Price's theorem (E = <s_1 s_2>_K in K11, K12, K22):

    M_ab^aa = 2 dE/dK11,  M_ab^ab = dE/dK12,  M_ab^bb = 2 dE/dK22,
    M_ab^aaaa = 4 d^2E/dK11^2,  M_ab^aaab = 2 d^2E/dK11 dK12,  M_ab^aabb = 4 d^2E/dK11 dK22,
    M_ab^abbb = 2 d^2E/dK12 dK22,  M_ab^bbbb = 4 d^2E/dK22^2,
    M_aa^aa = 2 d<s^2>_K/dK,  M_aa^aaaa = 4 d^2<s^2>_K/dK^2,

and on the diagonal the maps are the single-input ones, V' = C_W^2 (<s^4> - <s^2>^2) + r chi_par^2 V
and G1' = r chi_par G1 + (r C_W / 8) <(s^2)''''> V (PDLT 4.90, 4.115).

:func:`iterate_batch_jax` evaluates these exactly as :func:`derive.finite.batch.iterate_batch`
does, from the same SymPy coefficients (:func:`derive.finite.batch.batch_terms`), each compiled
once by :func:`derive.backends.codegen.to_jax`: the two-input ones are broadcast over all N x N entries
(K11 = K_aa, K12 = K_ab, K22 = K_bb), the single-input ones over the diagonal, and the local sums
are gathers over static index tables, vectorised over every pair and quadruple of inputs. The
four-point functions <s_a1 s_a2 s_a3 s_a4>_K come from the single-input form (one distinct input),
the two-input forms <s_a^p s_b^q>_K (two), and, on three or four distinct inputs, the rule of
:func:`derive.finite.moments.moment_rule`, evaluated by the same array-generic code as the NumPy
iteration (:func:`derive.finite.moments.distinct_moment` with ``xp = jax.numpy``): an exact reduction
to orthant probabilities for piecewise-polynomial activations (ReLU, leaky ReLU, |z|, step, ...;
error below 1e-13 of the moment's scale), a nested trapezoid rule in whitened coordinates for
smooth ones (tanh, erf, GELU, swish, ...; the order is chosen so that a one-dimensional probe at the
largest variance of the layer meets ``tol``, 1e-11 by default, and measured errors are 1e-10 or less),
and kink-aware Gauss-Legendre panels for other kinked ones (ELU, SELU). The host chooses the rule
and each layer's order before tracing, from the diagonal of K (the single-input recursion), exactly
as the NumPy iteration does; the scan switches between the orders it needs. The layers run in one
``lax.scan``; the iteration is one jitted function per activation, batch size and set of orders
(compiled once per depth; the hyperparameters, widths and each layer's choice of order are traced).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations, product

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jax import lax

from derive.backends.codegen import to_jax
from derive.backends.precision import float64, x64
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.finite.batch import BatchProfile, BatchTerms, batch_moment_rules, batch_terms, describe_rules
from derive.finite.moments import (
    SHIFT,
    SMOOTH_VAR,
    MomentRule,
    check_quad_order,
    distinct_moment,
    exact_moment,
    lower_triangular,
)
from derive.rules.activations import Activation
from derive.symbolic.quadrature import DEFAULT_TOL

__all__ = ["Coefficients", "coefficients", "four_point_table", "iterate_batch_jax"]

#: Number of times each batch iteration was traced, by (sigma(z), N, quadrature order).
TRACES: Counter = Counter()

#: Largest number of quadrature points (sub-covariances x grid points) evaluated at once.
MAX_GRID_ELEMENTS = 2**21

_PAIR_ARGS = (S.K11, S.K12, S.K22)


@dataclass(frozen=True)
class Coefficients:
    """The per-entry SymPy coefficients of the module docstring.

    In K11, K12, K22 (entry (a, b) at K11 = K_aa, K12 = K_ab, K22 = K_bb): ``E`` = <s_1 s_2>_K,
    ``M2`` = (M_ab^aa, M_ab^ab, M_ab^bb) and ``M4`` = (M_ab^aaaa, ..., M_ab^bbbb), indexed by the
    number of b's, and ``Q`` = (<s_1^3 s_2>_K, <s_1^2 s_2^2>_K, <s_1 s_2^3>_K), indexed by the power
    of s_2 minus one. In K (entry (a, a) at K = K_aa): ``s2`` = <s^2>_K, ``s4`` = <s^4>_K,
    ``M2_single`` = M_aa^aa and ``M4_single`` = M_aa^aaaa. ``sigma`` is sigma(z).
    """

    E: sp.Expr
    M2: tuple
    M4: tuple
    Q: tuple
    s2: sp.Expr
    s4: sp.Expr
    M2_single: sp.Expr
    M4_single: sp.Expr
    sigma: sp.Expr


def coefficients(terms: BatchTerms, sigma: sp.Expr) -> Coefficients:
    """The coefficients of the module docstring, read off the derivation's expressions."""
    dE, d2E, q = terms.pairs.dE, terms.pairs.d2E, terms.pairs.quartic
    return Coefficients(
        E=terms.E2,
        M2=(2 * dE["11"], dE["12"], 2 * dE["22"]),
        M4=(4 * d2E["11,11"], 2 * d2E["11,12"], 4 * d2E["11,22"], 2 * d2E["12,22"], 4 * d2E["22,22"]),
        Q=(q[(3, 1)], q[(2, 2)], q[(1, 3)]),
        s2=terms.s2, s4=terms.s4, M2_single=2 * terms.g1, M4_single=4 * terms.g2, sigma=sigma)


# ------------------------------------------------------------------------------------------------
# Static index tables (NumPy, built once per batch size at trace time)


@dataclass(frozen=True)
class _Local:
    """The distinct tuples c in {a, b}^k of every pair (a, b), as gathers.

    ``index[a, b, p, i]`` is c_i of pattern p (bit i of p chooses a or b); ``count[p]`` is the
    number of b's; ``first[p]`` marks the all-a pattern, the only one kept for a = b.
    """

    index: np.ndarray
    count: np.ndarray
    first: np.ndarray


@lru_cache(maxsize=None)
def _local(n: int, k: int) -> _Local:
    patterns = np.array(list(product((0, 1), repeat=k)), dtype=np.int64).reshape(-1, k)
    a = np.arange(n)[:, None, None, None]
    b = np.arange(n)[None, :, None, None]
    index = np.where(patterns[None, None] == 0, a, b)
    return _Local(index, patterns.sum(axis=1), np.all(patterns == 0, axis=1))


@dataclass(frozen=True)
class _Moments:
    """Where each of the N^4 four-point functions comes from.

    The candidates are laid out as [s4 on the diagonal (N) | Q[0] (N^2) | Q[1] (N^2) | Q[2] (N^2) |
    three distinct inputs | four distinct inputs]; ``source[a1, a2, a3, a4]`` indexes them.
    ``sets[d]`` are the sorted sets of d distinct inputs and ``powers[d]`` the exponent patterns
    quadrature evaluates for each set (``source`` enumerates set-major, pattern-minor).
    """

    source: np.ndarray
    sets: dict
    powers: dict


#: The power patterns of a four-point function on three and four distinct inputs.
_PATTERNS = {3: ((2, 1, 1), (1, 2, 1), (1, 1, 2)), 4: ((1, 1, 1, 1),)}


@lru_cache(maxsize=None)
def _moments(n: int) -> _Moments:
    powers = {d: np.array(p) for d, p in _PATTERNS.items()}
    sets = {d: np.array(list(combinations(range(n), d)), dtype=np.int64).reshape(-1, d) for d in (3, 4)}
    offset = {3: n + 3 * n * n}
    offset[4] = offset[3] + len(sets[3]) * len(powers[3])
    position = {d: {tuple(s): i for i, s in enumerate(sets[d].tolist())} for d in (3, 4)}
    source = np.empty((n,) * 4, dtype=np.int64)
    for idx in np.ndindex(*source.shape):
        distinct = sorted(set(idx))
        counts = tuple(idx.count(c) for c in distinct)
        if len(distinct) == 1:
            source[idx] = distinct[0]
        elif len(distinct) == 2:
            a, b = distinct
            source[idx] = n + (counts[1] - 1) * n * n + a * n + b
        else:
            d = len(distinct)
            pattern = [tuple(p) for p in powers[d].tolist()].index(counts)
            source[idx] = offset[d] + position[d][tuple(distinct)] * len(powers[d]) + pattern
    return _Moments(source, sets, powers)


# ------------------------------------------------------------------------------------------------
# The jitted iteration


def _root(cov):
    """Lower-triangular L with L L^T = cov: the Cholesky factor, or where cov is singular (including
    in floating point only: positive eigenvalues but a Cholesky breakdown) the triangular factor of
    the eigen-root, as in NumPy's rule (:func:`derive.finite.moments.lower_triangular`).

    Both factorisations read the lower triangle only, as LAPACK does through NumPy: a kernel from
    quadrature nodes is symmetric only to the quadrature error (entry (a, b) is evaluated at
    (K_aa, K_ab, K_bb), entry (b, a) at (K_bb, K_ab, K_aa)), and averaging the triangles would move
    the quadrature points by that much.
    """
    v, w = lax.linalg.eigh(cov, lower=True, symmetrize_input=False)
    chol = lax.linalg.cholesky(cov, symmetrize_input=False)
    definite = jnp.all(w > 0) & jnp.all(jnp.isfinite(chol))
    fallback = lower_triangular(jnp, v * jnp.sqrt(jnp.clip(w, 0.0, None)))
    return jnp.where(definite, chol, fallback)


def _grid_size(rule: MomentRule, d: int) -> int:
    """Quadrature points of one sub-covariance of d inputs under ``rule``."""
    if rule.kind == "trapezoid":
        return max(rule.order ** (d - 1), 4 * rule.order**2)
    levels = d - 1 if rule.smoothed is not None else d
    return 2 * d * rule.order * (3 * rule.order) ** (levels - 1)


def _distinct_moments(sigma: Callable, smoothed: Callable | None, rule: MomentRule, K, sets: np.ndarray,
                      powers: np.ndarray):
    """E[prod_i sigma(z_i)^p_i], z ~ N(0, K[set, set]), for every set and power pattern, by
    :func:`derive.finite.moments.distinct_moment`. Returns shape (len(sets) * len(powers),).

    The exact rule runs on all sets at once; the quadrature rules on :data:`MAX_GRID_ELEMENTS`
    points at a time.
    """
    patterns = [tuple(p) for p in powers.tolist()]
    if rule.kind == "exact":
        cov = K[sets[:, :, None], sets[:, None, :]]
        return jnp.stack([exact_moment(jnp, rule.pieces, cov, p) for p in patterns], axis=1).ravel()

    def moments(subset):
        cov = K[subset[:, None], subset[None, :]]
        return jnp.stack([distinct_moment(jnp, rule, sigma, smoothed, cov, p, _root) for p in patterns])

    per_batch = max(1, MAX_GRID_ELEMENTS // (_grid_size(rule, sets.shape[1]) * len(patterns)))
    return lax.map(moments, jnp.asarray(sets), batch_size=min(per_batch, len(sets))).ravel()


@lru_cache(maxsize=32)
def _table_program(sigma: sp.Expr, rule: MomentRule, d: int):
    """The jitted (K, sets of d inputs) -> :func:`_distinct_moments` over :data:`_PATTERNS` ``[d]``."""
    f = to_jax(sigma, (S.z,))
    smoothed = to_jax(rule.smoothed, (SHIFT, SMOOTH_VAR)) if rule.smoothed is not None else None
    powers = np.array(_PATTERNS[d])
    return jax.jit(lambda K, sets: _distinct_moments(f, smoothed, rule, K, sets, powers))


def four_point_table(sigma: sp.Expr, rule: MomentRule, K: np.ndarray) -> dict:
    """{sorted (a1, a2, a3, a4): <sigma_a1 sigma_a2 sigma_a3 sigma_a4>_K} on three or four distinct
    inputs by a quadrature ``rule``, where there are enough of them to pay for compiling
    (:func:`derive.finite.moments_jax.worth_compiling` on :func:`_grid_size` points); the others are
    left out. The values are :func:`_distinct_moments`', as in the jitted iteration, for
    :func:`derive.finite.batch.channel_means` outside it (the tensor form's channel means)."""
    from derive.finite.moments_jax import COMPILE_POINTS

    M = K.shape[0]
    table = {}
    with x64():
        for d, patterns in _PATTERNS.items():
            sets = np.array(list(combinations(range(M), d)), dtype=np.int64).reshape(-1, d)
            if rule.kind == "exact" or len(sets) * len(patterns) * _grid_size(rule, d) < COMPILE_POINTS:
                continue
            values = np.asarray(_table_program(sigma, rule, d)(jnp.asarray(K, dtype=jnp.float64), sets))
            for (s, p), v in zip(product(sets.tolist(), patterns), values.tolist()):
                table[tuple(sorted(c for c, k in zip(s, p) for _ in range(k)))] = v
    return table


@dataclass(frozen=True)
class _Compiled:
    E: Callable
    M2: tuple
    M4: tuple
    Q: tuple
    s2: Callable
    s4: Callable
    M2_single: Callable
    M4_single: Callable
    sigma: Callable


def _compile(c: Coefficients) -> _Compiled:
    def pair(e):
        return to_jax(e, _PAIR_ARGS)

    def single(e):
        return to_jax(e, (S.K,))

    return _Compiled(pair(c.E), tuple(map(pair, c.M2)), tuple(map(pair, c.M4)), tuple(map(pair, c.Q)),
                     single(c.s2), single(c.s4), single(c.M2_single), single(c.M4_single),
                     to_jax(c.sigma, (S.z,)))


def _local_coefficients(tables, diagonal, local: _Local, eye):
    """M_ab^{c(p)} for every pair and local pattern p, shape (N, N, 2^k): the pair tables by the
    number of b's off the diagonal; on it the single-input value for the all-a pattern, else 0."""
    off = jnp.stack(tables, axis=-1)[..., local.count]
    on = jnp.where(local.first, diagonal[:, None], 0.0)
    return jnp.where(eye[..., None], on[:, None, :], off)


def _layer(f: _Compiled, n: int, rules: tuple):
    """One step (K, V, G1) -> (K', V', G1') of the module docstring, for N = n inputs; the four-point
    functions on three or four distinct inputs by ``rules[which]`` (a switch when there are several)."""
    smoothed = to_jax(rules[0].smoothed, (SHIFT, SMOOTH_VAR)) if rules[0].smoothed is not None else None
    eye = np.eye(n, dtype=bool)
    l2, l4 = _local(n, 2), _local(n, 4)
    mom = _moments(n)

    def distinct(rule):
        def moments(K):
            return jnp.concatenate([_distinct_moments(f.sigma, smoothed, rule, K, mom.sets[d], mom.powers[d])
                                    for d in (3, 4) if len(mom.sets[d])])
        return moments

    def step(carry, r, which, C_W, C_b):
        K, V, G = carry
        kd = jnp.diagonal(K)
        k11, k22 = kd[:, None], kd[None, :]

        def on_pairs(fn):
            return fn(k11, K, k22)

        two = jnp.where(eye, f.s2(kd)[:, None], on_pairs(f.E))
        m2 = _local_coefficients([on_pairs(g) for g in f.M2], f.M2_single(kd), l2, eye)
        m4 = _local_coefficients([on_pairs(g) for g in f.M4], f.M4_single(kd), l4, eye)

        candidates = [f.s4(kd)] + [on_pairs(g).ravel() for g in f.Q]
        if n >= 3:
            branches = [distinct(rule) for rule in rules]
            candidates.append(branches[0](K) if len(branches) == 1 else lax.switch(which, branches, K))
        quartic = jnp.concatenate(candidates)[mom.source]
        gauss = quartic - two[:, :, None, None] * two[None, None, :, :]

        i = l2.index  # (N, N, 4, 2)
        V_local = V[i[:, :, None, None, :, None, 0], i[:, :, None, None, :, None, 1],
                    i[None, None, :, :, None, :, 0], i[None, None, :, :, None, :, 1]]
        mixed = jnp.einsum("abcdpq,abp,cdq->abcd", V_local, m2, m2)
        V_next = C_W**2 * gauss + r * C_W**2 / 4 * mixed

        acc2 = jnp.sum(m2 * G[i[..., 0], i[..., 1]], axis=-1)
        j = l4.index  # (N, N, 16, 4)
        acc4 = jnp.sum(m4 * V[j[..., 0], j[..., 1], j[..., 2], j[..., 3]], axis=-1)
        G_next = r * C_W * (acc2 / 2 + acc4 / 8)
        K_next = C_b + C_W * two
        return (K_next, V_next, G_next)

    return step


@lru_cache(maxsize=32)
def _program(c: Coefficients, n: int, rules: tuple) -> Callable:
    """The jitted iteration for one set of coefficients, batch size and set of distinct rules
    (hyperparameters, widths and each step's choice among the rules traced)."""
    step = _layer(_compile(c), n, rules)
    key = (c.sigma, n, tuple(rule.order for rule in rules))

    def run(K1, ratios, which, C_W, C_b):
        TRACES[key] += 1
        init = (K1, jnp.zeros((n,) * 4, K1.dtype), jnp.zeros((n, n), K1.dtype))

        def body(carry, xs):
            r, w = xs
            new = step(carry, r, w, C_W, C_b)
            return new, carry

        last, history = lax.scan(body, init, (ratios, which))
        return tuple(jnp.concatenate([h, x[None]]) for h, x in zip(history, last))

    return jax.jit(run)


@float64


def iterate_batch_jax(activation: Activation, inputs, depth: int, C_W: float, C_b: float, *, widths=None,
                      quad_order="auto", tol: float = DEFAULT_TOL) -> BatchProfile:
    """Multi-input K_ab, V_(a1a2)(a3a4) and G1_ab through ``depth`` layers, in generated JAX.

    The same maps, arguments and result as :func:`derive.finite.batch.iterate_batch` (see the
    module docstring for the formulas): K^(1) = C_b + C_W x x^T / d for inputs x of shape (N, d),
    V^(1) = G1^(1) = 0, r = n_l / n_{l-1} from ``widths`` (n_1..n_L; default uniform), and
    four-point functions on three or four distinct inputs by the rule of
    :func:`derive.finite.moments.moment_rule` (``quad_order``: "auto" or an integer). Float64
    throughout.

    Returns:
        :class:`~derive.finite.batch.BatchProfile` with K (L, N, N), V (L, N, N, N, N),
        G1 (L, N, N), index 0 = layer 1, and ``quadrature`` describing the rule.
    """
    from derive.core.inputs import check_inputs

    x = check_inputs(inputs)
    N = x.shape[0]
    if int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    depth = int(depth)
    check_quad_order(quad_order)
    n = np.broadcast_to(np.asarray(1.0 if widths is None else widths, dtype=float), (depth,)).astype(float)
    ratios = np.ones(depth - 1)
    ratios[1:] = n[1:depth - 1] / n[:depth - 2]
    terms = batch_terms(activation, tol)
    c = coefficients(terms, activation.sigma_numeric)
    K1 = C_b + C_W * x @ x.T / x.shape[1]
    rules = batch_moment_rules(activation, terms.s2, np.diag(K1).copy(), depth, C_W, C_b, quad_order, tol)
    distinct = tuple(sorted(set(rules), key=lambda rule: rule.order))
    which = np.array([distinct.index(rule) for rule in rules[:depth - 1]], dtype=np.int32)
    run = _program(c, N, distinct)
    K, V, G = run(K1, ratios, which, np.float64(C_W), np.float64(C_b))
    return BatchProfile(np.asarray(K), np.asarray(V), np.asarray(G), describe_rules(rules))
