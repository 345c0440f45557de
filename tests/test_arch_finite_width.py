"""Finite-width maps of architectures from the layer rules' [finite_width] tables.

Checked against: PDLT's dense recursions evaluated with mpmath, the dense-network engine
(derive.finite.single, whose V and G1 come from the same rule, to 1e-12), the generated
infinite-width kernels of derive.kernels.arch, recursions derived by hand for residual blocks and
LayerNorm and evaluated with mpmath, and sampled networks at three widths after a fit in 1/n
(a deliberately wrong map is rejected with the same samples).
"""

import mpmath as mp
import numpy as np
import pytest
import sympy as sp

import derive.finite.arch as afw
import derive.finite.collective as collective
from derive import arch
from derive.core.errors import DeriveError
from derive.finite.arch import arch_finite_width
from derive.finite.single import finite_width_maps, iterate
from derive.finite.tensor import arch_finite_width_tensor
from derive.rules.activations import resolve
from derive.validation.arch import compare_finite_width, sample_kernel_estimates


def _relative(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300 + 1e-12 * np.max(np.abs(b))))


# ------------------------------------------------------------------------------------------------
# The dense network through the layer rules is the dense engine


@pytest.mark.parametrize("name,cw,cb", [("relu", 2.0, 0.0), ("tanh", 1.5, 0.1), ("gelu", 1.98, 0.17),
                                        ("erf", 1.2, 0.05), ("swish", 1.8, 0.1), ("linear", 0.9, 0.2)])
@pytest.mark.slow
def test_dense_network_equals_dense_engine(name, cw, cb):
    depth = 7
    fw = arch_finite_width(arch.mlp(depth, name, cw, cb))
    profile = iterate(finite_width_maps(resolve(name)), depth, cw, cb)
    for q in ("K", "V", "G1", "Theta"):
        assert _relative(fw.values[q], profile.values[q]) < 1e-12, q


@pytest.mark.parametrize("name", ["tanh", "gelu", "relu", "swish"])
@pytest.mark.parametrize("K,V,G1,r", [(0.4, 0.3, -0.2, 1.0), (1.9, 2.5, 0.7, 0.5)])
def test_dense_rule_gives_pdlt_recursions(name, K, V, G1, r):
    """The maps derived from rules/layers/dense.toml against PDLT (4.90) and (4.115) with mpmath:
    V' = C_W^2 (<s^4> - <s^2>^2) + r chi^2 V, G1' = r [chi G1 + C_W/(8K^4) <s^2 (z^4 - 6Kz^2 + 3K^2)> V],
    chi = C_W d<s^2>/dK by numerical differentiation of the quadrature."""
    from derive.core import symbols as S
    from derive.finite.collective import dense_after_activation
    from derive.finite.collective import r as r_symbol
    from derive.symbolic.numeric import evaluate

    mp.mp.dps = 30
    f = {"tanh": mp.tanh, "relu": lambda t: max(t, 0), "gelu": lambda t: t * (1 + mp.erf(t / mp.sqrt(2))) / 2,
         "swish": lambda t: t / (1 + mp.exp(-t))}[name]
    cw, cb = 1.7, 0.2
    s2 = lambda k: _gauss(lambda t: f(t) ** 2, k)  # noqa: E731
    chi = cw * mp.diff(s2, K)
    h4 = _gauss(lambda t: f(t) ** 2 * (t**4 - 6 * K * t**2 + 3 * K**2), K)
    V_ref = cw**2 * (_gauss(lambda t: f(t) ** 4, K) - s2(K) ** 2) + r * chi**2 * V
    G1_ref = r * (chi * G1 + cw / (8 * K**4) * h4 * V)
    maps = dense_after_activation(resolve(name), 1e-11)
    values = {S.K: K, S.V: V, S.G1: G1, r_symbol: r, S.C_W: cw, S.C_b: cb}
    assert float(evaluate(maps["K"], values)) == pytest.approx(float(cb + cw * s2(K)), rel=1e-11)
    assert float(evaluate(maps["V"], values)) == pytest.approx(float(V_ref), rel=1e-10)
    assert float(evaluate(maps["G1"], values)) == pytest.approx(float(G1_ref), rel=1e-9, abs=1e-12)


def _derivatives(name):
    """sigma and its first three derivatives written out by hand (almost everywhere for relu)."""
    phi = lambda t: mp.exp(-t * t / 2) / mp.sqrt(2 * mp.pi)  # noqa: E731
    sig = lambda t: 1 / (1 + mp.exp(-t))  # noqa: E731
    if name == "tanh":
        return (mp.tanh, lambda t: 1 - mp.tanh(t) ** 2, lambda t: -2 * mp.tanh(t) * (1 - mp.tanh(t) ** 2),
                lambda t: (1 - mp.tanh(t) ** 2) * (6 * mp.tanh(t) ** 2 - 2))
    if name == "gelu":
        return (lambda t: t * mp.ncdf(t), lambda t: mp.ncdf(t) + t * phi(t), lambda t: phi(t) * (2 - t * t),
                lambda t: t * phi(t) * (t * t - 4))
    if name == "swish":
        d1 = lambda t: sig(t) * (1 - sig(t))  # noqa: E731
        d2 = lambda t: d1(t) * (1 - 2 * sig(t))  # noqa: E731
        d3 = lambda t: d1(t) * (1 - 6 * sig(t) + 6 * sig(t) ** 2)  # noqa: E731
        return (lambda t: t * sig(t), lambda t: sig(t) + t * d1(t), lambda t: 2 * d1(t) + t * d2(t),
                lambda t: 3 * d2(t) + t * d3(t))
    return (lambda t: max(t, 0), lambda t: 1 if t > 0 else 0, lambda t: 0, lambda t: 0)


@pytest.mark.parametrize("name", ["tanh", "gelu", "relu", "swish"])
@pytest.mark.parametrize("state", [dict(K=0.4, V=0.3, Theta=0.9, A=0.2, B=-0.1, D=0.3, F=0.15, P=-0.05, Q=0.4, r=1.0),
                                   dict(K=1.9, V=2.5, Theta=2.2, A=1.1, B=0.6, D=-0.4, F=0.8, P=0.3, Q=-0.2, r=0.5)])
