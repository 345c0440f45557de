"""Four-point functions <prod_i sigma(z_i)^p_i>_K on three or four distinct inputs
(:func:`derive.finite.moments.distinct_moment`) against independent references.

* Exact values in mpmath (30 digits), from identities that share no code with the engine:
  ReLU, leaky ReLU, |z| and the step are sums of E[prod z_i^k_i prod_{i in S} H(z_i)], reduced by
  Stein's lemma and conditioning on z_j = 0 to orthant probabilities (Sheppard's arcsine for two and
  three variables; for four, Plackett's one-dimensional integral by mpmath's tanh-sinh quadrature);
  erf(z) = E_w[sign(sqrt(2) z - w)] and gelu(z) = z Phi(z) = z E_w[H(z - w)] with independent
  w ~ N(0, 1) turn erf and GELU moments into the same orthant moments of a larger Gaussian vector;
  polynomials are Wick moments (the same recursion without steps).
* tanh and swish have no such identity: a nested composite Gauss-Legendre rule (panels of fixed
  width) in the Cholesky coordinates of the reversed input order, every coordinate explicit, at two
  panel orders whose agreement is checked before use. The engine's rule is a trapezoid rule in the
  other order's coordinates with the last coordinate tabulated.

Errors are judged relative to |reference| (the covariances are chosen so that no moment is tiny).
"""

from __future__ import annotations

from functools import lru_cache

import mpmath as mp
import numpy as np
import pytest
from scipy import special as sps

from derive.core.errors import DeriveError
from derive.finite import moments as fw
from derive.finite.batch import iterate_batch
from derive.finite.moments import MomentRule, distinct_moment, moment_rule
from derive.rules.activations import resolve

mp.mp.dps = 30


def _corr_cov(rho, var):
    d = np.sqrt(np.asarray(var, dtype=float))
    return np.asarray(rho, dtype=float) * d[:, None] * d[None, :]


def _kernel(x, cw=1.7, cb=0.1):
    return cb + cw * x @ x.T / x.shape[1]


#: Layer-1 kernels of the batch tests and benchmarks (variances up to 2.6, correlations -0.73..0.6),
#: a strongly anti-correlated pair, nearly aligned inputs, and mixed strong correlations.
COVS = {
    "random8": _kernel(np.random.default_rng(0).normal(size=(4, 8))),
    "random5": _kernel(np.random.default_rng(0).normal(size=(4, 5))),
    "anti": _corr_cov([[1, -0.867, 0.3, 0.5], [-0.867, 1, -0.2, -0.4], [0.3, -0.2, 1, 0.1],
                       [0.5, -0.4, 0.1, 1]], [1.0, 1.2, 0.8, 1.5]),
    "aligned": _kernel(np.random.default_rng(2).normal(size=6)
                       + 0.1 * np.random.default_rng(3).normal(size=(4, 6))),
    "mixed": _corr_cov([[1, 0.98, -0.97, 0.2], [0.98, 1, -0.95, 0.25], [-0.97, -0.95, 1, -0.1],
                        [0.2, 0.25, -0.1, 1]], [2.0, 1.5, 1.0, 0.5]),
}
PATTERNS = [(2, 1, 1), (1, 2, 1), (1, 1, 1, 1)]


# ------------------------------------------------------------------------ mpmath exact reference


def _mp_matrix(cov):
    if isinstance(cov, mp.matrix):
        return cov
    return mp.matrix([[mp.mpf(repr(float(c))) for c in row] for row in np.asarray(cov)])


def _orthant(C):
    """P(X > 0), X ~ N(0, C), at most four variables."""
    m = C.rows
    if m == 0:
        return mp.mpf(1)
    R = mp.matrix(m, m)
    for i in range(m):
        for j in range(m):
            R[i, j] = C[i, j] / mp.sqrt(C[i, i] * C[j, j])
    if m == 1:
        return mp.mpf(1) / 2
    if m == 2:
        return mp.mpf(1) / 4 + mp.asin(R[0, 1]) / (2 * mp.pi)
    if m == 3:
        return mp.mpf(1) / 8 + (mp.asin(R[0, 1]) + mp.asin(R[0, 2]) + mp.asin(R[1, 2])) / (4 * mp.pi)
    assert m == 4
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]

    def slope(t):  # dP/dt along R(t) = I + t (R - I), Plackett (1954)
        Rt = mp.eye(4) + t * (R - mp.eye(4))
        total = mp.mpf(0)
        for i, j in pairs:
            k, l = (x for x in range(4) if x not in (i, j))
            inv = mp.matrix([[1, Rt[i, j]], [Rt[i, j], 1]]) ** -1
            bk, bl = mp.matrix([[Rt[k, i], Rt[k, j]]]), mp.matrix([[Rt[l, i], Rt[l, j]]])
            ckl = Rt[k, l] - (bk * inv * bl.T)[0, 0]
            ckk, cll = 1 - (bk * inv * bk.T)[0, 0], 1 - (bl * inv * bl.T)[0, 0]
            density = 1 / (2 * mp.pi * mp.sqrt(1 - Rt[i, j] ** 2))
            total += R[i, j] * density * (mp.mpf(1) / 4 + mp.asin(ckl / mp.sqrt(ckk * cll)) / (2 * mp.pi))
        return total

    return mp.mpf(1) / 16 + mp.quad(slope, [0, 1])


