"""The generated-JAX batch iteration of V and G1: against the NumPy iteration of the same SymPy
coefficients, against the single-input iteration on the diagonal, its symmetries, and one trace
per shape."""

from __future__ import annotations

import numpy as np
import pytest

from derive.core.errors import DeriveError
from derive.finite import batch_jax as fwb
from derive.finite.batch import iterate_batch
from derive.finite.batch_jax import iterate_batch_jax
from derive.finite.single import finite_width_maps, iterate
from derive.rules.activations import resolve

#: Four inputs of dimension 5: every four-point function kind occurs (one to four distinct inputs),
#: with correlations of both signs (K^(1) has K_23 ~ 0.03 and K_24 ~ -0.9).
X4 = np.random.default_rng(0).normal(size=(4, 5))
WIDTHS = np.array([32, 64, 48, 128, 96])
C_W, C_B = 1.7, 0.1
ACTIVATIONS = ["relu", "tanh", "erf", "swish", "gelu"]


def _assert_layers_close(got, want, rtol=1e-12):
    """Entrywise relative agreement, entries below rtol of their layer's largest judged absolutely
    (such entries are differences of O(1) Gaussian expectations, so rounding dominates them)."""
    assert got.shape == want.shape
    for layer in range(len(want)):
        scale = np.max(np.abs(want[layer]))
        np.testing.assert_allclose(got[layer], want[layer], rtol=rtol, atol=rtol * scale,
                                   err_msg=f"layer {layer}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ACTIVATIONS + ["elu", "leaky_relu"])
def test_generated_jax_matches_numpy_batch_iteration(name):
    """Every rule for four-point functions on three or four distinct inputs: exact (relu, leaky_relu),
    trapezoid with a closed-form (erf, gelu) or tabulated (tanh, swish) last coordinate, and
    kink-aware panels (elu)."""
    act = resolve(name)
    depth = len(WIDTHS)
    want = iterate_batch(act, X4, depth, C_W, C_B, widths=WIDTHS)
    got = iterate_batch_jax(act, X4, depth, C_W, C_B, widths=WIDTHS)
    for q in ("K", "V", "G1"):
        _assert_layers_close(getattr(got, q), getattr(want, q))


@pytest.mark.slow
@pytest.mark.parametrize("n_inputs, depth", [(1, 3), (2, 1), (2, 2), (3, 4)])
def test_small_batches_and_depths_match_numpy(n_inputs, depth):
    act = resolve("tanh")
    x = X4[:n_inputs]
    want = iterate_batch(act, x, depth, 1.3, 0.05, widths=30)
    got = iterate_batch_jax(act, x, depth, 1.3, 0.05, widths=30)
    assert got.V.shape == (depth,) + (n_inputs,) * 4
    for q in ("K", "V", "G1"):
        _assert_layers_close(getattr(got, q), getattr(want, q))
    assert np.all(got.V[0] == 0) and np.all(got.G1[0] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["erf", "tanh"])
def test_singular_input_kernel_matches_numpy(name):
    """Four inputs in two dimensions with C_b = 0: K^(1) has rank 2, so the sub-covariances of three
    and four inputs are singular (one of them positive definite in rounding only, where Cholesky
    breaks down); both iterations then use the eigen-root. Smooth activations: the pair forms stay
    well conditioned (ReLU's are not at the rho ~ 0.999 this draw produces one layer later)."""
    x = np.random.default_rng(3).normal(size=(4, 2))
    want = iterate_batch(resolve(name), x, 3, 1.7, 0.0)
    got = iterate_batch_jax(resolve(name), x, 3, 1.7, 0.0)
    for q in ("K", "V", "G1"):
        assert np.all(np.isfinite(getattr(got, q)))
        _assert_layers_close(getattr(got, q), getattr(want, q))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_diagonal_is_the_single_input_iteration(name):
    """V_(aa)(aa) and G1_aa are the single-input V and G1 at K^(1) = K_aa. G1 agrees to the
    quadrature tolerance only: the single-input map uses <sigma^2 (z^4 - 6 K z^2 + 3 K^2)>_K, the
    batch one 4 d^2<sigma^2>_K/dK^2, equal analytically but separate quadrature nodes for swish."""
    act = resolve(name)
    depth = len(WIDTHS)
    got = iterate_batch_jax(act, X4, depth, C_W, C_B, widths=WIDTHS)
    maps = finite_width_maps(act)
    for a in range(len(X4)):
        k1 = C_B + C_W * float(X4[a] @ X4[a]) / X4.shape[1]
        single = iterate(maps, depth, C_W, C_B, k1=k1, widths=WIDTHS)
        np.testing.assert_allclose(got.K[:, a, a], single.values["K"], rtol=1e-13)
        np.testing.assert_allclose(got.V[:, a, a, a, a], single.values["V"], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(got.G1[:, a, a], single.values["G1"], rtol=1e-10, atol=1e-300)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "erf"])
def test_symmetries(name):
    got = iterate_batch_jax(resolve(name), X4, 4, C_W, C_B)
    V, G, K = got.V, got.G1, got.K
    scale = np.max(np.abs(V))
    for perm in [(0, 2, 1, 3, 4), (0, 1, 2, 4, 3), (0, 3, 4, 1, 2)]:
        np.testing.assert_allclose(V, V.transpose(perm), rtol=1e-12, atol=1e-14 * scale)
    np.testing.assert_allclose(G, G.transpose(0, 2, 1), rtol=1e-12, atol=1e-14 * np.max(np.abs(G)))
    np.testing.assert_allclose(K, K.transpose(0, 2, 1), rtol=1e-13)


@pytest.mark.slow
def test_compiles_once_per_shape():
    """New hyperparameters and widths reuse the compiled iteration; the key holds the set of
    quadrature orders (a fixed order no other test uses), so the count starts from this test."""
    act = resolve("erf")
    key = (act.sigma_numeric, 3, (20,))
    before = fwb.TRACES[key]
    iterate_batch_jax(act, X4[:3], 4, 1.5, 0.1, quad_order=20)
    iterate_batch_jax(act, X4[:3], 4, 1.9, 0.0, widths=[10, 20, 40, 80], quad_order=20)
    assert fwb.TRACES[key] == before + 1
    iterate_batch_jax(act, X4[:3], 5, 1.9, 0.0, quad_order=20)
    assert fwb.TRACES[key] == before + 2


@pytest.mark.parametrize("kwargs", [dict(depth=0), dict(depth=2.5), dict(quad_order=0),
                                    dict(quad_order="fast")])
def test_rejects_bad_arguments(kwargs):
    args = dict(depth=3, quad_order=24) | kwargs
    with pytest.raises(DeriveError):
        iterate_batch_jax(resolve("relu"), X4, args["depth"], C_W, C_B, quad_order=args["quad_order"])