@pytest.mark.slow
def test_dense_rule_ntk_maps_give_pdlt_recursions(name, state):
    """The [finite_width.ntk] maps of rules/layers/dense.toml against PDLT's NTK-fluctuation (8.89) and
    dNTK (ch. 11) recursions evaluated with mpmath: sigma'' and sigma''' written out, no integration by
    parts, chi_par by numerical differentiation of <sigma^2>_K."""
    from derive.core import symbols as S
    from derive.finite.single import finite_width_maps
    from derive.symbolic.numeric import evaluate

    mp.mp.dps = 30
    f, f1, f2, f3 = _derivatives(name)
    cw, cb, lw, lb = 1.7, 0.2, 0.8, 0.3
    K, V, Th, r = (mp.mpf(state[k]) for k in ("K", "V", "Theta", "r"))
    A, B, D, F, P, Q = (mp.mpf(state[k]) for k in ("A", "B", "D", "F", "P", "Q"))

    def E(g):
        return _gauss(g, K)

    W = lambda t: lw * f(t) ** 2 + cw * Th * f1(t) ** 2  # noqa: E731
    h2 = lambda t: t * t - K  # noqa: E731
    chi_par = cw * mp.diff(lambda k: _gauss(lambda t: f(t) ** 2, k), K)
    chi_perp = cw * E(lambda t: f1(t) ** 2)
    w_h2 = E(lambda t: W(t) * h2(t))
    s_d2_dd = E(lambda t: f(t) * f1(t) ** 2 * f2(t))
    d_sd = E(lambda t: f1(t) ** 2 + f(t) * f2(t))
    d_ddd = E(lambda t: f2(t) ** 2 + f1(t) * f3(t))
    want = {
        "B": cw**2 * E(lambda t: f1(t) ** 4) * Th**2 + r * chi_perp**2 * B,
        "F": cw**2 * E(lambda t: f(t) ** 2 * f1(t) ** 2) * Th + r * chi_par**2 * F,
        "D": (cw * (E(lambda t: f(t) ** 2 * W(t)) - E(lambda t: f(t) ** 2) * E(W))
              + r * cw / (4 * K**4) * V * E(lambda t: f(t) ** 2 * h2(t)) * w_h2 + r * chi_par * chi_perp * D),
        "A": (E(lambda t: W(t) ** 2) - E(W) ** 2 + r * V / (4 * K**4) * w_h2**2 + r * chi_perp**2 * A
              + r * chi_perp * w_h2 * D / K**2),
        "P": cw**2 * Th**2 * s_d2_dd + r * cw * chi_perp * E(lambda t: f(t) * f2(t)) * B + r * chi_par * chi_perp * P,
        "Q": (lw * cw * Th * E(lambda t: f(t) ** 2 * f1(t) ** 2) + cw**2 * Th**2 * s_d2_dd
              + r * (lw * cw * d_sd**2 + cw**2 * Th * d_ddd * d_sd) * F + r * chi_par * chi_perp * Q),
    }
    maps = finite_width_maps(resolve(name))
    values = {S.BY_NAME[k]: float(v) for k, v in state.items()}
    values.update({S.G1: 0.0, S.C_W: cw, S.C_b: cb, S.lambda_W: lw, S.lambda_b: lb})
    for q, ref in want.items():
        got = float(evaluate(maps.recursions[q], values))
        assert got == pytest.approx(float(ref), rel=1e-9, abs=1e-11), q


def test_dense_per_layer_variances_and_widths():
    cws, cbs, widths = [1.0, 1.7, 1.2, 2.1, 1.5], [0.0, 0.1, 0.3, 0.05, 0.2], [64, 128, 32, 96, 48]
    items = [arch.dense(cws[0], cbs[0], width=widths[0])]
    for cw, cb, n in zip(cws[1:], cbs[1:], widths[1:]):
        items += [arch.activation("tanh"), arch.dense(cw, cb, width=n)]
    fw = arch_finite_width(arch.serial(*items))  # records every layer: the dense ones are even
    profile = iterate(finite_width_maps(resolve("tanh")), 5, cws, cbs, widths=widths)
    for q in ("K", "V", "G1", "Theta"):
        assert _relative(fw.values[q][::2], profile.values[q]) < 1e-12, q


# ------------------------------------------------------------------------------------------------
# Infinite width: the same K and Theta as the generated kernels


def _residual(act, xi, gamma, cw1=1.0, cw2=1.0, cb=0.0):
    return arch.residual(arch.dense(cw1, cb), arch.activation(act), arch.dense(cw2, cb), xi=xi, gamma=gamma)


