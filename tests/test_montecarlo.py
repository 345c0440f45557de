"""Monte Carlo engine: exact per-network statistics, reproducibility, and agreement with theory.

The infinite-width references are independent NumPy recursions written here (PDLT = Roberts, Yaida &
Hanin, *The Principles of Deep Learning Theory*, ch. 4 and 9):

    K^(1)       = C_b + C_W x.x / d,          Theta^(1) = lambda_b + lambda_W x.x / d
    K^(l+1)     = C_b + C_W <s s>_K
    Theta^(l+1) = lambda_b + lambda_W <s s>_K + C_W <s' s'>_K Theta^(l)

with ReLU's arc-cosine closed forms (Cho & Saul 2009) and a 2-D Gauss-Hermite quadrature for tanh.

Sample sizes for the theory checks. The mean of the per-network kernel differs from the infinite-width
value by a relative O(L/n) amount, c / n with |c| <= 0.35 for both activations at depth 3 (measured with
4e4 networks at widths 16-64, where c/n is resolved, and consistent with c/n scaling). The per-network
relative variance is a / n (a ~ 12 for the ReLU kernel, ~ 4-7 for the ReLU NTK, ~ 3 for the tanh
kernel diagonal, ~ 0.1 for the tanh NTK diagonal), so with S networks

    bias / stderr = (c / n) / sqrt(a / (n S)) = c sqrt(S / (a n)).

The worst case, the tanh NTK diagonal (c ~ 0.07, a ~ 0.1), gives 0.24 at n = 256, S = 300 (default run)
and 0.24 at n = 512, S = 600 (slow run); every other entry is below 0.15. The finite-width bias is thus
a small fraction of the 5-standard-error tolerance, while a 5% error in C_W moves the depth-3 kernel by
8-13% (ReLU) and the tanh NTK diagonal by 5%, i.e. by 10 or more standard errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derive.core.errors import DeriveError
from derive.sampling import dense as mc
from derive.sampling.estimators import Moments

X = np.array([[1.0, 0.5, -0.3, 0.8], [0.2, -1.0, 0.7, 0.4], [1.2, 0.3, 0.1, 0.9]])
DEPTH = 3
CASES = {  # name: (activation, C_W, C_b)
    "relu": (jax.nn.relu, 2.0, 0.1),
    "tanh": (jnp.tanh, 1.5, 0.05),
}


# ----------------------------------------------------------------------------------------------
# Independent infinite-width references (NumPy)


def _relu_expectations(K):
    """<relu(z_a) relu(z_b)>_K and <step(z_a) step(z_b)>_K for every pair (arc-cosine kernels)."""
    diag = np.diag(K)
    rho = np.clip(K / np.sqrt(np.outer(diag, diag)), -1.0, 1.0)
    angle = np.arccos(rho)
    E = (np.sqrt(np.maximum(np.outer(diag, diag) - K**2, 0.0)) + K * (np.pi - angle)) / (2 * np.pi)
    Ed = (np.pi - angle) / (2 * np.pi)
    return E, Ed


def _quadrature_expectations(f, df, order=100):
    """Expectations of f f and df df under every 2x2 block of K, by 2-D Gauss-Hermite quadrature.

    z1 = sqrt(K11) u, z2 = sqrt(K22) (rho u + sqrt(1 - rho^2) v), with u, v independent N(0, 1).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    weights = weights / np.sqrt(2 * np.pi)
    u, v = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)

    def expect(K):
        n = K.shape[0]
        E, Ed = np.empty_like(K), np.empty_like(K)
        for a in range(n):
            for b in range(n):
                rho = K[a, b] / np.sqrt(K[a, a] * K[b, b])
                z1 = np.sqrt(K[a, a]) * u
                z2 = np.sqrt(K[b, b]) * (rho * u + np.sqrt(max(1.0 - rho**2, 0.0)) * v)
                E[a, b] = np.sum(w * f(z1) * f(z2))
                Ed[a, b] = np.sum(w * df(z1) * df(z2))
        return E, Ed

    return expect


EXPECTATIONS = {
    "relu": _relu_expectations,
    "tanh": _quadrature_expectations(np.tanh, lambda z: 1.0 / np.cosh(z) ** 2),
}


