"""Mehler's expansion of separable two-input quadrature nodes: per-row Hermite coefficients, the sum in
rho by Horner's rule, and the certified truncation order (:mod:`derive.kernels.gram`, item 6)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import jax.numpy as jnp
import numpy as np
from jax import lax

from derive.kernels.structure import _Factor, _MehlerNode

#: Bound on the relative Mehler tail, T / <p^2>, certified for every row and layer (float64).
MEHLER_TOL = 1e-12


#: The same for float32 (its coefficients carry ~1e-7 roundoff).
MEHLER_TOL_FLOAT32 = 1e-6


#: Horner steps per compiled loop body of a Mehler sum.
_HORNER_BLOCK = 16


#: Expansion orders tried, in increasing cost.
MEHLER_ORDERS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)


@lru_cache(maxsize=32)
def _hermite_rule(order: int, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes x_i, weights w_i (sum 1) for N(0, 1), and the table W_ki = w_i h_k(x_i),
    k < order, h_k = He_k / sqrt(k!). The h_k are evaluated as sqrt(w_i) h_k(x_i) (the normalised
    Hermite functions, bounded by 1) by their three-term recurrence, so nothing overflows."""
    from scipy.special import roots_hermitenorm

    x, w = roots_hermitenorm(points)
    w = w / w.sum()
    root_w = np.sqrt(w)
    table = np.empty((order, points))
    previous, current = np.zeros(points), root_w.copy()
    for k in range(order):
        table[k] = current * root_w
        previous, current = current, (x * current - math.sqrt(k) * previous) / math.sqrt(k + 1)
    return x, w, table


def _rule_points(order: int) -> int:
    return 2 * order


def _mehler_coefficients(functions: Sequence[Callable], K, rule):
    """Per-row Mehler coefficients P_k(K) (rows x order) of each factor function at variances K,
    with the relative tails (<p^2> - sum_k P_k^2) / <p^2> (rows)."""
    x, w, table = rule
    z = jnp.sqrt(K)[..., None] * x
    coefficients, tails = [], []
    for f in functions:
        values = f(z)
        c = jnp.matmul(values, table.T, precision=lax.Precision.HIGHEST)
        norm = jnp.sum(w * values * values, axis=-1)
        tail = norm - jnp.sum(c * c, axis=-1)
        tails.append(tail / jnp.maximum(norm, jnp.finfo(values.dtype).tiny))
        coefficients.append(c)
    return jnp.stack(coefficients, axis=-3), jnp.stack(tails, axis=-2)


def _mehler_sum(rho, node: _MehlerNode, row_coef, col_coef, parities, order: int):
    """sum_k rho^k sum_t c_t P_tk(a) Q_tk(b) over a tile, by Horner's rule in rho (or rho^2 when
    every term has a definite parity); constant factors contribute at k = 0 only.

    ``row_coef`` is (functions, rows, order); ``col_coef`` is (functions, order, columns), so that
    the values read along a tile row are contiguous (strided reads stop LLVM from vectorising).
    """
    total = jnp.zeros_like(rho)
    classes: dict[int, list[_Factor]] = {}
    for term in node.terms:
        if term.p is None or term.q is None:
            a = row_coef[term.p, :, 0][:, None] if term.p is not None else 1.0
            b = col_coef[term.q, 0, :][None, :] if term.q is not None else 1.0
            total = total + term.coefficient * a * b
            continue
        pp, pq = parities[term.p], parities[term.q]
        parity = pp * pq if pp and pq else 0
        if pp and pq and pp != pq:
            continue  # an even factor against an odd one: every coefficient product vanishes
        cls = 0 if parity == 0 else (2 if pp == 1 else 1)  # 2: even k, 1: odd k, 0: all k
        classes.setdefault(cls, []).append(term)
    for cls, terms in classes.items():
        start, step = {0: (0, 1), 1: (1, 2), 2: (0, 2)}[cls]
        ks = list(range(start, order, step))
        variable = rho if cls == 0 else rho * rho
        # Highest k first, in blocks of _HORNER_BLOCK steps (zero-padded in front): a scan over
        # the blocks keeps each compiled loop body small enough for LLVM to vectorise it.
        count = len(ks)
        pad = -count % _HORNER_BLOCK
        blocks = (count + pad) // _HORNER_BLOCK
        rows = jnp.stack([row_coef[t.p][:, start::step][:, ::-1] for t in terms])  # (terms, T, count)
        cols = jnp.stack([col_coef[t.q][start::step, :][::-1] for t in terms])  # (terms, count, T)
        rows = jnp.pad(rows, ((0, 0), (0, 0), (pad, 0))).reshape(len(terms), -1, blocks, _HORNER_BLOCK)
        cols = jnp.pad(cols, ((0, 0), (pad, 0), (0, 0))).reshape(len(terms), blocks, _HORNER_BLOCK, -1)
        weights = [t.coefficient for t in terms]

        def block(acc, coefficients):
            r, q = coefficients  # (terms, T, block), (terms, block, T)
            for j in range(_HORNER_BLOCK):
                c = 0
                for i, w in enumerate(weights):
                    c = c + w * r[i, :, j][:, None] * q[i, j, :][None, :]
                acc = acc * variable + c
            return acc, None

        acc, _ = lax.scan(block, jnp.zeros_like(rho), (jnp.moveaxis(rows, 2, 0), jnp.moveaxis(cols, 1, 0)))
        total = total + (rho * acc if cls == 1 else acc)
    return total
