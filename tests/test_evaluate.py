"""derive.kernels.gram: NNGP / NTK Gram matrices against a plain NumPy loop over entries and layers.

The reference implements the recursions of the effective-theory sheet (sec. 2) entry by entry with
the closed forms written out by hand in ``math`` (Cho & Saul arc-cosine kernel for ReLU, Williams'
arcsine kernel for erf) or, for quadrature nodes, with derive's NumPy evaluator; it applies the same
covariance clamp (floor tiny**(1/4), |rho| <= 1) so that K -> 0 has a defined value in both.

The tiled method (the default) is checked against the direct one for every closed-form activation
of the rules, its Mehler expansion of quadrature nodes against the direct quadrature and against
mpmath, and its sharded form against the one-device loop (bit for bit).
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from derive.core.errors import DeriveError
from derive.core.symbols import C_W, K11, K12, K22, z1, z2
from derive.kernels.gram import gram_matrices, gram_profile
from derive.symbolic.numeric import evaluate
from derive.symbolic.quadrature import GaussianExpectation

RELU = (sp.sqrt(K11 * K22 - K12**2) + K12 * (sp.pi - sp.acos(K12 / sp.sqrt(K11 * K22)))) / (2 * sp.pi)
RELU_D = (sp.pi - sp.acos(K12 / sp.sqrt(K11 * K22))) / (2 * sp.pi)
ERF = 2 / sp.pi * sp.asin(2 * K12 / sp.sqrt((1 + 2 * K11) * (1 + 2 * K22)))
ERF_D = 4 / (sp.pi * sp.sqrt((1 + 2 * K11) * (1 + 2 * K22) - 4 * K12**2))
TANH = GaussianExpectation(sp.Lambda((z1, z2), sp.tanh(z1) * sp.tanh(z2)), K11, K12, K22, 49)
TANH_D = GaussianExpectation(sp.Lambda((z1, z2), (1 - sp.tanh(z1) ** 2) * (1 - sp.tanh(z2) ** 2)),
                             K11, K12, K22, 49)

gram = importlib.import_module("derive.kernels.gram")
direct_method = importlib.import_module("derive.kernels.direct")
planner = importlib.import_module("derive.kernels.plan")
structure = importlib.import_module("derive.kernels.structure")

FLOOR = np.finfo(np.float64).tiny ** 0.25


def clamp(k11, k12, k22):
    k11, k22 = max(k11, FLOOR), max(k22, FLOOR)
    bound = math.sqrt(k11 * k22)
    return k11, min(max(k12, -bound), bound), k22


def relu_pair(k11, k12, k22):
    s = math.sqrt(k11 * k22)
    rho = min(max(k12 / s, -1.0), 1.0)
    theta = math.acos(rho)
    e = (math.sqrt(max(k11 * k22 - k12 * k12, 0.0)) + k12 * (math.pi - theta)) / (2 * math.pi)
    return e, (math.pi - theta) / (2 * math.pi)


def erf_pair(k11, k12, k22):
    a, b = 1 + 2 * k11, 1 + 2 * k22
    e = 2 / math.pi * math.asin(min(max(2 * k12 / math.sqrt(a * b), -1.0), 1.0))
    return e, 4 / (math.pi * math.sqrt(a * b - 4 * k12 * k12))


def tanh_pair(k11, k12, k22):
    values = {K11: k11, K12: k12, K22: k22}
    return float(evaluate(TANH, values)), float(evaluate(TANH_D, values))


ACTIVATIONS = {"relu": (RELU, RELU_D, relu_pair), "erf": (ERF, ERF_D, erf_pair)}


def reference(pair, x, depth, c_w, c_b, lam_w, lam_b):
    """K^(L), Theta^(L) by explicit loops over layers and entries (a <= b, then mirrored).

    The diagonal is the map at K11 = K12 = K22 = max(K_aa, floor).
    """
    n, d = x.shape
    K = np.empty((n, n))
    T = np.empty((n, n))
    for a in range(n):
        for b in range(n):
            overlap = sum(x[a, j] * x[b, j] for j in range(d)) / d
            K[a, b] = c_b + c_w * overlap
            T[a, b] = lam_b + lam_w * overlap
    for _ in range(depth - 1):
        K_next, T_next = np.empty_like(K), np.empty_like(T)
        for a in range(n):
            for b in range(a, n):
                if a == b:
                    k = max(K[a, a], FLOOR)
                    e, ed = pair(k, k, k)
                else:
                    e, ed = pair(*clamp(K[a, a], K[a, b], K[b, b]))
                K_next[a, b] = K_next[b, a] = c_b + c_w * e
                T_next[a, b] = T_next[b, a] = lam_b + lam_w * e + c_w * ed * T[a, b]
        K, T = K_next, T_next
    return K, T


def batch(n_random=4, d=6, seed=0):
    """Random rows, then a copy of row 0 (rho = 1), the negative of row 1 (rho = -1), a zero row."""
    x = np.random.default_rng(seed).normal(size=(n_random, d))
    return np.vstack([x, x[:1], -x[1:2], np.zeros((1, d))])


@pytest.mark.parametrize("c_b", [0.0, 0.3], ids=["C_b=0", "C_b=0.3"])
@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_matches_numpy_loop(name, depth, c_b):
    expectation, derivative, pair = ACTIVATIONS[name]
    x = batch()
    c_w = 2.0 if name == "relu" else 1.7
    nngp, ntk = gram_matrices(expectation, derivative, x, depth, c_w, c_b)
    ref_k, ref_t = reference(pair, x, depth, c_w, c_b, c_w, c_b)
    assert nngp.shape == ntk.shape == (len(x), len(x))
    assert nngp.dtype == ntk.dtype == jnp.float64
    assert np.isfinite(nngp).all() and np.isfinite(ntk).all()
    np.testing.assert_allclose(nngp, ref_k, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ntk, ref_t, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(nngp, nngp.T)
    np.testing.assert_array_equal(ntk, ntk.T)
    # The copy of row 0 has exactly row 0's kernel.
    np.testing.assert_array_equal(nngp[4], nngp[0])
    np.testing.assert_array_equal(ntk[4], ntk[0])


def test_explicit_learning_rates_and_relu_criticality():
    x = batch(seed=1)
    depth, lam_w, lam_b = 4, 0.7, 0.05
    nngp, ntk = gram_matrices(RELU, RELU_D, x, depth, 2.0, 0.0, lambda_W=lam_w, lambda_b=lam_b)
    ref_k, ref_t = reference(relu_pair, x, depth, 2.0, 0.0, lam_w, lam_b)
    np.testing.assert_allclose(nngp, ref_k, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ntk, ref_t, rtol=1e-12, atol=1e-14)
    # ReLU at criticality (C_W = 2, C_b = 0) preserves the diagonal: K^(l)_aa = K^(1)_aa.
    first_layer = 2.0 * np.sum(x * x, axis=1) / x.shape[1]
    np.testing.assert_allclose(np.diag(nngp), first_layer, rtol=1e-14, atol=1e-70)


def test_quadrature_nodes_through_depth():
    x = batch(n_random=3, d=4, seed=2)
    nngp, ntk = gram_matrices(TANH, TANH_D, x, 3, 1.5, 0.1, method="direct")
    ref_k, ref_t = reference(tanh_pair, x, 3, 1.5, 0.1, 1.5, 0.1)
    np.testing.assert_allclose(nngp, ref_k, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ntk, ref_t, rtol=1e-12, atol=1e-14)


def test_row_blocks_match_whole_matrix(monkeypatch):
    x = batch(n_random=5, d=3, seed=3)
    whole = gram_matrices(TANH, TANH_D, x, 2, 1.2, 0.2, method="direct")
    monkeypatch.setattr(direct_method, "MAX_GRID_ELEMENTS", 3 * len(x) * 49 * 49)  # three rows per block
    direct_method._recursion.cache_clear()
    blocked = gram_matrices(TANH, TANH_D, x, 2, 1.2, 0.2, method="direct")
    direct_method._recursion.cache_clear()
    for w, b in zip(whole, blocked):
        np.testing.assert_allclose(b, w, rtol=1e-14, atol=1e-16)


def test_profile_stacks_layers():
    x = batch(seed=4)
    k_stack, t_stack = gram_profile(ERF, ERF_D, x, 4, 1.7, 0.2)
    assert k_stack.shape == t_stack.shape == (4, len(x), len(x))
    for depth in (1, 4):
        nngp, ntk = gram_matrices(ERF, ERF_D, x, depth, 1.7, 0.2, method="direct")
        np.testing.assert_allclose(k_stack[depth - 1], nngp, rtol=1e-15)
        np.testing.assert_allclose(t_stack[depth - 1], ntk, rtol=1e-15)
        nngp, ntk = gram_matrices(ERF, ERF_D, x, depth, 1.7, 0.2)  # the tiled method: to rounding
        np.testing.assert_allclose(k_stack[depth - 1], nngp, rtol=1e-13)
        np.testing.assert_allclose(t_stack[depth - 1], ntk, rtol=1e-13)
    assert gram_profile(ERF, ERF_D, x, 1, 1.7, 0.2)[0].shape == (1, len(x), len(x))


def test_hyperparameters_do_not_recompile():
    x = batch(seed=5)
    key = (RELU, RELU_D)
    gram_matrices(RELU, RELU_D, x, 3, 2.0, 0.1)
    before = direct_method.TRACES[key]
    for c_w, c_b, lam in ((1.5, 0.0, None), (2.5, 0.4, 0.3), (2.0, 0.1, 1.0)):
        gram_matrices(RELU, RELU_D, x + c_b, 3, c_w, c_b, lambda_W=lam, lambda_b=lam)
    assert direct_method.TRACES[key] == before
    gram_matrices(RELU, RELU_D, x[:5], 3, 2.0, 0.1)  # a new shape compiles once more
    assert direct_method.TRACES[key] == before + 1


def test_float32_on_request():
    x = batch(seed=6)
    for expectation, derivative in ((RELU, RELU_D), (ERF, ERF_D)):
        k64, t64 = gram_matrices(expectation, derivative, x, 3, 1.8, 0.1)
        with jax.numpy_dtype_promotion("strict"):
            k32, t32 = gram_matrices(expectation, derivative, x, 3, 1.8, 0.1, dtype=jnp.float32)
        assert k32.dtype == t32.dtype == jnp.float32
        np.testing.assert_allclose(k32, k64, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(t32, t64, rtol=2e-5, atol=1e-6)


def test_gradient_in_hyperparameters_is_finite_at_boundaries():
    x = batch(seed=7)  # identical, antipodal and zero rows

    def total(c_w):
        nngp, ntk = gram_matrices(RELU, RELU_D, x, 3, c_w, 0.0)
        return jnp.sum(nngp) + jnp.sum(ntk)

    g = jax.grad(total)(2.0)
    h = 1e-6
    fd = (total(2.0 + h) - total(2.0 - h)) / (2 * h)
    assert np.isfinite(g)
    assert float(g) == pytest.approx(float(fd), rel=1e-6)


def test_bad_input():
    x = batch()
    with pytest.raises(DeriveError, match="C_W"):
        gram_matrices(C_W * RELU, RELU_D, x, 2, 2.0, 0.0)
    with pytest.raises(DeriveError, match="depth"):
        gram_matrices(RELU, RELU_D, x, 0, 2.0, 0.0)
    with pytest.raises(DeriveError, match="shape"):
        gram_matrices(RELU, RELU_D, x[0], 2, 2.0, 0.0)
    # Covariance symbols are matched by name, whatever their assumptions.
    plain = {s: sp.Symbol(s.name) for s in (K11, K12, K22)}
    nngp, _ = gram_matrices(RELU.xreplace(plain), RELU_D.xreplace(plain), x, 2, 2.0, 0.0)
    np.testing.assert_allclose(nngp, gram_matrices(RELU, RELU_D, x, 2, 2.0, 0.0)[0], rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# The tiled method: against the direct one, and the structure it reads off the derivations


def derived(name):
    from derive.api import kernel
    from derive.symbolic.recursions import numeric_kernel_expressions

    return numeric_kernel_expressions(kernel(name))


def assert_close_to(result, reference, rtol=1e-12):
    """Entrywise rtol, plus rtol relative to the matrix scale for entries near zero."""
    for got, want in zip(result, reference):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


CLOSED_FORMS = ["relu", "leaky_relu", "abs", "linear", "step", "erf", "gelu"]


@pytest.mark.slow
@pytest.mark.parametrize("tile", [None, 3], ids=["one-tile", "tiles-of-3"])
@pytest.mark.parametrize("c_b", [0.0, 0.3], ids=["C_b=0", "C_b=0.3"])
@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_tiled_matches_direct(name, c_b, tile):
    expectation, derivative = derived(name)
    x = batch(n_random=5, seed=8)  # 8 rows: with tiles of 3 the last tile is padded
    for depth in (2, 5):
        tiled = gram_matrices(expectation, derivative, x, depth, 1.7, c_b, tile=tile, method="tiled")
        direct = gram_matrices(expectation, derivative, x, depth, 1.7, c_b, method="direct")
        assert_close_to(tiled, direct)
        for m in tiled:
            m = np.asarray(m)
            np.testing.assert_array_equal(m, m.T)
            np.testing.assert_array_equal(m[5], m[0])  # row 5 is a copy of row 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_tiled_loops_over_many_tiles(name, monkeypatch):
    """Many tiles: the loops over diagonal and other tiles, in batches and one at a time (a
    remainder), agree with the direct method, and the batching does not change a bit."""
    expectation, derivative = derived(name)
    x = np.vstack([batch(n_random=17, d=5, seed=15), batch(n_random=3, d=5, seed=16)])  # 26 rows
    direct = gram_matrices(expectation, derivative, x, 4, 1.6, 0.2, method="direct")
    results = []
    for tile_batch in (1, 3, 4):
        monkeypatch.setattr(gram, "TILE_BATCH", tile_batch)
        for tile in (4, 5):  # 7 or 6 blocks (the last one padded): 7 + 21 or 6 + 15 tiles
            tiled = gram_matrices(expectation, derivative, x, 4, 1.6, 0.2, method="tiled", tile=tile)
            assert_close_to(tiled, direct)
            for m in tiled:
                m = np.asarray(m)
                np.testing.assert_array_equal(m, m.T)
            results.append((tile, tiled))
    for tile in (4, 5):
        same = [r for t, r in results if t == tile]
        for other in same[1:]:
            for a, b in zip(same[0], other):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiled_matches_numpy_loop_with_learning_rates():
    x = batch(seed=9)
    for name, (expectation, derivative, pair) in ACTIVATIONS.items():
        nngp, ntk = gram_matrices(expectation, derivative, x, 4, 1.9, 0.05, lambda_W=0.6, lambda_b=0.2,
                                  tile=2)
        ref_k, ref_t = reference(pair, x, 4, 1.9, 0.05, 0.6, 0.2)
        np.testing.assert_allclose(nngp, ref_k, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ntk, ref_t, rtol=1e-12, atol=1e-14)


def test_plans_are_read_off_the_derivation():
    # Homogeneity is detected from the expression, whatever it is called: a multiple of the
    # arc-cosine kernel plus a linear term, and its square (degree 2).
    assert planner._plan(3 * RELU + 2 * K12, 3 * RELU_D + 2).kind == "homogeneous"
    assert "E = (K11 K22)^(1) e(rho)" in gram.plan_summary(RELU**2, 2 * RELU * RELU_D)
    # ... and rejected when a variance enters on its own.
    assert planner._plan(RELU + K11, RELU_D).kind == "general"
    for name in ("relu", "leaky_relu", "abs", "linear", "step"):
        assert planner._plan(*derived(name)).kind == "homogeneous", name
    erf = planner._plan(*derived("erf"))
    assert erf.kind == "general" and "per-row 1/sqrt(2*K11 + 1)" in erf.description
    tanh = planner._plan(*derived("tanh"))
    assert tanh.kind == "mehler" and tanh.parities == (-1, 1)  # tanh odd, tanh^2 even


def test_homogeneous_form_of_relu():
    h = structure._homogeneous(RELU)
    assert h.degree == 1
    rho = np.linspace(-1, 1, 9)
    expected = (np.sqrt(1 - rho**2) + rho * (np.pi - np.arccos(rho))) / (2 * np.pi)
    np.testing.assert_allclose(evaluate(h.form, {structure._RHO: rho}), expected, rtol=1e-14, atol=1e-16)
    assert structure._homogeneous(RELU_D).degree == 0


@pytest.mark.slow
def test_mehler_matches_direct_quadrature():
    """The derived tanh nodes (order chosen for 1e-11) against their direct evaluation."""
    expectation, derivative = derived("tanh")
    x = 1.3 * batch(n_random=4, d=5, seed=10)  # first-layer variances up to ~3: high Mehler orders
    tiled = gram_matrices(expectation, derivative, x, 3, 1.5, 0.1, method="tiled", tile=4)
    direct = gram_matrices(expectation, derivative, x, 3, 1.5, 0.1, method="direct")
    assert_close_to(tiled, direct, rtol=1e-12)
    for m in tiled:
        np.testing.assert_array_equal(np.asarray(m)[4], np.asarray(m)[0])


def mp_expect(f, k11, k12, k22):
    """<f(z1, z2)> under N(0, [[k11, k12], [k12, k22]]) by mpmath's adaptive quadrature (15 digits)."""
    import mpmath

    mpmath.mp.dps = 15
    s1, s2 = mpmath.sqrt(k11), mpmath.sqrt(k22)
    rho = k12 / (s1 * s2)
    c = mpmath.sqrt(1 - rho**2)

    def g(u, v):
        return f(s1 * u, s2 * (rho * u + c * v)) * mpmath.npdf(u) * mpmath.npdf(v)

    return float(mpmath.quad(g, [-9, 0, 9], [-9, 0, 9]))  # Gaussian tails beyond 9: < 1e-18


