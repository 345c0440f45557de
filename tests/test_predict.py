"""Infinite-width predictions (derive.predict): Neural Tangents' nt.predict on identical inputs, the
linearised training dynamics run step by step, and the kernels between two input sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

import derive
from derive.arch.description import dense_network
from derive.core.errors import DeriveError
from derive.rules.activations import resolve

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "nt_predict.npz"

#: Agreement with Neural Tangents (issue target): relative to the largest entry of each array.
NT_RTOL = 1e-10
#: Agreement with the step-by-step dynamics and with expm (the same float64 linear algebra).
DYNAMICS_RTOL = 1e-9


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---------------------------------------------------------------------------------------------------------
# Neural Tangents (stored reference: benchmarks/predict.py --write-reference)


def _reference():
    with np.load(REFERENCE) as f:
        data = {k: f[k] for k in f.files}
    return data, json.loads(str(data.pop("meta")))


def _cases():
    data, meta = _reference()
    for name in meta["networks"]:
        for noise in meta["noise"]:
            for label, t in [("inf", None)] + [(f"t{i}", t) for i, t in enumerate(meta["times"])]:
                yield name, noise, label, t


@pytest.mark.slow
@pytest.mark.parametrize("name,noise,label,t", list(_cases()))
def test_predictions_equal_neural_tangents(name, noise, label, t):
    data, meta = _reference()
    _, cw, cb = meta["networks"][name]
    res = derive.predict(name, data["input/x_train"], data["input/y_train"], data["input/x_test"],
                         depth=meta["depth"], C_W=cw, C_b=cb, t=t, learning_rate=meta["learning_rate"],
                         noise=noise, covariance="full")
    for mode in ("nngp", "ntk"):
        key = f"{name}/{noise}/{label}/{mode}"
        assert _rel(res[mode].mean, data[key + "/mean"]) < NT_RTOL, (key, "mean")
        assert _rel(res[mode].covariance, data[key + "/covariance"]) < NT_RTOL, (key, "covariance")
        assert res.jitter[mode] == 0.0


@pytest.mark.skipif(not os.environ.get("DERIVE_NT_PYTHON"), reason="set DERIVE_NT_PYTHON to a python with "
                    "neural-tangents 0.6.5 (../shared/tools/make-nt-venv.sh)")
def test_stored_reference_is_what_neural_tangents_computes(tmp_path):
    out = tmp_path / "ref.npz"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predict.py"), "--nt-python",
                    os.environ["DERIVE_NT_PYTHON"], "--write-reference", str(out)], check=True)
    with np.load(out) as new, np.load(REFERENCE) as old:
        for key in old.files:
            if key != "meta":
                np.testing.assert_allclose(new[key], old[key], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# The linearised dynamics, independently: the network's outputs at time t are a linear map of the
# Gaussian outputs at initialisation, f_t(x) = f_0(x) - A_t (f_0(X) - Y); mean and covariance follow
# from A_t, computed here by the matrix exponential (gradient flow) or by iterating the steps.

RNG = np.random.default_rng(3)
X_TRAIN, X_TEST = RNG.normal(size=(9, 3)), RNG.normal(size=(4, 3))
Y_TRAIN = RNG.normal(size=(9, 2))
NET = dict(depth=3, C_W=1.8, C_b=0.2)


def _kernels(name):
    both = np.concatenate([X_TRAIN, X_TEST])
    g = derive.gram(name, both, **NET)
    return g.nngp, g.ntk


def _moments(A, K_joint, n):
    """Mean and covariance of f_0(x) - A (f_0(X) - Y) with f_0 ~ N(0, K_joint) over (X, x)."""
    m = K_joint.shape[0] - n
    L = np.concatenate([-A, np.eye(m)], axis=1)  # (m, n + m)
    return A @ Y_TRAIN, L @ K_joint @ L.T


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "tanh"])
@pytest.mark.parametrize("mode", ["nngp", "ntk"])
def test_gradient_flow_equals_the_matrix_exponential(name, mode):
    K, Theta = _kernels(name)
    n, size, eta, t = 9, Y_TRAIN.size, 0.8, 3.0
    G = K if mode == "nngp" else Theta  # the kernel that drives training
    A = G[n:, :n] @ np.linalg.solve(G[:n, :n], np.eye(n) - linalg.expm(-eta * t * G[:n, :n] / size))
    mean, cov = _moments(A, K, n)
    res = derive.predict(name, X_TRAIN, Y_TRAIN, X_TEST, **NET, t=t, learning_rate=eta, covariance="full")
    assert _rel(res[mode].mean, mean) < DYNAMICS_RTOL
    assert _rel(res[mode].covariance, cov) < DYNAMICS_RTOL


@pytest.mark.parametrize("mode", ["nngp", "ntk"])
def test_gradient_descent_steps_equal_the_iteration(mode):
    K, Theta = _kernels("erf")
    n, size, eta, steps = 9, Y_TRAIN.size, 2.5, 40
    G = K if mode == "nngp" else Theta
    # f_{s+1}(z) = f_s(z) - eta/|Y| G_zX (f_s(X) - Y): track A_s with f_s(x) = f_0(x) - A_s (f_0(X) - Y)
    # and R_s with f_s(X) - Y = R_s (f_0(X) - Y).
    A, R = np.zeros((4, n)), np.eye(n)
    for _ in range(steps):
        A = A + eta / size * G[n:, :n] @ R
        R = R - eta / size * G[:n, :n] @ R
    mean, cov = _moments(A, K, n)
    res = derive.predict("erf", X_TRAIN, Y_TRAIN, X_TEST, **NET, steps=steps, learning_rate=eta,
                         covariance="full")
    assert _rel(res[mode].mean, mean) < DYNAMICS_RTOL
    assert _rel(res[mode].covariance, cov) < DYNAMICS_RTOL


def test_converged_flow_is_kernel_regression_and_the_nngp_mode_the_gp_posterior():
    K, Theta = _kernels("tanh")
    n, noise = 9, 0.05
    res = derive.predict("tanh", X_TRAIN, Y_TRAIN, X_TEST, **NET, noise=noise, covariance="full",
                         get=("nngp", "ntk", "ntkgp"))
    Kn = K[:n, :n] + noise * np.eye(n)
    assert _rel(res.nngp.mean, K[n:, :n] @ np.linalg.solve(Kn, Y_TRAIN)) < DYNAMICS_RTOL
    assert _rel(res.nngp.covariance, K[n:, n:] - K[n:, :n] @ np.linalg.solve(Kn, K[:n, n:])) < DYNAMICS_RTOL
    Tn = Theta[:n, :n] + noise * np.eye(n)
    assert _rel(res.ntk.mean, Theta[n:, :n] @ np.linalg.solve(Tn, Y_TRAIN)) < DYNAMICS_RTOL
    assert _rel(res["ntkgp"].covariance,
                Theta[n:, n:] - Theta[n:, :n] @ np.linalg.solve(Tn, Theta[:n, n:])) < DYNAMICS_RTOL
    # a long finite time approaches convergence
    late = derive.predict("tanh", X_TRAIN, Y_TRAIN, X_TEST, **NET, noise=noise, t=1e9, covariance="full")
    assert _rel(late.ntk.mean, res.ntk.mean) < 1e-8 and _rel(late.ntk.covariance, res.ntk.covariance) < 1e-8


def test_variances_chunks_times_and_shapes():
    full = derive.predict("relu", X_TRAIN, Y_TRAIN, X_TEST, **NET, t=[0.5, 2.0], covariance="full")
    diag = derive.predict("relu", X_TRAIN, Y_TRAIN, X_TEST, **NET, t=[0.5, 2.0], chunk=3)
    assert full.ntk.mean.shape == (2, 4, 2) and full.ntk.covariance.shape == (2, 4, 4)
    assert diag.ntk.covariance.shape == (2, 4)
    for mode in ("nngp", "ntk"):
        np.testing.assert_allclose(diag[mode].mean, full[mode].mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(diag[mode].variance, full[mode].variance, rtol=1e-10, atol=1e-14)
    # one output column: |Y| halves, so time runs twice as fast (the loss is normalised by |Y|)
    one = derive.predict("relu", X_TRAIN, Y_TRAIN[:, 0], X_TEST, **NET, t=1.0)
    np.testing.assert_allclose(one.ntk.mean, full.ntk.mean[1, :, 0], rtol=1e-12)
    np.testing.assert_allclose(one.ntk.variance, full.ntk.variance[1], rtol=1e-10)
    assert one.ntk.mean.shape == (4,) and one.ntk.variance.shape == (4,)
    assert "t = 1" in repr(one) and "| ntk |" in one._repr_markdown_()
    assert json.dumps(one.to_dict())


def test_architecture_gives_the_same_predictions_and_positions_are_refused():
    net = dense_network(resolve("relu"), 3, 1.8, 0.2, 1.8, 0.2)
    a = derive.predict(net, X_TRAIN, Y_TRAIN, X_TEST, t=1.0)
    b = derive.predict("relu", X_TRAIN, Y_TRAIN, X_TEST, **NET, t=1.0)
    np.testing.assert_allclose(a.ntk.mean, b.ntk.mean, rtol=1e-12)
    conv = derive.arch.serial(derive.arch.conv((3,), C_W=1.5, C_b=0.1))
    with pytest.raises(DeriveError, match="positions"):
        derive.predict(conv, RNG.normal(size=(5, 6, 2)), np.ones(5), RNG.normal(size=(2, 6, 2)))


def test_repeated_training_inputs():
    x = np.concatenate([X_TRAIN, X_TRAIN[:2]])
    y = np.concatenate([Y_TRAIN, Y_TRAIN[:2]])
    finite = derive.predict("relu", x, y, X_TEST, **NET, t=5.0, covariance="full")
    reference = derive.predict("relu", X_TRAIN, Y_TRAIN, X_TEST, **NET, t=None, covariance="full")
    assert np.all(np.isfinite(finite.ntk.mean)) and np.all(np.isfinite(finite.ntk.covariance))
    converged = derive.predict("relu", x, y, X_TEST, **NET)
    assert converged.jitter["ntk"] > 0 and np.all(np.isfinite(converged.ntk.mean))
    # the duplicates carry no new information: converged predictions barely move
    assert _rel(converged.ntk.mean, reference.ntk.mean) < 1e-4


@pytest.mark.parametrize("kwargs,message", [
    (dict(t=1.0, steps=3), "either t"),
    (dict(t=-1.0), "non-negative"),
    (dict(steps=2.5), "whole numbers"),
    (dict(t=[1.0, np.inf]), "infinite time"),
    (dict(get="ntkgp", t=1.0), "t = infinity only"),
    (dict(get="gp"), "get must name"),
    (dict(covariance="all"), "covariance must be"),
    (dict(noise=-1.0), "noise must be"),
    (dict(learning_rate=0.0), "learning_rate must be positive"),
    (dict(steps=5, learning_rate=1e6), "diverges"),
])
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(DeriveError, match=message):
        derive.predict("relu", X_TRAIN, Y_TRAIN, X_TEST, **NET, **kwargs)


def test_bad_targets_and_inputs_are_refused():
    with pytest.raises(DeriveError, match="targets must have shape"):
        derive.predict("relu", X_TRAIN, Y_TRAIN[:5], X_TEST, **NET)
    with pytest.raises(DeriveError, match="NaN"):
        derive.predict("relu", X_TRAIN, np.full(9, np.nan), X_TEST, **NET)
    with pytest.raises(DeriveError, match="must agree after the first axis"):
        derive.predict("relu", X_TRAIN, Y_TRAIN, X_TEST[:, :2], **NET)


# ---------------------------------------------------------------------------------------------------------
# Kernels between two input sets


@pytest.mark.parametrize("name", ["relu", "tanh", "erf"])
def test_gram_between_two_sets_is_the_block_of_one_gram(name):
    both = np.concatenate([X_TRAIN, X_TEST])
    full = derive.gram(name, both, **NET)
    block = derive.gram(name, X_TRAIN, **NET, x_test=X_TEST)
    assert block.nngp.shape == (4, 9)
    np.testing.assert_allclose(block.nngp, full.nngp[9:, :9], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(block.ntk, full.ntk[9:, :9], rtol=1e-12, atol=1e-15)


def test_cross_gram_of_an_architecture_with_positions():
    from derive.kernels.engine import network_cross_gram, network_gram

    net = derive.arch.serial(derive.arch.conv((3,), C_W=1.5, C_b=0.1), derive.arch.activation("relu"),
                             derive.arch.conv((3,), C_W=1.5, C_b=0.1))
    a, b = RNG.normal(size=(3, 5, 2)), RNG.normal(size=(2, 5, 2))
    K, T, Kd, Td = network_cross_gram(net, a, b, chunk=2)
    Kf, Tf = network_gram(net, np.concatenate([b, a]))
    np.testing.assert_allclose(K, Kf[2:, :, :2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(T, Tf[2:, :, :2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(Kd, np.stack([Kf[2 + i, :, 2 + i] for i in range(3)]), rtol=1e-12, atol=1e-15)
    assert Td.shape == (3, 5, 5)


# ---------------------------------------------------------------------------------------------------------
# The command


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or ROOT)


@pytest.mark.slow
def test_cli_predict_files_json_and_npz(tmp_path):
    for name, value in (("x", X_TRAIN), ("y", Y_TRAIN), ("xt", X_TEST)):
        np.save(tmp_path / f"{name}.npy", value)
    out = tmp_path / "pred.npz"
    res = _cli("predict", "-a", "tanh", "-L", "3", "--cw", "1.8", "--cb", "0.2", "--inputs", str(tmp_path / "x.npy"),
               "--targets", str(tmp_path / "y.npy"), "--test-inputs", str(tmp_path / "xt.npy"), "--time", "3",
               "--lr", "0.8", "--full-covariance", "--format", "json", "--out", str(out))
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    api = derive.predict("tanh", X_TRAIN, Y_TRAIN, X_TEST, **NET, t=3.0, learning_rate=0.8, covariance="full")
    for mode in ("nngp", "ntk"):
        np.testing.assert_allclose(got["modes"][mode]["mean"], api[mode].mean, rtol=1e-12)
        np.testing.assert_allclose(got["modes"][mode]["covariance"], api[mode].covariance, rtol=1e-12)
    with np.load(out) as f:
        np.testing.assert_allclose(f["ntk_variance"], api.ntk.variance, rtol=1e-12)
        assert f["nngp_covariance"].shape == (4, 4)


@pytest.mark.slow
def test_cli_predict_demo_text_fits_80_columns_and_bad_requests_exit_2(tmp_path):
    res = _cli("predict", "-a", "relu", "-L", "3", "--cw", "2", "--time", "1", "--time", "5")
    assert res.returncode == 0, res.stderr
    assert "Demo task" in res.stdout and "ntk: all layers trained" in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    for args, message in ((("--time", "1", "--steps", "3"), "not both"),
                          (("--steps", "5", "--lr", "1e6"), "diverges"),
                          (("--inputs", str(tmp_path / "none.npy")), "together"),
                          (("--time", "inf", "--time", "2"), "on its own")):
        bad = _cli("predict", "-a", "relu", "-L", "3", "--cw", "2", *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_cli_gram_test_inputs(tmp_path):
    np.save(tmp_path / "x.npy", X_TRAIN)
    np.save(tmp_path / "xt.npy", X_TEST)
    res = _cli("gram", "-a", "erf", "--depth", "3", "--cw", "1.8", "--cb", "0.2", "--inputs", str(tmp_path / "x.npy"),
               "--test-inputs", str(tmp_path / "xt.npy"), "--format", "json")
    assert res.returncode == 0, res.stderr
    block = derive.gram("erf", X_TRAIN, **NET, x_test=X_TEST)
    np.testing.assert_allclose(json.loads(res.stdout)["ntk"], block.ntk, rtol=1e-12)
