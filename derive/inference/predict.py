"""Predictions of infinitely wide networks for any architecture: the kernels through the one engine
(:func:`derive.kernels.engine.network_gram`), then the formulas of :mod:`derive.inference.infinite`.

The test inputs go through in chunks (:data:`TEST_CHUNK` points at a time): each chunk's test-train
kernel blocks and its own diagonal are evaluated, its predictions formed and kept, so that memory
grows with N (N + chunk) and not with M^2. The full test covariance (M, M) needs the full test-test
kernel and is evaluated in one piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from derive.arch.description import Serial
from derive.core.errors import DeriveError
from derive.inference.infinite import MODES, Gaussian, check_learning_rate, ensemble, prepare
from derive.kernels.engine import network_cross_gram, network_gram

#: Test points per chunk (their kernel blocks and predictions are formed together; the kernel blocks in
#: turn are evaluated in chunks of at most as many rows as there are training points).
TEST_CHUNK = 2048
#: Values of ``covariance``: none, the per-point variances, or the full test covariance.
COVARIANCES = (None, "diagonal", "full")


@dataclass(frozen=True)
class Prediction:
    """Test-output distributions of infinitely wide networks, one :class:`Gaussian` per mode.

    ``modes["nngp"]``: the GP posterior (t = infinity) or the network with only its last layer trained
    for time t; ``modes["ntk"]``: the infinite ensemble of networks trained by gradient descent on the
    MSE for time t (or to convergence); ``modes["ntkgp"]``: the GP posterior with the NTK as prior.
    Means have shape (M, k) ((M,) for 1-d targets), with a leading time axis when several times were
    asked; ``covariance`` (M, M) or, for "diagonal", the variances (M,).
    """

    modes: dict
    times: tuple | None
    steps: bool
    learning_rate: float
    noise: float
    jitter: dict = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0

    def __getitem__(self, mode: str) -> Gaussian:
        return self.modes[mode]

    @property
    def nngp(self) -> Gaussian:
        return self.modes["nngp"]

    @property
    def ntk(self) -> Gaussian:
        return self.modes["ntk"]

    @property
    def time_label(self) -> str:
        if self.times is None:
            return "t = inf"
        what = "steps" if self.steps else "t"
        return f"{what} = " + ", ".join(f"{t:g}" for t in self.times)

    def to_dict(self) -> dict:
        """Plain data (lists) for JSON."""
        out = {"times": None if self.times is None else list(self.times), "steps": self.steps,
               "learning_rate": self.learning_rate, "noise": self.noise, "jitter": dict(self.jitter),
               "n_train": self.n_train, "n_test": self.n_test, "modes": {}}
        for mode, g in self.modes.items():
            entry = {"mean": np.asarray(g.mean).tolist()}
            if g.covariance is not None:
                entry["covariance" if g.full else "variance"] = np.asarray(g.covariance).tolist()
            out["modes"][mode] = entry
        return out

    def __repr__(self) -> str:
        modes = ", ".join(self.modes)
        return (f"Prediction({modes}; {self.n_test} test points from {self.n_train} training points; "
                f"{self.time_label})")

    def _repr_markdown_(self) -> str:
        lines = [f"**Infinite-width predictions** ({self.time_label}, learning rate {self.learning_rate:g}, "
                 f"noise {self.noise:g}): {self.n_test} test points from {self.n_train} training points", "",
                 "| mode | mean (first outputs) | variance (first outputs) | jitter |", "|---|---|---|---|"]
        for mode, g in self.modes.items():
            mean = np.asarray(g.mean).reshape(-1)[:4]
            var = g.variance
            var_text = "" if var is None else ", ".join(f"{v:.6g}" for v in np.asarray(var).reshape(-1)[:4])
            lines.append(f"| {mode} | {', '.join(f'{v:.6g}' for v in mean)} | {var_text} | "
                         f"{self.jitter.get(mode, 0.0):g} |")
        return "\n".join(lines)


def _targets(y_train, n: int) -> tuple[np.ndarray, bool]:
    y = np.asarray(y_train)
    if y.dtype.kind not in "fiu":
        raise DeriveError(f"training targets must be numeric, got dtype {y.dtype}")
    flat = y.ndim == 1
    y = y.reshape(-1, 1) if flat else y
    if y.ndim != 2 or y.shape[0] != n or y.shape[1] < 1:
        raise DeriveError(f"training targets must have shape ({n},) or ({n}, k) for {n} training inputs, "
                          f"got {np.shape(y_train)}")
    if not np.all(np.isfinite(y)):
        raise DeriveError("training targets contain NaN or infinity")
    return y.astype(np.float64), flat


def _times(t, steps) -> tuple[tuple | None, bool, bool]:
    """(times, steps?, scalar?) from the user's ``t`` or ``steps``."""
    if t is not None and steps is not None:
        raise DeriveError("give either t (gradient flow, continuous time) or steps (gradient descent), not both")
    values = steps if steps is not None else t
    if values is None:
        return None, False, True
    arr = np.asarray(values, dtype=float)
    scalar = arr.ndim == 0
    arr = arr.reshape(-1)
    if arr.size == 0 or not np.all(arr >= 0) or np.any(np.isnan(arr)):
        raise DeriveError(f"{'steps' if steps is not None else 't'} must be non-negative numbers, got {values!r}")
    if steps is not None and (np.any(np.isinf(arr)) or np.any(arr != np.round(arr))):
        raise DeriveError(f"steps must be whole numbers (use t=None for convergence), got {values!r}")
    if np.all(np.isinf(arr)) and scalar:
        return None, False, True
    if np.any(np.isinf(arr)):
        raise DeriveError("infinite time mixed with finite ones: ask t=None (convergence) separately")
    return tuple(float(v) for v in arr), steps is not None, scalar