@pytest.mark.slow
def test_mehler_against_mpmath():
    """One tanh layer: K^(2) = E(K^(1)) and Theta^(2) = 1 + Ed(K^(1)) (C_W = 1, C_b = 0,
    lambda_W = 0, lambda_b = 1) at three covariances, against mpmath to 1e-8 relative."""
    import mpmath

    from derive.core.inputs import inputs_from_kernel

    k1 = np.array([[0.8, 0.3, -0.5], [0.3, 1.2, 0.9], [-0.5, 0.9, 2.5]])
    x = inputs_from_kernel(k1)
    expectation, derivative = derived("tanh")
    nngp, ntk = gram_matrices(expectation, derivative, x, 2, 1.0, 0.0, lambda_W=0.0, lambda_b=1.0)
    nngp, ntk = np.asarray(nngp), np.asarray(ntk)
    for a, b in ((0, 1), (1, 2), (0, 2)):
        args = (k1[a, a], k1[a, b], k1[b, b])
        e = mp_expect(lambda u, v: mpmath.tanh(u) * mpmath.tanh(v), *args)
        ed = mp_expect(lambda u, v: mpmath.sech(u) ** 2 * mpmath.sech(v) ** 2, *args)
        assert nngp[a, b] == pytest.approx(e, rel=1e-8)
        assert ntk[a, b] - 1 == pytest.approx(ed, rel=1e-8)