def _stepped(C, k, steps):
    """E[prod X_i^k_i prod_{i in steps} H(X_i)], X ~ N(0, C), by Stein's lemma and conditioning."""
    m = C.rows
    used = [i for i in range(m) if k[i] > 0 or i in steps]
    if len(used) < m:  # marginalise what the integrand does not use
        sub = mp.matrix(len(used), len(used))
        for a, i in enumerate(used):
            for b, j in enumerate(used):
                sub[a, b] = C[i, j]
        return _stepped(sub, [k[i] for i in used], {used.index(j) for j in steps})
    if all(ki == 0 for ki in k):
        return _orthant(C)
    i = next(a for a in range(m) if k[a] > 0)
    rest = list(k)
    rest[i] -= 1
    total = mp.mpf(0)
    for j in range(m):
        if rest[j] > 0:
            lower = list(rest)
            lower[j] -= 1
            total += C[i, j] * rest[j] * _stepped(C, lower, steps)
        elif j in steps:
            keep = [a for a in range(m) if a != j]
            cond = mp.matrix(m - 1, m - 1)
            for a, x in enumerate(keep):
                for b, y in enumerate(keep):
                    cond[a, b] = C[x, y] - C[x, j] * C[j, y] / C[j, j]
            total += (C[i, j] / mp.sqrt(2 * mp.pi * C[j, j])
                      * _stepped(cond, [rest[a] for a in keep], {keep.index(s) for s in steps if s != j}))
    return total


#: sigma^p = sum_k a_k z^k + sum_k b_k z^k H(z): ((a_k), (b_k)) for p = 1, 2, written out by hand.
PIECEWISE = {
    "relu": {1: ((0, 0), (0, 1)), 2: ((0, 0, 0), (0, 0, 1))},
    "leaky_relu": {1: ((0, 0.01), (0, 0.99)), 2: ((0, 0, 1e-4), (0, 0, 1 - 1e-4))},
    "abs": {1: ((0, -1), (0, 2)), 2: ((0, 0, 1), ())},
    "step": {1: ((), (1,)), 2: ((), (1,))},
}


def _piecewise_reference(name, cov, powers):
    from itertools import product

    C = _mp_matrix(cov)
    terms = []
    for p in powers:
        below, step = PIECEWISE[name][p]
        terms.append([(k, mp.mpf(repr(c)), False) for k, c in enumerate(below) if c]
                     + [(k, mp.mpf(repr(c)), True) for k, c in enumerate(step) if c])
    total = mp.mpf(0)
    for combo in product(*terms):
        coeff = mp.fprod(c for _, c, _ in combo)
        total += coeff * _stepped(C, [k for k, _, _ in combo], {i for i, t in enumerate(combo) if t[2]})
    return total


def _erf_reference(cov, powers):
    """E[prod erf(z_i)^p_i] = E[prod_c sign(y_c)], y_c = sqrt(2) z_i(c) - w_c: sign = 2H - 1 expanded."""
    S = _mp_matrix(cov)
    copies = [i for i, p in enumerate(powers) for _ in range(p)]
    n = len(copies)
    C = mp.matrix(n, n)
    for a in range(n):
        for b in range(n):
            C[a, b] = 2 * S[copies[a], copies[b]] + (1 if a == b else 0)
    total = mp.mpf(0)
    for mask in range(1 << n):
        sub = {a for a in range(n) if mask >> a & 1}
        total += 2 ** len(sub) * (-1) ** (n - len(sub)) * _stepped(C, [0] * n, sub)
    return total


