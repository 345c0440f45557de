"""Monte Carlo estimates of the kernel (NNGP) and the NTK from sampled finite-width dense networks.

The network (PDLT = Roberts, Yaida & Hanin, *The Principles of Deep Learning Theory*, ch. 2) has
widths n_0 = d (the input dimension), n_1 = ... = n_{L-1} = ``width`` and n_L = ``out_width``; L is
the number of dense layers::

    z^(1)_{i;a}   = b^(1)_i + sum_j W^(1)_{ij} x_{j;a}
    z^(l+1)_{i;a} = b^(l+1)_i + sum_j W^(l+1)_{ij} sigma(z^(l)_{j;a})
    b^(l)_i ~ N(0, C_b),   W^(l)_{ij} ~ N(0, C_W / n_{l-1})   (all independent)

Per network, for a batch of inputs x_a, we measure

- the empirical kernel of every layer, K_hat^(l)_{ab} = (1/n_l) sum_i z^(l)_{i;a} z^(l)_{i;b};
- the empirical NTK of the output layer averaged over output neurons (PDLT ch. 7-8),
  Theta_hat_{ab} = (1/n_L) sum_i sum_mu lambda_mu dz^(L)_{i;a}/dtheta_mu dz^(L)_{i;b}/dtheta_mu, with
  lambda = lambda_b for biases and lambda_W / n_{l-1} for the weights of layer l (Neural Tangents'
  NTK parametrisation when lambda_W = C_W and lambda_b = C_b, the default).

Networks are independent, so the mean over S networks estimates E[K_hat^(l)] = K^(l) + O(1/n) and
E[Theta_hat] = Theta^(L) + O(1/n), with standard error (sample std over networks) / sqrt(S).
Network k's parameters are drawn from ``jax.random.fold_in(jax.random.key(seed), k)``, and the
per-entry mean and variance are accumulated network by network in index order (Welford's update), so
the numbers do not depend on the chunk size used to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .errors import DeriveError

jax.config.update("jax_enable_x64", True)

Activation = Callable[[jax.Array], jax.Array]
Params = list[tuple[jax.Array, jax.Array]]

#: Working-memory budget per chunk of networks when ``chunk`` is not given. Small chunks that stay in
#: cache are fastest on CPU; on an accelerator pass a larger ``chunk`` explicitly.
DEFAULT_CHUNK_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------------------------
# One network


def layer_widths(input_dim: int, depth: int, width: int, out_width: int | None = None) -> tuple[int, ...]:
    """Widths (n_0, n_1, ..., n_L): n_0 = input_dim, hidden layers ``width``, n_L = ``out_width``."""
    out = width if out_width is None else out_width
    return (input_dim,) + (width,) * (depth - 1) + (out,)


def init_network(key: jax.Array, widths: Sequence[int], C_W: float, C_b: float, dtype=jnp.float64) -> Params:
    """Sample [(W^(1), b^(1)), ..., (W^(L), b^(L))] with W^(l) of shape (n_l, n_{l-1}).

    W^(l)_{ij} ~ N(0, C_W / n_{l-1}) and b^(l)_i ~ N(0, C_b) (PDLT ch. 2); layer l uses
    the key ``fold_in(key, l)``, split into one key for W and one for b.
    """
    params = []
    for l in range(1, len(widths)):
        n_in, n_out = widths[l - 1], widths[l]
        key_W, key_b = jax.random.split(jax.random.fold_in(key, l))
        W = jnp.sqrt(C_W / n_in) * jax.random.normal(key_W, (n_out, n_in), dtype)
        b = jnp.sqrt(C_b) * jax.random.normal(key_b, (n_out,), dtype)
        params.append((W, b))
    return params


def forward(params: Params, activation: Activation, inputs: jax.Array) -> list[jax.Array]:
    """Preactivations [z^(1), ..., z^(L)], each of shape (N, n_l), for inputs of shape (N, n_0)."""
    zs = []
    h = inputs
    for l, (W, b) in enumerate(params):
        if l > 0:
            h = activation(h)
        z = h @ W.T + b
        zs.append(z)
        h = z
    return zs


def _activation_and_derivative(activation: Activation, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sigma(z) and sigma'(z) in one pass (a JVP with unit tangent; valid for elementwise sigma)."""
    return jax.jvp(activation, (z,), (jnp.ones_like(z),))


