"""Estimators: moments and their standard errors, the 1/n fit, z-scores, the registry, and V.

The statistical checks use synthetic data with known answers (coverage of the stated uncertainties
over many replicates), and a deep linear network, whose four-point vertex follows by hand from the
single-input recursion (effective-theory sheet, sec. 4; PDLT = Roberts, Yaida & Hanin, eq. 4.90)

    V^(l+1) = C_W^2 [<s^4>_K - <s^2>_K^2] + r chi_par^2 V^(l),     V^(1) = 0.

For sigma(z) = z: <z^4>_K - <z^2>_K^2 = 3K^2 - K^2 = 2K^2 and chi_par = C_W, so with equal widths
(r = 1) and K^(l+1) = C_b + C_W K^(l),

    V^(l+1) = 2 C_W^2 K^(l)^2 + C_W^2 V^(l).

The linear network is also exactly solvable at finite width, which bounds the bias of the estimator:
z^(l)_i given layer l - 1 is N(0, G^(l)) i.i.d., so G^(l+1) = C_b + (C_W / n) sum_i z^(l)_i^2 has
E[G^(l+1)] = C_b + C_W E[G^(l)] = K^(l+1) and

    Var(G^(l+1)) = C_W^2 (1 + 2/n) Var(G^(l)) + (2 C_W^2 / n) K^(l)^2,

i.e. n Var(G^(l)) = V^(l) + O(1/n). The test asserts that this O(1/n) difference is below one standard
error at the sizes used, so that the 5-standard-error comparison with V^(l) is a fair one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from derive.core.errors import DeriveError
from derive.sampling import dense as mc
from derive.sampling import estimators as est
from derive.validation import quantities as registry

# ----------------------------------------------------------------------------------------------
# Moments and their standard errors


def test_moments_from_samples_match_numpy():
    x = np.random.default_rng(0).gamma(2.0, size=(500, 3))
    m = est.Moments.from_samples(x)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(m.var, x.var(0, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(m.mean_stderr, x.std(0, ddof=1) / np.sqrt(500), rtol=1e-13)
    np.testing.assert_allclose(m.m4, ((x - x.mean(0)) ** 4).sum(0), rtol=1e-13)
    assert m.take(1).mean == pytest.approx(x[:, 1].mean(), rel=1e-14)


@pytest.mark.parametrize("draw", ["normal", "exponential"])
def test_variance_stderr_matches_spread_over_replicates(draw):
    """The stated stderr of s^2 equals the spread of s^2 over 4000 replicates of S = 200 samples.

    With R replicates the relative error of the empirical spread is about sqrt((kurtosis of s^2) / 2R)
    < 4%; a tolerance of 12% is three times that.
    """
    rng = np.random.default_rng(1)
    x = getattr(rng, draw)(size=(200, 4000))
    m = est.Moments.from_samples(x)
    var, se = est.variance_with_stderr(m)
    assert np.mean(se) == pytest.approx(np.std(var), rel=0.12)
    true_var = 1.0
    assert np.mean(var) == pytest.approx(true_var, abs=4 * np.std(var) / np.sqrt(4000))


# ----------------------------------------------------------------------------------------------
# Weighted least-squares fit in 1/n


WIDTHS = np.array([32.0, 64.0, 128.0, 256.0])


def test_fit_recovers_an_exact_line_and_quadratic():
    y = 1.5 - 4.0 / WIDTHS
    fit = est.fit_inverse_width(WIDTHS, y, np.full(4, 0.01))
    assert fit.intercept == pytest.approx(1.5, rel=1e-12) and fit.slope == pytest.approx(-4.0, rel=1e-10)
    assert fit.chi2 == pytest.approx(0.0, abs=1e-15) and fit.dof == 2
    np.testing.assert_allclose(fit.predict(WIDTHS), y, rtol=1e-12)
    quad = est.fit_inverse_width(WIDTHS, y + 30.0 / WIDTHS**2, np.full(4, 0.01), order=2)
    np.testing.assert_allclose(quad.coefficients, [1.5, -4.0, 30.0], rtol=1e-8)


@pytest.mark.parametrize("order", [1, 2])
def test_fit_uncertainties_have_nominal_coverage(order):
    """Over 4000 synthetic data sets y_k = a + b/n_k (+ c/n_k^2) + s_k eps_k, the standardised errors
    of the intercept and slope have unit spread and the +-1 sigma interval covers 68.3%.

    Binomial error of the coverage: sqrt(0.683 * 0.317 / 4000) = 0.0074; tolerance 0.03 (4 sigma).
    Spread of a unit-variance sample of 4000: relative error 1.1%; tolerance 5%.
    """
    rng = np.random.default_rng(2)
    truth = np.array([0.8, 3.0, -40.0])[: order + 1]
    se = np.array([0.01, 0.02, 0.03, 0.05])
    mean = est._design(WIDTHS, order) @ truth
    z_a, z_b, chi2 = [], [], []
    for _ in range(4000):
        fit = est.fit_inverse_width(WIDTHS, mean + se * rng.standard_normal(4), se, order)
        z_a.append((fit.intercept - truth[0]) / fit.intercept_stderr)
        z_b.append((fit.slope - truth[1]) / fit.slope_stderr)
        chi2.append(fit.chi2)
    for z in (np.array(z_a), np.array(z_b)):
        assert np.std(z) == pytest.approx(1.0, abs=0.05)
        assert abs(np.mean(z)) < 0.07
        assert np.mean(np.abs(z) < 1) == pytest.approx(0.6827, abs=0.03)
    assert np.mean(chi2) == pytest.approx(4 - (order + 1), rel=0.1)


@pytest.mark.parametrize("args", [
    dict(widths=[32, 64], estimates=[1, 2], stderrs=[0.1, 0.0]),
    dict(widths=[32, 32], estimates=[1, 2], stderrs=[0.1, 0.1]),
    dict(widths=[32], estimates=[1], stderrs=[0.1]),
    dict(widths=[32, 64], estimates=[1, 2], stderrs=[0.1, 0.1], order=2),
    dict(widths=[32, 64], estimates=[1, np.nan], stderrs=[0.1, 0.1]),
    dict(widths=[32, 64, 128], estimates=[1, 2, 3], stderrs=[0.1, 0.1, 0.1], order=3),
])
def test_fit_rejects_bad_input(args):
    with pytest.raises(DeriveError):
        est.fit_inverse_width(**args)


# ----------------------------------------------------------------------------------------------
# z-scores and the registry


def test_z_score():
    assert est.z_score(1.5, 0.5, 1.0) == pytest.approx(1.0)
    assert est.z_score(1.5, 0.5, None) is None
    assert est.z_score(1.0, 0.0, 1.0 + 1e-15) == 0.0  # deterministic statistic, equal up to rounding
    assert est.z_score(1.0, 0.0, 1.1) == -np.inf


def _fake_result(rng, S=50, widths=(4, 6, 6), N=2):
    """A MonteCarloResult with random per-network statistics (the layout of the sampler's)."""
    L = len(widths) - 1
    grams = rng.gamma(4.0, size=(S, L, N, N))
    grams = (grams + grams.transpose(0, 1, 3, 2)) / 2
    ntks = rng.gamma(4.0, size=(S, N, N))
    nngp = est.Moments.from_samples(grams * 1.1)
    ntk = est.Moments.from_samples(ntks)
    return mc.MonteCarloResult(nngp.mean, nngp.std, ntk.mean, ntk.std, S, widths, 0,
                               nngp_moments=nngp, gram_moments=est.Moments.from_samples(grams),
                               ntk_moments=ntk, gram_samples=grams, ntk_samples=ntks)


def test_estimators_from_samples():
    rng = np.random.default_rng(3)
    res = _fake_result(rng)
    V, V_se = est.four_point_vertex(res)
    diag = np.diagonal(res.gram_samples, axis1=-2, axis2=-1)  # (S, L, N)
    np.testing.assert_allclose(V, np.array([[4.0], [6.0]]) * diag.var(0, ddof=1), rtol=1e-12)
    assert np.all(V_se > 0)
    K = np.ones((2, 2, 2))
    G1, G1_se = est.nlo_kernel(res, K)
    np.testing.assert_allclose(G1, np.array([[4.0], [6.0]]) * (diag.mean(0) - 1.0), rtol=1e-12)
    np.testing.assert_allclose(G1_se, np.array([[4.0], [6.0]]) * diag.std(0, ddof=1) / np.sqrt(50),
                               rtol=1e-12)
    var, var_se = est.ntk_variance(res)
    np.testing.assert_allclose(var, 6.0 * np.diagonal(res.ntk_samples, axis1=1, axis2=2).var(0, ddof=1),
                               rtol=1e-12)
    with pytest.raises(DeriveError):
        est.nlo_kernel(res, np.ones((3, 2, 2)))


def test_registry_rows_without_a_theory_have_null_z():
    rng = np.random.default_rng(4)
    res = _fake_result(rng)
    setup = registry.Setup(res.widths, 1.0, 0.1, 1.0, 0.1, np.ones((2, 4)), kernel=np.ones((2, 2, 2)),
                      ntk=np.ones((2, 2, 2)))
    bare = {name: replace(q, theory=None) for name, q in registry.QUANTITIES.items()}
    rows = registry.quantity_rows(bare["V"], res, setup)
    assert [(r["layer"], r["inputs"]) for r in rows] == [(2, [0]), (2, [1])]
    assert all(r["theory"] is None and r["z"] is None and r["stderr"] > 0 for r in rows)
    rows = registry.quantity_rows(bare["G1"], res, setup)
    assert len(rows) == 2 and all(r["z"] is None for r in rows)
    rows = registry.quantity_rows(registry.QUANTITIES["K"], res, setup)
    assert len(rows) == 2 * 3 and all(r["z"] is not None for r in rows)
    rows = registry.quantity_rows(registry.QUANTITIES["Theta"], res, setup)
    assert {r["layer"] for r in rows} == {2} and len(rows) == 3


def test_register_theory_plugs_in_and_rejects_unknown_names():
    saved = registry.QUANTITIES["G1"]
    try:
        registry.register_theory("G1", lambda setup: np.zeros((setup.depth, setup.inputs.shape[0])))
        assert registry.QUANTITIES["G1"].theory is not saved.theory
    finally:
        registry.QUANTITIES["G1"] = saved
    with pytest.raises(DeriveError):
        registry.register_theory("nonsense", lambda setup: None)


# ----------------------------------------------------------------------------------------------
# V of a deep linear network, by hand


def linear(z):
    return z


def _linear_vertex(K1, C_W, C_b, depth):
    """V^(l) and K^(l), l = 1..L, from V' = 2 C_W^2 K^2 + C_W^2 V (module docstring)."""
    K, V = [K1], [0.0]
    for _ in range(depth - 1):
        V.append(2 * C_W**2 * K[-1] ** 2 + C_W**2 * V[-1])
        K.append(C_b + C_W * K[-1])
    return np.array(V), np.array(K)


def _linear_exact(K1, C_W, C_b, depth, n):
    """n Var(G^(l)) of the linear network at width n, exactly (module docstring)."""
    m, v, out = K1, 0.0, [0.0]
    for _ in range(depth - 1):
        m, v = C_b + C_W * m, C_W**2 * (1 + 2 / n) * v + 2 * C_W**2 / n * m**2
        out.append(n * v)
    return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("width, method", [(64, "weights"), (128, "weights"), (128, "conditional")])
def test_linear_network_four_point_vertex(width, method):
    """V^(2), V^(3) of a depth-3 linear network from 1500 networks agree with the recursion, for
    networks sampled weight by weight and layer by layer from the conditional law.

    The estimator's relative standard error is about sqrt(2 / 1500) = 4%; its O(1/n) bias, from the
    exact finite-width variance, is 1.6% at n = 64 (asserted below one standard error).
    """
    C_W, C_b, depth = 0.9, 0.2, 3
    x = np.array([[1.0, -0.5, 0.3, 0.8], [0.4, 0.2, -1.1, 0.6]])
    result = mc.sample_kernels(linear, x, depth, width, C_W, C_b, n_networks=1500, seed=21, ntk=False,
                               method=method)
    V_hat, V_se = est.four_point_vertex(result)
    kernels = np.zeros((depth, 2, 2))  # only the diagonal enters G1
    for a, xa in enumerate(x):
        kernels[:, a, a] = _linear_vertex(C_b + C_W * xa @ xa / 4, C_W, C_b, depth)[1]
    G1_hat, G1_se = est.nlo_kernel(result, kernels)
    for a, xa in enumerate(x):
        V, _ = _linear_vertex(C_b + C_W * xa @ xa / 4, C_W, C_b, depth)
        exact = _linear_exact(C_b + C_W * xa @ xa / 4, C_W, C_b, depth, width)
        assert V_hat[0, a] == 0.0 and V_se[0, a] == 0.0  # G_hat^(1) is deterministic
        assert np.all(np.abs(exact[1:] - V[1:]) < V_se[1:, a])
        assert np.all(np.abs(V_hat[1:, a] - V[1:]) < 5 * V_se[1:, a]), (V_hat[:, a], V, V_se[:, a])
        # the linear network has G1 = 0 exactly: E[G_hat^(l)] = K^(l) at any width
        assert np.all(np.abs(G1_hat[1:, a]) < 5 * G1_se[1:, a])