def _gelu_reference(cov, powers):
    """E[prod (z_i Phi(z_i))^p_i] = E[prod_i z_i^p_i prod_c H(z_i(c) - w_c)] over (z, y = z - w)."""
    S = _mp_matrix(cov)
    d = len(powers)
    copies = [i for i, p in enumerate(powers) for _ in range(p)]
    n = len(copies)
    C = mp.matrix(d + n, d + n)
    for i in range(d):
        for j in range(d):
            C[i, j] = S[i, j]
    for a in range(n):
        for i in range(d):
            C[i, d + a] = C[d + a, i] = S[i, copies[a]]
        for b in range(n):
            C[d + a, d + b] = S[copies[a], copies[b]] + (1 if a == b else 0)
    return _stepped(C, list(powers) + [0] * n, set(range(d, d + n)))


@lru_cache(maxsize=None)
def _reference(name, cov_key, powers):
    cov = COVS[cov_key][: len(powers), : len(powers)]
    if name == "erf":
        return float(_erf_reference(cov, powers))
    if name == "gelu":
        return float(_gelu_reference(cov, powers))
    return float(_piecewise_reference(name, cov, powers))


def _engine(name, cov, powers, quad_order="auto", rule=None):
    act = resolve(name)
    rule = rule or moment_rule(act, quad_order, float(np.max(np.diag(cov))))
    numeric = fw.NumpyMoments(act.sigma_numeric, rule.smoothed)
    with np.errstate(all="ignore"):
        return float(distinct_moment(np, rule, numeric.sigma, numeric.smoothed, np.asarray(cov, float),
                                     powers, fw._root))


def test_reference_reproduces_known_values():
    """Sheppard/Plackett: the equicorrelated (rho = 1/2) four-variate orthant probability is 1/5;
    the arc-cosine kernel; E relu(z)^4 = 3 K^2 / 2; the erf-arcsine kernel; E (z Phi(z))^2 by hand."""
    R = mp.matrix([[1 if i == j else mp.mpf(1) / 2 for j in range(4)] for i in range(4)])
    assert abs(_orthant(R) - mp.mpf(1) / 5) < 1e-25
    cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    theta = np.arccos(0.5 / np.sqrt(2))
    arccos = np.sqrt(2) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
    assert abs(float(_piecewise_reference("relu", cov, (1, 1))) - arccos) < 1e-15
    assert abs(_stepped(mp.matrix([[2]]), [4], {0}) - 6) < 1e-25
    assert abs(float(_erf_reference(cov, (1, 1))) - 2 / np.pi * np.arcsin(1 / np.sqrt(15))) < 1e-15
    # E[(z Phi(z))^2], z ~ N(0, 1), by mpmath quadrature
    want = mp.quad(lambda z: z**2 * mp.ncdf(z) ** 2 * mp.npdf(z), [-mp.inf, 0, mp.inf])
    assert abs(_gelu_reference([[1.0]], (2,)) - want) < 1e-25


# ---------------------------------------------------------------------- piecewise-linear: exact


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "abs", "step"])
@pytest.mark.parametrize("cov_key", list(COVS))
def test_piecewise_polynomial_moments_are_exact(name, cov_key):
    assert moment_rule(resolve(name)).kind == "exact"
    for powers in PATTERNS:
        want = _reference(name, cov_key, powers)
        got = _engine(name, COVS[cov_key][: len(powers), : len(powers)], powers)
        assert abs(got - want) <= 1e-11 * abs(want), (powers, got, want)


@pytest.mark.parametrize("cov_key", ["random8", "random5", "anti", "aligned"])
def test_kink_aware_panels_against_exact_relu(cov_key):
    """The rule for kinked activations that are not piecewise polynomial (ELU, SELU), run on ReLU:
    nested Gauss-Legendre panels split at the kinks, last coordinate in closed form."""
    smoothed = fw.smoothed_activation(resolve("relu").sigma_numeric)
    assert smoothed is not None
    rule = MomentRule("panels", 16, smoothed=smoothed)
    for powers in PATTERNS:
        want = _reference("relu", cov_key, powers)
        got = _engine("relu", COVS[cov_key][: len(powers), : len(powers)], powers, rule=rule)
        assert abs(got - want) <= 1e-8 * abs(want), (powers, got, want)