NETWORKS = {
    "residual tanh": arch.serial(arch.dense(1.0), arch.repeat(3, _residual("tanh", 0.8, 0.9, cb=0.05))),
    "residual relu": arch.serial(arch.dense(1.0), arch.repeat(3, _residual("relu", 0.6**0.5, 0.4**0.5, 2.0, 1.0))),
    "residual relu, large branch": arch.serial(arch.dense(1.0), arch.repeat(3, _residual("relu", 0.5, 1.2, 2.0, 1.0))),
    "residual tanh, small branch": arch.serial(arch.dense(1.0), arch.repeat(3, _residual("tanh", 1.0, 0.6, 1.5, 1.0))),
    "layernorm stack": arch.serial(arch.dense(1.0), arch.repeat(3, arch.layer_norm(), arch.activation("tanh"),
                                                                  arch.dense(1.5, 0.1))),
    "pre-LN residual gelu": arch.serial(arch.dense(1.0), arch.repeat(3, arch.residual(
        arch.layer_norm(), arch.dense(1.0), arch.activation("gelu"), arch.dense(1.6), xi=1.0, gamma=0.7))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_infinite_width_agrees_with_arch_kernels(name):
    from derive.kernels.arch import arch_kernels

    net = NETWORKS[name]
    fw = arch_finite_width(net)
    theory = arch_kernels(net, np.ones((1, 8)))
    K = [float(np.asarray(k).reshape(-1)[0]) for k in theory.nngp]
    gaussian = [i for i, v in enumerate(fw.values["V"]) if v is not None]
    assert _relative([fw.values["K"][i] for i in gaussian], [K[i] for i in gaussian]) < 1e-10
    assert abs(fw.values["Theta"][-1] - float(np.asarray(theory.ntk[-1]).reshape(-1)[0])) < 1e-10 * fw.values["Theta"][-1]


# ------------------------------------------------------------------------------------------------
# Recursions derived by hand, evaluated with mpmath (independent of the engine's code)


def _gauss(f, K):
    K = mp.mpf(K)
    return mp.quad(lambda t: f(t) * mp.exp(-t * t / (2 * K)), [-mp.inf, 0, mp.inf]) / mp.sqrt(2 * mp.pi * K)


def _residual_by_hand(act, xi, gamma, cw1, cw2, cb, blocks):
    """z' = xi z + gamma b, b = W2 act(u) + b2, u = W1 z + b1 (uniform width n, V and G1 per 1/n).

    u reads z through mean(z^2): K_u = C_b + C_W1 K, n Var(G_u) = C_W1^2 (2K^2 + V), G1_u = C_W1 G1 and
    X_u = n Cov(z_i^2, G_u) = C_W1 (2K^2 + V). The second dense is PDLT's (4.90), (4.115) with
    chi = C_W2 d<act^2>/dK, and X_b = chi X_u. Given z, b_i ~ N(0, G_b) independently, so
    K' = xi^2 K + gamma^2 K_b, V' = xi^4 V + 2 xi^2 gamma^2 X_b + gamma^4 V_b, G1' = xi^2 G1 + gamma^2 G1_b.
    """
    f = {"tanh": mp.tanh, "relu": lambda t: max(t, 0)}[act]
    s2 = lambda k: _gauss(lambda t: f(t) ** 2, k)  # noqa: E731
    s4 = lambda k: _gauss(lambda t: f(t) ** 4, k)  # noqa: E731
    K, V, G1 = mp.mpf(1), mp.mpf(0), mp.mpf(0)  # after the first dense (C_W = 1, x.x/n_0 = 1)
    out = [(K, V, G1)]
    for _ in range(blocks):
        Ku, Vu, Gu, Xu = cb + cw1 * K, cw1**2 * (2 * K**2 + V), cw1 * G1, cw1 * (2 * K**2 + V)
        d1, d2 = mp.diff(s2, Ku), mp.diff(s2, Ku, 2)
        Kb = cb + cw2 * s2(Ku)
        Vb = cw2**2 * (s4(Ku) - s2(Ku) ** 2) + (cw2 * d1) ** 2 * Vu
        Gb = cw2 * (d1 * Gu + d2 / 2 * Vu)
        Xb = cw2 * d1 * Xu
        K, V, G1 = (xi**2 * K + gamma**2 * Kb, xi**4 * V + 2 * xi**2 * gamma**2 * Xb + gamma**4 * Vb,
                    xi**2 * G1 + gamma**2 * Gb)
        out.append((K, V, G1))
    return [[float(v[i]) for v in out] for i in range(3)]


@pytest.mark.parametrize("act,xi,gamma,cw1,cw2,cb", [("tanh", 0.8, 0.9, 1.0, 1.0, 0.05),
                                                     ("tanh", 1.0, 0.6, 1.5, 1.0, 0.0),
                                                     ("relu", 0.6**0.5, 0.4**0.5, 2.0, 1.0, 0.0)])
@pytest.mark.slow
def test_residual_block_against_hand_derivation(act, xi, gamma, cw1, cw2, cb):
    mp.mp.dps = 30
    net = arch.serial(arch.dense(1.0), arch.repeat(3, _residual(act, xi, gamma, cw1, cw2, cb)))
    fw = arch_finite_width(net)
    K, V, G1 = _residual_by_hand(act, xi, gamma, cw1, cw2, cb, 3)
    assert _relative(fw.values["K"], K) < 1e-10
    assert _relative(fw.values["V"][1:], V[1:]) < 1e-9
    assert np.max(np.abs(np.array(fw.values["G1"]) - G1)) < 1e-9 * max(1.0, np.max(np.abs(G1)))


@pytest.mark.parametrize("xi2", [0.25, 0.5, 0.75, 0.9])
def test_scale_invariant_residual_vertex_grows_linearly(xi2):
    """ReLU blocks xi z + gamma W2 relu(W1 z) with C_W1 C_W2 = 2, C_b = 0, xi^2 + gamma^2 = 1 keep K
    fixed and add gamma^2 (4 xi^2 + 7 gamma^2) K^2 to V per block (the hand derivation above with
    <relu^2> = K/2, Var(relu^2) = 5K^2/4): V^(l)/(n K^2) grows linearly in the number of blocks, with
    slope 7 at xi = 0 (a two-layer MLP per block: 5 from the relu layer, 2 from the linear one) falling
    to 0 as the skip takes over, gamma^2/xi^2 -> 0."""
    gamma2 = 1 - xi2
    blocks = 12
    net = arch.serial(arch.dense(1.0), arch.repeat(blocks, _residual("relu", xi2**0.5, gamma2**0.5, 2.0, 1.0)))
    fw = arch_finite_width(net, width=100)
    slope = gamma2 * (4 * xi2 + 7 * gamma2)
    assert np.allclose(fw.values["K"], 1.0, rtol=1e-13)
    assert np.allclose(fw.values["V"], slope * np.arange(blocks + 1), rtol=1e-12, atol=1e-12)
    assert np.allclose(fw.values["G1"], 0.0, atol=1e-12)
    assert np.allclose(fw.normalised()["V_over_nK2"], slope * np.arange(blocks + 1) / 100, rtol=1e-12, atol=1e-14)


def test_layernorm_then_activation_by_hand():
    """dense -> LayerNorm -> tanh -> dense(C_W, C_b): with w = z/sqrt(K) ~ N(0, 1) and psi = tanh^2 the
    next layer's variance moves, to first order, as mean_j iota(z_j) with iota = C_W [psi(w) -
    (w^2/2) <psi'(w) w>] (the LayerNorm statistics' fluctuation folded in; the channel mean enters at
    second order). d<iota>/dK = 0, so V' = C_W^2 Var(psi(w) - (w^2/2) <psi'(w) w>), whatever V was:
    LayerNorm stops the vertex from accumulating (for eps -> 0; here eps = 1e-12)."""
    mp.mp.dps = 30
    cw, cb = 1.5, 0.1
    psi = lambda t: mp.tanh(t) ** 2  # noqa: E731
    slope = _gauss(lambda t: mp.diff(psi, t) * t, 1)
    iota = lambda t: psi(t) - t * t / 2 * slope  # noqa: E731
    V_hand = float(cw**2 * (_gauss(lambda t: iota(t) ** 2, 1) - _gauss(iota, 1) ** 2))
    K_hand = float(cb + cw * _gauss(psi, 1))
    fw = arch_finite_width(NETWORKS["layernorm stack"])
    for i in (1, 2, 3):
        assert abs(fw.values["V"][i] - V_hand) < 1e-9 * V_hand
        assert abs(fw.values["K"][i] - K_hand) < 1e-10 * K_hand


def test_ntk_fluctuations_after_layernorm_by_hand():
    """dense(C_W=2) -> LayerNorm -> gelu -> dense(C_W, C_b) for one input, from the LayerNorm Jacobian
    by hand, u = z/sqrt(K) ~ N(0, 1), s = gelu(u), Theta and K the first layer's (A = B = D = F = V = 0
    there). The next NTK diagonal given the input is T = lambda_W mean(s^2) + C_W Theta mean(s'^2)/S^2
    with S^2 = mean(z^2) - mean(z)^2; moving the channel mean by K^(1/2) mean(u) and the variance by
    K mean(u^2 - 1) gives T's influence function

        iota_T = lambda_W [s^2 - 2<ss'> u - <ss'u> (u^2 - 1)]
                 + (C_W Theta/K) [s'^2 - 2<s's''> u - (<s's''u> + <s'^2>) (u^2 - 1)],

    and G's (the next variance) is C_W times the first bracket. A = Var iota_T, D = Cov(iota_T, iota_G).
    The Jacobian (1/S) diag(s') P with P = 1 - 11^T/n - u u^T/n contracts the NTK into
    F = C_W^2 (Theta/K) E[(w - <w> - <wu> u)^2], w = s s' (the projection removes the mean and the
    direction of the input; no F term survives it), and B = C_W^2 (Theta/K)^2 <s'^4>."""
    mp.mp.dps = 30
    cw, cb = 1.5, 0.1
    Phi = lambda t: (1 + mp.erf(t / mp.sqrt(2))) / 2  # noqa: E731
    phi = lambda t: mp.exp(-t * t / 2) / mp.sqrt(2 * mp.pi)  # noqa: E731
    s, ds, dds = (lambda t: t * Phi(t)), (lambda t: Phi(t) + t * phi(t)), (lambda t: phi(t) * (2 - t * t))
    K, Theta = 2.0, 2.0
    g = lambda f: _gauss(f, 1)  # noqa: E731
    a1, a2 = g(lambda t: s(t) * ds(t)), g(lambda t: s(t) * ds(t) * t)
    b1, b2, b3 = g(lambda t: ds(t) * dds(t)), g(lambda t: ds(t) * dds(t) * t), g(lambda t: ds(t) ** 2)
    first = lambda t: s(t) ** 2 - 2 * a1 * t - a2 * (t * t - 1)  # noqa: E731
    iota_T = lambda t: cw * first(t) + cw * Theta / K * (ds(t) ** 2 - 2 * b1 * t - (b2 + b3) * (t * t - 1))  # noqa: E731
    iota_G = lambda t: cw * first(t)  # noqa: E731
    w1, w2 = g(lambda t: s(t) * ds(t)), g(lambda t: s(t) * ds(t) * t)
    hand = {
        "A": g(lambda t: iota_T(t) ** 2) - g(iota_T) ** 2,
        "B": cw**2 * (Theta / K) ** 2 * g(lambda t: ds(t) ** 4),
        "D": g(lambda t: iota_T(t) * iota_G(t)) - g(iota_T) * g(iota_G),
        "F": cw**2 * Theta / K * g(lambda t: (s(t) * ds(t) - w1 - w2 * t) ** 2),
    }
    net = arch.serial(arch.dense(2.0), arch.layer_norm(), arch.activation("gelu"), arch.dense(cw, cb))
    fw = arch_finite_width(net)
    assert fw.values["Theta"][0] == Theta and fw.values["K"][0] == K
    for q, value in hand.items():
        assert abs(fw.values[q][-1] - float(value)) < 1e-9 * abs(float(value)), (q, fw.values[q][-1], value)
    assert fw.values["P"][-1] is None and fw.values["Q"][-1] is None


# ------------------------------------------------------------------------------------------------
# What is refused, and why


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_branch_reading_the_skip_through_an_activation_is_refused(act):
    net = arch.serial(arch.dense(1.0), arch.residual(arch.activation(act), arch.dense(1.0), xi=1.0, gamma=0.5))
    with pytest.raises(DeriveError, match="self-interaction"):
        arch_finite_width(net)


@pytest.mark.parametrize("net,match", [
    (arch.serial(arch.conv(filter=(3,)), arch.activation("relu"), arch.global_avg_pool(), arch.dense(1.0)),
     "tensor form"),
    (arch.serial(arch.dense(1.0), arch.residual(arch.layer_norm(), arch.attention(heads=2))),
     "tensor form"),
    (arch.serial(arch.dense(1.0), arch.residual(arch.layer_norm(), arch.dot_product_attention(heads=2))),
     "logits stay random at infinite width"),
    (arch.serial(arch.dense(1.0), arch.residual(arch.dense(1.0), arch.residual(arch.dense(1.0)), arch.dense(1.0))),
     "inside a residual branch"),
    (arch.serial(arch.dense(1.0), arch.activation("relu"), arch.residual(arch.dense(1.0))),
     "skip carries the output of an activation"),
])
def test_refused_with_the_reason(net, match):
    with pytest.raises(DeriveError, match=match):
        arch_finite_width(net)


def test_outputs_that_are_not_gaussian_points_have_no_vertex():
    fw = arch_finite_width(arch.serial(arch.dense(1.0), arch.activation("relu"), arch.dense(2.0)))
    assert fw.values["V"][1] is None and fw.values["K"][1] == pytest.approx(0.5, rel=1e-14)
    assert fw.values["V"][2] == pytest.approx(4 * 5 / 4, rel=1e-13)  # C_W^2 Var(relu^2) = 4 * 5K^2/4


# ------------------------------------------------------------------------------------------------
# Sampled networks (three widths, fit in 1/n); a dropped term is rejected with the same samples

WIDTHS = (32, 64, 128)
SAMPLES = 4000


def _without_cross_term(net):
    original = afw._combine
    try:
        afw._combine = lambda a2, c2, skip, branch, cross: original(a2, c2, skip, branch, 0.0)
        return arch_finite_width(net)
    finally:
        afw._combine = original


def _without_layernorm_fluctuation(net):
    """The map that treats LayerNorm's statistics as fixed at their infinite-width values (the
    influence of the inner means dropped)."""
    original = collective._Collective.iota

    def iota(self, m):
        return self._iota.setdefault(m, self.bar(m.args[0]))

    try:
        collective._Collective.iota = iota
        collective.segment_maps.cache_clear()
        return arch_finite_width(net)
    finally:
        collective._Collective.iota = original
        collective.segment_maps.cache_clear()


#: Where V is small against the 2 K^2 noise of the estimator (LayerNorm keeps it at about 0.07 K^2;
#: a small branch adds little per block), more networks for the same relative power.
SAMPLES_FOR = {"layernorm stack": 20000, "residual tanh, small branch": 16000}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_sampled_networks_agree_and_a_dropped_term_is_rejected(name):
    net = NETWORKS[name]
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES_FOR.get(name, SAMPLES), seed=11)
    check = compare_finite_width(arch_finite_width(net), estimates)
    assert check.passed, check.worst
    assert len(check.rows) == 3 * 4  # K, V, G1 at the first dense and after each of 3 blocks
    # V has power wherever it is non-zero: a deviation as large as V itself would be flagged
    assert not any(r["weak"] for r in check.rows if r["quantity"] == "V")
    wrong = _without_layernorm_fluctuation(net) if "layernorm" in name or "LN" in name else _without_cross_term(net)
    assert not compare_finite_width(wrong, estimates).passed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["residual tanh", "pre-LN residual gelu", "layernorm stack"])