def infinite_width(name, x, depth, C_W, C_b, lambda_W, lambda_b):
    """Per-layer K^(l) (depth, N, N) and the output Theta^(L) (N, N)."""
    K = C_b + C_W * x @ x.T / x.shape[1]
    Theta = lambda_b + lambda_W * x @ x.T / x.shape[1]
    kernels = [K]
    for _ in range(depth - 1):
        E, Ed = EXPECTATIONS[name](K)
        K, Theta = C_b + C_W * E, lambda_b + lambda_W * E + C_W * Ed * Theta
        kernels.append(K)
    return np.stack(kernels), Theta


# ----------------------------------------------------------------------------------------------
# Exact per-network statistics


def _brute_force_statistics(params, activation, x, lambda_W, lambda_b):
    """Kernels from a plain NumPy forward pass, NTK from jax.jacrev over every parameter."""
    h, kernels = np.asarray(x), []
    for W, b in params:
        z = h @ np.asarray(W).T + np.asarray(b)
        kernels.append(z @ z.T / z.shape[1])
        h = np.asarray(activation(jnp.asarray(z)))

    jacobians = jax.jacrev(lambda p: mc.forward(p, activation, jnp.asarray(x))[-1])(params)
    n_inputs, n_out = x.shape[0], params[-1][0].shape[0]
    ntk = np.zeros((n_inputs, n_inputs))
    for (J_W, J_b), (W, _) in zip(jacobians, params):
        J_W = np.asarray(J_W).reshape(n_inputs, n_out, -1)
        J_b = np.asarray(J_b)
        ntk += lambda_W / W.shape[1] * np.einsum("aip,bip->ab", J_W, J_W)
        ntk += lambda_b * np.einsum("aip,bip->ab", J_b, J_b)
    return np.stack(kernels), ntk / n_out


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", [jnp.tanh, jax.nn.relu, jnp.sin], ids=["tanh", "relu", "sin"])
@pytest.mark.parametrize("lambdas", [(1.7, 0.3), (0.6, 1.9)], ids=["default", "other"])
def test_statistics_match_brute_force(depth, activation, lambdas):
    C_W, C_b = 1.7, 0.3
    lambda_W, lambda_b = lambdas
    widths = (4, 5, 7, 6, 3)[:depth] + (6,)
    params = mc.init_network(jax.random.key(3), widths, C_W, C_b)
    nngp, ntk = mc.network_statistics(params, activation, jnp.asarray(X), lambda_W, lambda_b)
    ref_nngp, ref_ntk = _brute_force_statistics(params, activation, X, lambda_W, lambda_b)
    assert nngp.dtype == jnp.float64
    np.testing.assert_allclose(nngp, ref_nngp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ntk, ref_ntk, rtol=1e-12, atol=1e-12)


def test_parameter_statistics():
    widths = (4, 300, 200)
    W1, b1 = mc.init_network(jax.random.key(0), widths, 2.0, 0.5)[0]
    assert W1.shape == (300, 4) and b1.shape == (300,)
    W2, _ = mc.init_network(jax.random.key(0), widths, 2.0, 0.5)[1]
    np.testing.assert_allclose(np.var(np.asarray(W2)) * 300, 2.0, rtol=0.02)  # 6e4 draws: 0.6% error
    np.testing.assert_allclose(np.var(np.asarray(b1)), 0.5, rtol=0.25)  # 300 draws: 8% error


# ----------------------------------------------------------------------------------------------
# Reproducibility and compilation


@pytest.mark.slow
@pytest.mark.parametrize("prng", mc.PRNGS)
def test_same_seed_same_numbers_for_any_chunk_size(prng):
    def run(chunk, seed=7):
        return mc.sample_kernels(jnp.tanh, X, 3, 16, 1.5, 0.05, n_networks=17, seed=seed, chunk=chunk,
                                 keep_samples=True, prng=prng)

    a, b, c = run(3), run(8), run(None)
    assert a.prng == prng
    for other in (b, c):
        for field in ("nngp_mean", "nngp_std", "ntk_mean", "ntk_std", "nngp_samples", "ntk_samples",
                      "gram_samples"):
            assert np.array_equal(getattr(a, field), getattr(other, field)), field
    assert a.nngp_samples.shape == (17, 3, 3, 3) and a.ntk_samples.shape == (17, 3, 3)
    np.testing.assert_allclose(a.ntk_mean, a.ntk_samples.mean(0), rtol=1e-13)
    np.testing.assert_allclose(a.nngp_std, a.nngp_samples.std(0, ddof=1), rtol=1e-12)
    for field in ("mean", "m2", "m3", "m4"):
        assert np.array_equal(getattr(a.gram_moments, field), getattr(b.gram_moments, field)), field
    assert not np.array_equal(run(3, seed=8).ntk_mean, a.ntk_mean)