def test_mehler_falls_back_where_it_does_not_converge():
    """sign(z1) sign(z2) has Hermite coefficients ~ k^(-3/4): no order reaches the tolerance, so
    "auto" uses the direct method and "tiled" refuses."""
    node = GaussianExpectation(sp.Lambda((z1, z2), sp.sign(z1) * sp.sign(z2)), K11, K12, K22, 33)
    x = batch(n_random=3, d=3, seed=11)[:4]
    auto = gram_matrices(node, node, x, 2, 1.0, 0.1)
    direct = gram_matrices(node, node, x, 2, 1.0, 0.1, method="direct")
    for a, b in zip(auto, direct):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(DeriveError, match="Mehler"):
        gram_matrices(node, node, x, 2, 1.0, 0.1, method="tiled")


@pytest.mark.slow
def test_tanh_float32():
    expectation, derivative = derived("tanh")
    x = batch(seed=12)
    k64, t64 = gram_matrices(expectation, derivative, x, 3, 1.5, 0.1)
    k32, t32 = gram_matrices(expectation, derivative, x, 3, 1.5, 0.1, dtype=jnp.float32)
    assert k32.dtype == t32.dtype == jnp.float32
    assert_close_to((k32, t32), (k64, t64), rtol=2e-5)


SHARDING_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np
import jax
from derive.api import kernel
from derive.symbolic.recursions import numeric_kernel_expressions
from derive.kernels.gram import gram_matrices