def test_sampled_output_ntk_extrapolates_to_the_infinite_width_ntk(name):
    net = NETWORKS[name]
    estimates = sample_kernel_estimates(net, WIDTHS, samples=1000, seed=5, ntk=True)
    check = compare_finite_width(arch_finite_width(net), estimates, quantities=("Theta",))
    (row,) = check.rows
    assert check.passed, row
    assert not row["weak"] and row["detectable"] < 0.1 * row["theory"]



# ------------------------------------------------------------------------------------------------
# The tensor form: several inputs and positions


@pytest.mark.parametrize("name", ["tanh", "relu"])
def test_tensor_form_of_a_batch_equals_iterate_batch(name):
    from derive.finite.batch import iterate_batch

    x = np.random.default_rng(0).standard_normal((3, 5))
    tf = arch_finite_width_tensor(arch.mlp(4, name, 1.5, 0.1), x)
    ref = iterate_batch(resolve(name), x, 4, 1.5, 0.1)
    got = {q: [v for v in tf.values[q] if v is not None] for q in ("K", "V", "G1")}
    for q, want in (("K", ref.K), ("V", ref.V), ("G1", ref.G1)):
        for a, b in zip(got[q], want):
            assert np.max(np.abs(a - b)) <= 1e-12 * max(1.0, np.max(np.abs(b))), q


