"""Monte Carlo of the dNTK of real finite-width networks (PDLT ch. 11), single input.

The differential of the NTK (dNTK) of layer l is

    dH_{i0i1i2} = sum_{mu,nu} lambda_mu lambda_nu (d^2 z_i0 / dtheta_mu dtheta_nu)
                  (dz_i1 / dtheta_mu) (dz_i2 / dtheta_nu),

with lambda = lambda_b for biases and lambda_W / n_{l-1} for the weights of layer l. With
u_i = Lambda grad_theta z_i (the learning-rate-scaled gradient of one preactivation) it is the second
directional derivative dH_{i0i1i2} = D^2 z_i0 [u_i1, u_i2], computed here by nested forward-mode
differentiation of the sampled network itself: nothing of the derivation in
:mod:`derive.finite.single` is used, so the comparison is independent.

Per network and layer l >= 2 the estimators are averages over distinct neurons i != j of

    dH_ijj z_i   (-> P / n_{l-1}),     dH_iij z_j   (-> Q / n_{l-1}),     dH_iii z_i   (-> (P + 2Q) / n_{l-1}),

obtained from 2 n_l second directional derivatives: D^2 z[u_j, u_j] for every j, and
D^2 z[u_i, w] with w = sum_j z_j u_j for every i. Their means over independent networks, times
n_{l-1}, estimate P, Q and P + 2Q up to O(1/n) corrections; standard errors are over networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from derive.backends.precision import float64
from derive.core.errors import DeriveError
from derive.sampling.dense import forward, init_network, layer_widths

#: Estimated quantities, in the order of the last axis of :attr:`DNTKSamples.samples`.
DNTK_ESTIMATES = ("P", "Q", "P+2Q")


def _tree_dot(coeffs, tree):
    """sum_j coeffs_j tree_j over the leading axis of every leaf."""
    return jax.tree.map(lambda t: jnp.tensordot(coeffs, t, axes=1), tree)


def _layer_estimates(params, activation, x, layer: int, lambda_W, lambda_b):
    """(mean_{i != j} dH_ijj z_i, mean_{i != j} dH_iij z_j, mean_i dH_iii z_i) at ``layer`` (>= 2)."""
    sub = params[:layer]

    def z_of(p):
        return forward(p, activation, x[None])[-1][0]

    z = z_of(sub)
    n = z.shape[0]
    jac = jax.jacrev(z_of)(sub)  # leaves with a leading axis over the n neurons
    u = [(gW * (lambda_W / gW.shape[-1]), gb * lambda_b) for gW, gb in jac]  # u_i = Lambda grad z_i

    def second(a, b):
        def first(p):
            return jax.jvp(z_of, (p,), (a,))[1]
        return jax.jvp(first, (sub,), (b,))[1]

    same = jax.vmap(lambda a: second(a, a))(u)  # [j, i] = dH_{i j j}
    w = _tree_dot(z, u)
    mixed = jax.vmap(lambda a: second(a, w))(u)  # [i, k] = sum_j z_j dH_{k i j}
    diag = jnp.diagonal(same)  # dH_{i i i}
    pairs = n * (n - 1)
    p_hat = (jnp.sum(same @ z) - jnp.sum(diag * z)) / pairs
    q_hat = (jnp.trace(mixed) - jnp.sum(diag * z)) / pairs
    return jnp.stack([p_hat, q_hat, jnp.mean(diag * z)])


@partial(jax.jit, static_argnames=("activation", "widths", "chunk"))
def _chunk(start, key, x, hyper, *, activation, widths, chunk):
    C_W, C_b, lambda_W, lambda_b = hyper
    depth = len(widths) - 1

    def one(k):
        params = init_network(jax.random.fold_in(key, k), widths, C_W, C_b, x.dtype)
        return jnp.stack([_layer_estimates(params, activation, x, l, lambda_W, lambda_b)
                          for l in range(2, depth + 1)])

    return jax.lax.map(one, start + jnp.arange(chunk))


@dataclass(frozen=True)
class DNTKSamples:
    """Per-network estimates, shape (networks, depth - 1, 3): layers 2..L, then :data:`DNTK_ESTIMATES`,
    each already multiplied by n_{l-1}."""

    samples: np.ndarray
    widths: tuple

    def estimate(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean over networks and its standard error, per layer 2..L, for one of :data:`DNTK_ESTIMATES`."""
        s = self.samples[..., DNTK_ESTIMATES.index(name)]
        return s.mean(axis=0), s.std(axis=0, ddof=1) / np.sqrt(s.shape[0])


@float64


def sample_dntk(activation, depth: int, width: int, C_W: float, C_b: float, lambda_W: float | None = None,
                lambda_b: float | None = None, *, x=None, n_networks: int = 1000, seed: int = 0,
                chunk: int = 64) -> DNTKSamples:
    """Sample ``n_networks`` dense networks of uniform ``width`` and estimate n_{l-1} E[dH z] per layer.

    Args:
        activation: elementwise JAX function sigma (a static argument: reuse the same object).
        depth: L >= 2 (the first layer is linear in its parameters: its dNTK is zero).
        x: the single input (default: n_0 = 4 ones, so x.x/n_0 = 1).
        n_networks, seed, chunk: network k uses ``fold_in(key(seed), k)``; results do not depend on
            ``chunk``.
    """
    if depth < 2:
        raise DeriveError(f"the dNTK needs depth >= 2, got {depth}")
    if n_networks < 2:
        raise DeriveError(f"n_networks must be at least 2 for a standard error, got {n_networks}")
    lambda_W = C_W if lambda_W is None else lambda_W
    lambda_b = C_b if lambda_b is None else lambda_b
    x = jnp.ones(4, jnp.float64) if x is None else jnp.asarray(x, jnp.float64).reshape(-1)
    widths = layer_widths(x.shape[0], depth, width)
    key = jax.random.key(seed)
    hyper = tuple(jnp.asarray(v, jnp.float64) for v in (C_W, C_b, lambda_W, lambda_b))
    chunk = int(max(1, min(chunk, n_networks)))
    parts = [np.asarray(_chunk(jnp.int64(s), key, x, hyper, activation=activation, widths=widths, chunk=chunk))
             for s in range(0, n_networks, chunk)]
    samples = np.concatenate(parts)[:n_networks]
    scale = np.asarray(widths[1:depth], float)[:, None]  # n_{l-1} for l = 2..L
    return DNTKSamples(samples * scale, widths)
