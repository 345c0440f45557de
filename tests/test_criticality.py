"""Criticality against independent numerics: mpmath quadrature and root finding with activations
written out by hand, and the single-input map iterated to depth 10^4 with a Gauss-Hermite rule."""

from __future__ import annotations

import json
import subprocess
import sys

import mpmath as mp
import numpy as np
import pytest

from derive.rules.activations import resolve
from derive.symbolic.critical import analyse

mp.mp.dps = 30
SQ2 = mp.sqrt(2)


def _phi(z):
    return mp.exp(-z * z / 2) / mp.sqrt(2 * mp.pi)


def _sig(z):
    return 1 / (1 + mp.exp(-z))


# Hand-written sigma, sigma', sigma'' (independent of the rule files and the engine).
HAND = {
    "relu": (lambda z: max(z, 0), lambda z: 1 if z > 0 else 0, lambda z: 0),
    "leaky_relu": (lambda z: z if z > 0 else z / 100, lambda z: 1 if z > 0 else mp.mpf(1) / 100, lambda z: 0),
    "linear": (lambda z: z, lambda z: 1, lambda z: 0),
    "tanh": (mp.tanh, lambda z: 1 - mp.tanh(z) ** 2, lambda z: -2 * mp.tanh(z) * (1 - mp.tanh(z) ** 2)),
    "sin": (mp.sin, mp.cos, lambda z: -mp.sin(z)),
    "erf": (mp.erf, lambda z: 2 / mp.sqrt(mp.pi) * mp.exp(-z * z), lambda z: -4 * z / mp.sqrt(mp.pi) * mp.exp(-z * z)),
    "gelu": (lambda z: z * (1 + mp.erf(z / SQ2)) / 2, lambda z: (1 + mp.erf(z / SQ2)) / 2 + z * _phi(z),
             lambda z: _phi(z) * (2 - z * z)),
    "swish": (lambda z: z * _sig(z), lambda z: _sig(z) + z * _sig(z) * (1 - _sig(z)),
              lambda z: 2 * _sig(z) * (1 - _sig(z)) + z * _sig(z) * (1 - _sig(z)) * (1 - 2 * _sig(z))),
}


def expect(f, K):
    s = mp.sqrt(K)
    return mp.quad(lambda x: _phi(x) * f(s * x), [-mp.inf, 0, mp.inf])


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "linear"])
def test_scale_invariant_critical_point(name):
    rep = analyse(resolve(name))
    assert rep.cls == "scale-invariant"
    (p,) = rep.critical_points
    sigma = HAND[name][0]
    A2 = expect(lambda z: sigma(z) ** 2, 1)  # <sigma^2>_K / K at K = 1
    assert p.C_W == pytest.approx(float(1 / A2), rel=1e-12) and p.C_b == 0
    # exact form agrees with the float
    assert float(p.exact["C_W"]) == pytest.approx(p.C_W, rel=1e-15)


@pytest.mark.parametrize("name", ["tanh", "sin", "erf"])
def test_k0_class_critical_point(name):
    rep = analyse(resolve(name))
    assert rep.cls == "K*=0"
    sigma = HAND[name][0]
    s1 = mp.diff(sigma, 0)
    p = rep.critical_points[0]
    assert (p.C_b, p.K_star) == (0.0, 0.0)
    assert p.C_W == pytest.approx(float(1 / s1**2), rel=1e-12)


def _gauss_hermite_map(name, C_W, C_b):
    """K -> C_b + C_W <sigma^2>_K and chi_perp(K) with a 160-point Gauss-Hermite rule (NumPy)."""
    x, w = np.polynomial.hermite_e.hermegauss(160)
    w = w / w.sum()
    fns = {"tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2), "sin": (np.sin, np.cos),
           "erf": (lambda z: np.vectorize(lambda t: float(mp.erf(t)))(z),
                   lambda z: 2 / np.sqrt(np.pi) * np.exp(-z * z))}
    s, ds = fns[name]

    def step(K):
        z = np.sqrt(K) * x
        return C_b + C_W * np.sum(w * s(z) ** 2), C_W * np.sum(w * ds(z) ** 2)

    return step