def _assert_one_site_is_the_single_input_form(net, rtol: float) -> None:
    """K, V, G1 of the tensor form at one input (one site) equal the single-input walker's, layer by layer."""
    tf = arch_finite_width_tensor(net, np.ones((1, 8)))
    single = arch_finite_width(net)
    for q in ("K", "V", "G1"):
        for a, b in zip(tf.values[q], single.values[q]):
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(float(np.ravel(a)[0]) - b) <= rtol * max(1.0, abs(b)), q


def test_tensor_form_of_one_input_is_the_single_input_form():
    net = NETWORKS["layernorm stack"].items[0], arch.repeat(3, arch.activation("gelu"), arch.dense(1.7, 0.2))
    net = arch.serial(*net)
    _assert_one_site_is_the_single_input_form(net, 1e-12)


def test_pooling_a_gaussian_point_is_linear():
    """avg_pool before the activation maps K, V, G1 of each channel linearly: pooling positions 0, 1 of
    a two-position conv output with window 2 gives K = mean of the 2x2 block, V the mean of its 2^4."""
    x = np.random.default_rng(2).standard_normal((1, 3, 4))
    conv = [arch.conv(filter=(2,), padding="VALID", C_W=1.3), arch.activation("tanh"), arch.conv(filter=(1,), C_W=1.1)]
    base = arch_finite_width_tensor(arch.serial(*conv), x)
    pooled = arch_finite_width_tensor(arch.serial(*conv, arch.avg_pool(window=(2,))), x)
    K, V, G = (base.values[q][-1] for q in ("K", "V", "G1"))
    assert pooled.values["K"][-1][0, 0] == pytest.approx(K.mean(), rel=1e-13)
    assert pooled.values["V"][-1][0, 0, 0, 0] == pytest.approx(V.mean(), rel=1e-13)
    assert pooled.values["G1"][-1][0, 0] == pytest.approx(G.mean(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("net,match", [
    (arch.serial(arch.conv(filter=(2,)), arch.layer_norm(), arch.activation("relu"), arch.conv(filter=(2,))),
     "activation after LayerNorm with positions"),
    (arch.serial(arch.conv(filter=(2,)), arch.residual(arch.activation("relu"), arch.conv(filter=(2,)))),
     "self-interaction"),
    (arch.serial(arch.conv(filter=(2,)), arch.layer_norm(), arch.dot_product_attention()),
     "no \\[finite_width\\] maps: its logits stay random"),
])
def test_tensor_form_refuses_with_the_reason(net, match):
    with pytest.raises(DeriveError, match=match):
        arch_finite_width_tensor(net, np.ones((1, 4, 3)))


CNNS = {
    "1-d CNN (examples/architectures/cnn.toml)": lambda: arch.load_arch("examples/architectures/cnn.toml"),
    "CNN, pooling before tanh, global pooling": lambda: arch.serial(
        arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.avg_pool(window=(2,)), arch.activation("tanh"),
        arch.conv(filter=(2,), C_W=1.6), arch.activation("relu"), arch.global_avg_pool(), arch.dense(2.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CNNS))
def test_sampled_cnns_agree_and_a_dropped_term_is_rejected(name):
    import derive.finite.tensor as tensor

    net = CNNS[name]()
    x = np.random.default_rng(1).standard_normal((1, 6, 4))
    theory = arch_finite_width_tensor(net, x)
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES, seed=3, inputs=x)
    check = compare_finite_width(theory, estimates)
    assert check.passed, check.worst
    assert not any(r["weak"] for r in check.rows if r["quantity"] == "V")
    original = tensor._activation_means

    def uncorrelated_positions(*args, **kwargs):  # only the entries with one site s = t = u = v
        means = original(*args, **kwargs)
        M = int(round(np.sqrt(means.value.size)))
        cov = np.zeros((M,) * 4)
        s = np.arange(M)
        cov[s, s, s, s] = means.cov.reshape((M,) * 4)[s, s, s, s]
        means.cov = cov.reshape(M * M, M * M)
        return means

    try:  # the channel means' fluctuations as if the positions fluctuated independently
        tensor._activation_means = uncorrelated_positions
        wrong = arch_finite_width_tensor(net, x)
    finally:
        tensor._activation_means = original
    assert not compare_finite_width(wrong, estimates).passed


def test_ntk_fluctuations_are_carried_only_where_derived():
    """A..Q after dense layers fed by activations; A..F after LayerNorm and through residual blocks,
    P, Q not (None from there on); the dense network's equal the dense engine's."""
    from derive.finite.arch import QUANTITIES

    assert QUANTITIES[-6:] == ("A", "B", "D", "F", "P", "Q")
    mlp = arch_finite_width(arch.mlp(4, "tanh", 1.5, 0.1))
    profile = iterate(finite_width_maps(resolve("tanh")), 4, 1.5, 0.1)
    for q in ("A", "B", "D", "F", "P", "Q"):
        assert _relative(mlp.values[q], profile.values[q]) < 1e-12, q
    ln = arch_finite_width(NETWORKS["layernorm stack"])
    for q in ("A", "B", "D", "F"):
        assert all(v is not None and np.isfinite(v) and v != 0 for v in ln.values[q][1:]), q
    assert ln.values["P"][0] == 0.0 and all(v is None for v in ln.values["P"][1:] + ln.values["Q"][1:])
    res = arch_finite_width(arch.serial(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.5),
                                        arch.residual(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.0)),
                                        arch.activation("tanh"), arch.dense(1.2)))
    assert res.values["B"][2] is not None and res.values["B"][2] > 0
    for q in ("A", "B", "D", "F"):
        assert all(v is not None and np.isfinite(v) for v in res.values[q][3::2]), q
    assert res.values["P"][2] is not None and res.values["P"][3] is None and res.values["Q"][5] is None


def _dropping(term):
    """The residual NTK fluctuation maps with one term dropped (the wrong maps a check must reject)."""
    original = afw._combine_ntk

    def wrong(a2, c2, skip, branch, jacobian):
        A, B, D, F = skip.fluctuations[:4]
        kk, tk, tt = jacobian
        out = list(original(a2, c2, skip, branch, jacobian))
        if term == "B in the cross term":
            out[1] -= 2 * a2 * c2 * tt * B
        elif term == "skip-branch covariance":
            out[0] -= 2 * a2 * c2 * (tk * D + tt * A)
        return tuple(out)

    return wrong