assert len(jax.devices()) == 4
x = np.random.default_rng(0).normal(size=(21, 5))
x[5], x[9], x[11] = x[2], -x[3], 0.0
for name in ("relu", "erf", "tanh"):
    e, d = numeric_kernel_expressions(kernel(name))
    one = gram_matrices(e, d, x, 4, 1.7, 0.2, tile=4)
    for devices in (4, jax.devices()[1:3]):
        many = gram_matrices(e, d, x, 4, 1.7, 0.2, tile=4, devices=devices)
        for a, b in zip(one, many):
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
print("identical")
"""


@pytest.mark.slow
def test_sharded_tiles_are_identical():
    """Rows sharded over 4 (and 2) simulated CPU devices give bit-identical matrices."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("identical")


def test_fast_inverse_cosine_and_sine():
    import mpmath

    from derive.backends.safe import (
        ASIN_COEFFICIENTS,
        SQRT_ONE_MINUS_COEFFICIENTS,
        fast_arccos,
        fast_arcsin,
        fast_sqrt_one_minus_square,
    )

    # The coefficients are the Chebyshev interpolants they claim to be.
    mpmath.mp.dps = 50
    n = len(ASIN_COEFFICIENTS)
    nodes = [mpmath.mpf(1) / 8 * (1 + mpmath.cos(mpmath.pi * (2 * k + 1) / (2 * n))) for k in range(n)]
    vandermonde = mpmath.matrix([[t**j for j in range(n)] for t in nodes])
    asin_quotient = [(mpmath.asin(mpmath.sqrt(t)) / mpmath.sqrt(t) - 1) / t for t in nodes]
    for coefficients, values in ((ASIN_COEFFICIENTS, asin_quotient),
                                 (SQRT_ONE_MINUS_COEFFICIENTS, [mpmath.sqrt(1 - t) for t in nodes])):
        solved = mpmath.lu_solve(vandermonde, mpmath.matrix(values))
        np.testing.assert_allclose(coefficients, [float(c) for c in solved], rtol=1e-14)
    # Accuracy in ulps over [-1, 1], near +-1 and near 0.
    mpmath.mp.dps = 30
    x = np.concatenate([np.linspace(-1, 1, 2001), 1 - np.logspace(-16, -1, 60), -1 + np.logspace(-16, -1, 60),
                        np.logspace(-300, -1, 30), [0.5, np.nextafter(0.5, 1), -0.5]])
    exact = {
        fast_arccos: [mpmath.acos(mpmath.mpf(v)) for v in x],
        fast_arcsin: [mpmath.asin(mpmath.mpf(v)) for v in x],
        fast_sqrt_one_minus_square: [mpmath.sqrt(1 - mpmath.mpf(v) ** 2) for v in x],
    }
    for fn, ulps in ((fast_arccos, 1), (fast_arcsin, 2), (fast_sqrt_one_minus_square, 2)):
        got = np.asarray(jax.jit(fn)(x))
        want = np.array([float(v) for v in exact[fn]])
        assert np.all(np.abs(got - want) <= ulps * np.spacing(np.abs(want))), fn.__name__
    # Defined values and gradients at the boundary.
    assert float(fast_arccos(1.0)) == 0.0 and float(fast_arccos(-1.0)) == np.pi
    assert float(fast_sqrt_one_minus_square(1.0)) == 0.0
    for fn in (fast_arccos, fast_arcsin, fast_sqrt_one_minus_square):
        assert np.isfinite(float(jax.grad(fn)(1.0))) and np.isfinite(float(jax.grad(fn)(-1.0)))
        assert float(jax.grad(fn)(0.3)) == pytest.approx(float(jax.grad(lambda v: {
            fast_arccos: jnp.arccos, fast_arcsin: jnp.arcsin,
            fast_sqrt_one_minus_square: lambda u: jnp.sqrt(1 - u * u)}[fn](v))(0.3)), rel=1e-14)


