"""Architectures: description and files, derived kernels against independent references, and the
sampler against the theory (derive.arch, derive.rules.layers, derive.kernels.arch, derive.sampling.arch)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from derive import arch as A
from derive.api import gram
from derive.core.errors import DeriveError
from derive.kernels.arch import arch_kernels
from derive.rules.layers import layer_names
from derive.sampling.arch import sample_arch
from derive.symbolic.maps import layer_maps

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(3)
X = RNG.normal(size=(3, 6))
SEQ = RNG.normal(size=(2, 5, 3))
IMG = RNG.normal(size=(2, 4, 3, 2))


# ------------------------------------------------------------------------------------------------
# Descriptions and files


def test_every_shipped_layer_rule_loads():
    assert {"dense", "activation", "layernorm", "residual", "conv", "avg_pool", "global_avg_pool", "flatten",
            "attention", "dot_product_attention"} <= set(layer_names())


def test_file_and_python_descriptions_are_the_same_object(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text("""
name = "pre-LN"
[[layers]]
type = "dense"
C_W = "2/5*5"
[[layers]]
type = "repeat"
times = 3
  [[layers.body]]
  type = "residual"
  gamma = 0.5
    [[layers.body.branch]]
    type = "layernorm"
    [[layers.body.branch]]
    type = "dense"
    C_W = 2
    [[layers.body.branch]]
    type = "activation"
    activation = "leaky_relu"
    params = { a = "0.1" }
    [[layers.body.branch]]
    type = "dense"