RESIDUAL_NTK = {  # name: (network, the dropped term the same samples reject)
    "relu": (arch.serial(arch.dense(1.0), arch.repeat(3, _residual("relu", 0.6**0.5, 0.4**0.5, 2.0, 1.0))),
             "skip-branch covariance"),
    "relu, unit skip": (arch.serial(arch.dense(1.0), arch.repeat(3, _residual("relu", 1.0, 0.5, 2.0, 1.0))),
                        "skip-branch covariance"),
    "tanh": (arch.serial(arch.dense(1.0), arch.repeat(3, _residual("tanh", 0.8, 0.9, cb=0.05))),
             "B in the cross term"),
    "tanh, small branch": (arch.serial(arch.dense(1.0), arch.repeat(3, _residual("tanh", 1.0, 0.6, 1.5, 1.0))),
                           "B in the cross term"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESIDUAL_NTK))
def test_sampled_ntk_fluctuation_of_residual_mlps_and_a_dropped_term_is_rejected(name):
    """n Var(H_ii) of a residual MLP's output channel (three blocks z' = xi z + gamma W2 sigma(W1 z)),
    fitted in 1/n over three widths, against A + 2B carried through the blocks; the maps without one
    of their cross terms are rejected by the same samples."""
    net, dropped = RESIDUAL_NTK[name]
    theory = arch_finite_width(net)
    estimates = sample_kernel_estimates(net, (48, 96, 192), samples=4000, seed=7, ntk=True)
    check = compare_finite_width(theory, estimates, quantities=("Theta", "Theta_var"))
    assert check.passed and not any(r["weak"] for r in check.rows), check.rows
    original = afw._combine_ntk
    try:
        afw._combine_ntk = _dropping(dropped)
        wrong = arch_finite_width(net)
    finally:
        afw._combine_ntk = original
    assert wrong.values["A"][-1] + 2 * wrong.values["B"][-1] != pytest.approx(check.rows[-1]["theory"])
    assert not compare_finite_width(wrong, estimates, quantities=("Theta_var",)).passed


def _layernorm_statistics_held(self, F):
    """The wrong influence function of an NTK statistic: LayerNorm's mean and variance held at their
    infinite-width values (their own fluctuation dropped)."""
    return sp.expand(sum((self.bar(collective._diff(F, a)) * self.bar(a.args[0])
                          for a in collective._top_means(F)), sp.Integer(0)))


LAYERNORM_NTK = {
    "layernorm tanh stack": NETWORKS["layernorm stack"],
    "pre-LN residual gelu": NETWORKS["pre-LN residual gelu"],
    "layernorm relu stack": arch.serial(arch.dense(1.0), arch.repeat(3, arch.layer_norm(), arch.activation("relu"),
                                                                       arch.dense(2.0, 0.1))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERNORM_NTK))
def test_sampled_ntk_fluctuation_through_layernorm_and_a_dropped_term_is_rejected(name):
    """n Var(H_ii) of the output channel of three blocks LayerNorm -> tanh (relu) -> dense, and of
    three pre-LN residual blocks x + 0.7 W2 gelu(W1 LN(x)), fitted in 1/n over three widths, against
    A + 2B carried through LayerNorm; the maps that hold LayerNorm's statistics at their
    infinite-width values (38.6 -> 24.2, 80.4 -> 107.5 and 50.5 -> 72.0) are rejected by the same
    samples."""
    net = LAYERNORM_NTK[name]
    theory = arch_finite_width(net)
    estimates = sample_kernel_estimates(net, (48, 96, 192), samples=4000, seed=7, ntk=True)
    check = compare_finite_width(theory, estimates, quantities=("Theta", "Theta_var"))
    assert check.passed and not any(r["weak"] for r in check.rows), check.rows
    original = collective._Collective.influence
    try:
        collective._Collective.influence = _layernorm_statistics_held
        collective.ntk_maps.cache_clear()
        wrong = arch_finite_width(net)
    finally:
        collective._Collective.influence = original
        collective.ntk_maps.cache_clear()
    assert wrong.values["A"][-1] != pytest.approx(theory.values["A"][-1], rel=0.1)
    assert not compare_finite_width(wrong, estimates, quantities=("Theta_var",)).passed


def _layernorm_head_samples(n: int, networks: int, seed: int, cw1: float, cw2: float, cb2: float):
    """Output z (networks, n) and the NTK between output channels H (networks, n, n) of
    dense(cw1) -> LayerNorm -> gelu -> dense(cw2, cb2) on one input with x.x/n_0 = 1, by autodiff: the
    first layer's NTK is cw1 delta_ij given the input, so H = (cb2 + cw2 mean(phi^2)) 1 + cw1 M M^T
    with M = d z_out / d z_1 (jax.jacfwd through LayerNorm and gelu)."""
    import jax
    import jax.numpy as jnp

    from derive.backends.precision import x64

    def one(key):
        k1, k2, k3 = jax.random.split(key, 3)
        W1, W2, b2 = jax.random.normal(k1, (n, n)), jax.random.normal(k2, (n, n)), jax.random.normal(k3, (n,))
        z1 = jnp.sqrt(cw1 / n) * W1 @ jnp.ones(n)

        def phi(z):
            return jax.nn.gelu((z - z.mean()) / jnp.sqrt(z.var() + 1e-12), approximate=False)

        def head(z):
            return jnp.sqrt(cw2 / n) * W2 @ phi(z)

        M = jax.jacfwd(head)(z1)
        H = (cb2 + cw2 * jnp.mean(phi(z1) ** 2)) * jnp.eye(n) + cw1 * M @ M.T
        return head(z1) + jnp.sqrt(cb2) * b2, H

    with x64():
        z, H = jax.lax.map(jax.jit(one), jax.random.split(jax.random.PRNGKey(seed), networks))
        return np.asarray(z), np.asarray(H)


def _pair_statistics(z: np.ndarray, H: np.ndarray) -> dict:
    """Per network, the means over pairs of distinct output channels i != j whose expectations times n
    are A = n Cov(H_ii, H_jj), B = n E[H_ij^2], D = n Cov(H_ii, z_j^2), F = n E[H_ij z_i z_j] (centred
    at the means over every network)."""
    n = z.shape[1]
    pairs = n * (n - 1)
    d = np.einsum("kii->ki", H) - np.einsum("kii->", H) / H.shape[0] / n
    e = z**2 - np.mean(z**2)
    off = 1 - np.eye(n)
    return {"A": n * (d.sum(1) ** 2 - (d**2).sum(1)) / pairs,
            "B": n * np.einsum("kij,kij,ij->k", H, H, off) / pairs,
            "D": n * (d.sum(1) * e.sum(1) - (d * e).sum(1)) / pairs,
            "F": n * np.einsum("kij,ki,kj,ij->k", H, z, z, off) / pairs}