def network_statistics(
    params: Params,
    activation: Activation,
    inputs: jax.Array,
    lambda_W: float,
    lambda_b: float,
) -> tuple[jax.Array, jax.Array]:
    """Empirical kernels (L, N, N) of every layer and the empirical NTK (N, N) of the output layer.

    Kernel: K_hat^(l)_{ab} = (1/n_l) sum_i z^(l)_{i;a} z^(l)_{i;b}.

    NTK, by backpropagation without parameter Jacobians. With J^(l)_a = dz^(L)_a / dz^(l)_a the
    (n_L, n_l) Jacobian between layers at input a, and h^(l-1) = sigma(z^(l-1)) (h^(0) = x),

        dz^(L)_{i;a} / db^(l)_j     = J^(l)_{a;ij}
        dz^(L)_{i;a} / dW^(l)_{jk}  = J^(l)_{a;ij} h^(l-1)_{k;a}

    so that

        Theta_hat_{ab} = sum_{l=1}^{L} (1/n_L) tr(J^(l)_a J^(l)_b^T)
                         [lambda_b + (lambda_W / n_{l-1}) h^(l-1)_a . h^(l-1)_b],

    with J^(L) = I and J^(l)_a = J^(l+1)_a W^(l+1) diag(sigma'(z^(l)_a)) by the chain rule (the
    backward form of PDLT's forward NTK recursion, ch. 8).
    """
    zs = forward(params, activation, inputs)
    n_inputs = inputs.shape[0]
    n_out = zs[-1].shape[1]
    nngp = jnp.stack([z @ z.T / z.shape[1] for z in zs])

    hs = [inputs]
    dsigmas = []
    for z in zs[:-1]:
        sigma, dsigma = _activation_and_derivative(activation, z)
        hs.append(sigma)
        dsigmas.append(dsigma)

    def learning_rate_factor(l: int) -> jax.Array:
        h = hs[l - 1]
        return lambda_b + (lambda_W / h.shape[1]) * (h @ h.T)

    ntk = learning_rate_factor(len(params))  # J^(L) = I: (1/n_L) tr(I) = 1
    J = None
    for l in range(len(params) - 1, 0, -1):
        W_next = params[l][0]  # W^(l+1), shape (n_{l+1}, n_l)
        dsigma = dsigmas[l - 1][:, None, :]  # sigma'(z^(l)), broadcast over output neurons
        J = W_next[None] * dsigma if J is None else jnp.einsum("aij,jk->aik", J, W_next) * dsigma
        flat = J.reshape(n_inputs, -1)
        ntk = ntk + (flat @ flat.T / n_out) * learning_rate_factor(l)
    return nngp, ntk


# ----------------------------------------------------------------------------------------------
# Many networks: chunked, vmapped, accumulated in network order


def _welford(state, sample_and_mask):
    """One network's Welford update of (count, mean, M2); masked networks leave the state unchanged."""
    count, mean, m2 = state
    sample, mask = sample_and_mask
    count = count + mask
    new_mean = jax.tree.map(lambda m, x: m + mask * (x - m) / jnp.maximum(count, 1.0), mean, sample)
    new_m2 = jax.tree.map(lambda s, m, nm, x: s + mask * (x - m) * (x - nm), m2, mean, new_mean, sample)
    return (count, new_mean, new_m2), None


@partial(jax.jit, static_argnames=("activation", "widths", "keep_samples"))
def _chunk_step(state, indices, mask, root_key, inputs, C_W, C_b, lambda_W, lambda_b, *,
                activation, widths, keep_samples):
    dtype = inputs.dtype

    def one_network(k):
        params = init_network(jax.random.fold_in(root_key, k), widths, C_W, C_b, dtype)
        return network_statistics(params, activation, inputs, lambda_W, lambda_b)

    samples = jax.vmap(one_network)(indices)
    state, _ = jax.lax.scan(_welford, state, (samples, mask.astype(dtype)))
    return state, (samples if keep_samples else None)


