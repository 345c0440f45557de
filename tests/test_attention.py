"""Scaled dot-product attention with Gaussian logits (derive/kernels/attention.py, rules/layers/dot_product_attention.toml).

The quasi-Monte Carlo expectations are checked against two independent quadratures (mpmath for two
tokens, where softmax is a sigmoid of one logit difference; a tensor trapezoid rule with Gaussian
weight for three tokens, contracting the full Jacobian tensors), the identity mechanism against its
closed form, and the layer's kernel and NTK against sampled networks with independent query and key
weights and 1/sqrt(n/H) logits (5 standard errors, and a wrong theory must be rejected).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from reference import expect2

from derive import arch
from derive.core.errors import DeriveError
from derive.kernels.arch import arch_kernels
from derive.kernels.attention import attention_statistics, check_points
from derive.sampling.arch import sample_arch


def _kernels(rng, rows: int, dim: int = 5):
    x = rng.standard_normal((rows, dim))
    y = rng.standard_normal((rows, dim + 2))
    K = x @ x.T / dim
    return K, y @ y.T / (dim + 2) + K  # a kernel and an NTK-like PSD matrix


def _trapezoid_reference(K, N, T, c, X, Y, h, L):
    """sum E[p_a p_b] X and sum E[J_a J_b] X Y for every pair of rows, by a tensor trapezoid rule with
    Gaussian weight in the 2(T - 1) zero-sum logit directions (J from its definition, contracted as a
    full tensor; nothing shared with the engine's per-point formula)."""
    M = N * T
    K4, X4, Y4 = (A.reshape(N, T, N, T) for A in (K, X, Y))
    x = np.arange(-L, L + h / 2, h)
    w = np.exp(-x * x / 2)
    w /= w.sum()
    B = np.linalg.qr(np.eye(T) - 1.0 / T)[0][:, :T - 1]
    Z = np.zeros((T, T - 1))
    Bb = np.block([[B, Z], [Z, B]])
    D = 2 * (T - 1)
    grid = np.array(list(itertools.product(range(len(x)), repeat=D)))
    points, weights = x[grid], np.prod(w[grid], axis=1)
    P, R = np.zeros((M, M)), np.zeros((M, M))
    eye = np.eye(T)
    for i in range(M):
        for j in range(i, M):
            a, s, b, s2 = i // T, i % T, j // T, j % T
            cov = c * np.block([[K4[a, s, a, s] * K4[a, :, a, :], K4[a, s, b, s2] * K4[a, :, b, :]],
                                [K4[a, s, b, s2] * K4[a, :, b, :].T, K4[b, s2, b, s2] * K4[b, :, b, :]]])
            lam, U = np.linalg.eigh(Bb.T @ cov @ Bb)
            logits = points @ (Bb @ (U * np.sqrt(np.maximum(lam, 0)))).T
            p = np.exp(logits[:, :T] - logits[:, :T].max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            q = np.exp(logits[:, T:] - logits[:, T:].max(1, keepdims=True))
            q /= q.sum(1, keepdims=True)
            P[i, j] = P[j, i] = np.einsum("k,ks,kt,st->", weights, p, q, X4[a, :, b, :])
            Ja = p[:, :, None] * eye - p[:, :, None] * p[:, None, :]
            Jb = q[:, :, None] * eye - q[:, :, None] * q[:, None, :]
            EJJ = np.einsum("k,ksu,ktv->sutv", weights, Ja, Jb)
            R[i, j] = R[j, i] = np.einsum("sutv,st,uv->", EJJ, X4[a, :, b, :], Y4[a, :, b, :])
    return P, R


def _engine(K, N, T, c, X, Y, points=65536):
    out = attention_statistics(jnp.asarray(K), N, T, c, mechanism="softmax", points=points,
                               singles=[jnp.asarray(X)], pairs=[(jnp.asarray(X), jnp.asarray(Y))])
    return np.asarray(out[0]), np.asarray(out[1])


def _relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_two_tokens_against_mpmath():
    """T = 2: softmax is sigmoid(d) of the logit difference d, so both maps are two-dimensional
    Gaussian expectations over (d_a, d_b), computed at 25 digits by tests/reference.py."""
    rng = np.random.default_rng(3)
    N, T, c = 2, 2, 1.0
    K, Theta = _kernels(rng, N * T)
    P, R = _engine(K, N, T, c, Theta, K)
    K4, X4, Y4 = (A.reshape(N, T, N, T) for A in (K, Theta, K))
    e = np.array([1.0, -1.0])
    sig = lambda d: 1 / (1 + mp.exp(-d))  # noqa: E731
    for (a, s), (b, s2) in [((0, 0), (1, 1)), ((0, 1), (0, 0)), ((1, 0), (1, 0))]:
        var_a = c * K4[a, s, a, s] * (e @ K4[a, :, a, :] @ e)
        var_b = c * K4[b, s2, b, s2] * (e @ K4[b, :, b, :] @ e)
        cov = c * K4[a, s, b, s2] * (e @ K4[a, :, b, :] @ e)
        Xab = X4[a, :, b, :]

        def f(da, db):
            p, q = (sig(da), 1 - sig(da)), (sig(db), 1 - sig(db))
            return sum(p[t] * q[u] * Xab[t, u] for t in range(2) for u in range(2))

        ref_p = float(expect2(f, mp.mpf(var_a), mp.mpf(cov), mp.mpf(var_b), kinks1=(), kinks2=()))
        # J = sigma'(d) e e^T for two tokens, so the contraction factorises.
        ref_r = float(expect2(lambda da, db: sig(da) * (1 - sig(da)) * sig(db) * (1 - sig(db)),
                              mp.mpf(var_a), mp.mpf(cov), mp.mpf(var_b), kinks1=(), kinks2=())) \
            * (e @ Xab @ e) * (e @ Y4[a, :, b, :] @ e)
        i, j = a * T + s, b * T + s2  # errors relative to the largest entry, as everywhere here
        assert abs(P[i, j] - ref_p) <= 2e-6 * np.abs(P).max()
        assert abs(R[i, j] - ref_r) <= 2e-6 * np.abs(R).max()


@pytest.mark.slow
@pytest.mark.parametrize("c", [0.8, 2.0])
def test_three_tokens_against_a_trapezoid_rule(c):
    rng = np.random.default_rng(5)
    N, T = 1, 3
    K, Theta = _kernels(rng, N * T)
    P_ref, R_ref = _trapezoid_reference(K, N, T, c, Theta, K, h=0.45, L=7.0)
    P, R = _engine(K, N, T, c, Theta, K)
    assert _relative(P, P_ref) < 2e-5
    assert _relative(R, R_ref) < 2e-5
    # the quasi-Monte Carlo error shrinks with the number of points
    P_few, R_few = _engine(K, N, T, c, Theta, K, points=1024)
    assert _relative(P_few, P_ref) > _relative(P, P_ref)


def test_two_inputs_two_tokens_every_entry_against_a_trapezoid_rule():
    rng = np.random.default_rng(7)
    N, T, c = 2, 2, 1.5
    K, Theta = _kernels(rng, N * T)
    P_ref, R_ref = _trapezoid_reference(K, N, T, c, K, Theta, h=0.15, L=9.0)
    P, R = _engine(K, N, T, c, K, Theta)
    assert _relative(P, P_ref) < 2e-6
    assert _relative(R, R_ref) < 2e-6
    assert np.array_equal(P, P.T) and np.array_equal(R, R.T)


def test_identity_mechanism_is_the_closed_form():
    rng = np.random.default_rng(1)
    N, T, c = 2, 3, 0.7
    K, Theta = _kernels(rng, N * T)
    P, R = (np.asarray(a) for a in attention_statistics(jnp.asarray(K), N, T, c, mechanism="identity", points=256,
                                                          singles=[jnp.asarray(Theta)],
                                                          pairs=[(jnp.asarray(Theta), jnp.asarray(K))]))
    K4, X4 = K.reshape(N, T, N, T), Theta.reshape(N, T, N, T)
    for a, s, b, s2 in itertools.product(range(N), range(T), range(N), range(T)):
        # E[l_a(s,t) l_b(s',t')] = c K_ab(s,s') K_ab(t,t'); J = I
        expected_p = sum(c * K4[a, s, b, s2] * K4[a, t, b, u] * X4[a, t, b, u] for t in range(T) for u in range(T))
        expected_r = sum(X4[a, t, b, u] * K4[a, t, b, u] for t in range(T) for u in range(T))
        assert P[a * T + s, b * T + s2] == pytest.approx(expected_p, rel=1e-12)
        assert R[a * T + s, b * T + s2] == pytest.approx(expected_r, rel=1e-12)


def test_one_token_attends_to_itself():
    """T = 1: softmax over one key is 1 and its Jacobian 0, so the layer is a dense value-output map."""
    rng = np.random.default_rng(2)
    K, Theta = _kernels(rng, 3)
    P, R = attention_statistics(jnp.asarray(K), 3, 1, 2.0, mechanism="softmax", points=256,
                                singles=[jnp.asarray(Theta)], pairs=[(jnp.asarray(K), jnp.asarray(K))])
    np.testing.assert_allclose(P, Theta, rtol=1e-14)
    np.testing.assert_allclose(R, 0, atol=1e-14)


def test_points_and_mechanism_are_checked():
    with pytest.raises(DeriveError, match="power of two"):
        check_points(1000)
    with pytest.raises(DeriveError, match="mechanism"):
        arch.dot_product_attention(mechanism="relu")
    with pytest.raises(DeriveError, match="points"):
        arch.dot_product_attention(points=100)
    with pytest.raises(DeriveError, match="positions"):
        arch_kernels(arch.serial(arch.dense(), arch.dot_product_attention()), np.ones((2, 3)))


# ------------------------------------------------------------------------------------------------
# Sampled networks


TOKENS = np.random.default_rng(11).standard_normal((2, 3, 6))


def _one_layer(mechanism, **kw):
    return arch.serial(arch.dense(1.0), arch.dot_product_attention(
        heads=4, C_Q=1.2, C_K=0.9, C_V=1.0, C_O=0.8, C_b=0.05, mechanism=mechanism, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["softmax", "identity"])
def test_one_layer_agrees_with_sampled_networks(mechanism):
    """A single attention layer on Gaussian features: its mean kernel and NTK over the logits are exact
    for any number of heads, so sampled networks (width 256, 4 heads of 64 channels) must agree."""
    net = _one_layer(mechanism)
    theory = arch_kernels(net, TOKENS)
    mc = sample_arch(net, TOKENS, width=256, n_networks=400, seed=3)
    assert max(float(np.abs(z).max()) for z in mc.nngp_z(theory)) < 5
    assert float(np.abs(mc.ntk_z(theory)).max()) < 5


@pytest.mark.slow
def test_wrong_attention_theories_are_detected():
    """At the same sample size the check has power: logits treated as zero (uniform attention) in the
    kernel, and the NTK without the query/key gradients, are both rejected."""
    net = _one_layer("softmax")
    mc = sample_arch(net, TOKENS, width=256, n_networks=400, seed=3)
    uniform = arch_kernels(arch.serial(arch.dense(1.0), arch.dot_product_attention(
        heads=4, C_Q=0.0, C_K=0.9, C_V=1.0, C_O=0.8, C_b=0.05, lambda_Q=1.2)), TOKENS)
    assert float(np.abs(mc.nngp_z(uniform)[-1]).max()) > 5
    frozen = arch_kernels(_one_layer("softmax", lambda_Q=0.0, lambda_K=0.0), TOKENS)
    assert max(float(np.abs(z).max()) for z in mc.nngp_z(frozen)) < 5  # the kernel does not depend on them
    assert float(np.abs(mc.ntk_z(frozen)).max()) > 5
