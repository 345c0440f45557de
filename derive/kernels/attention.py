"""Self-attention with Gaussian logits: the expectations in its infinite-width kernel and NTK maps.

Scaled dot-product attention (``rules/layers/dot_product_attention.toml``) has, per head of
n_h = n / H channels, the logits

    l_a(s, t) = q_a(s) . k_a(t) / sqrt(n_h),   q = W_Q x,  k = W_K x,
    W_Q ~ N(0, C_Q / n_in),  W_K ~ N(0, C_K / n_in)  (independent),

for input a, query position s and key position t. They stay random at infinite width: by the
central limit theorem over the n_h channels they become jointly Gaussian, with zero mean and

    Cov(l_a(s, t), l_b(s', t')) = c K_ab(s, s') K_ab(t, t'),   c = C_Q C_K,               (1)

K the layer input's kernel (Hron, Bahri, Sohl-Dickstein & Novak 2020, "Infinite attention",
arXiv:2006.10540, sec. 3; the same Gaussian law per head, independent across heads). The values
v = W_V x are independent of the logits, so with attention weights f_a(s, .) = softmax(l_a(s, .))
(or f = l, the "identity" mechanism) the output kernel averaged over the logits is
C_b + C_O C_V mean_attend(K), where for a matrix X over (input, position) pairs

    mean_attend(X)_{(a,s),(b,s')} = sum_(t, t') E[f_a(s, t) f_b(s', t')] X_ab(t, t').          (2)

The NTK gains the query and key weights' share, through their own gradients and through the
input's NTK: with the Jacobian J_a(s; t, u) = d f_a(s, t) / d l_a(s, u),

    logit_response(X, Y)_{(a,s),(b,s')} = sum_(t, t', u, u') E[J_a(s; t, u) J_b(s'; t', u')]
                                           X_ab(t, t') Y_ab(u, u'),                            (3)

entering as C_O C_V [(lambda_Q C_K + C_Q lambda_K) K + C_Q C_K Theta] logit_response(K, K)
+ C_O C_V C_Q C_K K logit_response(K, Theta) (the rule's ``ntk`` map): each weight matrix's
gradient is the logit Jacobian times x_a(s) . x_b(s') or k . k, whose channel sums self-average.
For the identity mechanism (2) and (3) are closed forms, c K_ab(s, s') sum_(t,t') K_ab(t,t')
X_ab(t,t') and sum_(t,t') X_ab(t,t') Y_ab(t,t'), which Neural Tangents also implements
(``GlobalSelfAttention(linear_scaling=False, attention_mechanism="IDENTITY")``).

For softmax the expectations have no closed form. For each pair of rows (a, s), (b, s') the 2T
logits l_a(s, .), l_b(s', .) are drawn as L xi from the covariance (1), xi standard normal at
``points`` quasi-Monte Carlo points (scrambled Sobol, Owen 1995, mapped by the normal quantile;
fixed seed, so the result is deterministic). Softmax does not change when a constant is added to
its logits, so the covariance is first projected on the zero-sum logits of each query (a rank two
lower), and the factor L = U diag(sqrt(w)) takes its eigenvectors in decreasing order of w, so
the directions that matter get the first, best distributed Sobol coordinates. Per point, with
p = f_a(s, .) and p' = f_b(s', .) and J = diag(p) - p p^T,

    p^T X p',
    p^T (X o Y) p' - sum_u p_u (X p')_u (Y p')_u - sum_u p'_u (X^T p)_u (Y^T p)_u
        + (p^T X p') (p^T Y p')                                            (J X J' contracted with Y)

are averaged. Both maps are symmetric for symmetric X, Y (entry ((b,s'),(a,s)) is entry
((a,s),(b,s'))), so only pairs on and above the diagonal are integrated. The error relative to
the largest entry, measured against independent quadratures (tests/test_attention.py: mpmath and
tensor trapezoid rules for two and three tokens, logit variances c K^2 up to ~5), is about 5e-6 to
1e-5 at the default 16384 points and 1e-6 at 65536; it falls roughly as 1 / points. The cost is
(N T)^2 / 2 pairs times ``points`` evaluations of two softmaxes over T keys.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from derive.arch.description import MECHANISMS, check_points
from derive.core.errors import DeriveError

#: Points integrated at once per pair of rows (the scan over points runs in blocks of this size).
POINT_BLOCK = 2048

#: Pairs of rows evaluated together (vmapped) in the map over pairs.
PAIR_BATCH = 8

#: Seed of the scrambled Sobol points (fixed: the maps are deterministic functions of K).
SOBOL_SEED = 20200611


@lru_cache(maxsize=16)
def gaussian_points(dim: int, count: int, seed: int = SOBOL_SEED) -> np.ndarray:
    """``count`` scrambled Sobol points of [0, 1)^dim mapped to N(0, I_dim) by the normal quantile."""
    from scipy.special import ndtri
    from scipy.stats import qmc

    u = qmc.Sobol(d=dim, scramble=True, seed=seed).random(count)
    tiny = np.finfo(np.float64).eps / 2
    return ndtri(np.clip(u, tiny, 1 - tiny))


def _zero_sum_projector(T: int, dtype) -> jax.Array:
    """Block-diagonal projector on logits that sum to zero over the keys of each of the two queries."""
    C = jnp.eye(T, dtype=dtype) - jnp.full((T, T), 1.0 / T, dtype)
    Z = jnp.zeros((T, T), dtype)
    return jnp.block([[C, Z], [Z, C]])


def _logit_factor(Kaa, Kab, Kbb, kaa, kab, kbb, c, softmax: bool):
    """L with L L^T = the covariance (1) of (l_a(s, .), l_b(s', .)), columns by decreasing variance."""
    top = jnp.concatenate([kaa * Kaa, kab * Kab], axis=1)
    bottom = jnp.concatenate([kab * Kab.T, kbb * Kbb], axis=1)
    cov = c * jnp.concatenate([top, bottom], axis=0)
    if softmax:
        P = _zero_sum_projector(Kaa.shape[0], cov.dtype)
        cov = P @ cov @ P
    cov = (cov + cov.T) / 2
    w, U = jnp.linalg.eigh(cov)
    return (U * jnp.sqrt(jnp.maximum(w, 0)))[:, ::-1]


def _softmax_pair_statistics(L, singles, pairs, xi_blocks):
    """Averages over the points of p^T X p' (each X in ``singles``) and of the contraction of J X J'
    with Y (each (X, Y) in ``pairs``), for logits L xi (module docstring)."""
    T = L.shape[0] // 2

    def block(acc, xi):
        logits = xi @ L.T
        p = jax.nn.softmax(logits[:, :T], axis=-1)
        q = jax.nn.softmax(logits[:, T:], axis=-1)
        out = []
        for X in singles:
            out.append(jnp.sum(jnp.einsum("kt,tu,ku->k", p, X, q)))
        for X, Y in pairs:
            Xq, Yq = q @ X.T, q @ Y.T  # (X p')_u per point
            Xp, Yp = p @ X, p @ Y  # (X^T p)_u per point
            pXq = jnp.sum(p * Xq, axis=-1)
            pYq = jnp.sum(p * Yq, axis=-1)
            value = (jnp.einsum("kt,tu,ku->k", p, X * Y, q) - jnp.sum(p * Xq * Yq, axis=-1)
                     - jnp.sum(q * Xp * Yp, axis=-1) + pXq * pYq)
            out.append(jnp.sum(value))
        return tuple(a + b for a, b in zip(acc, out)), None

    zero = tuple(jnp.zeros((), L.dtype) for _ in range(len(singles) + len(pairs)))
    total, _ = lax.scan(block, zero, xi_blocks)
    count = xi_blocks.shape[0] * xi_blocks.shape[1]
    return tuple(t / count for t in total)


def _blocks(X4, a, b):
    return X4[a, :, b, :]


def attention_statistics(K, N: int, T: int, c, *, mechanism: str, points: int, singles=(), pairs=()):
    """mean_attend(X) for X in ``singles`` and logit_response(X, Y) for (X, Y) in ``pairs``.

    Args:
        K: the layer input's kernel, (M, M) with M = N T rows (input a, position s) in row-major order.
        N, T: inputs and positions (tokens).
        c: C_Q C_K, the scale of the logit covariance (1).
        mechanism: "softmax" or "identity".
        points: quasi-Monte Carlo points per pair of rows (softmax).
        singles, pairs: (M, M) matrices, symmetric (kernels and NTKs).

    Returns:
        A list of (M, M) arrays, those of ``singles`` then those of ``pairs``.
    """
    M = N * T
    K4 = K.reshape(N, T, N, T)
    S4 = [X.reshape(N, T, N, T) for X in singles]
    P4 = [(X.reshape(N, T, N, T), Y.reshape(N, T, N, T)) for X, Y in pairs]
    if mechanism == "identity":
        out = []
        for X4 in S4:
            overlap = jnp.einsum("atbu,atbu->ab", K4, X4)
            out.append((c * K4 * overlap[:, None, :, None]).reshape(M, M))
        for X4, Y4 in P4:
            overlap = jnp.einsum("atbu,atbu->ab", X4, Y4)
            out.append(jnp.broadcast_to(overlap[:, None, :, None], (N, T, N, T)).reshape(M, M))
        return out
    if mechanism != "softmax":
        raise DeriveError(f"attention mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")

    block = min(POINT_BLOCK, points)
    xi = jnp.asarray(gaussian_points(2 * T, points), K.dtype).reshape(points // block, block, 2 * T)
    rows, cols = np.triu_indices(M)

    def pair(index):
        i, j = index
        a, s, b, s2 = i // T, i % T, j // T, j % T
        L = _logit_factor(K4[a, :, a, :], K4[a, :, b, :], K4[b, :, b, :], K4[a, s, a, s], K4[a, s, b, s2],
                          K4[b, s2, b, s2], c, softmax=True)
        return jnp.stack(_softmax_pair_statistics(
            L, [_blocks(X4, a, b) for X4 in S4], [(_blocks(X4, a, b), _blocks(Y4, a, b)) for X4, Y4 in P4],
            xi))

    values = lax.map(pair, (jnp.asarray(rows), jnp.asarray(cols)), batch_size=PAIR_BATCH)  # (pairs, terms)
    out = []
    for k in range(values.shape[1]):
        upper = jnp.zeros((M, M), K.dtype).at[rows, cols].set(values[:, k])
        out.append(upper + jnp.triu(upper, 1).T)
    return out


__all__ = ["MECHANISMS", "attention_statistics", "check_points", "gaussian_points"]
