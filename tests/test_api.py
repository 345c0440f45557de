"""The public API end to end: derivation -> generated JAX -> Gram matrices -> Monte Carlo."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import derive
from derive.core import symbols as S
from derive.symbolic.numeric import evaluate
from derive.symbolic.recursions import numeric_kernel_expressions


def _numpy_recursion(d, x, depth, C_W, C_b):
    """K^(L), Theta^(L) by a plain loop over entries and layers with NumPy evaluation."""
    e, de = numeric_kernel_expressions(d)
    n = len(x)
    K = C_b + C_W * x @ x.T / x.shape[1]
    T = C_b + C_W * x @ x.T / x.shape[1]
    for _ in range(depth - 1):
        K2, T2 = np.empty_like(K), np.empty_like(T)
        for a in range(n):
            for b in range(n):
                vals = {S.K11: K[a, a], S.K12: K[a, b], S.K22: K[b, b]}
                E, Ed = float(evaluate(e, vals)), float(evaluate(de, vals))
                K2[a, b] = C_b + C_W * E
                T2[a, b] = C_b + C_W * E + C_W * Ed * T[a, b]
        K, T = K2, T2
    return K, T


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swish", "erf", "abs"])
def test_gram_equals_numpy_loop(name):
    x = np.random.default_rng(3).standard_normal((4, 6))
    g = derive.gram(name, x, depth=4, C_W=1.4, C_b=0.2)
    K, T = _numpy_recursion(derive.kernel(name), x, 4, 1.4, 0.2)
    np.testing.assert_allclose(g.nngp, K, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.ntk, T, rtol=1e-10, atol=1e-13)


def test_emit_code_is_a_standalone_module(tmp_path):
    src = derive.emit_code("gelu")
    assert "_gauss" not in src  # closed form: no quadrature in the module
    path = tmp_path / "gelu_kernel.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("gelu_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = derive.kernel("gelu")
    vals = {S.K11: 1.3, S.K12: -0.4, S.K22: 0.8}
    assert float(mod.sigma_sigma(1.3, -0.4, 0.8)) == pytest.approx(float(evaluate(d.expectation, vals)), rel=1e-13)
    assert float(mod.dsigma_dsigma(1.3, -0.4, 0.8)) == pytest.approx(
        float(evaluate(d.derivative_expectation, vals)), rel=1e-13)


@pytest.mark.slow
def test_monte_carlo_check_quadrature_activation():
    """swish (no closed form): sampled NNGP and NTK within 5 standard errors of the derived theory.

    Width 256, depth 3, 200 networks: the O(depth/width) finite-width shift of the mean is about
    0.3 * 3/256 ~ 0.4% relative (see tests/test_montecarlo.py), while the per-network relative spread
    is sqrt(a/n) ~ 0.2 so the standard error is ~1.4% relative: the bias is well below it.
    """
    x = np.random.default_rng(5).standard_normal((3, 8))
    mc = derive.monte_carlo_check("swish", x, depth=3, C_W=1.8, C_b=0.1, width=256, n_networks=200, seed=11)
    assert mc.passed(5.0), mc.max_abs_z
    wrong = derive.monte_carlo_check("swish", x, depth=3, C_W=1.8, C_b=0.1, width=256, n_networks=200, seed=11)
    # The same samples against a theory with C_W 5% too large must fail: the check has power.
    bad = derive.gram("swish", x, depth=3, C_W=1.8 * 1.05, C_b=0.1)
    z = wrong.sampled.nngp_z_scores(bad.nngp)
    assert np.max(np.abs(z)) > 5


def test_public_names_are_lazy_and_light():
    import subprocess
    import sys

    code = "import sys, derive; derive.kernel('relu'); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_dir_lists_only_the_public_api():
    import derive

    derive.gram  # noqa: B018  (imports submodules on the way)
    names = set(dir(derive))
    assert names == set(derive.__all__) | {"__version__"}
    assert {"kernel", "gram", "criticality", "finite_width", "validate", "check", "predict", "arch", "arch_gram",
            "sample", "emit_code"} <= names
    for name in derive.__all__:
        assert getattr(derive, name) is not None


@pytest.mark.slow
def test_sample_is_the_dense_or_the_architecture_sampler():
    """derive.sample gives the samplers' own numbers for an activation name and for an architecture."""
    import derive
    from derive import arch
    from derive.backends.codegen import jax_activation
    from derive.sampling.arch import sample_arch
    from derive.sampling.dense import sample_kernels

    x = np.random.default_rng(3).standard_normal((3, 4))
    got = derive.sample("tanh", x, 16, 3, 1.5, 0.1, n_networks=12, seed=4)
    want = sample_kernels(jax_activation(derive.activation("tanh")), x, 3, 16, 1.5, 0.1, n_networks=12, seed=4)
    np.testing.assert_array_equal(got.nngp_mean, want.nngp_mean)
    np.testing.assert_array_equal(got.ntk_mean, want.ntk_mean)
    net = arch.serial(arch.dense(1.0), arch.activation("relu"), arch.dense(2.0))
    got = derive.sample(net, x, 16, n_networks=12, seed=4)
    want = sample_arch(net, x, 16, n_networks=12, seed=4)
    np.testing.assert_array_equal(got.ntk.mean, want.ntk.mean)
    np.testing.assert_array_equal(got.nngp[-1].mean, want.nngp[-1].mean)
    with pytest.raises(derive.DeriveError, match="depth and C_W"):
        derive.sample("tanh", x, 16)


def test_reports_take_an_activation_name_or_object():
    from derive.finite.single import finite_width_report

    by_name = finite_width_report("tanh", 3, 1.5, 0.1)
    by_object = finite_width_report(derive.activation("tanh"), 3, 1.5, 0.1)
    assert by_name["V"] == by_object["V"] and by_name["A"] == by_object["A"]
