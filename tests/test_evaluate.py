"""derive.evaluate: NNGP / NTK Gram matrices against a plain NumPy loop over entries and layers.

The reference implements the recursions of the effective-theory sheet (sec. 2) entry by entry with
the closed forms written out by hand in ``math`` (Cho & Saul arc-cosine kernel for ReLU, Williams'
arcsine kernel for erf) or, for quadrature nodes, with derive's NumPy evaluator; it applies the same
covariance clamp (floor tiny**(1/4), |rho| <= 1) so that K -> 0 has a defined value in both.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from derive.errors import DeriveError
from derive.evaluate import gram_matrices, gram_profile
from derive.numeric import evaluate
from derive.quadrature import GaussianExpectation
from derive.symbols import C_W, K11, K12, K22, z1, z2

RELU = (sp.sqrt(K11 * K22 - K12**2) + K12 * (sp.pi - sp.acos(K12 / sp.sqrt(K11 * K22)))) / (2 * sp.pi)
RELU_D = (sp.pi - sp.acos(K12 / sp.sqrt(K11 * K22))) / (2 * sp.pi)
ERF = 2 / sp.pi * sp.asin(2 * K12 / sp.sqrt((1 + 2 * K11) * (1 + 2 * K22)))
ERF_D = 4 / (sp.pi * sp.sqrt((1 + 2 * K11) * (1 + 2 * K22) - 4 * K12**2))
TANH = GaussianExpectation(sp.Lambda((z1, z2), sp.tanh(z1) * sp.tanh(z2)), K11, K12, K22, 49)
TANH_D = GaussianExpectation(sp.Lambda((z1, z2), (1 - sp.tanh(z1) ** 2) * (1 - sp.tanh(z2) ** 2)),
                             K11, K12, K22, 49)

gram = importlib.import_module("derive.evaluate")

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
    nngp, ntk = gram_matrices(TANH, TANH_D, x, 3, 1.5, 0.1)
    ref_k, ref_t = reference(tanh_pair, x, 3, 1.5, 0.1, 1.5, 0.1)
    np.testing.assert_allclose(nngp, ref_k, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ntk, ref_t, rtol=1e-12, atol=1e-14)


def test_row_blocks_match_whole_matrix(monkeypatch):
    x = batch(n_random=5, d=3, seed=3)
    whole = gram_matrices(TANH, TANH_D, x, 2, 1.2, 0.2)
    monkeypatch.setattr(gram, "MAX_GRID_ELEMENTS", 3 * len(x) * 49 * 49)  # three rows per block
    gram._recursion.cache_clear()
    blocked = gram_matrices(TANH, TANH_D, x, 2, 1.2, 0.2)
    gram._recursion.cache_clear()
    for w, b in zip(whole, blocked):
        np.testing.assert_allclose(b, w, rtol=1e-14, atol=1e-16)


def test_profile_stacks_layers():
    x = batch(seed=4)
    k_stack, t_stack = gram_profile(ERF, ERF_D, x, 4, 1.7, 0.2)
    assert k_stack.shape == t_stack.shape == (4, len(x), len(x))
    for depth in (1, 4):
        nngp, ntk = gram_matrices(ERF, ERF_D, x, depth, 1.7, 0.2)
        np.testing.assert_allclose(k_stack[depth - 1], nngp, rtol=1e-15)
        np.testing.assert_allclose(t_stack[depth - 1], ntk, rtol=1e-15)
    assert gram_profile(ERF, ERF_D, x, 1, 1.7, 0.2)[0].shape == (1, len(x), len(x))


def test_hyperparameters_do_not_recompile():
    x = batch(seed=5)
    key = (RELU, RELU_D)
    gram_matrices(RELU, RELU_D, x, 3, 2.0, 0.1)
    before = gram.TRACES[key]
    for c_w, c_b, lam in ((1.5, 0.0, None), (2.5, 0.4, 0.3), (2.0, 0.1, 1.0)):
        gram_matrices(RELU, RELU_D, x + c_b, 3, c_w, c_b, lambda_W=lam, lambda_b=lam)
    assert gram.TRACES[key] == before
    gram_matrices(RELU, RELU_D, x[:5], 3, 2.0, 0.1)  # a new shape compiles once more
    assert gram.TRACES[key] == before + 1


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