@pytest.mark.slow
def test_sampled_ntk_fluctuations_after_layernorm_one_by_one():
    """A, B, D, F after dense -> LayerNorm -> gelu -> dense, each against its own estimate from sampled
    networks (autodiff NTK between output channels, 3000 networks at widths 32, 64, 128, fitted in
    1/n): all within 5 standard errors, each estimate precise enough to detect an error the size of
    its value; F without LayerNorm's Jacobian projection (the activation-only map
    C_W^2 Theta E(s^2 ds^2) with s = gelu(z/sqrt(K)), K = Theta = 1 here) is rejected."""
    cw1, cw2, cb2 = 1.0, 1.5, 0.1
    net = arch.serial(arch.dense(cw1), arch.layer_norm(), arch.activation("gelu"), arch.dense(cw2, cb2))
    theory = {q: arch_finite_width(net).values[q][-1] for q in ("A", "B", "D", "F")}
    widths = (32, 64, 128)
    per_width = [_pair_statistics(*_layernorm_head_samples(n, 3000, n, cw1, cw2, cb2)) for n in widths]
    X = np.stack([np.ones(3), 1 / np.asarray(widths, float)], 1)
    for q, value in theory.items():
        y = np.array([s[q].mean() for s in per_width])
        w = np.array([len(s[q]) / s[q].var() for s in per_width])
        cov = np.linalg.inv(X.T @ (X * w[:, None]))
        intercept, stderr = (cov @ X.T @ (w * y))[0], np.sqrt(cov[0, 0])
        assert abs(intercept - value) < 5 * stderr, (q, intercept, stderr, value)
        assert stderr < 0.2 * abs(value), (q, stderr, value)  # power: an error the size of the value
        if q == "F":
            Phi = lambda t: (1 + mp.erf(t / mp.sqrt(2))) / 2  # noqa: E731
            gelu_dgelu = lambda t: t * Phi(t) * (Phi(t) + t * mp.exp(-t * t / 2) / mp.sqrt(2 * mp.pi))  # noqa: E731
            naive = float(cw2**2 * _gauss(lambda t: gelu_dgelu(t) ** 2, 1))
            assert abs(intercept - naive) > 5 * stderr, (intercept, stderr, naive)


@pytest.mark.slow
def test_sampled_ntk_fluctuation_with_layernorm_inside_residual_branches():
    """Two blocks z + 0.8 W3 tanh(W2 LN(W1 z)): LayerNorm in the middle of the branch, so the branch's
    Jacobian is chained through a dense layer that reads LayerNorm's statistics. n Var(H_ii) of the
    output channel agrees with A + 2B (20.0; no single dropped term moves it by 5 standard errors of
    these samples, so the rejection power is shown on the networks above)."""
    net = arch.serial(arch.dense(1.0), arch.repeat(2, arch.residual(
        arch.dense(1.3), arch.layer_norm(), arch.dense(1.1), arch.activation("tanh"), arch.dense(0.9), gamma=0.8)))
    theory = arch_finite_width(net)
    estimates = sample_kernel_estimates(net, (48, 96, 192), samples=4000, seed=7, ntk=True)
    check = compare_finite_width(theory, estimates, quantities=("Theta", "Theta_var"))
    assert check.passed and not any(r["weak"] for r in check.rows), check.rows


@pytest.mark.slow
def test_sampled_ntk_fluctuation_of_a_mixed_network_and_a_dropped_term_is_rejected():
    """Dense layers with different activations and variances between them (not a uniform dense
    network): n Var(H_ii) of the output channel, fitted in 1/n over three widths, against A + 2B from
    the walker; without the 2B term (A alone) the same samples reject it."""
    net = arch.serial(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.6, 0.1), arch.activation("relu"),
                      arch.dense(2.0, 0.05, lambda_W=1.2))
    theory = arch_finite_width(net)
    estimates = sample_kernel_estimates(net, (48, 96, 192), samples=3000, seed=11, ntk=True)
    check = compare_finite_width(theory, estimates, quantities=("Theta_var",))
    (row,) = check.rows
    assert check.passed and not row["weak"], row
    assert row["theory"] == pytest.approx(theory.values["A"][-1] + 2 * theory.values["B"][-1])
    theory.values["A"][-1] = row["theory"] - 2 * theory.values["B"][-1] - 2 * theory.values["B"][-1]
    wrong = compare_finite_width(theory, estimates, quantities=("Theta_var",))
    assert not wrong.passed, wrong.rows


# ------------------------------------------------------------------------------------------------
# The tensor form through LayerNorm, residual blocks and tied self-attention


PRE_LN = arch.serial(arch.dense(1.0), arch.repeat(2,
    arch.residual(arch.layer_norm(), arch.dense(1.0), arch.activation("gelu"), arch.dense(1.6), xi=1.0, gamma=0.7),
    arch.residual(arch.dense(1.2), arch.activation("tanh"), arch.dense(1.0), xi=0.9, gamma=0.6)))


MID_LN = arch.serial(arch.dense(1.0), arch.residual(arch.dense(1.3), arch.layer_norm(), arch.dense(1.1),
                                                  arch.activation("tanh"), arch.dense(0.9), gamma=0.8))


@pytest.mark.slow
@pytest.mark.parametrize("net", [PRE_LN, MID_LN], ids=["pre-LN blocks", "LayerNorm inside a branch"])
def test_tensor_form_of_one_input_through_layernorm_and_residual_blocks_is_the_single_input_form(net):
    """One site: the numeric delta method over sites (JAX derivatives of the LayerNorm normalisation,
    the residual cross term X, through the branch's Jacobians) against the symbolic single-input walker."""
    _assert_one_site_is_the_single_input_form(net, 1e-11)


@pytest.mark.slow
def test_tensor_form_of_a_batch_has_each_input_alone_on_its_diagonal():
    """Through LayerNorm and residual blocks every map is local on the diagonal: K_aa, G1_aa and
    V_(aa)(aa) of a batch are those of input a alone."""
    x = np.random.default_rng(5).standard_normal((3, 6))
    batch = arch_finite_width_tensor(PRE_LN, x)
    for a in range(3):
        alone = arch_finite_width_tensor(PRE_LN, x[a:a + 1])
        for q in ("K", "G1"):
            assert np.allclose(batch.values[q][-1][a, a], alone.values[q][-1][0, 0], rtol=1e-11)
        assert np.isclose(batch.values["V"][-1][a, a, a, a], alone.values["V"][-1][0, 0, 0, 0], rtol=1e-11)


def _transformer(heads, blocks=2):
    return arch.serial(arch.dense(1.0), arch.repeat(blocks,
        arch.residual(arch.layer_norm(), arch.attention(heads=heads, C_Q=0.5, C_K=0.5, C_V=0.5, C_O=1 / 3)),
        arch.residual(arch.layer_norm(), arch.dense(0.4), arch.activation("gelu"), arch.dense(1.6))))


