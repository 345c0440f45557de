"""Trained ensembles: the gradient-descent trainer against a plain NumPy loop, and infinite-width
predictions against ensembles trained at three widths (the wrong dynamics rejected)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import derive
from derive.arch.description import dense_network
from derive.backends.codegen import jax_activation
from derive.core.errors import DeriveError
from derive.inference.predict import predict_network
from derive.rules.activations import resolve
from derive.sampling.dense import init_network
from derive.sampling.training import train_ensemble
from derive.validation.trained import compare

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(11)
X_TRAIN, X_TEST = RNG.normal(size=(8, 4)), RNG.normal(size=(4, 4))
W_TARGET = RNG.normal(size=4) / 2
Y_TRAIN = np.sin(X_TRAIN @ W_TARGET)
#: Sampling check: |z| of every fitted intercept below this, and above it for the wrong dynamics.
Z_MAX = 5.0


def _numpy_training(params, x, y, xt, C_W, C_b, lr, steps):
    """Gradient descent on |z(X) - Y|^2 / (2|Y|) by hand-written backpropagation (tanh hidden layers),
    learning rates lr C_W / n_in for weights and lr C_b for biases."""
    params = [(np.array(W), np.array(b)) for W, b in params]
    size = y.size

    def forward(params, h):
        hs, zs = [h], []
        for l, (W, b) in enumerate(params):
            z = hs[-1] @ W.T + b
            zs.append(z)
            if l < len(params) - 1:
                hs.append(np.tanh(z))
        return hs, zs

    for _ in range(steps):
        hs, zs = forward(params, x)
        delta = (zs[-1] - y) / size  # dL/dz^(L)
        grads = []
        for l in range(len(params) - 1, -1, -1):
            W, _ = params[l]
            grads.append((delta.T @ hs[l], delta.sum(axis=0)))
            if l > 0:
                delta = (delta @ W) * (1 - np.tanh(zs[l - 1]) ** 2)
        grads.reverse()
        params = [(W - lr * C_W / W.shape[1] * gW, b - lr * C_b * gb) for (W, b), (gW, gb) in zip(params, grads)]
    return forward(params, xt)[1][-1]


@pytest.mark.slow
def test_trainer_equals_a_numpy_loop():
    y = Y_TRAIN[:, None]
    C_W, C_b, lr, steps, width = 1.7, 0.2, 0.9, 7, 6
    ens = train_ensemble(jax_activation(resolve("tanh")), X_TRAIN, y, X_TEST, 3, width, C_W, C_b, steps=[0, steps],
                         learning_rate=lr, n_networks=3, seed=5, chunk=2)
    for k in range(3):
        params = init_network(jax.random.fold_in(jax.random.key(5), k), (4, width, width, 1), C_W, C_b)
        for c, s in enumerate((0, steps)):
            expected = _numpy_training(params, X_TRAIN, y, X_TEST, C_W, C_b, lr, s)
            np.testing.assert_allclose(ens.outputs[k, c], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_ensembles_do_not_depend_on_the_chunk_size():
    act = jax_activation(resolve("relu"))
    a = train_ensemble(act, X_TRAIN, Y_TRAIN, X_TEST, 3, 8, 2.0, 0.0, steps=[5], learning_rate=1.0, n_networks=6,
                       chunk=2)
    b = train_ensemble(act, X_TRAIN, Y_TRAIN, X_TEST, 3, 8, 2.0, 0.0, steps=[5], learning_rate=1.0, n_networks=6,
                       chunk=4)
    np.testing.assert_allclose(a.outputs, b.outputs, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("name,cw,cb,lr", [("tanh", 1.5, 0.05, 1.0), ("relu", 1.0, 0.5, 0.4)])
def test_trained_ensembles_agree_with_the_infinite_width_prediction(name, cw, cb, lr):
    """Depth 3, widths 16, 32, 64, 600 networks each: mean and variance of every test output at steps
    0, 40 and 400, fitted in 1/n, agree with the NTK prediction (|z| < 5); the same ensembles reject
    the prediction of last-layer-only training (the NNGP mode). (ReLU away from criticality: at
    C_W = 2, C_b = 0 its NTK is nearly proportional to its NNGP kernel and the two modes differ by less
    than this sample size resolves.)"""
    steps, depth = (0, 40, 400), 3
    activation = resolve(name)
    sigma = jax_activation(activation)
    ensembles = [train_ensemble(sigma, X_TRAIN, Y_TRAIN[:, None], X_TEST, depth, w, cw, cb, steps=steps,
                                learning_rate=lr, n_networks=600, seed=w) for w in (16, 32, 64)]
    net = dense_network(activation, depth, cw, cb, cw, cb)
    theory = predict_network(net, X_TRAIN, Y_TRAIN[:, None], X_TEST, steps=list(steps), learning_rate=lr,
                             get=("nngp", "ntk"))
    right = compare(ensembles, theory, mode="ntk", z_max=Z_MAX, learning_rate=lr)
    assert right.passed, "\n".join(right.table())
    wrong = compare(ensembles, theory, mode="nngp", z_max=Z_MAX, learning_rate=lr)
    assert not wrong.passed, "\n".join(wrong.table())
    # the training converged: the final loss is far below the initial one
    assert max(right.final_loss.values()) < 0.05 * float(np.mean(Y_TRAIN**2))


@pytest.mark.slow
def test_validate_trained_api_report_and_figure(tmp_path):
    rep = derive.validate_trained("erf", X_TRAIN, Y_TRAIN, X_TEST, 3, 1.5, 0.05, widths=(8, 16, 32), n_networks=60,
                                  steps=(0, 10))
    assert len(rep.rows) == 2 * 2 * 4 and {r.quantity for r in rep.rows} == {"mean", "variance"}
    assert "comparisons against the ntk prediction" in repr(rep) and "| quantity |" in rep._repr_markdown_()
    assert json.dumps(rep.to_dict())
    assert all(len(line) <= 80 for line in rep.table())
    fig = rep.plot(str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000 and len(fig.axes) == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(widths=(8, 16)), "at least three"),
    (dict(mode="ntkgp"), "mode must be"),
    (dict(n_networks=1), "n_networks must be"),
])
def test_validate_trained_refuses(kwargs, message):
    with pytest.raises(DeriveError, match=message):
        derive.validate_trained("relu", X_TRAIN, Y_TRAIN, X_TEST, 3, 2.0, **kwargs)


@pytest.mark.slow
def test_cli_validate_trained_exit_codes(tmp_path):
    base = [sys.executable, "-m", "cli", "validate-trained", "-a", "tanh", "-L", "3", "--cw", "1.5", "--cb", "0.05",
            "--widths", "8,16,32", "--networks", "150", "--steps", "0", "--steps", "40", "--format", "json"]
    ok = subprocess.run(base + ["--out", str(tmp_path / "ok.png")], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["passed"] and out["mode"] == "ntk" and (tmp_path / "ok.png").is_file()
    bad = subprocess.run(base[:4] + ["-a", "tanh", "-L", "3", "--cw", "1.5", "--widths", "8,16"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "at least three" in bad.stderr and "Traceback" not in bad.stderr