def test_kink_aware_panels_converge_for_elu():
    """ELU has no exact reduction; its panels rule at 16 and 32 points per panel agree to ~1e-9."""
    rule = moment_rule(resolve("elu"))
    assert rule.kind == "panels" and rule.smoothed is not None
    for key in ("random8", "anti"):
        for powers in PATTERNS:
            cov = COVS[key][: len(powers), : len(powers)]
            a = _engine("elu", cov, powers, rule=rule)
            b = _engine("elu", cov, powers, rule=MomentRule("panels", 32, smoothed=rule.smoothed))
            assert abs(a - b) <= 1e-8 * abs(b), (key, powers, a, b)


def test_singular_covariance():
    """Four inputs in two dimensions (C_b = 0): the covariance has rank 2. The exact rule lifts it to
    a definite one; the trapezoid rule uses the triangular root of the eigen-root."""
    x = np.random.default_rng(3).normal(size=(4, 2))
    cov = 1.7 * x @ x.T / 2
    X = _mp_matrix(x)
    C = X * X.T * mp.mpf("1.7") / 2 + mp.mpf("1e-24") * mp.eye(4)
    for powers in PATTERNS:
        d = len(powers)
        sub = mp.matrix(d, d)
        for i in range(d):
            for j in range(d):
                sub[i, j] = C[i, j]
        relu = float(_stepped(sub, list(powers), set(range(d))))
        assert abs(_engine("relu", cov[:d, :d], powers) - relu) <= 1e-7 * abs(relu)
        erf = float(_erf_reference(sub, powers))
        assert abs(_engine("erf", cov[:d, :d], powers) - erf) <= 1e-9 * abs(erf)


# ------------------------------------------------------------------------------ smooth: trapezoid


@pytest.mark.slow
@pytest.mark.parametrize("name", ["erf", "gelu"])
@pytest.mark.parametrize("cov_key", ["random8", "random5", "anti", "aligned", "mixed"])
def test_smooth_moments_against_orthant_reference(name, cov_key):
    rule = moment_rule(resolve(name), "auto", float(np.max(np.diag(COVS[cov_key]))))
    assert rule.kind == "trapezoid" and rule.smoothed is not None
    for powers in PATTERNS:
        want = _reference(name, cov_key, powers)
        got = _engine(name, COVS[cov_key][: len(powers), : len(powers)], powers)
        assert abs(got - want) <= 1e-10 * abs(want), (powers, got, want)


@pytest.mark.parametrize("cov_key", ["random5", "aligned"])
def test_tabulated_last_coordinate(cov_key):
    """The tabulated-and-interpolated path (activations without a closed-form smoothing), run on erf."""
    cov = COVS[cov_key]
    auto = moment_rule(resolve("erf"), "auto", float(np.max(np.diag(cov))))
    rule = MomentRule("trapezoid", auto.order)
    for powers in PATTERNS:
        want = _reference("erf", cov_key, powers)
        got = _engine("erf", cov[: len(powers), : len(powers)], powers, rule=rule)
        assert abs(got - want) <= 1e-10 * abs(want), (powers, got, want)


def test_polynomial_activation_is_wick_exact():
    """sigma = z^3 - z/2 goes to the exact rule (Stein's lemma without steps is Wick's theorem)."""
    act = resolve("z**3 - z/2")
    assert moment_rule(act).kind == "exact"
    cov = COVS["anti"]
    for powers in PATTERNS:
        d = len(powers)
        C = _mp_matrix(cov[:d, :d])
        coeffs = {1: ((0, -0.5, 0, 1),), 2: ((0, 0, 0.25, 0, -1, 0, 1),)}
        from itertools import product

        want = mp.mpf(0)
        for combo in product(*[list(enumerate(coeffs[p][0])) for p in powers]):
            c = mp.fprod(mp.mpf(repr(ck)) for _, ck in combo)
            if c:
                want += c * _stepped(C, [k for k, _ in combo], set())
        want = float(want)
        assert abs(_engine("z**3 - z/2", cov[:d, :d], powers) - want) <= 1e-12 * abs(want)