@pytest.mark.parametrize("name", ["tanh", "sin"])
def test_k0_class_asymptotics_by_iterating_to_depth_1e4(name):
    """K^(l) ~ 1/(-a1 l) and chi_perp^(l) ~ 1 - p_perp / l, read off the iterated map at l = 10^4."""
    rep = analyse(resolve(name))
    step = _gauss_hermite_map(name, rep.critical_points[0].C_W, 0.0)
    K, L = 1.0, 10_000
    for _ in range(L - 1):
        K, _chi = step(K)
    _, chi = step(K)
    a1, p_perp = float(rep.a1), float(rep.p_perp)
    # Next-order corrections are O(log(l)/l) relative: 1e-3 at l = 1e4; 1% is ample and still decisive.
    assert L * K == pytest.approx(1 / -a1, rel=1e-2)
    assert L * (1 - chi) == pytest.approx(p_perp, rel=2e-2)


def test_erf_a1_b1_against_direct_series():
    """a1, b1 from finite differences of the independent maps at small K (mpmath, 30 digits)."""
    rep = analyse(resolve("erf"))
    s, ds, _ = HAND["erf"]
    cw = mp.pi / 4
    f = lambda K: cw * expect(lambda z: s(z) ** 2, K)  # noqa: E731
    chi = lambda K: cw * expect(lambda z: ds(z) ** 2, K)  # noqa: E731
    h = mp.mpf("1e-6")
    a1 = (f(2 * h) - 2 * f(h)) / (2 * h * h)  # f = K + a1 K^2 + c K^3: (f(2h) - 2 f(h)) / (2h^2) = a1 + 3ch
    b1 = (4 * (chi(h) - 1) - (chi(2 * h) - 1)) / (2 * h)  # Richardson for chi = 1 + b1 K + c K^2
    assert float(rep.a1) == pytest.approx(float(a1), rel=1e-4)
    assert float(rep.b1) == pytest.approx(float(b1), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gelu", "swish"])
def test_half_stable_critical_point_by_mpmath_root_finding(name):
    rep = analyse(resolve(name))
    assert rep.cls == "half-stable"
    s, ds, d2s = HAND[name]
    p = rep.critical_points[0]
    kstar = mp.findroot(lambda K: expect(lambda z: s(z) * d2s(z), K), mp.mpf(p.K_star) * (1 + mp.mpf("1e-3")))
    cw = 1 / expect(lambda z: ds(z) ** 2, kstar)
    cb = kstar - cw * expect(lambda z: s(z) ** 2, kstar)
    assert p.K_star == pytest.approx(float(kstar), rel=1e-10)
    assert p.C_W == pytest.approx(float(cw), rel=1e-10)
    assert p.C_b == pytest.approx(float(cb), rel=1e-9)


def test_half_stable_side_matches_iteration():
    """GELU at its critical point: K^(l) started on the stable side converges to K*, the other side leaves."""
    rep = analyse(resolve("gelu"))
    p = rep.critical_points[0]
    s = HAND["gelu"][0]
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    sv = np.vectorize(lambda t: float(s(mp.mpf(t))))
    zs = {}

    def f(K):
        if K not in zs:
            zs[K] = p.C_b + p.C_W * np.sum(w * sv(np.sqrt(K) * x) ** 2)
        return zs[K]

    stable_above = "stable from above" in p.stability
    start = p.K_star * (1.3 if stable_above else 0.7)
    K = start
    for _ in range(60):
        K = f(K)
    assert abs(K - p.K_star) < abs(start - p.K_star)


@pytest.mark.parametrize("expr, words", [("z**2", "sigma'(0) = 0"), ("softplus", "sigma(0)"), ("exp", "sigma(0) = 1")])
def test_no_critical_point_gives_reason(expr, words):
    rep = analyse(resolve(expr))
    assert rep.cls == "none" and rep.critical_points == [] and words in rep.reason


def test_cli_criticality_json():
    res = subprocess.run([sys.executable, "-m", "cli", "criticality", "--activation", "tanh", "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("activation", "class", "critical_points", "chi_par", "chi_perp", "taylor", "a1", "b1", "p_perp"):
        assert key in out
    assert out["class"] == "K*=0"
    assert out["critical_points"][0]["C_W_exact"] == "1"
    assert set(out["taylor"]) == {f"sigma_{p}" for p in range(5)}
    res = subprocess.run([sys.executable, "-m", "cli", "criticality", "--activation", "z**2", "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    out = json.loads(res.stdout)
    assert out["class"] == "none" and out["reason"]