def _first(g: Gaussian, p: int) -> Gaussian:
    """The first ``p`` test points of a chunk's predictions (per-point variances)."""
    return Gaussian(g.mean[:, :p], None if g.covariance is None else g.covariance[:, :p], g.full)


def predict_network(net: Serial, x_train, y_train, x_test, *, t=None, steps=None, learning_rate: float = 1.0,
                    noise: float = 0.0, get=("nngp", "ntk"), covariance: str | None = "diagonal",
                    chunk: int | None = None, dtype: str = "float64") -> Prediction:
    """Infinite-width predictions of ``net`` trained on (x_train, y_train), at ``x_test``.

    Args:
        net: an architecture (the dense network of an activation is one: :func:`derive.arch.dense_network`);
            its output must have no positions (end with flatten or global pooling).
        x_train, x_test: inputs (N, ...) and (M, ...).
        y_train: targets (N,) or (N, k).
        t: gradient-flow time, a number or a 1-d sequence (None or inf: converged); the learning rate
            multiplies it, as in Neural Tangents.
        steps: instead of t, the number(s) of discrete gradient-descent steps of size ``learning_rate``.
        learning_rate: eta; the loss is |f(X) - Y|^2 / (2 |Y|) (module :mod:`derive.inference.infinite`).
        noise: observation noise variance sigma^2 added to the train-train kernel's diagonal.
        get: the modes, any of "nngp", "ntk", "ntkgp" (a name or a sequence).
        covariance: None, "diagonal" (per-point variances) or "full" (the (M, M) test covariance).
        chunk: test points per chunk (default :data:`TEST_CHUNK`).
    """
    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    modes = (get,) if isinstance(get, str) else tuple(get)
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise DeriveError(f"get must name modes among {', '.join(MODES)}, got {get!r}")
    if covariance not in COVARIANCES:
        raise DeriveError(f"covariance must be None, 'diagonal' or 'full', got {covariance!r}")
    for name, value in (("learning_rate", learning_rate), ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not np.isfinite(value):
            raise DeriveError(f"{name} must be a finite number, got {value!r}")
    if learning_rate <= 0:
        raise DeriveError(f"learning_rate must be positive, got {learning_rate!r}")
    if noise < 0:
        raise DeriveError(f"noise must be >= 0 (a variance), got {noise!r}")
    times, discrete, scalar = _times(t, steps)
    if "ntkgp" in modes and times is not None:
        raise DeriveError("the NTK-GP mode is a posterior (t = infinity only); drop t/steps or the mode")
    x_train = np.asarray(x_train, dtype=float)
    x_test = np.asarray(x_test, dtype=float)
    y, flat = _targets(y_train, x_train.shape[0] if x_train.ndim else 0)
    chunk = TEST_CHUNK if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise DeriveError(f"chunk must be a positive integer, got {chunk!r}")

    nngp_xx, ntk_xx = network_gram(net, x_train, dtype=dtype)
    if nngp_xx.ndim != 2:
        raise DeriveError("the architecture's output has positions; end it with flatten or global pooling "
                          "to predict one output per input")
    kernels = {"nngp": nngp_xx, "ntk": ntk_xx, "ntkgp": ntk_xx}
    rate = learning_rate / y.size
    trains, jitter = {}, {}
    for mode in modes:
        trains[mode] = prepare(kernels[mode], float(noise), finite_time=times is not None,
                               infinite_time=times is None)
        jitter[mode] = trains[mode].jitter
        if discrete:
            check_learning_rate(trains[mode], learning_rate, y.size)

    def chunk_predictions(x_part, full_test_test=None):
        K_tx, T_tx, K_tt, T_tt = network_cross_gram(net, x_part, x_train, dtype=dtype)
        if full_test_test is not None:
            K_tt, T_tt = full_test_test
        blocks = {"nngp": K_tx, "ntk": T_tx, "ntkgp": T_tx}
        priors = {"nngp": K_tt, "ntk": K_tt, "ntkgp": T_tt}
        return {mode: ensemble(mode, y, trains[mode], blocks[mode], times, steps=discrete, rate_scale=rate,
                               covariance=covariance, prior_test_test=priors[mode], nngp_train=nngp_xx,
                               nngp_test_train=K_tx) for mode in modes}

    if covariance == "full":
        parts = [chunk_predictions(x_test, network_gram(net, x_test, dtype=dtype))]
    else:
        # chunks of equal size (the last one padded by copies of its last point, dropped again), so
        # that the kernels compile once
        chunk = min(chunk, x_test.shape[0])
        parts = []
        for i in range(0, x_test.shape[0], chunk):
            part = x_test[i:i + chunk]
            p = part.shape[0]
            if p < chunk:
                part = np.concatenate([part, np.repeat(part[-1:], chunk - p, axis=0)])
            parts.append({m: _first(g, p) for m, g in chunk_predictions(part).items()})
    out = {}
    for mode in modes:
        mean = np.concatenate([p[mode].mean for p in parts], axis=1)
        cov = None
        if covariance is not None:
            cov = np.concatenate([p[mode].covariance for p in parts], axis=1)
        if flat:
            mean = mean[..., 0]
        if scalar:
            mean = mean[0]
            cov = None if cov is None else cov[0]
        out[mode] = Gaussian(mean, cov, covariance == "full")
    return Prediction(out, times, discrete, float(learning_rate), float(noise), jitter, x_train.shape[0],
                      x_test.shape[0])


__all__ = ["COVARIANCES", "TEST_CHUNK", "Prediction", "predict_network"]