@pytest.mark.slow
def test_attention_heads_enter_the_nlo_kernel_only():
    """Each head's logits average over n/H channels: their fluctuation adds to G1 in proportion to H
    (the logits' Wishart bias), while K and V do not depend on the number of heads."""
    x = np.random.default_rng(7).standard_normal((1, 3, 4))
    one, two, four = (arch_finite_width_tensor(arch.serial(arch.dense(1.0), arch.layer_norm(),
                                                           arch.attention(heads=h, C_Q=0.5, C_K=0.5)), x)
                      for h in (1, 2, 4))
    np.testing.assert_allclose(two.values["V"][-1], four.values["V"][-1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(two.values["K"][-1], four.values["K"][-1], rtol=1e-13)
    g1, g2, g4 = (r.values["G1"][-1] for r in (one, two, four))
    np.testing.assert_allclose(g4 - g2, 2 * (g2 - g1), rtol=1e-9, atol=1e-14)
    assert np.max(np.abs(g2 - g1)) > 1e-4


@pytest.mark.slow
def test_sampled_pre_ln_transformer_blocks_agree_and_a_dropped_term_is_rejected():
    """Pre-LN transformer blocks (tied attention with two heads, GELU MLP) on one input of three tokens:
    every entry of K, V and G1 at every block output against sampled networks at three widths, after
    the 1/n fit; the same samples reject the blocks without the skip's cross term X in V."""
    import derive.finite.tensor as tensor

    net = _transformer(2)
    x = np.random.default_rng(1).standard_normal((1, 3, 4))
    theory = arch_finite_width_tensor(net, x)
    estimates = sample_kernel_estimates(net, (32, 64, 128), samples=6000, seed=17, inputs=x)
    check = compare_finite_width(theory, estimates)
    assert check.passed, check.worst
    assert not any(r["weak"] for r in check.rows if r["quantity"] == "V" and r["index"] > 1)
    original = tensor._residual_vertex
    try:  # the residual stream as if the branch did not read the skip
        tensor._residual_vertex = lambda a2, c2, V, X, Vb: original(a2, c2, V, 0 * X, Vb)
        wrong = arch_finite_width_tensor(net, x)
    finally:
        tensor._residual_vertex = original
    assert not compare_finite_width(wrong, estimates).passed


@pytest.mark.slow
def test_sampled_attention_layer_agrees_and_its_own_fluctuations_are_needed():
    """One tied self-attention layer after LayerNorm (two heads, C_O = C_V = 1) on three tokens: the
    theory agrees with sampled networks, and without the heads' own logit and value fluctuations (the
    Wishart terms) it is rejected by the same samples."""
    import derive.finite.tensor as tensor

    net = arch.serial(arch.dense(1.0), arch.layer_norm(), arch.attention(heads=2, C_Q=1.0, C_K=1.0))
    x = np.random.default_rng(1).standard_normal((1, 3, 4))
    theory = arch_finite_width_tensor(net, x)
    estimates = sample_kernel_estimates(net, (32, 64, 128), samples=4000, seed=23, inputs=x)
    check = compare_finite_width(theory, estimates)
    assert check.passed, check.worst
    original = tensor._attention_fluctuations
    try:  # attention as if its logits and values were exact functions of its input
        tensor._attention_fluctuations = lambda *args: (0.0, 0.0)
        wrong = arch_finite_width_tensor(net, x)
    finally:
        tensor._attention_fluctuations = original
    assert not compare_finite_width(wrong, estimates).passed


@pytest.mark.parametrize("name", ["tanh", "gelu", "relu"])
def test_dense_rule_jacobian_is_the_derivative_of_the_infinite_width_maps(name):
    """[finite_width.jacobian] of rules/layers/dense.toml (what residual blocks chain through their
    branch) against mpmath: K' = C_b + C_W <s^2>_K and Theta' = lambda_b + lambda_W <s^2>_K +
    C_W Theta <s'^2>_K by 30-digit quadrature, differentiated numerically in K and Theta."""
    from derive.core import symbols as S
    from derive.finite.arch import _parameters, _Point, _Walker

    K0, Th0, cw, lw = 0.8, 1.3, 1.5, 1.2
    dense = arch.dense(cw, 0.1, lambda_W=lw)
    walker = _Walker(1e-11)
    point = walker.elementwise(_Point(K0, 0.0, 0.0, Th0, 1, 1), arch.activation(name))
    values = {S.K: K0, S.V: 0.0, S.G1: 0.0, S.r: 1.0, **dict(_parameters(dense))}
    got = walker.jacobian(point, dense, values)

    mp.mp.dps = 30
    sigma = {"tanh": mp.tanh, "gelu": lambda u: u * (1 + mp.erf(u / mp.sqrt(2))) / 2,
             "relu": lambda u: max(u, 0)}[name]
    dsigma = {"tanh": lambda u: 1 - mp.tanh(u) ** 2,
              "gelu": lambda u: (1 + mp.erf(u / mp.sqrt(2))) / 2 + u * mp.exp(-u * u / 2) / mp.sqrt(2 * mp.pi),
              "relu": lambda u: 1 if u > 0 else 0}[name]

    def gauss(f, K):
        return mp.quad(lambda x: f(mp.sqrt(K) * x) * mp.exp(-x * x / 2), [-mp.inf, 0, mp.inf]) / mp.sqrt(2 * mp.pi)

    def kernel(K):
        return cw * gauss(lambda u: sigma(u) ** 2, K)

    def ntk(K, Th):
        return lw * gauss(lambda u: sigma(u) ** 2, K) + cw * Th * gauss(lambda u: dsigma(u) ** 2, K)

    want = (mp.diff(kernel, K0), mp.diff(lambda K: ntk(K, Th0), K0), mp.diff(lambda t: ntk(K0, t), Th0))
    for g, w, what in zip(got, want, ("dK'/dK", "dTheta'/dK", "dTheta'/dTheta")):
        assert g == pytest.approx(float(w), rel=1e-9), what


@pytest.mark.parametrize("maps, define, message", [
    ({"A": "ncov(s^2, T)"}, {"T": "mean(s^2)"}, r"ncov\(...\) takes channel statistics"),
    ({"A": "mean(s^2)"}, {}, r"a channel statistic \(mean\(...\)\) is used through ncov, dK or dz"),
    ({"A": "E(mean(s^2)*ds)"}, {}, r"mean\(...\) inside E\(...\)"),
    ({"A": "dK(G)*s"}, {"G": "mean(s^2)"}, r"uses s outside E\(...\) and mean\(...\)"),
    ({"A": "dz(G, G)"}, {"G": "mean(s^2)"}, r"dz"),
])
def test_rule_statistics_are_checked_with_one_line_errors(maps, define, message):
    """The channel-statistic operators of [finite_width.ntk] take statistics, and statistics appear
    only through them: a wrong rule is refused with what and where."""
    from derive.core.errors import DeriveError as Base
    from derive.rules.layers import _parse_ntk_maps

    full = {q: "0" for q in ("A", "B", "D", "F", "P", "Q")} | maps
    with pytest.raises(Base, match=message) as info:
        _parse_ntk_maps(full, define, {"C_W": sp.Symbol("C_W")}, "mine.toml")
    assert "\n" not in str(info.value) and "mine.toml" in str(info.value)
