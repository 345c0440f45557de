"""Finite-width recursions: expectations against mpmath, closed forms in depth against iteration,
generated JAX against NumPy, depth 10^4 stability, and Monte Carlo of real networks at several
widths extrapolated in 1/n."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest

from derive import api
from derive.backends.codegen import jax_activation
from derive.core import symbols as S
from derive.finite.single import QUANTITIES, closed_forms_in_depth, finite_width_maps, iterate, iterate_jax
from derive.rules.activations import resolve
from derive.symbolic.numeric import evaluate

mp.mp.dps = 25


def _phi(x):
    return mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)


def _sig(z):
    return 1 / (1 + mp.exp(-z))


HAND = {  # sigma, sigma' written out independently of the rules
    "relu": (lambda z: max(z, 0), lambda z: 1 if z > 0 else 0),
    "tanh": (mp.tanh, lambda z: 1 - mp.tanh(z) ** 2),
    "swish": (lambda z: z * _sig(z), lambda z: _sig(z) + z * _sig(z) * (1 - _sig(z))),
    "gelu": (lambda z: z * (1 + mp.erf(z / mp.sqrt(2))) / 2,
             lambda z: (1 + mp.erf(z / mp.sqrt(2))) / 2 + z * _phi(z)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("K", [0.3, 1.7])
def test_map_expectations_against_mpmath(name, K):
    s, ds = HAND[name]
    maps = finite_width_maps(resolve(name))
    integrands = {
        "s2": lambda z: s(z) ** 2, "s4": lambda z: s(z) ** 4, "d2": lambda z: ds(z) ** 2,
        "d4": lambda z: ds(z) ** 4, "s2d2": lambda z: s(z) ** 2 * ds(z) ** 2,
        "s2_h4": lambda z: s(z) ** 2 * (z**4 - 6 * K * z**2 + 3 * K**2),
        "s2_h2": lambda z: s(z) ** 2 * (z**2 - K), "d2_h2": lambda z: ds(z) ** 2 * (z**2 - K),
        "zsd": lambda z: z * s(z) * ds(z), "zsd3": lambda z: z * s(z) * ds(z) ** 3,
    }
    sq = mp.sqrt(K)
    for key, f in integrands.items():
        ref = mp.quad(lambda x: _phi(x) * f(sq * x), [-mp.inf, 0, mp.inf])
        got = float(evaluate(maps.expectations[key], {S.K: K}))
        scale = float(mp.quad(lambda x: _phi(x) * abs(f(sq * x)), [-mp.inf, 0, mp.inf]))
        assert abs(got - float(ref)) <= 1e-10 * scale, (key, got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "linear", "abs"])
@pytest.mark.parametrize("C_W, lam_W, lam_b", [(None, None, 0.0), (1.7, 0.6, 0.3)])
def test_closed_forms_in_depth_match_iteration(name, C_W, lam_W, lam_b):
    act = resolve(name)
    crit = api.criticality(act).critical_points[0].C_W
    cw = crit if C_W is None else C_W
    lw = cw if lam_W is None else lam_W
    maps = finite_width_maps(act)
    prof = iterate(maps, 12, cw, 0.0, lw, lam_b, k1=0.8)
    closed = closed_forms_in_depth(maps, cw, 0.0, lw, lam_b, 0.8, float(prof.values["Theta"][0]))
    assert set(closed) == set(QUANTITIES)
    for q, expr in closed.items():
        for layer in range(1, 13):
            want = prof.values[q][layer - 1]
            got = float(expr.xreplace({S.l: layer}))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12 * (1 + abs(want))), (q, layer)


def test_no_closed_form_outside_the_solvable_case():
    maps = finite_width_maps(resolve("tanh"))
    assert closed_forms_in_depth(maps, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0) == {}
    maps = finite_width_maps(resolve("relu"))
    assert closed_forms_in_depth(maps, 2.0, 0.1, 2.0, 0.1, 1.0, 1.0) == {}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "tanh", "swish", "gelu"])
def test_generated_jax_matches_numpy_iteration(name):
    maps = finite_width_maps(resolve(name))
    depth = 15
    cw = np.linspace(1.2, 1.9, depth)
    cb = np.linspace(0.0, 0.2, depth)
    widths = np.array([32, 64, 64, 128, 96] * 3)
    prof = iterate(maps, depth, cw, cb, 0.9 * cw, 0.5 * cb, widths=widths)
    jx = iterate_jax(maps, depth, cw, cb, 0.9 * cw, 0.5 * cb, widths=widths)
    for q in QUANTITIES:
        np.testing.assert_allclose(jx[q], prof.values[q], rtol=1e-12, atol=1e-300)


@pytest.mark.slow
@pytest.mark.parametrize("name, cw, cb", [("tanh", 1.0, 0.0), ("relu", 2.0, 0.0), ("gelu", 1.983058257437548, 0.1729223907560669)])
def test_depth_ten_thousand_is_finite(name, cw, cb):
    maps = finite_width_maps(resolve(name))
    jx = iterate_jax(maps, 10_000, cw, cb, widths=1000)
    for q in QUANTITIES:
        assert np.all(np.isfinite(jx[q])), q
    prof = iterate(maps, 10_000, cw, cb, widths=1000) if name == "relu" else None
    if prof is not None:
        for v in prof.normalised().values():
            assert np.all(np.isfinite(v[1:]))


# ------------------------------------------------------------------------------- Monte Carlo


def _fit_intercept(ns, ys, ses):
    """Weighted least squares y = a + b/n; returns (a, stderr of a)."""
    X = np.stack([np.ones(len(ns)), 1.0 / np.asarray(ns, float)], axis=1)
    W = np.diag(1.0 / np.asarray(ses) ** 2)
    cov = np.linalg.inv(X.T @ W @ X)
    a, _ = cov @ X.T @ W @ np.asarray(ys)
    return a, np.sqrt(cov[0, 0])


def _variance_and_se(x):
    x = np.asarray(x, float)
    m = x.mean()
    m2 = np.mean((x - m) ** 2)
    m4 = np.mean((x - m) ** 4)
    return x.var(ddof=1), np.sqrt(max(m4 - m2**2, 0.0) / len(x))


def _cov_and_se(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    p = (x - x.mean()) * (y - y.mean())
    return p.mean() * len(x) / (len(x) - 1), p.std(ddof=1) / np.sqrt(len(x))


MC_CASES = [("relu", 2.0, 0.1), ("tanh", 1.5, 0.1), ("swish", 1.8, 0.1)]


@pytest.mark.slow
@pytest.mark.parametrize("name, cw, cb", MC_CASES)
def test_ntk_fluctuations_against_sampled_networks(name, cw, cb):
    """n Var(H_11) -> A + 2B and n Cov(H_11, z_1^2) -> D + 2F, extrapolated over widths 48, 96, 192.

    One input with x.x/n_0 = 1, depth 3, a single output neuron; 3000 networks per width. The O(1/n^2)
    terms are absorbed by the fitted b/n slope; the tolerance is 5 standard errors of the intercept.
    """
    depth, S_net = 3, 3000
    act = resolve(name)
    maps = finite_width_maps(act)
    theory = iterate(maps, depth, cw, cb)
    A, B, D, F = (theory.values[q][-1] for q in ("A", "B", "D", "F"))
    x = np.ones((1, 4))
    sigma = jax_activation(act)
    from derive.sampling.dense import sample_kernels

    ns, var_y, var_se, cov_y, cov_se = [], [], [], [], []
    for k, n in enumerate((48, 96, 192)):
        res = sample_kernels(sigma, x, depth, n, cw, cb, out_width=1, n_networks=S_net, seed=100 + k,
                             keep_samples=True)
        H = res.ntk_samples[:, 0, 0]
        z2 = res.nngp_samples[:, -1, 0, 0]
        v, vse = _variance_and_se(H)
        c, cse = _cov_and_se(H, z2)
        ns.append(n)
        var_y.append(n * v)
        var_se.append(n * vse)
        cov_y.append(n * c)
        cov_se.append(n * cse)
    a, se = _fit_intercept(ns, var_y, var_se)
    assert abs(a - (A + 2 * B)) < 5 * se, (a, se, A + 2 * B)
    a, se = _fit_intercept(ns, cov_y, cov_se)
    assert abs(a - (D + 2 * F)) < 5 * se, (a, se, D + 2 * F)


@pytest.mark.slow
@pytest.mark.parametrize("name, cw, cb", [("tanh", 1.5, 0.1), ("swish", 1.8, 0.1), ("relu", 2.0, 0.1)])
def test_nlo_kernel_against_sampled_networks(name, cw, cb):
    """n (E[z^2] - K) -> G1 at the last layer (depth 3), extrapolated over widths 16, 32, 64."""
    depth, S_net = 3, 6000
    act = resolve(name)
    theory = iterate(finite_width_maps(act), depth, cw, cb)
    K, G1 = theory.values["K"][-1], theory.values["G1"][-1]
    x = np.ones((1, 4))
    sigma = jax_activation(act)
    from derive.sampling.dense import sample_kernels

    ns, ys, ses = [], [], []
    for k, n in enumerate((16, 32, 64)):
        res = sample_kernels(sigma, x, depth, n, cw, cb, n_networks=S_net, seed=200 + k)
        ns.append(n)
        ys.append(n * (res.nngp_mean[-1, 0, 0] - K))
        ses.append(n * res.nngp_stderr[-1, 0, 0])
    a, se = _fit_intercept(ns, ys, ses)
    assert abs(a - G1) < 5 * se, (a, se, G1)


@pytest.mark.parametrize("name, cw, cb, lam_w, lam_b", [("relu", 2.0, 0.1, 1.3, 0.4), ("tanh", 1.5, 0.1, 0.6, 0.9),
                                                       ("swish", 1.8, 0.2, 0.6, 0.9)])
@pytest.mark.slow
def test_dntk_against_sampled_networks(name, cw, cb, lam_w, lam_b):
    """n E[dH_ijj z_i] -> P and n E[dH_iij z_j] -> Q (i != j), the dNTK's leading statistics.

    The sampled dNTK is the second directional derivative of real networks (nested forward-mode
    differentiation), independent of the derivation. Depth 3 with learning rates unlike C_W, C_b. At
    layer 2 the statistics are exact at any width (layer-1 preactivations are Gaussian, the layer-1
    NTK deterministic): checked at width 32. At layer 3, where the B and F correlations of layer 2
    enter, widths 16, 32, 64 are extrapolated in 1/n. Tolerance: 5 standard errors.
    """
    from derive.sampling.dntk import sample_dntk

    depth = 3
    act = resolve(name)
    theory = iterate(finite_width_maps(act), depth, cw, cb, lam_w, lam_b)
    sigma = jax_activation(act)
    ns, est = (16, 32, 64), {"P": [], "Q": []}
    for k, n in enumerate(ns):
        res = sample_dntk(sigma, depth, n, cw, cb, lam_w, lam_b, n_networks=1500, seed=300 + k)
        for q in est:
            est[q].append(res.estimate(q))
    for q, rows in est.items():
        m, se = rows[1][0][0], rows[1][1][0]  # layer 2, width 32
        assert abs(m - theory.values[q][1]) <= 5 * se + 1e-12, (q, 2, m, se, theory.values[q][1])  # relu P: 0 to rounding
        a, se = _fit_intercept(ns, [r[0][1] for r in rows], [r[1][1] for r in rows])
        assert abs(a - theory.values[q][2]) < 5 * se, (q, 3, a, se, theory.values[q][2])
    if name == "relu":  # scale-invariant: <sigma sigma''> = <sigma sigma'^2 sigma''> = 0, so P = 0
        assert np.all(theory.values["P"] == 0)


# ------------------------------------------------------------------------- several inputs


X2 = np.array([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0]]) * 2.0


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_batch_tensors_reduce_to_single_input_on_the_diagonal(name):
    from derive.finite.batch import iterate_batch

    act = resolve(name)
    bp = iterate_batch(act, X2, 4, 1.8, 0.1)
    for i in range(len(X2)):
        k1 = 0.1 + 1.8 * float(X2[i] @ X2[i]) / X2.shape[1]
        p = iterate(finite_width_maps(act), 4, 1.8, 0.1, k1=k1)
        np.testing.assert_allclose(bp.V[:, i, i, i, i], p.values["V"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bp.G1[:, i, i], p.values["G1"], rtol=1e-10, atol=1e-14)
    # the symmetries of the four-point vertex
    V = bp.V[-1]
    np.testing.assert_allclose(V, V.transpose(1, 0, 2, 3), rtol=1e-12)
    np.testing.assert_allclose(V, V.transpose(2, 3, 0, 1), rtol=1e-12)


def _sampled_ghat(name, x, depth, n, cw, cb, S_net, seed):
    """Per-network G_hat^(L)_ab = C_b + C_W/n sum_j sigma(z_{j;a}) sigma(z_{j;b}) of layer L-1."""
    import jax
    import jax.numpy as jnp

    from derive.sampling.dense import forward, init_network, layer_widths

    sig = jax_activation(resolve(name))
    widths = layer_widths(x.shape[1], depth, n, 1)
    xj = jnp.asarray(x)

    def one(k):
        params = init_network(jax.random.fold_in(jax.random.key(seed), k), widths, cw, cb)
        h = sig(forward(params, sig, xj)[-2])
        return cb + cw * h @ h.T / n

    return np.asarray(jax.lax.map(one, jnp.arange(S_net), batch_size=500))


@pytest.mark.slow
@pytest.mark.parametrize("name, cw, cb", [("relu", 2.0, 0.1), ("tanh", 1.8, 0.1), ("swish", 1.8, 0.1)])
def test_batch_vertex_and_nlo_kernel_against_sampled_networks(name, cw, cb):
    """V_{(ab)(cd)} = n Cov(G_hat_ab, G_hat_cd) and G1_ab = n (E G_hat_ab - K_ab) for two inputs at
    depth 3, extrapolated in 1/n from widths 32 and 64 (6000 networks each), within 5 sigma."""
    from derive.finite.batch import iterate_batch

    depth = 3
    bp = iterate_batch(resolve(name), X2, depth, cw, cb)
    idx = [(0, 0), (0, 1), (1, 1)]
    est: dict = {}
    for k, n in enumerate((32, 64)):
        G = _sampled_ghat(name, X2, depth, n, cw, cb, 6000, seed=300 + k)
        flat = np.stack([G[:, a, b] for a, b in idx], axis=1)
        for i, (a, b) in enumerate(idx):
            m = flat[:, i].mean()
            est.setdefault(("G1", a, b), []).append((n, n * (m - bp.K[-1, a, b]), n * flat[:, i].std(ddof=1) / np.sqrt(len(flat))))
            for j, (c, d) in enumerate(idx[i:], start=i):
                c_, se = _cov_and_se(flat[:, i], flat[:, j])
                est.setdefault(("V", a, b, c, d), []).append((n, n * c_, n * se))
    for key, rows in est.items():
        ns, ys, ses = zip(*rows)
        a_, se = _fit_intercept(ns, ys, ses)
        theory = bp.G1[-1, key[1], key[2]] if key[0] == "G1" else bp.V[-1, key[1], key[2], key[3], key[4]]
        assert abs(a_ - theory) < 5 * se, (key, a_, se, theory)


@pytest.mark.slow
def test_sampled_dntk_does_not_depend_on_the_chunk_size():
    from derive.sampling.dntk import sample_dntk

    sigma = jax_activation(resolve("tanh"))
    a = sample_dntk(sigma, 3, 8, 1.5, 0.1, n_networks=7, seed=4, chunk=3).samples
    b = sample_dntk(sigma, 3, 8, 1.5, 0.1, n_networks=7, seed=4, chunk=5).samples
    assert a.shape == (7, 2, 3)
    np.testing.assert_array_equal(a, b)