@pytest.mark.parametrize("shape", [(3, 200, 200), (1, 131071), (4, 5)])
def test_tiled_moment_updates_match_direct_central_moments(shape):
    """The tile-by-tile moment updates (several tiles, the whole-array fallback for a prime size, one
    small tile) give the mean and the central moment sums M_k = sum (x - mean)^k of a direct NumPy
    computation, mask networks past n_networks, and do not depend on how networks are split in chunks."""
    assert mc._moment_tile(math.prod(shape)) == {(3, 200, 200): 15000, (1, 131071): 131071, (4, 5): 20}[shape]
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, size=(7, *shape))  # skewed, so M_3 is not ~0
    def run(splits, n_networks=6):
        out, start = jax.device_put(mc.zero_moments({"a": shape}, np.float64)), 0  # donated: fresh per run
        for stop in splits:
            out = mc._accumulate(out, {"a": jnp.asarray(x[start:stop])}, np.int64(start), np.int64(n_networks))
            start = stop
        return out

    whole, split = run([7]), run([3, 5, 7])
    assert float(whole[0]) == 6.0
    for a, b in zip(whole[1:], split[1:]):
        assert np.array_equal(a["a"], b["a"])
    kept = x[:6]
    mean = kept.mean(0)
    np.testing.assert_allclose(whole[1]["a"], mean, rtol=1e-13)
    for k, m in zip((2, 3, 4), whole[2:]):
        np.testing.assert_allclose(m["a"], ((kept - mean) ** k).sum(0), rtol=1e-9, atol=1e-12)


_PHILOX_DRAWS = {
    "split": lambda key: jax.random.key_data(jax.random.split(key, (2, 3))),
    "fold_in": lambda key: jax.random.key_data(jax.random.fold_in(key, 123)),
    **{f"bits{w}": (lambda key, w=w: jax.random.bits(key, (5, 3), np.dtype(f"uint{w}")))
       for w in (8, 16, 32, 64)},
    "normal64": lambda key: jax.random.normal(jax.random.fold_in(key, 5), (9, 4), jnp.float64),
    "normal32": lambda key: jax.random.normal(key, (9,), jnp.float32),
    "vmapped": lambda key: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(key, k), (3,)))(
        jnp.arange(4)),
}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, -5])
def test_philox_is_jax_philox4x32(seed):
    """The sampler's Philox 4x32-10 (64-bit products instead of lax.mulhi, which does not compile under
    shard_map on several devices) gives the bits of JAX's own "philox4x32", eagerly and under jit."""
    try:
        reference = jax.random.key(seed, impl="philox4x32")
    except (ValueError, KeyError):
        pytest.skip("this JAX has no philox4x32")
    ours = jax.random.key(seed, impl=mc._PRNG_IMPLS["philox4x32"])
    assert np.array_equal(jax.random.key_data(ours), jax.random.key_data(reference))
    for name, draw in _PHILOX_DRAWS.items():
        assert np.array_equal(draw(ours), draw(reference)), name
        assert np.array_equal(jax.jit(draw)(ours), jax.jit(draw)(reference)), name


def test_compiles_once_per_shape():
    traces = []

    def counting_tanh(z):
        traces.append(1)
        return jnp.tanh(z)

    mc.sample_kernels(counting_tanh, X, 2, 8, 1.0, 0.0, n_networks=10, chunk=4)
    first = len(traces)
    mc.sample_kernels(counting_tanh, X, 2, 8, 1.3, 0.2, n_networks=7, seed=1, chunk=4)
    assert first > 0 and len(traces) == first


# ----------------------------------------------------------------------------------------------
# Agreement with infinite-width theory, and power to reject a wrong one


def _theory(name, C_W=None, lambda_W=None):
    _, C_W0, C_b = CASES[name]
    C_W = C_W0 if C_W is None else C_W
    lambda_W = C_W0 if lambda_W is None else lambda_W
    return infinite_width(name, X, DEPTH, C_W, C_b, lambda_W, C_b)


@pytest.fixture(scope="module")
def sampled():
    """Depth 3, width 256, 300 networks per activation (see the module docstring for the choice)."""
    out = {}
    for name, (activation, C_W, C_b) in CASES.items():
        out[name] = mc.sample_kernels(activation, X, DEPTH, 256, C_W, C_b, n_networks=300, seed=11)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_infinite_width_theory(sampled, name):
    result = sampled[name]
    kernels, ntk = _theory(name)
    assert result.nngp_mean.shape == (DEPTH, 3, 3) and result.ntk_mean.shape == (3, 3)
    assert np.max(np.abs(result.nngp_z_scores(kernels))) < 5
    assert np.max(np.abs(result.ntk_z_scores(ntk))) < 5


