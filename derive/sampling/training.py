"""Ensembles of finite-width dense networks trained by full-batch gradient descent on the MSE.

Each network is the one of :mod:`derive.sampling.dense` (W^(l) ~ N(0, C_W / n_{l-1}),
b^(l) ~ N(0, C_b), L dense layers, output width k = the number of target columns), drawn with
``jax.random.fold_in(jax.random.key(seed), k)`` for network k, and trained on (X, Y) by ``steps``
steps of gradient descent on

    L(theta) = |z^(L)(X) - Y|^2 / (2 |Y|)          (|Y| = N k, Neural Tangents' normalisation)

with the NTK's learning-rate tensor (PDLT eq. 7.5 ff.): W^(l) <- W^(l) - eta (lambda_W / n_{l-1})
dL/dW^(l), b^(l) <- b^(l) - eta lambda_b dL/db^(l). With lambda_W = C_W, lambda_b = C_b this is plain
gradient descent on the standard-normal parameters of the NTK parametrisation. As n -> infinity the
function-space dynamics are those of the kernel predictions of :mod:`derive.inference.infinite` with
``steps`` (Lee et al. 2019); at finite width they differ at order 1/n.

The test outputs z^(L)(x_test) of every network are recorded at each requested step count (the
``checkpoints``), together with the final training loss; networks run in chunks (vmapped and jitted,
one compilation per chunk size), so memory stays bounded, and the per-network records are kept (S x
checkpoints x M x k numbers) for the moments and their standard errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from derive.backends.precision import float64
from derive.core import budget
from derive.core.errors import DeriveError
from derive.core.progress import stage
from derive.sampling.dense import forward, init_network

Activation = Callable[[jax.Array], jax.Array]

#: Networks trained together (vmapped) by default.
DEFAULT_CHUNK = 64


@dataclass(frozen=True)
class TrainedEnsemble:
    """Test outputs of S trained networks: ``outputs`` (S, checkpoints, M, k), ``losses`` (S, checkpoints)
    the training loss at each checkpoint."""

    outputs: np.ndarray
    losses: np.ndarray
    checkpoints: tuple
    width: int

    @property
    def n_networks(self) -> int:
        return self.outputs.shape[0]

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean of the test outputs and its standard error, (checkpoints, M, k) each."""
        s = self.n_networks
        return self.outputs.mean(axis=0), self.outputs.std(axis=0, ddof=1) / np.sqrt(s)

    def variance(self) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble variance of the test outputs (unbiased) and its standard error,
        sqrt((m4 - var^2) / S) from the fourth central moment (asymptotic, large S)."""
        s = self.n_networks
        centred = self.outputs - self.outputs.mean(axis=0)
        var = np.sum(centred**2, axis=0) / (s - 1)
        m4 = np.mean(centred**4, axis=0)
        return var, np.sqrt(np.maximum(m4 - var**2, 0.0) / s)


def _train_function(activation: Activation, widths: tuple, checkpoints: tuple, dtype):
    def one(key, x_train, y_train, x_test, hyper):
        C_W, C_b, lambda_W, lambda_b, lr = hyper
        params = init_network(key, widths, C_W, C_b, dtype)
        size = y_train.size

        def loss(params):
            return jnp.sum((forward(params, activation, x_train)[-1] - y_train) ** 2) / (2 * size)

        def step(params, _):
            grads = jax.grad(loss)(params)
            return [(W - lr * lambda_W / widths[l] * gW, b - lr * lambda_b * gb)
                    for l, ((W, b), (gW, gb)) in enumerate(zip(params, grads))], None

        outs, losses, done = [], [], 0
        for target in checkpoints:
            if target > done:
                params, _ = lax.scan(step, params, None, length=target - done)
                done = target
            outs.append(forward(params, activation, x_test)[-1])
            losses.append(loss(params))
        return jnp.stack(outs), jnp.stack(losses)

    def chunk(keys, x_train, y_train, x_test, hyper):
        return jax.vmap(one, in_axes=(0, None, None, None, None))(keys, x_train, y_train, x_test, hyper)

    return jax.jit(chunk)


_TRAIN_CACHE: dict = {}


@float64


def train_ensemble(activation: Activation, x_train, y_train, x_test, depth: int, width: int, C_W: float,
                   C_b: float = 0.0, lambda_W: float | None = None, lambda_b: float | None = None, *,
                   steps: Sequence[int] | int, learning_rate: float, n_networks: int, seed: int = 0,
                   chunk: int | None = None, progress: bool | Callable[[int, int], None] | None = None
                   ) -> TrainedEnsemble:
    """Train ``n_networks`` dense networks of hidden width ``width`` and record their test outputs.

    ``activation`` is a jnp function (:func:`derive.backends.codegen.jax_activation`); ``steps`` one or
    more step counts at which the test outputs are recorded (the checkpoints, increasing); targets
    (N, k) set the output width k. ``progress(done, total)`` is called after each chunk.
    """
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.float64)
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    checkpoints = tuple(int(s) for s in np.atleast_1d(steps))
    if any(s < 0 for s in checkpoints) or list(checkpoints) != sorted(checkpoints):
        raise DeriveError(f"steps must be non-negative and increasing, got {steps!r}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise DeriveError(f"width must be a positive integer, got {width!r}")
    if isinstance(n_networks, bool) or not isinstance(n_networks, (int, np.integer)) or n_networks < 2:
        raise DeriveError(f"n_networks must be an integer >= 2, got {n_networks!r}")
    widths = (x_train.shape[1],) + (int(width),) * (depth - 1) + (y.shape[1],)
    lambda_W = C_W if lambda_W is None else lambda_W
    lambda_b = C_b if lambda_b is None else lambda_b
    chunk = min(DEFAULT_CHUNK if chunk is None else int(chunk), n_networks)
    budget.check(budget.training(n_networks, widths, len(x_train), len(x_test), max(checkpoints, default=0),
                                 chunk=chunk))
    key = (activation, widths, checkpoints)
    if key not in _TRAIN_CACHE:
        _TRAIN_CACHE[key] = _train_function(activation, widths, checkpoints, jnp.float64)
    run = _TRAIN_CACHE[key]
    base = jax.random.key(seed)
    hyper = tuple(jnp.asarray(h, jnp.float64) for h in (C_W, C_b, lambda_W, lambda_b, learning_rate))
    outputs, losses = [], []
    report, close = stage(progress, f"training {n_networks} networks of width {width}", n_networks,
                          lambda p: (lambda done: p(done, n_networks)))
    for start in range(0, n_networks, chunk):
        # Always a full chunk (one compilation); the surplus networks of the last one are dropped.
        keys = jax.vmap(lambda k: jax.random.fold_in(base, k))(jnp.arange(start, start + chunk))
        out, loss = run(keys, x_train, y, x_test, hyper)
        take = min(chunk, n_networks - start)
        outputs.append(np.asarray(out)[:take])
        losses.append(np.asarray(loss)[:take])
        if report is not None:
            report(start + take)
    close()
    return TrainedEnsemble(np.concatenate(outputs), np.concatenate(losses), checkpoints, int(width))


__all__ = ["DEFAULT_CHUNK", "TrainedEnsemble", "train_ensemble"]
