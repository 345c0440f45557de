"""Fixed points of the correlation map (derive profile): every shipped activation against an independent
iteration of the map by quadrature of the activation itself (no derived expectation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from derive.core import symbols as S
from derive.rules.activations import resolve
from derive.rules.files import activation_names
from derive.symbolic.numeric import evaluate
from derive.symbolic.signal import correlation_fixed_points, depth_profile

ROOT = Path(__file__).resolve().parent.parent
#: Gauss-Legendre points per piece of the independent map's integrals.
NODES = 64
#: The integrals are cut at z = 0 (where every shipped kink or jump sits) and at |u|, |v| = CUT.
CUT = 9.0
#: Residual of the independent map at a reported fixed point.
RESIDUAL_TOL = 1e-7
#: Grid of rho on which the independent map is tabulated (its sign changes bracket every crossing).
GRID = np.linspace(-1.0, 1.0, 201)
SETTINGS = [(1.0, 0.1), (1.6, 0.0)]


def _pieces(edges: np.ndarray):
    """Gauss-Legendre nodes and weights (times the standard normal density) on consecutive intervals
    [edges[..., k], edges[..., k + 1]], broadcast over leading axes."""
    t, w = np.polynomial.legendre.leggauss(NODES)
    a, b = edges[..., :-1, None], edges[..., 1:, None]
    x = (a + b) / 2 + (b - a) / 2 * t
    weight = (b - a) / 2 * w * np.exp(-x**2 / 2) / np.sqrt(2 * np.pi)
    return x.reshape(*edges.shape[:-1], -1), weight.reshape(*edges.shape[:-1], -1)


def _independent_map(activation, K, cw, cb):
    """rho -> (C_b + C_W <sigma(z1) sigma(z2)>) / (C_b + C_W <sigma(z)^2>) at variance K (the next
    layer's correlation), for an array of rho: z1 = sqrt(K) u, z2 = sqrt(K) (rho u + sqrt(1 - rho^2) v),
    u and v standard normal, each integral by Gauss-Legendre pieces cut where z1 = 0 and z2 = 0 (a
    kink or jump of sigma does not spoil the rule). No derived expectation is used."""

    def sigma(z):
        return np.broadcast_to(np.asarray(evaluate(activation.sigma_numeric, {S.z: z}), dtype=float), z.shape)

    u, wu = _pieces(np.array([-CUT, 0.0, CUT]))
    s1 = sigma(np.sqrt(K) * u)
    norm = cb + cw * float(np.sum(wu * s1**2))

    def step(rho):
        rho = np.asarray(rho, dtype=float)[:, None]
        c = np.sqrt(np.maximum(1 - rho**2, 0.0))
        cut = np.clip(-rho * u / np.maximum(c, 1e-300), -CUT, CUT)
        v, wv = _pieces(np.stack([np.full_like(cut, -CUT), cut, np.full_like(cut, CUT)], axis=-1))
        z2 = np.sqrt(K) * (rho[..., None] * u[None, :, None] + c[..., None] * v)
        inner = np.sum(wv * sigma(z2), axis=-1)
        return (cb + cw * np.sum(wu * s1 * inner, axis=-1)) / norm

    return step


def _cases():
    for name in activation_names():
        for cw, cb in SETTINGS:
            yield name, cw, cb


@pytest.mark.slow
@pytest.mark.parametrize("name,cw,cb", list(_cases()))
def test_every_crossing_of_the_independent_map_is_reported(name, cw, cb):
    """The independent map, tabulated on a grid of rho: each sign change of its residual rho' - rho
    brackets a reported fixed point, and each reported fixed point is one of it (residual
    < RESIDUAL_TOL); rho = 1 is always reported (identical inputs stay identical)."""
    act = resolve(name)
    with np.errstate(all="ignore"):
        prof = depth_profile(act, cw, cb, 400)
    K = float(prof.K[-1])
    if not (np.isfinite(K) and 1e-8 < K < 1e4):
        pytest.skip(f"the single-input map does not settle at a finite K here (K_400 = {K:.3g})")
    fps = correlation_fixed_points(act, cw, cb, K)
    reported = np.array([f["rho"] for f in fps])
    assert np.any(reported == 1.0), fps
    step = _independent_map(act, K, cw, cb)
    with np.errstate(all="ignore"):
        residual = step(GRID) - GRID
        at_reported = step(reported) - reported
    assert np.all(np.abs(at_reported) < RESIDUAL_TOL), (fps, at_reported)
    h = GRID[1] - GRID[0]
    for i in np.flatnonzero(np.sign(residual[:-1]) * np.sign(residual[1:]) < 0):
        assert np.any((reported >= GRID[i] - h) & (reported <= GRID[i + 1] + h)), (GRID[i], fps)


def test_gelu_at_its_critical_point_reports_rho_one():
    """The case of the report: GELU at (C_W, C_b) = (1.983, 0.173), 1000 layers: rho -> 1 and the
    fixed point rho = 1 is listed, with chi_c close to 1 (the approach to K* is a power law)."""
    out = subprocess.run([sys.executable, "-m", "cli", "profile", "--activation", "gelu", "--cw", "1.983", "--cb",
                          "0.173", "--depth", "1000", "--format", "json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    fps = json.loads(out.stdout)["correlation_fixed_points"]
    assert [f["rho"] for f in fps] == [1.0] and 0.95 < fps[0]["chi_c"] <= 1.0


def test_relu_at_criticality_is_marginal_and_the_profile_runs():
    """ReLU at (2, 0): chi_perp = 1 exactly, the fixed point rho = 1 is marginal (a tangent), and
    the profile of a constant susceptibility prints per layer (it used to fail on a scalar)."""
    act = resolve("relu")
    prof = depth_profile(act, 2.0, 0.0, 50)
    assert prof.chi_par.shape == (50,) and np.allclose(prof.chi_perp, 1.0)
    fps = correlation_fixed_points(act, 2.0, 0.0, float(prof.K[-1]))
    assert len(fps) == 1 and fps[0]["rho"] == 1.0 and fps[0]["marginal"] and not fps[0]["stable"]
    out = subprocess.run([sys.executable, "-m", "cli", "profile", "--activation", "relu", "--cw", "2", "--cb", "0",
                          "--depth", "50"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "marginal" in out.stdout