@pytest.mark.parametrize("name", list(CASES))
def test_detects_five_percent_error_in_C_W(sampled, name):
    result = sampled[name]
    _, C_W, _ = CASES[name]
    kernels, ntk = _theory(name, C_W=1.05 * C_W, lambda_W=C_W)
    worst = max(np.max(np.abs(result.nngp_z_scores(kernels[-1]))), np.max(np.abs(result.ntk_z_scores(ntk))))
    assert worst > 5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("prng", mc.PRNGS)
def test_forward_statistics_agree_with_theory_for_every_prng(prng, dtype):
    """Networks from every PRNG, forward statistics only: K_hat^(l) of every layer within 5 standard
    errors of the infinite-width K^(l), and a 5% error in C_W rejected (ReLU, the sample of ``sampled``:
    bias / stderr below 0.15, a 5% error in C_W about 8-13 standard errors at depth 3)."""
    activation, C_W, C_b = CASES["relu"]
    result = mc.sample_kernels(activation, X, DEPTH, 256, C_W, C_b, n_networks=300, seed=13, ntk=False,
                               dtype=dtype, prng=prng)
    assert result.nngp_mean.dtype == dtype and result.prng == prng
    kernels, _ = _theory("relu")
    assert np.max(np.abs(result.nngp_z_scores(kernels))) < 5
    wrong_kernels, _ = _theory("relu", C_W=1.05 * C_W)
    assert np.max(np.abs(result.nngp_z_scores(wrong_kernels[-1]))) > 5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_infinite_width_theory_wide(name):
    activation, C_W, C_b = CASES[name]
    result = mc.sample_kernels(activation, X, DEPTH, 512, C_W, C_b, n_networks=600, seed=12)
    kernels, ntk = _theory(name)
    assert np.max(np.abs(result.nngp_z_scores(kernels))) < 5
    assert np.max(np.abs(result.ntk_z_scores(ntk))) < 5
    wrong_kernels, wrong_ntk = _theory(name, C_W=1.05 * C_W, lambda_W=C_W)
    assert max(np.max(np.abs(result.nngp_z_scores(wrong_kernels[-1]))),
               np.max(np.abs(result.ntk_z_scores(wrong_ntk)))) > 5


# ----------------------------------------------------------------------------------------------
# Helpers and input checks


def test_z_scores_handle_zero_standard_error():
    z = mc.z_scores([1.0, 2.0, 3.0, 1.0], [0.5, 0.0, 0.0, 0.0], [0.0, 2.0, 4.0, 0.5])
    np.testing.assert_array_equal(z, [2.0, 0.0, -np.inf, np.inf])
    with pytest.raises(DeriveError):
        mc.z_scores(np.zeros(2), np.ones(2), np.zeros(3))


@pytest.mark.parametrize(
    "kwargs",
    [dict(depth=0), dict(width=0), dict(n_networks=1), dict(C_W=-1.0), dict(inputs=np.ones(4)),
     # generators refused for their reasons in mc._REFUSED_PRNGS, and an unknown one
     dict(prng="rbg"), dict(prng="unsafe_rbg"), dict(prng="philox2x32"), dict(prng="threefry4x32"),
     dict(prng="mt19937")],
)
def test_rejects_bad_arguments(kwargs):
    args = dict(activation=jnp.tanh, inputs=X, depth=2, width=4, C_W=1.0, C_b=0.0, n_networks=4)
    with pytest.raises(DeriveError):
        mc.sample_kernels(**{**args, **kwargs})


# ----------------------------------------------------------------------------------------------
# Per-layer widths, the empirical kernels G_hat, moments over networks, devices


def _numpy_grams(params, activation, x, C_W, C_b):
    """G_hat^(l) = C_b + C_W h^(l-1) h^(l-1)^T / n_{l-1} from a plain NumPy forward pass."""
    h, grams = np.asarray(x), []
    for W, b in params:
        grams.append(C_b + C_W * h @ h.T / h.shape[1])
        h = np.asarray(activation(jnp.asarray(h @ np.asarray(W).T + np.asarray(b))))
    return np.stack(grams)