""")
    loaded = A.load_arch(path)
    built = A.serial(A.dense(C_W=2), A.repeat(3, A.residual(
        A.layer_norm(), A.dense(2), A.activation("leaky_relu", a="0.1"), A.dense(), gamma=0.5)), name="pre-LN")
    assert loaded == built and hash(loaded) == hash(built)
    assert [label for label, _ in loaded.top_level()] == ["1:dense", "repeat2[1]", "repeat2[2]", "repeat2[3]"]


@pytest.mark.parametrize("build, message", [
    (lambda: A.layer("dense", C_V=1), "unknown parameter 'C_V'"),
    (lambda: A.layer("denze"), "unknown layer type"),
    (lambda: A.layer("activation"), "needs an activation"),
    (lambda: A.activation("no_such_thing(z"), "activation"),
    (lambda: A.residual(A.dense(), A.activation("relu")), "must end in a layer with fresh weights"),
    (lambda: A.residual(A.layer_norm()), "must end in a layer with fresh weights"),
    (lambda: A.conv(padding="FULL"), "padding"),
    (lambda: A.conv(filter=(0,)), "positive integers"),
    (lambda: A.repeat(0, A.dense()), "times"),
    (lambda: A.dense(C_W="__import__('os').system('true')"), "not allowed"),
    (lambda: A.dense(C_W="x + 1"), "unknown name 'x'"),
    (lambda: A.dense(C_W="sqrt(-1)"), "not a real number"),
    (lambda: A.dense(C_W=float("nan")), "not finite"),
    (lambda: A.dense(width=0), "width"),
])
def test_bad_descriptions_raise_one_line_errors(build, message):
    with pytest.raises(DeriveError) as info:
        build()
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("[[layers]\n", "not valid TOML"),
    ("name = 'x'\n", "no [[layers]]"),
    ("[[layers]]\nC_W = 1\n", "needs a 'type'"),
    ("[[layers]]\ntype = 'dense'\nC_W = 'open(\"/etc/passwd\")'\n", "layers[1]"),
    ("[[layers]]\ntype = 'repeat'\ntimes = 2\nfoo = 1\n", "unknown key"),
    ("bogus = 1\n[[layers]]\ntype = 'dense'\n", "unknown top-level key"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DeriveError) as info:
        A.load_arch(path)
    assert message in str(info.value)


def test_shipped_example_architectures_load():
    for path in sorted((ROOT / "examples" / "architectures").glob("*.toml")):
        net = A.load_arch(path)
        assert net.items, path


# ------------------------------------------------------------------------------------------------
# Theory against independent references


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "erf", "tanh", "gelu"])
def test_dense_network_matches_the_dense_gram_path(activation):
    net = A.mlp(4, activation, 1.7, 0.1)
    ours = arch_kernels(net, X)
    ref = gram(activation, X, 4, 1.7, 0.1, method="direct")
    np.testing.assert_allclose(ours.nngp[-1], ref.nngp, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(ours.ntk[-1], ref.ntk, rtol=1e-11, atol=1e-14)
    assert len(ours.nngp) == 4  # the first dense layer and three repetitions


def test_relu_diagonal_is_the_exact_single_input_recursion():
    """K -> C_b + C_W K / 2 and Theta -> lambda_b + lambda_W K / 2 + C_W Theta / 2 for ReLU."""
    C_W, C_b, depth = 2.0, 0.05, 10
    ours = arch_kernels(A.mlp(depth, "relu", C_W, C_b), X)
    for a in range(len(X)):
        K = C_b + C_W * X[a] @ X[a] / X.shape[1]
        Theta = C_b + C_W * X[a] @ X[a] / X.shape[1]
        for _ in range(depth - 1):
            K, Theta = C_b + C_W * K / 2, C_b + C_W * K / 2 + C_W * Theta / 2
        assert abs(ours.nngp[-1][a, a] - K) <= 1e-14 * K
        assert abs(ours.ntk[-1][a, a] - Theta) <= 1e-14 * Theta


def _numpy_conv_kernel(K, f, s, padding):
    """Plain loop: the mean over filter offsets of the zero-padded input kernel (1 spatial axis)."""
    N, P = K.shape[0], K.shape[1]
    if padding == "SAME":
        out = -(-P // s)
        lo = max((out - 1) * s + f - P, 0) // 2
    else:
        out, lo = (P - f) // s + 1, 0
    res = np.zeros((N, out, N, out))
    for a, p, b, q in product(range(N), range(out), range(N), range(out)):
        total = 0.0
        for d in range(f):
            i, j = s * p + d - lo, s * q + d - lo
            if 0 <= i < P and 0 <= j < P:
                total += K[a, i, b, j]
        res[a, p, b, q] = total / f
    return res


def _numpy_pool_kernel(K, w, s):
    N, P = K.shape[0], K.shape[1]
    out = (P - w) // s + 1
    res = np.zeros((N, out, N, out))
    for a, p, b, q in product(range(N), range(out), range(N), range(out)):
        res[a, p, b, q] = sum(K[a, s * p + d, b, s * q + e] for d in range(w) for e in range(w)) / w ** 2
    return res


def _input_kernel(x):
    return np.einsum("apc,bqc->apbq", x, x) / x.shape[-1]


@pytest.mark.parametrize("f, s, padding", [(3, 1, "SAME"), (2, 2, "VALID"), (4, 3, "SAME"), (3, 2, "VALID")])
def test_conv_and_pool_against_plain_loops(f, s, padding):
    C_W, C_b = 1.7, 0.2
    ours = arch_kernels(A.serial(A.conv((f,), (s,), padding, C_W=C_W, C_b=C_b)), SEQ)
    K0 = _input_kernel(SEQ)
    ref = C_b + C_W * _numpy_conv_kernel(K0, f, s, padding)
    np.testing.assert_allclose(ours.nngp[-1], ref, rtol=1e-13)
    np.testing.assert_allclose(ours.ntk[-1], ref, rtol=1e-13)  # Theta^(0) = 0, lambda = C
    pooled = arch_kernels(A.serial(A.avg_pool((2,), (1,))), SEQ)
    np.testing.assert_allclose(pooled.nngp[-1], _numpy_pool_kernel(K0, 2, 1), rtol=1e-13)


def test_attention_layernorm_and_residual_against_plain_numpy():
    """One pre-LN attention block by hand after a dense layer (C_W = 1, C_b = 0: K = x.x'/d):
    LayerNorm, softmax weights from the normalised kernel, A F A^T, then the residual sum (Hron et al.
    2020; Dinan et al. 2023)."""
    C_Q, C_K, C_V, C_O, gamma = 0.5, 0.5, 0.5, 1 / 3, 0.7
    net = A.serial(A.dense(), A.residual(A.layer_norm(eps=0.0), A.attention(heads=2, C_Q=C_Q, C_K=C_K, C_V=C_V,
                                                                             C_O=C_O), gamma=gamma))
    ours = arch_kernels(net, SEQ)
    K = _input_kernel(SEQ)
    N, T = K.shape[:2]
    d = np.einsum("apap->ap", K)
    F = K / np.sqrt(d[:, :, None, None] * d[None, None, :, :])
    weights = []
    for a in range(N):
        logits = math.sqrt(C_Q * C_K) * F[a, :, a, :]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights.append(e / e.sum(axis=1, keepdims=True))
    att = np.zeros_like(K)
    for a, b in product(range(N), range(N)):
        att[a, :, b, :] = weights[a] @ F[a, :, b, :] @ weights[b].T
    np.testing.assert_allclose(ours.nngp[-1], K + gamma ** 2 * C_O * C_V * att, rtol=1e-13)
    # after the dense layer Theta = K (lambda = C = 1), so LayerNorm's Theta is F as well
    np.testing.assert_allclose(ours.ntk[-1], K + gamma ** 2 * 3 * C_O * C_V * att, rtol=1e-13)


def test_global_pool_and_flatten():
    K0 = _input_kernel(SEQ)
    g = arch_kernels(A.serial(A.global_avg_pool()), SEQ)
    np.testing.assert_allclose(g.nngp[-1], K0.mean(axis=(1, 3)), rtol=1e-13)
    f = arch_kernels(A.serial(A.flatten()), SEQ)
    np.testing.assert_allclose(f.nngp[-1], np.einsum("apbp->ab", K0) / K0.shape[1], rtol=1e-13)


def test_two_spatial_axes_shapes():
    net = A.serial(A.conv((3, 2), C_W=2.0), A.activation("relu"), A.avg_pool((2, 2), (1, 1), "SAME"),
                   A.global_avg_pool(), A.dense())
    out = arch_kernels(net, IMG)
    assert out.spatial == [(4, 3), (4, 3), (4, 3), (), ()]
    assert out.nngp[-1].shape == (2, 2)
    assert np.all(np.isfinite(out.ntk[-1]))


def test_residual_relu_grows_linearly_and_depth_ten_thousand_is_finite():
    """With xi = 1 the kernel of a pre-LN residual ReLU block grows by gamma^2 C_W2 C_W1 / 2 per block:
    the LayerNorm output has K = 1 (PDLT ch. 9; Dinan et al.)."""
    gamma = 0.5
    block = A.residual(A.layer_norm(eps=0.0), A.dense(2.0), A.activation("relu"), A.dense(1.0), gamma=gamma)
    net = A.serial(A.dense(1.0), A.repeat(10_000, block))
    out = arch_kernels(net, X)
    K0 = X @ X.T / X.shape[1]
    np.testing.assert_allclose(np.diagonal(out.nngp[-1]), np.diagonal(K0) + 10_000 * gamma ** 2, rtol=1e-10)
    assert all(np.all(np.isfinite(k)) for k in (out.nngp[-1], out.ntk[-1]))
    assert len(out.nngp) == 10_001


@pytest.mark.parametrize("net, words", [
    (A.serial(A.dense(), A.activation("relu"), A.layer_norm(), A.dense()), "layer 3 (layernorm)"),
    (A.serial(A.activation("relu"), A.dense()), "the raw inputs"),
    (A.serial(A.layer_norm(), A.dense()), "the raw inputs"),
    (A.serial(A.dense(), A.activation("relu"), A.activation("tanh")), "layer 3 (activation)"),
    (A.serial(A.dense(), A.repeat(2, A.activation("relu"), A.layer_norm(), A.dense())), "layernorm"),
])
def test_rules_are_applied_only_to_gaussian_features(net, words):
    """Activations and LayerNorm are derived for zero-mean Gaussian inputs: after an activation the
    channel mean is E[sigma] != 0 (the sampler would show a large bias), so such networks are refused."""
    with pytest.raises(DeriveError, match=r"zero-mean Gaussian") as info:
        arch_kernels(net, X)
    assert words in str(info.value)


def test_shape_errors_are_reported_before_running():
    with pytest.raises(DeriveError, match="spatial axes"):
        arch_kernels(A.serial(A.conv((3,))), X)
    with pytest.raises(DeriveError, match="tokens"):
        arch_kernels(A.serial(A.attention()), X)
    with pytest.raises(DeriveError, match="larger than"):
        arch_kernels(A.serial(A.avg_pool((9,))), SEQ)
    with pytest.raises(DeriveError, match="spatial shape"):
        arch_kernels(A.serial(A.residual(A.conv((2,), (2,)))), SEQ)
    with pytest.raises(DeriveError, match="inputs"):
        arch_kernels(A.mlp(2, "relu", 2.0), np.zeros((3,)))


def test_single_input_maps_are_derived():
    layer = A.activation("relu")
    maps = layer_maps(layer)
    import sympy as sp

    from derive.core import symbols as S

    assert sp.simplify(maps.single_kernel - S.K / 2) == 0
    assert sp.simplify(maps.single_ntk - S.Theta / 2) == 0


# ------------------------------------------------------------------------------------------------
# Sampled networks against the theory (5 sigma), and the check's power


CASES = {
    "residual layernorm tanh": (A.serial(A.dense(1.5, 0.1), A.repeat(2, A.residual(
        A.layer_norm(), A.dense(2.0), A.activation("tanh"), A.dense(1.0), gamma=0.5))), X),
    "conv pool flatten": (A.serial(A.conv((3,), C_W=2.0, C_b=0.1), A.activation("relu"),
                                   A.conv((2,), (2,), "VALID"), A.activation("erf"), A.avg_pool((2,)),
                                   A.flatten(), A.dense()), SEQ),
    "2-d CNN, global pool": (A.serial(A.conv((3, 2), C_W=1.5, C_b=0.05), A.activation("relu"),
                                     A.conv((2, 2), (2, 1), C_W=2.0), A.activation("abs"),
                                     A.avg_pool((2, 2), (1, 1), "SAME"), A.global_avg_pool(), A.dense()), IMG),
    "pre-LN transformer (swish MLP)": (A.serial(A.dense(), A.residual(A.layer_norm(), A.attention(
        heads=2, C_Q=0.5, C_K=0.5, C_V=0.5, C_O=1 / 3)), A.residual(A.layer_norm(), A.dense(0.4),
        A.activation("swish"), A.dense(1.6)), A.global_avg_pool()), SEQ),
    # independent query/key weights, 1/sqrt(n/H) logits: the maps are the many-head limit, which 4 heads
    # of 64 channels follow within the standard error here (Dinan et al.'s variances: logits of std ~ 1/2)
    "pre-LN transformer, dot-product attention": (A.serial(A.dense(), A.residual(
        A.layer_norm(), A.dot_product_attention(heads=4, C_Q=0.5, C_K=0.5, C_V=0.5, C_O=1 / 3)),
        A.residual(A.layer_norm(), A.dense(0.4), A.activation("gelu"), A.dense(1.6))), SEQ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_sampled_networks_agree_with_the_theory(name):
    """Width 256, 200 networks: every recorded kernel entry and the output NTK within 5 standard
    errors (finite-width bias O(depth / n) is below the standard error at this size)."""
    net, inputs = CASES[name]
    theory = arch_kernels(net, inputs)
    mc = sample_arch(net, inputs, 256, n_networks=200, seed=11)
    for i, z in enumerate(mc.nngp_z(theory)):
        assert np.abs(z).max() < 5, (name, theory.labels[i], np.abs(z).max())
    assert np.abs(mc.ntk_z(theory)).max() < 5


def test_a_wrong_theory_is_detected():
    """The theory of a network whose first convolution has C_W 5% off fails the same check, at the
    same sample size and seed: the check has power."""
    net, inputs = CASES["conv pool flatten"]
    wrong = A.serial(A.conv((3,), C_W=2.1, C_b=0.1), *net.items[1:])
    mc = sample_arch(net, inputs, 256, n_networks=200, seed=11)
    assert max(np.abs(z).max() for z in mc.nngp_z(arch_kernels(wrong, inputs))) > 5


_DEVICE_SCRIPT = """
import sys
import numpy as np
import jax
from derive import arch as A
from derive.sampling.arch import sample_arch
x = np.array({x})
net = A.serial(A.dense(), A.residual(A.layer_norm(), A.attention(heads=2)),
               A.residual(A.layer_norm(), A.dot_product_attention(heads=2)), A.global_avg_pool())
mc = sample_arch(net, x, 8, n_networks=9, seed=5, chunk=3)
np.savez(sys.argv[1], devices=len(jax.devices()), mean=mc.nngp[-1].mean, m4=mc.nngp[-1].m4, ntk=mc.ntk.m2)
"""


@pytest.mark.slow
def test_chunk_sizes_give_identical_numbers_and_four_devices_the_same_to_rounding(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = tmp_path / "four.npz"
    res = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT.format(x=SEQ.tolist()), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    four = np.load(out)
    assert int(four["devices"]) == 4
    net = A.serial(A.dense(), A.residual(A.layer_norm(), A.attention(heads=2)),
                   A.residual(A.layer_norm(), A.dot_product_attention(heads=2)), A.global_avg_pool())
    runs = [sample_arch(net, SEQ, 8, n_networks=9, seed=5, chunk=chunk) for chunk in (None, 2, 5)]
    for one in runs[1:]:  # chunk sizes: bit for bit
        assert np.array_equal(runs[0].nngp[-1].mean, one.nngp[-1].mean)
        assert np.array_equal(runs[0].nngp[-1].m4, one.nngp[-1].m4)
        assert np.array_equal(runs[0].ntk.m2, one.ntk.m2)
    # device counts: to rounding (derive.sampling.arch docstring)
    np.testing.assert_allclose(four["mean"], runs[0].nngp[-1].mean, rtol=1e-13, atol=0)
    np.testing.assert_allclose(four["m4"], runs[0].nngp[-1].m4, rtol=1e-11, atol=0)
    np.testing.assert_allclose(four["ntk"], runs[0].ntk.m2, rtol=1e-11, atol=0)


# ------------------------------------------------------------------------------------------------
# Neural Tangents (a separate environment; skipped unless DERIVE_NT_PYTHON names its python)


@pytest.mark.skipif(not os.environ.get("DERIVE_NT_PYTHON"), reason="set DERIVE_NT_PYTHON to a python with "
                    "neural-tangents 0.6.5 (../shared/tools/make-nt-venv.sh)")
def test_agreement_with_neural_tangents():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import architectures_nt

    for row in architectures_nt.run(os.environ["DERIVE_NT_PYTHON"], repeats=1):
        assert row["nngp_off_diagonal_rel_diff"] < 1e-8 and row["ntk_off_diagonal_rel_diff"] < 1e-8, row
        assert row["nngp_rel_diff"] < 1e-8, row