def _auto_chunk(widths: Sequence[int], n_inputs: int, n_networks: int, budget: int, itemsize: int) -> int:
    params = sum(widths[l] * (widths[l - 1] + 1) for l in range(1, len(widths)))
    jacobians = 3 * n_inputs * widths[-1] * max(widths[1:])  # J, its product, and the flattened copy
    activations = 4 * n_inputs * sum(widths)
    per_network = itemsize * (params + jacobians + activations)
    return int(max(1, min(n_networks, budget // per_network)))


@dataclass(frozen=True)
class MonteCarloResult:
    """Per-entry means over sampled networks, their spread, and z-score helpers.

    Layer index l of ``nngp_*`` runs over 0..L-1 for PDLT layers 1..L. ``*_std`` is the sample
    standard deviation over networks (ddof = 1); ``*_stderr`` = std / sqrt(n_networks).
    ``nngp_samples``/``ntk_samples`` hold the per-network values when ``keep_samples`` was set.
    """

    nngp_mean: np.ndarray  # (L, N, N)
    nngp_std: np.ndarray  # (L, N, N)
    ntk_mean: np.ndarray  # (N, N)
    ntk_std: np.ndarray  # (N, N)
    n_networks: int
    widths: tuple[int, ...]
    seed: int
    nngp_samples: np.ndarray | None = None  # (S, L, N, N)
    ntk_samples: np.ndarray | None = None  # (S, N, N)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def nngp_stderr(self) -> np.ndarray:
        return self.nngp_std / np.sqrt(self.n_networks)

    @property
    def ntk_stderr(self) -> np.ndarray:
        return self.ntk_std / np.sqrt(self.n_networks)

    def nngp_z_scores(self, theory) -> np.ndarray:
        """(mean - theory) / stderr for every layer (theory (L, N, N)) or the last layer ((N, N))."""
        theory = np.asarray(theory, dtype=float)
        if theory.ndim == 2:
            return z_scores(self.nngp_mean[-1], self.nngp_stderr[-1], theory)
        return z_scores(self.nngp_mean, self.nngp_stderr, theory)

    def ntk_z_scores(self, theory) -> np.ndarray:
        """(mean - theory) / stderr for the output-layer NTK, theory of shape (N, N)."""
        return z_scores(self.ntk_mean, self.ntk_stderr, theory)


def z_scores(estimate, stderr, theory) -> np.ndarray:
    """(estimate - theory) / stderr, entry by entry.

    An entry with zero standard error scores 0 if it equals the theory exactly and +-inf otherwise.
    """
    estimate, stderr, theory = (np.asarray(a, dtype=float) for a in (estimate, stderr, theory))
    if estimate.shape != theory.shape:
        raise DeriveError(f"theory has shape {theory.shape}, the estimate {estimate.shape}")
    diff = estimate - theory
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / stderr
    return np.where(stderr > 0, z, np.where(diff == 0, 0.0, np.copysign(np.inf, diff)))


def sample_kernels(
    activation: Activation,
    inputs,
    depth: int,
    width: int,
    C_W: float,
    C_b: float,
    lambda_W: float | None = None,
    lambda_b: float | None = None,
    *,
    out_width: int | None = None,
    n_networks: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    keep_samples: bool = False,
    dtype=jnp.float64,
) -> MonteCarloResult:
    """Sample ``n_networks`` dense networks and estimate every layer's kernel and the output NTK.

    For network k (parameters from ``fold_in(key(seed), k)``), the per-network statistics of
    :func:`network_statistics` are computed; their mean over networks estimates the infinite-width
    K^(l)_{ab} and Theta^(L)_{ab} (PDLT ch. 4 and 9) up to O(depth/width) corrections (PDLT
    ch. 4-5 and 8-9), and the standard error is the sample standard deviation over the independent networks
    divided by sqrt(n_networks).

    Args:
        activation: elementwise JAX function sigma (e.g. ``jax.nn.relu``, ``jnp.tanh``); it is a
            static argument of a jitted function, so reuse the same object to avoid recompiling.
        inputs: (N, d) array of inputs x_a; d = n_0.
        depth: L, the number of dense layers (L - 1 nonlinearities).
        width: n_1 = ... = n_{L-1}; also n_L unless ``out_width`` is given.
        C_W, C_b: weight and bias variances, W ~ N(0, C_W / n_{l-1}), b ~ N(0, C_b).
        lambda_W, lambda_b: NTK learning-rate factors (weights: lambda_W / n_{l-1}); default C_W, C_b.
        out_width: n_L, the number of output neurons averaged over (default ``width``).
        n_networks: S >= 2 independent networks.
        seed: integer seed; results do not depend on ``chunk``.
        chunk: networks vmapped at once (default: as many as fit in ``DEFAULT_CHUNK_BYTES``). Each
            network holds N between-layer Jacobians of shape (n_L, n_l) and costs
            O(L N n_L width^2) operations for the NTK; a smaller ``out_width`` cuts both.
        keep_samples: also return the per-network statistics (S, L, N, N) and (S, N, N).
        dtype: float64 (default) or float32.
    """
    lambda_W = C_W if lambda_W is None else lambda_W
    lambda_b = C_b if lambda_b is None else lambda_b
    inputs = jnp.asarray(inputs, dtype=dtype)
    if inputs.ndim != 2 or inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise DeriveError(f"inputs must have shape (N, d) with N, d >= 1, got {inputs.shape}")
    if depth < 1:
        raise DeriveError(f"depth must be at least 1, got {depth}")
    if width < 1 or (out_width is not None and out_width < 1):
        raise DeriveError("width and out_width must be at least 1")
    if n_networks < 2:
        raise DeriveError(f"n_networks must be at least 2 for a standard error, got {n_networks}")
    if min(C_W, C_b, lambda_W, lambda_b) < 0:
        raise DeriveError("C_W, C_b, lambda_W and lambda_b must be non-negative")

    widths = layer_widths(inputs.shape[1], depth, width, out_width)
    n_inputs = inputs.shape[0]
    if chunk is None:
        chunk = _auto_chunk(widths, n_inputs, n_networks, DEFAULT_CHUNK_BYTES, jnp.dtype(dtype).itemsize)
    chunk = int(max(1, min(chunk, n_networks)))

    zeros = (jnp.zeros((depth, n_inputs, n_inputs), dtype), jnp.zeros((n_inputs, n_inputs), dtype))
    state = (jnp.zeros((), dtype), zeros, zeros)
    root_key = jax.random.key(seed)
    scalars = tuple(jnp.asarray(c, dtype) for c in (C_W, C_b, lambda_W, lambda_b))
    kept = []
    for start in range(0, n_networks, chunk):
        indices = jnp.arange(start, start + chunk)  # the last chunk is padded, then masked
        mask = indices < n_networks
        state, samples = _chunk_step(state, indices, mask, root_key, inputs, *scalars,
                                     activation=activation, widths=widths, keep_samples=keep_samples)
        if keep_samples:
            kept.append(jax.tree.map(lambda a: np.asarray(a)[: int(mask.sum())], samples))

    _, (nngp_mean, ntk_mean), (nngp_m2, ntk_m2) = state
    nngp_samples = ntk_samples = None
    if keep_samples:
        nngp_samples = np.concatenate([k[0] for k in kept])
        ntk_samples = np.concatenate([k[1] for k in kept])
    return MonteCarloResult(
        nngp_mean=np.asarray(nngp_mean),
        nngp_std=np.sqrt(np.asarray(nngp_m2) / (n_networks - 1)),
        ntk_mean=np.asarray(ntk_mean),
        ntk_std=np.sqrt(np.asarray(ntk_m2) / (n_networks - 1)),
        n_networks=n_networks,
        widths=widths,
        seed=seed,
        nngp_samples=nngp_samples,
        ntk_samples=ntk_samples,
    )