def test_empirical_grams_match_numpy():
    params = mc.init_network(jax.random.key(5), (4, 6, 9, 5), 1.7, 0.3)
    grams = mc.empirical_grams(params, jnp.tanh, jnp.asarray(X), 1.7, 0.3)
    np.testing.assert_allclose(grams, _numpy_grams(params, jnp.tanh, X, 1.7, 0.3), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grams[0], 0.3 + 1.7 * X @ X.T / 4, rtol=1e-14)  # deterministic first layer


@pytest.mark.slow
def test_per_layer_widths_and_streamed_moments():
    """Network k of the sampler is init_network(fold_in(key(seed), k)) at the given widths, and the
    streamed moments equal two-pass moments of the kept samples."""
    widths = (9, 5, 7)
    res = mc.sample_kernels(jnp.tanh, X, 3, None, 1.5, 0.05, widths=widths, n_networks=13, seed=4, chunk=4,
                            keep_samples=True)
    assert res.widths == (4, 9, 5, 7) and res.depth == 3
    assert res.prng == mc.DEFAULT_PRNG
    for k in (0, 12):
        params = mc.init_network(jax.random.fold_in(jax.random.key(4, impl=mc.DEFAULT_PRNG), k), res.widths,
                                 1.5, 0.05)
        nngp, ntk = mc.network_statistics(params, jnp.tanh, jnp.asarray(X), 1.5, 0.05)
        np.testing.assert_allclose(res.nngp_samples[k], nngp, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.ntk_samples[k], ntk, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.gram_samples[k], _numpy_grams(params, jnp.tanh, X, 1.5, 0.05),
                                   rtol=1e-12, atol=1e-14)
    for moments, samples in ((res.nngp_moments, res.nngp_samples), (res.gram_moments, res.gram_samples),
                             (res.ntk_moments, res.ntk_samples)):
        ref = Moments.from_samples(samples)
        for field in ("mean", "m2", "m3", "m4"):
            np.testing.assert_allclose(getattr(moments, field), getattr(ref, field), rtol=1e-9,
                                       atol=1e-12 * np.max(np.abs(getattr(ref, field))))
    np.testing.assert_allclose(res.gram_stderr, res.gram_samples.std(0, ddof=1) / np.sqrt(13), rtol=1e-10,
                               atol=1e-15)
    # the same networks without the NTK: forward statistics only
    fwd = mc.sample_kernels(jnp.tanh, X, 3, None, 1.5, 0.05, widths=widths, n_networks=13, seed=4, ntk=False)
    assert fwd.ntk_mean is None and fwd.ntk_moments is None
    np.testing.assert_allclose(fwd.nngp_mean, res.nngp_mean, rtol=1e-13)
    np.testing.assert_allclose(fwd.gram_moments.m2, res.gram_moments.m2, rtol=1e-9)


@pytest.mark.slow
def test_threefry_gives_the_networks_of_jax_default_key():
    """prng="threefry2x32" draws network k from fold_in(jax.random.key(seed), k) with JAX's default
    generator, as the sampler did before it had a ``prng`` option; another PRNG draws other networks."""
    kwargs = dict(widths=(6, 5), n_networks=5, seed=9, chunk=2, keep_samples=True)
    res = mc.sample_kernels(jnp.tanh, X, 2, None, 1.5, 0.05, prng="threefry2x32", **kwargs)
    for k in (0, 4):
        params = mc.init_network(jax.random.fold_in(jax.random.key(9), k), res.widths, 1.5, 0.05)
        nngp, ntk = mc.network_statistics(params, jnp.tanh, jnp.asarray(X), 1.5, 0.05)
        np.testing.assert_allclose(res.nngp_samples[k], nngp, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.ntk_samples[k], ntk, rtol=1e-12, atol=1e-14)
    other = mc.sample_kernels(jnp.tanh, X, 2, None, 1.5, 0.05, prng="philox4x32", **kwargs)
    assert not np.any(np.isclose(other.nngp_samples[:, -1], res.nngp_samples[:, -1], rtol=1e-6))


@pytest.mark.slow
def test_conditional_mean_of_the_kernel_is_the_empirical_gram():
    """E[K_hat^(l)] = E[G_hat^(l)]: given layer l - 1, z^(l)_i ~ N(0, G_hat^(l)) i.i.d.

    The difference K_hat - G_hat has mean 0 and per-network spread ~ G sqrt(2 / n_l), so the test
    compares the means within 5 standard errors of the paired difference (400 networks, n = 32).
    """
    res = mc.sample_kernels(jax.nn.relu, X, 3, 32, 2.0, 0.1, n_networks=400, seed=8, ntk=False,
                            keep_samples=True)
    diff = res.nngp_samples - res.gram_samples
    se = diff.std(0, ddof=1) / np.sqrt(400)
    assert np.all(np.abs(diff.mean(0)) < 5 * se)


