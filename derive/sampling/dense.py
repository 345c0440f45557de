"""Monte Carlo estimates of the kernel (NNGP) and the NTK from sampled finite-width dense networks.

The network (PDLT = Roberts, Yaida & Hanin, *The Principles of Deep Learning Theory*, ch. 2) has
widths n_0 = d (the input dimension), n_1, ..., n_L: either n_1 = ... = n_{L-1} = ``width`` and
n_L = ``out_width``, or any per-layer ``widths`` = (n_1, ..., n_L). L is the number of dense layers::

    z^(1)_{i;a}   = b^(1)_i + sum_j W^(1)_{ij} x_{j;a}
    z^(l+1)_{i;a} = b^(l+1)_i + sum_j W^(l+1)_{ij} sigma(z^(l)_{j;a})
    b^(l)_i ~ N(0, C_b),   W^(l)_{ij} ~ N(0, C_W / n_{l-1})   (all independent)

Per network, for a batch of inputs x_a, we measure

- the empirical kernel of every layer, K_hat^(l)_{ab} = (1/n_l) sum_i z^(l)_{i;a} z^(l)_{i;b};
- the empirical kernel that layer l's preactivations are conditionally Gaussian with,
  G_hat^(l)_{ab} = C_b + (C_W / n_{l-1}) sum_j h^(l-1)_{j;a} h^(l-1)_{j;b} with h^(l-1) =
  sigma(z^(l-1)) and h^(0) = x: given layer l - 1, z^(l)_i ~ N(0, G_hat^(l)) i.i.d. over i, so
  E[K_hat^(l)] = E[G_hat^(l)] and the finite-width statistics V and G1 follow from the spread of
  G_hat across networks (:mod:`derive.sampling.estimators`; PDLT ch. 4);
- optionally (``ntk=True``, the default) the empirical NTK of the output layer averaged over output
  neurons (PDLT ch. 7-8), Theta_hat_{ab} = (1/n_L) sum_i sum_mu lambda_mu dz^(L)_{i;a}/dtheta_mu
  dz^(L)_{i;b}/dtheta_mu, with lambda = lambda_b for biases and lambda_W / n_{l-1} for the weights of
  layer l (Neural Tangents' NTK parametrisation when lambda_W = C_W and lambda_b = C_b, the default).
  Without it only the forward pass runs, which is several times cheaper.

Two samplers give these forward statistics. ``method="weights"`` (the default, and the only one with
the NTK) draws every weight and bias: n_l (n_{l-1} + 1) normals per layer, each used for only N
multiply-adds, so drawing the weights, not the matmuls, bounds its speed (see
benchmarks/montecarlo_throughput.py). ``method="conditional"`` draws each layer's preactivations
from their exact law given the previous layer, z^(l) = R eps with R R^T = G_hat^(l) and eps standard
normal (N, n_l): the same joint law of (z^(1), ..., z^(L)), hence of every forward statistic, from
N n_l normals per layer.

Networks are independent, so the mean over S networks estimates E[K_hat^(l)] = K^(l) + O(1/n) and
E[Theta_hat] = Theta^(L) + O(1/n), with standard error (sample std over networks) / sqrt(S).
Network k's parameters are drawn from ``jax.random.fold_in(jax.random.key(seed, impl=prng), k)``
(``prng`` one of ``PRNGS``, see :func:`sample_kernels` for the choice of the default), and for every
entry the mean and the central moment sums M_2, M_3, M_4 are accumulated network by network in index
order (Welford's update, extended to the fourth moment by Terriberry; Pebay 2008, Sandia report
SAND2008-6212, eqs. 1.5), so the numbers do not depend on the chunk size used to bound memory.

Devices. Each chunk of networks is split over all devices of ``jax.devices()`` with ``jax.shard_map``
on a one-axis mesh named "networks": device d computes the statistics of its contiguous block of the
chunk (at least two networks, see ``MIN_NETWORKS_PER_DEVICE``), the blocks are gathered in network
order, and the moments are updated as above by one program compiled for a single device (each host's
first device of the mesh). Every network's statistics and every update are then the same operations
whatever the number of devices, so one device or many give the same numbers, bit for bit, for the
same seed.

Several hosts (``jax.distributed``). Run the same script, with the same arguments and seed, on every
host::

    import jax
    jax.distributed.initialize()   # first JAX call on every host; on SLURM, Open MPI or Cloud TPU it
                                   # needs no arguments, else coordinator_address=, num_processes=,
                                   # process_id=
    import jax.numpy as jnp
    from derive.sampling.dense import sample_kernels

    result = sample_kernels(jnp.tanh, x, 3, 1024, 1.5, 0.05, n_networks=10**6, ntk=False)

``jax.devices()`` then lists the devices of every host, the mesh spans them all, each host computes
the networks of its own devices, and every host receives the same (replicated) result. All arguments
are host values (NumPy arrays and Python numbers), so nothing has to be placed on remote devices by
hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import define_prng_impl
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from derive.backends.precision import float64
from derive.core import budget
from derive.core.display import markdown_table, rounded, upper_entries
from derive.core.errors import DeriveError
from derive.core.progress import stage
from derive.sampling.estimators import Moments

Activation = Callable[[jax.Array], jax.Array]
Params = list[tuple[jax.Array, jax.Array]]

#: Working-memory budget per device for one chunk of networks when ``chunk`` is not given. Small
#: chunks that stay in cache are fastest on CPU; on an accelerator pass a larger ``chunk`` explicitly.
DEFAULT_CHUNK_BYTES = 32 * 2**20

#: Fewest networks computed at once on one device. A batch of one is compiled without its batch axis
#: into other matmul kernels, whose rounding differs; from two networks on, every batch size gives the
#: same bits, which is what makes results independent of ``chunk`` and of the device count.
MIN_NETWORKS_PER_DEVICE = 2

#: Name of the mesh axis the networks are sharded over.
NETWORK_AXIS = "networks"


# ----------------------------------------------------------------------------------------------
# Random number generators
#
# Philox 4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3",
# SC'11; the Random123 library) as a JAX PRNG, bit for bit the same as JAX's own
# "philox4x32" (seed, split, fold_in and bits). JAX's version multiplies with ``lax.mulhi``, which
# does not compile inside ``jax.shard_map`` on more than one device (JAX 0.10.2: "failed to legalize
# operation 'mhlo.unknown'"); here the high word comes from a 64-bit product instead.

_PHILOX_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_KEY_INCREMENTS = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))  # Weyl sequence of the key
_PHILOX_ROUNDS = 10


def _mulhilo(multiplier: np.uint64, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Low and high 32-bit words of the 64-bit product ``multiplier * x``."""
    product = multiplier * x.astype(jnp.uint64)
    return product.astype(jnp.uint32), (product >> np.uint64(32)).astype(jnp.uint32)