def _gl_reference(sigma, cov, powers, width, points, half_width=8.0):
    """Nested composite Gauss-Legendre (``points`` per panel of ``width``) in the Cholesky coordinates
    of the reversed input order, every coordinate explicit (the outermost one looped)."""
    order = list(reversed(range(len(powers))))
    L = np.linalg.cholesky(np.asarray(cov)[np.ix_(order, order)])
    p = [powers[i] for i in order]
    t, v = np.polynomial.legendre.leggauss(points)
    edges = np.arange(-half_width, half_width + 1e-9, width)
    lo, hi = edges[:-1, None], edges[1:, None]
    x = ((lo + hi) / 2 + (hi - lo) / 2 * t).ravel()
    w = ((hi - lo) / 2 * v).ravel() * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    n, d = len(x), len(p)

    def along(j, ndim):
        return x.reshape((1,) * j + (n,) + (1,) * (ndim - 1 - j))

    total = 0.0
    for i0 in range(n):
        G = 1.0
        for k in reversed(range(1, d)):
            z = L[k, 0] * x[i0] + sum(L[k, j] * along(j - 1, k) for j in range(1, k + 1))
            G = np.sum(w.reshape((1,) * (k - 1) + (n,)) * sigma(z) ** p[k] * G, axis=-1)
        total += w[i0] * sigma(L[0, 0] * x[i0]) ** p[0] * G
    return float(total)


SIGMAS = {"tanh": np.tanh, "swish": lambda z: z * sps.expit(z)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tanh", "swish"])
@pytest.mark.parametrize("cov_key", ["random8", "random5", "anti", "aligned", "mixed"])
def test_tanh_and_swish_on_three_inputs(name, cov_key):
    cov = COVS[cov_key][:3, :3]
    for powers in [(2, 1, 1), (1, 1, 2)]:
        want = _gl_reference(SIGMAS[name], cov, powers, 0.4, 8)
        check = _gl_reference(SIGMAS[name], cov, powers, 0.4, 7)
        assert abs(check - want) <= 1e-11 * abs(want)  # the reference has converged
        got = _engine(name, cov, powers)
        assert abs(got - want) <= 1e-10 * abs(want), (powers, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name, cov_key", [("tanh", "random5"), ("swish", "mixed")])
def test_tanh_and_swish_on_four_inputs(name, cov_key):
    """Variances scaled to <= 1.1 so that the four-dimensional reference stays affordable."""
    cov = COVS[cov_key] * 0.4
    want = _gl_reference(SIGMAS[name], cov, (1, 1, 1, 1), 1.0, 8)
    check = _gl_reference(SIGMAS[name], cov, (1, 1, 1, 1), 1.0, 7)
    assert abs(check - want) <= 1e-10 * abs(want)  # the reference has converged
    got = _engine(name, cov, (1, 1, 1, 1))
    assert abs(got - want) <= 1e-10 * abs(want), (got, want)


def test_too_coarse_an_order_is_seen():
    """A fixed order far below the automatic one is off by much more than the tolerance, and the
    rule's probe says so: the comparison above could fail."""
    cov = COVS["random5"][:3, :3]
    want = _gl_reference(np.tanh, cov, (2, 1, 1), 0.4, 8)
    coarse = moment_rule(resolve("tanh"), 24, float(np.max(np.diag(cov))))
    assert coarse.error > 1e-6
    assert abs(_engine("tanh", cov, (2, 1, 1), rule=coarse) - want) > 1e-6 * abs(want)


def test_auto_order_grows_with_the_variance():
    act = resolve("tanh")
    orders = [moment_rule(act, "auto", v).order for v in (0.25, 1.0, 2.5, 4.0)]
    assert orders == sorted(orders) and orders[0] < orders[-1]
    for v in (0.25, 4.0):
        rule = moment_rule(act, "auto", v)
        assert rule.error <= fw.DEFAULT_TOL


@pytest.mark.parametrize("bad", ["fast", 0, -3, 2.5, True])
def test_rejects_bad_quad_order(bad):
    with pytest.raises(DeriveError):
        moment_rule(resolve("tanh"), bad)
    with pytest.raises(DeriveError):
        iterate_batch(resolve("tanh"), np.eye(3), 2, 1.0, 0.0, quad_order=bad)


def test_batch_profile_records_the_rule():
    x = np.random.default_rng(0).normal(size=(3, 4))
    prof = iterate_batch(resolve("tanh"), x, 4, 1.7, 0.1)
    q = prof.quadrature
    assert q["rule"] == "trapezoid" and len(q["orders"]) == 3 and not q["smoothed_closed_form"]
    assert all(e <= fw.DEFAULT_TOL for e in q["error_estimates"])
    fixed = iterate_batch(resolve("tanh"), x, 4, 1.7, 0.1, quad_order=40)
    assert fixed.quadrature["orders"] == [40, 40, 40]
    assert iterate_batch(resolve("relu"), x, 2, 1.7, 0.1).quadrature["rule"] == "exact"