@pytest.mark.parametrize("kwargs", [
    dict(depth=3, width=None, widths=(4, 4)),  # n_1..n_L needs L widths
    dict(depth=2, width=None, widths=(4, 0)),
    dict(depth=2, width=4, widths=(4, 4)),
    dict(depth=2, width=None),
    dict(depth=2, width=4, dtype=jnp.int32),
])
def test_rejects_bad_widths(kwargs):
    with pytest.raises(DeriveError):
        mc.sample_kernels(jnp.tanh, X, C_W=1.0, C_b=0.0, n_networks=4, **kwargs)


_DEVICE_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from derive.sampling import dense as mc
X = np.array({X})
chunk = None if sys.argv[2] == "None" else int(sys.argv[2])
out = dict(devices=len(jax.devices()))
for prng in mc.PRNGS:
    kwargs = dict(widths=(16, 12, 8), n_networks=19, seed=7, chunk=chunk, keep_samples=True, prng=prng)
    res = mc.sample_kernels(jnp.tanh, X, 3, None, 1.5, 0.05, **kwargs)
    cond = mc.sample_kernels(jnp.tanh, X, 3, None, 1.5, 0.05, ntk=False, method="conditional", **kwargs)
    out.update({{prng + "/" + name: value for name, value in dict(
        n_devices=res.n_devices, nngp=res.nngp_samples, ntk=res.ntk_samples, gram=res.gram_samples,
        m4=res.gram_moments.m4, ntk_m2=res.ntk_moments.m2, mean=res.nngp_mean, cond_nngp=cond.nngp_samples,
        cond_m4=cond.gram_moments.m4).items()}})
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
def test_one_and_four_devices_give_identical_numbers(tmp_path):
    """Four simulated CPU devices (XLA_FLAGS must be set before JAX starts, hence subprocesses) with a
    chunk rounded up to 8 = 2 per device, against one device with the default chunk: for every PRNG,
    every per-network statistic and every moment is bit-for-bit the same, for both samplers."""
    import os
    import subprocess
    import sys

    script = _DEVICE_SCRIPT.format(X=X.tolist())
    results = {}
    for devices, chunk in ((4, "3"), (1, "None")):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = tmp_path / f"{devices}.npz"
        res = subprocess.run([sys.executable, "-c", script, str(out), chunk], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        results[devices] = np.load(out)
    four, one = results[4], results[1]
    assert int(four["devices"]) == 4 and int(one["devices"]) == 1
    for prng in mc.PRNGS:
        assert int(four[f"{prng}/n_devices"]) == 4 and int(one[f"{prng}/n_devices"]) == 1
    names = [name for name in one.files if "/" in name and not name.endswith("/n_devices")]
    assert len(names) == 8 * len(mc.PRNGS)
    for name in names:
        assert np.array_equal(four[name], one[name]), name
    # the PRNGs draw different networks from the same seed
    assert not np.array_equal(one["philox4x32/nngp"], one["threefry2x32/nngp"])


@pytest.mark.slow
def test_conditional_sampler():
    """The conditional sampler: forward statistics only, G_hat^(1) as with weights, the same numbers
    for any chunk size, and the law of the weight sampler (checked statistically in
    tests/test_estimators.py and tests/test_validate.py)."""
    def run(chunk):
        return mc.sample_kernels(jax.nn.relu, X, 3, 8, 2.0, 0.1, n_networks=11, seed=2, chunk=chunk,
                                 ntk=False, method="conditional", keep_samples=True)

    a, b = run(3), run(None)
    assert np.array_equal(a.nngp_samples, b.nngp_samples)
    assert np.array_equal(a.gram_moments.m4, b.gram_moments.m4)
    assert a.ntk_mean is None and a.nngp_samples.shape == (11, 3, 3, 3)
    np.testing.assert_allclose(a.gram_samples[:, 0], np.broadcast_to(0.1 + 2.0 * X @ X.T / 4, (11, 3, 3)),
                               rtol=1e-14)
    with pytest.raises(DeriveError):
        mc.sample_kernels(jax.nn.relu, X, 3, 8, 2.0, 0.1, n_networks=4, method="conditional")  # ntk=True
    with pytest.raises(DeriveError):
        mc.sample_kernels(jax.nn.relu, X, 3, 8, 2.0, 0.1, n_networks=4, ntk=False, method="exact")