def _philox4x32(key, counter) -> tuple[jax.Array, ...]:
    """Philox 4x32-10 of the 4-word ``counter`` under the 2-word ``key`` (uint32, broadcast together).

    Each round: (x0, x1, x2, x3) <- (hi(M1 x2) ^ x1 ^ k0, lo(M1 x2), hi(M0 x0) ^ x3 ^ k1, lo(M0 x0)),
    with the key incremented by the Weyl constants before every round but the first.
    """
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    x0, x1, x2, x3 = (jnp.asarray(x, jnp.uint32) for x in counter)
    for round_ in range(_PHILOX_ROUNDS):
        if round_ > 0:
            k0, k1 = k0 + _PHILOX_KEY_INCREMENTS[0], k1 + _PHILOX_KEY_INCREMENTS[1]
        lo0, hi0 = _mulhilo(_PHILOX_MULTIPLIERS[0], x0)
        lo1, hi1 = _mulhilo(_PHILOX_MULTIPLIERS[1], x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def _counter_words(shape) -> tuple[jax.Array, jax.Array]:
    """High and low 32-bit words of every entry's row-major index in an array of ``shape``."""
    index = jnp.arange(math.prod(shape), dtype=jnp.uint64).reshape(shape)
    return (index >> np.uint64(32)).astype(jnp.uint32), index.astype(jnp.uint32)


def _philox_seed(seed: jax.Array) -> jax.Array:
    high = lax.convert_element_type(lax.shift_right_logical(seed, lax.convert_element_type(32, seed.dtype)),
                                    np.uint32)
    low = lax.convert_element_type(seed, np.uint32)  # integer narrowing keeps the low 32 bits
    zero = np.uint32(0)
    out = _philox4x32((zero, zero), (high, low, zero, zero))
    return jnp.stack(out[:2])


def _philox_split(key: jax.Array, shape) -> jax.Array:
    high, low = _counter_words(shape)
    zeros = jnp.zeros(shape, jnp.uint32)
    out = _philox4x32((key[0], key[1]), (zeros, zeros, high, low))
    return jnp.stack(out[:2], axis=len(shape))


def _philox_fold_in(key: jax.Array, data) -> jax.Array:
    zero = np.uint32(0)
    out = _philox4x32((key[0], key[1]), (zero, zero, zero, jnp.asarray(data, jnp.uint32)))
    return jnp.stack(out[:2])


def _philox_random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
    high, low = _counter_words(shape)
    zeros = jnp.zeros(shape, jnp.uint32)
    x0, x1, x2, x3 = _philox4x32((key[0], key[1]), (high, low, zeros, zeros))
    if bit_width == 64:
        return (x0.astype(jnp.uint64) << np.uint64(32)) | x1.astype(jnp.uint64)
    return (x0 ^ x1 ^ x2 ^ x3).astype(np.dtype(f"uint{bit_width}"))


_PHILOX4X32 = define_prng_impl(key_shape=(2,), seed=_philox_seed, split=_philox_split,
                               random_bits=_philox_random_bits, fold_in=_philox_fold_in,
                               name="philox4x32", tag="phx4")

#: PRNG implementations ``sample_kernels`` accepts (``prng=``), by name. Both are counter-based
#: generators at round counts that pass BigCrush (Salmon et al. 2011), give the same bits for a key
#: under ``jax.vmap`` as alone (so numbers do not depend on the chunk or on the device count) and have
#: 64-bit keys (two of 10^6 networks share a key with probability ~ 3e-8). Philox 4x32-10 draws
#: normals fastest on CPU and is the default; "threefry2x32" is JAX's default generator and reproduces
#: results from before this option existed.
_PRNG_IMPLS = {"philox4x32": _PHILOX4X32, "threefry2x32": "threefry2x32"}
PRNGS = tuple(_PRNG_IMPLS)
DEFAULT_PRNG = "philox4x32"

#: JAX implementations ``sample_kernels`` refuses, with the reason.
_REFUSED_PRNGS = {
    "rbg": "under jax.vmap it draws a whole batch of networks from the batch's first key, so network k's "
           "numbers would depend on the chunk size and the device count",
    "unsafe_rbg": "under jax.vmap it draws a whole batch of networks from the batch's first key, so network "
                  "k's numbers would depend on the chunk size and the device count",
    "threefry4x32": "jax.random.split of its keys (init_network splits every layer's key) did not finish "
                    "within minutes under jax.jit and jax.vmap (JAX 0.10.2)",
    "philox2x32": "its keys have 32 bits: among 10^5 networks two share all their weights with probability "
                  "~ 0.7",
}


# ----------------------------------------------------------------------------------------------
# One network


def layer_widths(input_dim: int, depth: int, width: int, out_width: int | None = None) -> tuple[int, ...]:
    """Widths (n_0, n_1, ..., n_L): n_0 = input_dim, hidden layers ``width``, n_L = ``out_width``."""
    out = width if out_width is None else out_width
    return (input_dim,) + (width,) * (depth - 1) + (out,)


@float64
def init_network(key: jax.Array, widths: Sequence[int], C_W: float, C_b: float, dtype=jnp.float64) -> Params:
    """Sample [(W^(1), b^(1)), ..., (W^(L), b^(L))] with W^(l) of shape (n_l, n_{l-1}).

    W^(l)_{ij} ~ N(0, C_W / n_{l-1}) and b^(l)_i ~ N(0, C_b) (PDLT ch. 2); layer l uses
    the key ``fold_in(key, l)``, split into one key for W and one for b. The key's implementation
    (threefry2x32, philox4x32, ...) is the generator used.
    """
    params = []
    for l in range(1, len(widths)):
        n_in, n_out = widths[l - 1], widths[l]
        key_W, key_b = jax.random.split(jax.random.fold_in(key, l))
        W = jnp.sqrt(C_W / n_in) * jax.random.normal(key_W, (n_out, n_in), dtype)
        b = jnp.sqrt(C_b) * jax.random.normal(key_b, (n_out,), dtype)
        params.append((W, b))
    return params


def _dense(W: jax.Array, b: jax.Array, h: jax.Array) -> jax.Array:
    """h W^T + b for h of shape (N, n_in), computed as (W h^T)^T: W (n_out, n_in) is then read along
    its rows, about twice as fast as contracting its second axis from the right on CPU."""
    return jnp.matmul(W, h.T).T + b


def forward(params: Params, activation: Activation, inputs: jax.Array) -> list[jax.Array]:
    """Preactivations [z^(1), ..., z^(L)], each of shape (N, n_l), for inputs of shape (N, n_0)."""
    zs = []
    h = inputs
    for l, (W, b) in enumerate(params):
        if l > 0:
            h = activation(h)
        z = _dense(W, b, h)
        zs.append(z)
        h = z
    return zs


def _activation_and_derivative(activation: Activation, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sigma(z) and sigma'(z) in one pass (a JVP with unit tangent; valid for elementwise sigma)."""
    return jax.jvp(activation, (z,), (jnp.ones_like(z),))


def _overlap(h: jax.Array) -> jax.Array:
    """(1/n) h_a . h_b for h of shape (N, n)."""
    return h @ h.T / h.shape[1]


def _statistics(params: Params, activation: Activation, inputs: jax.Array, C_W, C_b, lambda_W, lambda_b,
                ntk: bool) -> dict[str, jax.Array]:
    """One network's statistics: "nngp" (L, N, N) = K_hat^(l), "gram" (L, N, N) = G_hat^(l), and with
    ``ntk`` "ntk" (N, N) = Theta_hat (see :func:`network_statistics`)."""
    zs = forward(params, activation, inputs)
    hs, dsigmas = [inputs], []
    for z in zs[:-1]:
        if ntk:
            sigma, dsigma = _activation_and_derivative(activation, z)
            dsigmas.append(dsigma)
        else:
            sigma = activation(z)
        hs.append(sigma)
    overlaps = [_overlap(h) for h in hs]  # (1/n_{l-1}) h^(l-1)_a . h^(l-1)_b, l = 1..L
    out = {"nngp": jnp.stack([_overlap(z) for z in zs]),
           "gram": jnp.stack([C_b + C_W * o for o in overlaps])}
    if ntk:
        out["ntk"] = _empirical_ntk(params, dsigmas, overlaps, lambda_W, lambda_b)
    return out


def _empirical_ntk(params: Params, dsigmas, overlaps, lambda_W, lambda_b) -> jax.Array:
    """Theta_hat of the output layer by backpropagation (formula in :func:`network_statistics`)."""
    n_inputs = overlaps[0].shape[0]
    n_out = params[-1][0].shape[0]

    def learning_rate_factor(l: int) -> jax.Array:
        return lambda_b + lambda_W * overlaps[l - 1]

    ntk = learning_rate_factor(len(params))  # J^(L) = I: (1/n_L) tr(I) = 1
    J = None
    for l in range(len(params) - 1, 0, -1):
        W_next = params[l][0]  # W^(l+1), shape (n_{l+1}, n_l)
        dsigma = dsigmas[l - 1][:, None, :]  # sigma'(z^(l)), broadcast over output neurons
        J = W_next[None] * dsigma if J is None else jnp.einsum("aij,jk->aik", J, W_next) * dsigma
        flat = J.reshape(n_inputs, -1)
        ntk = ntk + (flat @ flat.T / n_out) * learning_rate_factor(l)
    return ntk


@float64
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
    stats = _statistics(params, activation, inputs, 0.0, 0.0, lambda_W, lambda_b, ntk=True)
    return stats["nngp"], stats["ntk"]


@float64
def empirical_grams(params: Params, activation: Activation, inputs: jax.Array, C_W: float, C_b: float
                    ) -> jax.Array:
    """G_hat^(l)_{ab} = C_b + (C_W / n_{l-1}) h^(l-1)_a . h^(l-1)_b for l = 1..L, shape (L, N, N).

    h^(0) = x and h^(l) = sigma(z^(l)): the covariance of z^(l)_i given layer l - 1 (PDLT ch. 4).
    """
    return _statistics(params, activation, inputs, C_W, C_b, 0.0, 0.0, ntk=False)["gram"]


def _psd_sqrt(G: jax.Array) -> jax.Array:
    """R with R R^T = G for a symmetric positive semi-definite G (eigenvalues clipped at 0), so that
    singular kernels (identical inputs, a dead layer) need no jitter."""
    w, U = jnp.linalg.eigh(G)
    return U * jnp.sqrt(jnp.maximum(w, 0.0))


def conditional_statistics(key: jax.Array, widths: Sequence[int], activation: Activation, inputs: jax.Array,
                           C_W, C_b) -> dict[str, jax.Array]:
    """Forward statistics of one network drawn layer by layer from the exact conditional law.

    Given layer l - 1, the preactivations z^(l)_{i;.} of the N inputs are i.i.d. over neurons i with law
    N(0, G_hat^(l)) (PDLT ch. 4; effective-theory sheet, sec. 7), G_hat^(l) = C_b + (C_W / n_{l-1})
    h^(l-1) h^(l-1)^T. So z^(l) = R eps with R R^T = G_hat^(l) and eps an (N, n_l) standard normal
    array from ``fold_in(key, l)``: the joint law of (z^(1), ..., z^(L)) is that of a network with
    Gaussian weights, drawn with N n_l normals per layer instead of n_l (n_{l-1} + 1).

    Returns "nngp" (L, N, N) = K_hat^(l) and "gram" (L, N, N) = G_hat^(l), as :func:`_statistics`.
    """
    h = inputs
    nngp, gram = [], []
    for l in range(1, len(widths)):
        G = C_b + C_W * _overlap(h)
        eps = jax.random.normal(jax.random.fold_in(key, l), (inputs.shape[0], widths[l]), inputs.dtype)
        z = _psd_sqrt(G) @ eps
        nngp.append(_overlap(z))
        gram.append(G)
        h = activation(z)
    return {"nngp": jnp.stack(nngp), "gram": jnp.stack(gram)}


# ----------------------------------------------------------------------------------------------
# Many networks: chunked, sharded over devices, accumulated in network order


def _moments_update(state, sample_and_mask):
    """One network's update of (count, mean, M2, M3, M4) per entry; a masked network changes nothing.

    With n the new count, delta = x - mean and d = delta / n (Pebay 2008, eqs. 1.5):
        mean += d
        M4 += delta d^3 (n - 1)(n^2 - 3n + 3) + 6 d^2 M2 - 4 d M3
        M3 += delta d^2 (n - 1)(n - 2) - 3 d M2
        M2 += delta d (n - 1)
    """
    count, mean, m2, m3, m4 = state
    sample, mask = sample_and_mask
    keep = mask > 0
    n = count + mask
    new = ({}, {}, {}, {})
    for key, x in sample.items():
        delta = x - mean[key]
        d = jnp.where(keep, delta / jnp.maximum(n, 1), 0)
        d2 = d * d
        term = delta * d * count  # delta^2 (n - 1) / n
        updated = (
            mean[key] + d,
            m2[key] + term,
            m3[key] + term * d * (n - 2) - 3 * d * m2[key],
            m4[key] + term * d2 * (n * n - 3 * n + 3) + 6 * d2 * m2[key] - 4 * d * m3[key],
        )
        for out, old, value in zip(new, (mean, m2, m3, m4), updated):
            out[key] = jnp.where(keep, value, old[key])
    return (n, *new), None


#: Statistics with one (N, N) array per layer, stacked into (L, N, N) in the results.
_LAYERED = ("nngp", "gram")


def _split_layers(stats: dict) -> dict:
    """{"nngp": (L, N, N), ...} -> {"nngp.0": (N, N), ..., "nngp.<L-1>": ...}: each layer's kernel is
    then the output of its own matmul, written once, instead of being copied into a stacked array
    (XLA on CPU made two copies of every kernel entry; without them 6.8 -> 8.1 networks/s at n = 512,
    N = 1024, L = 4, benchmarks/montecarlo_throughput.py)."""
    out = {k: v for k, v in stats.items() if k not in _LAYERED}
    for name in _LAYERED:
        out.update({f"{name}.{l}": layer for l, layer in enumerate(stats[name])})
    return out


def _join_layers(arrays: dict, name: str, depth: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`_split_layers` for one statistic: the layers stacked along ``axis``."""
    if name not in _LAYERED:
        return np.asarray(arrays[name])
    return np.stack([np.asarray(arrays[f"{name}.{l}"]) for l in range(depth)], axis=axis)


@partial(jax.jit, static_argnames=("activation", "widths", "chunk", "ntk", "method", "mesh", "prng"))
def _chunk_samples(start, key_data, inputs, hyper, *, activation, widths, chunk, ntk, method, mesh, prng):
    """Statistics of networks start .. start + chunk - 1, sharded over ``mesh``, replicated on return.

    ``key_data`` is the raw data of the key ``seed`` of the generator named ``prng``.
    """
    dtype = inputs.dtype

    def block(indices, key_data, inputs, hyper):
        root_key = jax.random.wrap_key_data(key_data, impl=_PRNG_IMPLS[prng])
        C_W, C_b, lambda_W, lambda_b = hyper

        def one_network(k):
            key = jax.random.fold_in(root_key, k)
            if method == "conditional":
                stats = conditional_statistics(key, widths, activation, inputs, C_W, C_b)
            else:
                params = init_network(key, widths, C_W, C_b, dtype)
                stats = _statistics(params, activation, inputs, C_W, C_b, lambda_W, lambda_b, ntk)
            return _split_layers(stats)

        return jax.vmap(one_network)(indices)

    indices = start + jnp.arange(chunk)
    samples = jax.shard_map(block, mesh=mesh, in_specs=(P(NETWORK_AXIS), P(), P(), P()),
                            out_specs=P(NETWORK_AXIS))(indices, key_data, inputs, hyper)
    return jax.lax.with_sharding_constraint(samples, NamedSharding(mesh, P()))


#: Entries of a moment tile: the four moment arrays of a tile and its samples of a chunk stay in cache
#: while the tile's entries are updated network after network.
MOMENT_TILE_ENTRIES = 1 << 14
_MIN_MOMENT_TILE = 1 << 9


def _moment_tile(size: int) -> int:
    """Entries per tile of a flattened array of ``size`` entries: the largest divisor of ``size`` up to
    ``MOMENT_TILE_ENTRIES``, or the whole array when that divisor would make the tiles too small."""
    if size <= MOMENT_TILE_ENTRIES:
        return size
    tile = next(t for t in range(MOMENT_TILE_ENTRIES, 0, -1) if size % t == 0)
    return tile if tile >= _MIN_MOMENT_TILE else size


def zero_moments(shapes: dict, dtype) -> tuple:
    """The state (count, mean, M2, M3, M4) before any network, for statistics of the given ``shapes``:
    distinct zero arrays, as :func:`_accumulate` updates them in place."""
    return (np.zeros((), dtype), *({k: np.zeros(s, dtype) for k, s in shapes.items()} for _ in range(4)))


@partial(jax.jit, donate_argnums=0)
def _accumulate(state, samples, start, n_networks):
    """Moment updates for the networks of one chunk, in index order (those >= n_networks masked).

    Every entry receives the updates of :func:`_moments_update`, network after network. The entries
    are visited tile by tile (``_moment_tile``): a tile's moments and its chunk of samples are read
    from memory once, instead of the whole state once per network. Each entry's arithmetic is the
    same whatever the tiling and the chunk size. Compiled for one device and run on each host's first
    device of the mesh: the same program for any number of devices, hence the same rounding.

    ``state`` is donated: the new moments are written over the old ones in place, so a call allocates
    no fresh arrays (on CPU, first touching freshly mapped pages of a large array cost up to half of a
    call); the caller must not use ``state`` again.
    """
    chunk = jax.tree.leaves(samples)[0].shape[0]
    count = state[0]
    mask = (start + jnp.arange(chunk) < n_networks).astype(count.dtype)
    new = ({}, {}, {}, {})
    for key, x in samples.items():
        shape = x.shape[1:]
        size = math.prod(shape)
        tile = _moment_tile(size)
        x = x.reshape(chunk, size // tile, tile)
        moments = tuple(a[key].reshape(size // tile, tile) for a in state[1:])

        def tile_update(i, moments, key=key, x=x):
            tiles = tuple({key: lax.dynamic_index_in_dim(a, i, 0, keepdims=False)} for a in moments)
            xs = {key: lax.dynamic_index_in_dim(x, i, 1, keepdims=False)}
            (_, *out), _ = jax.lax.scan(_moments_update, (count, *tiles), (xs, mask))
            return tuple(lax.dynamic_update_index_in_dim(a, o[key], i, 0) for a, o in zip(moments, out))

        moments = lax.fori_loop(0, size // tile, tile_update, moments)
        for out, a in zip(new, moments):
            out[key] = a.reshape(shape)
    return (count + jnp.sum(mask), *new)


def _auto_chunk(widths: Sequence[int], n_inputs: int, n_networks: int, budget: int, itemsize: int,
                ntk: bool = True, method: str = "weights") -> int:
    """Networks per device whose parameters and intermediates fit in ``budget`` bytes."""
    params = sum(widths[l] * (widths[l - 1] + 1) for l in range(1, len(widths)))
    if method == "conditional":
        params = n_inputs * sum(widths[1:])  # the standard normals eps
    jacobians = 3 * n_inputs * widths[-1] * max(widths[1:]) if ntk else 0  # J, its product, flat copy
    activations = 4 * n_inputs * sum(widths)
    per_network = itemsize * (params + jacobians + activations)
    return int(max(1, min(n_networks, budget // per_network)))


def network_mesh(devices: Sequence | None = None) -> Mesh:
    """A one-axis mesh ("networks") over ``devices`` (default: every device of every host)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (NETWORK_AXIS,))


@dataclass(frozen=True, repr=False)
class MonteCarloResult:
    """Per-entry means over sampled networks, their spread, and z-score helpers.

    Layer index l of ``nngp_*`` and ``gram_*`` runs over 0..L-1 for PDLT layers 1..L. ``*_std`` is
    the sample standard deviation over networks (ddof = 1); ``*_stderr`` = std / sqrt(n_networks).
    ``*_moments`` hold the mean and the central moment sums M_2, M_3, M_4 of every entry
    (:class:`derive.sampling.estimators.Moments`): ``nngp`` is K_hat^(l), ``gram`` is G_hat^(l), ``ntk``
    is Theta_hat. The NTK fields are None when sampled with ``ntk=False``. ``*_samples`` hold the
    per-network values when ``keep_samples`` was set. ``widths`` = (n_0, ..., n_L); ``seed`` and
    ``prng`` identify the networks (``fold_in(key(seed, impl=prng), k)`` for network k).
    """

    nngp_mean: np.ndarray  # (L, N, N)
    nngp_std: np.ndarray  # (L, N, N)
    ntk_mean: np.ndarray | None  # (N, N)
    ntk_std: np.ndarray | None  # (N, N)
    n_networks: int
    widths: tuple[int, ...]
    seed: int
    nngp_samples: np.ndarray | None = None  # (S, L, N, N)
    ntk_samples: np.ndarray | None = None  # (S, N, N)
    nngp_moments: Moments | None = None
    gram_moments: Moments | None = None
    ntk_moments: Moments | None = None
    gram_samples: np.ndarray | None = None  # (S, L, N, N)
    n_devices: int = 1
    prng: str | None = None  # the JAX PRNG implementation the networks were drawn with

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def nngp_stderr(self) -> np.ndarray:
        return self.nngp_std / np.sqrt(self.n_networks)

    @property
    def ntk_stderr(self) -> np.ndarray:
        if self.ntk_std is None:
            raise DeriveError("the sample has no NTK (sampled with ntk=False)")
        return self.ntk_std / np.sqrt(self.n_networks)

    @property
    def gram_mean(self) -> np.ndarray:
        """Mean of G_hat^(l) over networks, (L, N, N)."""
        return self.gram_moments.mean

    @property
    def gram_std(self) -> np.ndarray:
        return self.gram_moments.std

    @property
    def gram_stderr(self) -> np.ndarray:
        return self.gram_moments.mean_stderr

    def nngp_z_scores(self, theory) -> np.ndarray:
        """(mean - theory) / stderr for every layer (theory (L, N, N)) or the last layer ((N, N))."""
        theory = np.asarray(theory, dtype=float)
        if theory.ndim == 2:
            return z_scores(self.nngp_mean[-1], self.nngp_stderr[-1], theory)
        return z_scores(self.nngp_mean, self.nngp_stderr, theory)

    def ntk_z_scores(self, theory) -> np.ndarray:
        """(mean - theory) / stderr for the output-layer NTK, theory of shape (N, N)."""
        return z_scores(self.ntk_mean, self.ntk_stderr, theory)

    def __repr__(self) -> str:
        L, N = np.shape(self.nngp_mean)[:2]
        what = "the NNGP" + ("" if self.ntk_mean is None else " and the NTK")
        return (f"MonteCarloResult({self.n_networks} networks, widths {list(self.widths)}: {what} of {N} inputs "
                f"through {L} layers)")

    def _repr_markdown_(self) -> str:
        L, N = np.shape(self.nngp_mean)[:2]
        se, std = self.nngp_stderr, self.nngp_std
        rows = [["$\\hat K$", l + 1, a, b, self.nngp_mean[l, a, b], rounded(se[l, a, b]), rounded(std[l, a, b])]
                for l in range(L) for a, b in upper_entries(N)]
        if self.ntk_mean is not None:
            rows += [["$\\hat\\Theta$", L, a, b, self.ntk_mean[a, b], rounded(self.ntk_stderr[a, b]),
                      rounded(self.ntk_std[a, b])] for a, b in upper_entries(N)]
        return "\n".join([
            f"**Sampled networks**: {self.n_networks} networks with widths $n_0, \\dots, n_L$ = {list(self.widths)} "
            f"(seed {self.seed}); per entry the mean over networks, its standard error and the spread", "",
            markdown_table(["", "layer", "$a$", "$b$", "mean", "±", "std"], rows)])


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


def _check_widths(input_dim: int, depth: int, width, widths, out_width) -> tuple[int, ...]:
    if widths is not None:
        if width is not None or out_width is not None:
            raise DeriveError("give either width (and out_width) or widths, not both")
        widths = tuple(widths)
        if len(widths) != depth:
            raise DeriveError(f"widths must list n_1..n_L: {depth} numbers for depth {depth}, "
                              f"got {len(widths)}")
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in widths):
            raise DeriveError(f"widths must be integers >= 1, got {widths}")
        return (input_dim,) + tuple(int(n) for n in widths)
    if width is None:
        raise DeriveError("give width (uniform hidden width) or widths (n_1..n_L)")
    if width < 1 or (out_width is not None and out_width < 1):
        raise DeriveError("width and out_width must be at least 1")
    return layer_widths(input_dim, depth, int(width), None if out_width is None else int(out_width))


@float64
def sample_kernels(
    activation: Activation,
    inputs,
    depth: int,
    width: int | None,
    C_W: float,
    C_b: float,
    lambda_W: float | None = None,
    lambda_b: float | None = None,
    *,
    widths: Sequence[int] | None = None,
    out_width: int | None = None,
    n_networks: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    keep_samples: bool = False,
    dtype=jnp.float64,
    ntk: bool = True,
    method: str = "weights",
    devices: Sequence | None = None,
    progress: bool | Callable[[int], None] | None = None,
    prng: str = DEFAULT_PRNG,
) -> MonteCarloResult:
    """Sample ``n_networks`` dense networks and estimate every layer's kernel and the output NTK.

    For network k (parameters from ``fold_in(key(seed, impl=prng), k)``), the per-network statistics of
    :func:`network_statistics` and :func:`empirical_grams` are computed; their mean over networks
    estimates the infinite-width K^(l)_{ab} and Theta^(L)_{ab} (PDLT ch. 4 and 9) up to
    O(depth/width) corrections (PDLT ch. 4-5 and 8-9), and the standard error is the sample standard
    deviation over the independent networks divided by sqrt(n_networks). Higher moments over networks
    are kept for the estimators of :mod:`derive.sampling.estimators`.

    Args:
        activation: elementwise JAX function sigma (e.g. ``jax.nn.relu``, ``jnp.tanh``); it is a
            static argument of a jitted function, so reuse the same object to avoid recompiling.
        inputs: (N, d) array of inputs x_a; d = n_0.
        depth: L, the number of dense layers (L - 1 nonlinearities).
        width: n_1 = ... = n_{L-1}; also n_L unless ``out_width`` is given. None with ``widths``.
        C_W, C_b: weight and bias variances, W ~ N(0, C_W / n_{l-1}), b ~ N(0, C_b).
        lambda_W, lambda_b: NTK learning-rate factors (weights: lambda_W / n_{l-1}); default C_W, C_b.
        widths: per-layer widths (n_1, ..., n_L), instead of ``width`` and ``out_width``.
        out_width: n_L, the number of output neurons averaged over (default ``width``).
        n_networks: S >= 2 independent networks.
        seed: integer seed; results do not depend on ``chunk`` or on the number of devices.
        chunk: networks computed at once over all devices (rounded up to a multiple of the device
            count, at least ``MIN_NETWORKS_PER_DEVICE`` per device; default: per device as many as
            fit in ``DEFAULT_CHUNK_BYTES``). With the NTK each
            network holds N between-layer Jacobians of shape (n_L, n_l) and costs
            O(L N n_L width^2) operations; a smaller ``out_width`` cuts both.
        keep_samples: also return the per-network statistics (S, L, N, N) and (S, N, N).
        dtype: float64 (default) or float32.
        ntk: also compute the empirical NTK (default); False runs the forward pass only.
        method: "weights" (default) draws every weight and bias; "conditional" (with ``ntk=False``)
            draws each layer's preactivations from their exact law given the previous layer
            (:func:`conditional_statistics`): the same distribution of every forward statistic, other
            random numbers, and N n_l instead of n_l (n_{l-1} + 1) normals per layer, which makes it
            about n / N times faster at width n where drawing the weights dominates (on CPU).
        devices: the devices to shard networks over (default ``jax.devices()``: all, on all hosts).
        progress: True for progress on stderr (:mod:`derive.core.progress`), or a callable called with
            the number of networks done after each chunk.
        prng: the generator the networks are drawn with, one of ``PRNGS``: "philox4x32" (default) or
            "threefry2x32". Philox 4x32-10 is the default because it draws normals fastest on CPU
            among the JAX generators that keep the guarantees above: measured on two cores with 512 x
            512 weights, 1.1-1.2 times threefry2x32's normals per second in float64 (where turning
            bits into normals, not the bits, costs most) and 1.5 times in float32; 1.0-1.2 (float64)
            and 1.5-1.9 (float32) times the networks per second with 4 inputs at widths 512 and 1024
            (benchmarks/montecarlo_throughput.py). "threefry2x32" (JAX's default generator) gives the
            numbers of earlier versions, which drew with it; the same seed with the other generator
            gives other, equally distributed networks. Refused, with the reason in the error: "rbg"
            and "unsafe_rbg" (under ``jax.vmap`` XLA's RngBitGenerator draws a whole batch from its
            first key, so results would depend on ``chunk`` and on the device count), "philox2x32"
            (32-bit keys) and "threefry4x32".
    """
    lambda_W = C_W if lambda_W is None else lambda_W
    lambda_b = C_b if lambda_b is None else lambda_b
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise DeriveError(f"dtype must be float64 or float32, got {dtype}")
    inputs = np.asarray(inputs, dtype=dtype)
    if inputs.ndim != 2 or inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise DeriveError(f"inputs must have shape (N, d) with N, d >= 1, got {inputs.shape}")
    if depth < 1:
        raise DeriveError(f"depth must be at least 1, got {depth}")
    widths = _check_widths(inputs.shape[1], depth, width, widths, out_width)
    if n_networks < 2:
        raise DeriveError(f"n_networks must be at least 2 for a standard error, got {n_networks}")
    if min(C_W, C_b, lambda_W, lambda_b) < 0:
        raise DeriveError("C_W, C_b, lambda_W and lambda_b must be non-negative")
    if method not in ("weights", "conditional"):
        raise DeriveError(f"method must be 'weights' or 'conditional', got {method!r}")
    if method == "conditional" and ntk:
        raise DeriveError("the NTK needs the weights: use method='weights', or ntk=False")
    if prng in _REFUSED_PRNGS:
        raise DeriveError(f"prng={prng!r} is not supported: {_REFUSED_PRNGS[prng]}; use one of {PRNGS}")
    if prng not in PRNGS:
        raise DeriveError(f"prng must be one of {PRNGS}, got {prng!r}")
    estimate = budget.monte_carlo(n_networks, widths, inputs.shape[0], ntk=ntk,
                                  conditional=method == "conditional", itemsize=dtype.itemsize)
    if keep_samples:  # every network's statistics, (2 L + 1) N x N each
        estimate = budget.Estimate(estimate.what, estimate.ops, estimate.bytes + float(n_networks) * (
            2 * depth + 1) * inputs.shape[0] ** 2 * dtype.itemsize)
    budget.check(estimate)

    mesh = network_mesh(devices)
    n_devices = mesh.size
    n_inputs = inputs.shape[0]
    if chunk is None:
        per_device = _auto_chunk(widths, n_inputs, -(-n_networks // n_devices), DEFAULT_CHUNK_BYTES,
                                 dtype.itemsize, ntk, method)
    else:
        per_device = -(-int(max(1, min(chunk, n_networks))) // n_devices)
    # XLA lowers a batch of one network without its batch axis, with other kernels and other rounding
    chunk = max(per_device, MIN_NETWORKS_PER_DEVICE) * n_devices

    shapes = {f"{name}.{l}": (n_inputs, n_inputs) for name in _LAYERED for l in range(depth)}
    if ntk:
        shapes["ntk"] = (n_inputs, n_inputs)
    home = mesh.local_devices[0]
    state = jax.device_put(zero_moments(shapes, dtype), home)
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed, impl=_PRNG_IMPLS[prng])))
    hyper = tuple(np.asarray(c, dtype) for c in (C_W, C_b, lambda_W, lambda_b))
    static = dict(activation=activation, widths=widths, chunk=chunk, ntk=ntk, method=method, mesh=mesh,
                  prng=prng)
    kept = []
    hidden = sorted(set(widths[1:]))
    label = f"width {hidden[0]}" if len(hidden) == 1 else "widths " + ",".join(map(str, widths[1:]))
    report, close = stage(progress, f"sampling {n_networks} networks of {label}", n_networks)
    for start in range(0, n_networks, chunk):
        samples = _chunk_samples(np.int64(start), key_data, inputs, hyper, **static)
        samples = jax.device_put(jax.tree.map(lambda a: a.addressable_data(0), samples), home)
        state = _accumulate(state, samples, np.int64(start), np.int64(n_networks))
        if keep_samples:
            kept.append({k: np.asarray(v)[: min(chunk, n_networks - start)] for k, v in samples.items()})
        if report is not None:
            jax.block_until_ready(state)
            report(min(start + chunk, n_networks))

    close()
    _, mean, m2, m3, m4 = state

    def moments(key: str) -> Moments:
        return Moments(n_networks, *(_join_layers(a, key, depth) for a in (mean, m2, m3, m4)))

    nngp = moments("nngp")
    ntk_moments = moments("ntk") if ntk else None
    samples = {}
    if keep_samples:
        joined = {k: np.concatenate([c[k] for c in kept]) for k in shapes}
        samples = {name: _join_layers(joined, name, depth, axis=1) for name in _LAYERED + (("ntk",) if ntk else ())}
    return MonteCarloResult(
        nngp_mean=nngp.mean,
        nngp_std=nngp.std,
        ntk_mean=None if ntk_moments is None else ntk_moments.mean,
        ntk_std=None if ntk_moments is None else ntk_moments.std,
        n_networks=n_networks,
        widths=widths,
        seed=seed,
        nngp_samples=samples.get("nngp"),
        ntk_samples=samples.get("ntk"),
        nngp_moments=nngp,
        gram_moments=moments("gram"),
        ntk_moments=ntk_moments,
        gram_samples=samples.get("gram"),
        n_devices=n_devices,
        prng=prng,
    )