def test_tiled_hyperparameters_do_not_recompile():
    expectation, derivative = derived("tanh")
    x = batch(seed=13)
    key = (expectation, derivative)
    gram_matrices(expectation, derivative, x, 3, 1.2, 0.1)
    before = direct_method.TRACES[key]
    gram_matrices(expectation, derivative, x, 3, 1.2, 0.12)  # same Mehler orders: no new trace
    assert direct_method.TRACES[key] == before


@pytest.mark.slow
def test_forms_specialised_at_the_boundary():
    """Maps with a branch point at rho = +-1 that are not homogeneous (a variance added on its own)
    use the forms specialised there next to it; a smooth partner map keeps its own values."""
    x = batch(n_random=4, seed=14)
    shifted = RELU + (K11 + K22) / 10
    for expectation, derivative in ((shifted, RELU_D + 0.05), (shifted, ERF_D)):
        assert planner._plan(expectation, derivative).kind == "general"
        for c_b in (0.0, 0.3):
            tiled = gram_matrices(expectation, derivative, x, 4, 1.3, c_b, method="tiled", tile=3)
            direct = gram_matrices(expectation, derivative, x, 4, 1.3, c_b, method="direct")
            assert_close_to(tiled, direct)


def test_boundary_values_selected_when_the_form_is_not_exact_there(monkeypatch):
    """The homogeneous path selects e(+-1) next to the boundary when the compiled form would not
    reproduce it (forced here for ReLU, whose form is exact at +-1)."""
    monkeypatch.setattr(planner, "_exact_at_boundary", lambda compiled, ends: False)
    planner._plan.cache_clear()
    try:
        x = batch(seed=15)
        for c_b in (0.0, 0.3):
            tiled = gram_matrices(RELU, RELU_D, x, 4, 2.0, c_b, method="tiled")
            ref = reference(relu_pair, x, 4, 2.0, c_b, 2.0, c_b)
            assert_close_to(tiled, ref)
    finally:
        planner._plan.cache_clear()
