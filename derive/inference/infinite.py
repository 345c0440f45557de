"""Infinite-width inference: the Gaussian-process posterior and infinite ensembles trained by gradient
descent on the mean squared error, from kernel blocks.

Notation: X the N training inputs with targets Y (N, k); x the test inputs; K the NNGP kernel and
Theta the NTK, blocks K_XX (N, N), K_xX (M, N), K_xx (M, M). All formulas act on each output
column alike (the kernels are proportional to the identity over outputs at infinite width).

**Gaussian-process posterior** (the exact posterior of an infinitely wide Bayesian network; Neal
1996, Lee et al. 2018 "Deep neural networks as Gaussian processes"), observation noise sigma^2:

    mean = K_xX (K_XX + sigma^2 I)^-1 Y,      cov = K_xx - K_xX (K_XX + sigma^2 I)^-1 K_Xx.

**Gradient flow on the MSE** (Jacot et al. 2018; Lee et al. 2019 "Wide neural networks of any depth
evolve as linear models under gradient descent", eqs. (15)-(16); PDLT sec. 10.2). With the loss
L = |f(X) - Y|^2 / (2 |Y|) (|Y| = N k, the number of targets: Neural Tangents' normalisation) and
learning rate eta, a network at infinite width evolves linearly in its parameters, f_t(X) - Y =
e^{-eta t Theta_XX / |Y|} (f_0(X) - Y), and over the Gaussian initialisation f_0 the test outputs
at time t are Gaussian with

    mean_t = T_t Y,        T_t = Theta_xX Theta_XX^-1 (I - e^{-eta t Theta_XX / |Y|})   (M, N),
    cov_t  = K_xx + T_t K_XX T_t^T - (T_t K_Xx + K_xX T_t^T).

At t = infinity, T = Theta_xX Theta_XX^-1 (the mean is kernel regression with the NTK; the
covariance is not a posterior). Training only the last layer is the same with Theta replaced by
K ("nngp" mode: mean_t = K_xX K_XX^-1 (I - e^{-eta t K_XX/|Y|}) Y, cov_t = K_xx - K_xX K_XX^-1
(I - e^{-2 eta t K_XX/|Y|}) K_Xx), whose t = infinity limit is the GP posterior. **Discrete gradient
descent** with ``steps`` = s steps of size eta replaces e^{-eta t lambda/|Y|} by
(1 - eta lambda/|Y|)^s on each eigenvalue lambda (the linear model's iteration, exactly); it
converges for eta lambda_max / |Y| < 2.

``noise`` sigma^2 is added to the diagonal of the train-train kernel of each mode (the NNGP's for
"nngp", the NTK's for "ntk"; Neural Tangents' ``diag_reg`` with ``diag_reg_absolute_scale=True``).

Numerics: float64 throughout. Finite times use the eigendecomposition of the (symmetric) train-train
kernel; eigenvalues below zero by rounding are set to zero (as Neural Tangents does), and
(1 - e^{-a lambda}) / lambda is evaluated as -expm1(-a lambda) / lambda, with its limit a at
lambda = 0 (no 0/0). t = infinity uses a Cholesky factorisation; where it fails or a pivot is at
the level of rounding (a singular kernel: repeated training inputs without noise) a jitter
eps * mean(diag) is added, eps from :data:`JITTER_STEPS`, and reported in the result (``jitter``),
never silently. The test inputs are
processed in chunks (their kernel blocks too), so that M can be large; the full test covariance
(M, M) is formed only when asked (``covariance="full"``), otherwise its diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from derive.core.errors import DeriveError

#: Prediction modes: the NNGP (last layer trained / GP posterior), the NTK (all layers trained) and
#: the NTK-GP (a GP posterior with the NTK as prior covariance; He, Lakshminarayanan & Teh 2020).
MODES = ("nngp", "ntk", "ntkgp")
#: Relative jitters tried, in turn, when the Cholesky factorisation of a train-train kernel fails.
JITTER_STEPS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6)


@dataclass(frozen=True)
class Gaussian:
    """Mean (shape (*t, M, k)) and covariance of test outputs: (*t, M, M) when full, (*t, M) when
    only the variances were asked, None when neither."""

    mean: np.ndarray
    covariance: np.ndarray | None = None
    full: bool = False

    @property
    def variance(self) -> np.ndarray | None:
        """Per-test-point variances, (*t, M)."""
        if self.covariance is None:
            return None
        return np.diagonal(self.covariance, axis1=-2, axis2=-1) if self.full else self.covariance


@dataclass(frozen=True)
class TrainTrain:
    """A train-train kernel prepared for one mode: its eigendecomposition or Cholesky factor."""

    kernel: np.ndarray
    noise: float
    jitter: float = 0.0
    eigenvalues: np.ndarray | None = field(default=None, repr=False)
    eigenvectors: np.ndarray | None = field(default=None, repr=False)
    cholesky: tuple | None = field(default=None, repr=False)


def prepare(kernel: np.ndarray, noise: float, *, finite_time: bool, infinite_time: bool) -> TrainTrain:
    """Factorise K_XX + noise I for the times asked (eigendecomposition and/or Cholesky)."""
    from scipy import linalg

    k = np.asarray(kernel, dtype=np.float64)
    k = (k + k.T) / 2 + noise * np.eye(k.shape[0])
    values = vectors = chol = None
    jitter = 0.0
    if finite_time:
        values, vectors = np.linalg.eigh(k)
        values = np.maximum(values, 0.0)
    if infinite_time:
        scale = float(np.mean(np.diag(k))) or 1.0
        # A pivot at the level of rounding means a singular kernel whose factorisation "succeeded" on
        # rounding errors (repeated inputs): treated as a failure, like a negative pivot.
        smallest = k.shape[0] * np.finfo(np.float64).eps * scale
        for eps in JITTER_STEPS:
            try:
                chol = linalg.cho_factor(k + eps * scale * np.eye(k.shape[0]), lower=True, check_finite=True)
            except linalg.LinAlgError:
                continue
            if np.min(np.diag(chol[0])) ** 2 <= smallest:
                chol = None
                continue
            jitter = eps * scale
            break
        if chol is None:
            raise DeriveError(f"the train-train kernel is not positive definite even with a jitter of "
                              f"{JITTER_STEPS[-1]:g} x its mean diagonal; add observation noise (noise=...) "
                              f"or remove repeated training inputs")
    return TrainTrain(k, noise, jitter, values, vectors, chol)


def _solve(train: TrainTrain, b: np.ndarray) -> np.ndarray:
    from scipy import linalg

    return linalg.cho_solve(train.cholesky, b, check_finite=False)


def _spectral_factor(values: np.ndarray, rate: np.ndarray, steps: bool) -> np.ndarray:
    """(1 - decay(lambda)) / lambda per time (rows) and eigenvalue (columns), where decay is
    e^{-rate lambda} (gradient flow, rate = eta t / |Y|) or (1 - eta lambda / |Y|)^s (``steps``:
    rate = (eta / |Y|, s)); the lambda -> 0 limit where lambda = 0."""
    lam = values[None, :]
    if not steps:
        a = rate[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = -np.expm1(-a * lam) / lam
        limit = np.broadcast_to(a, out.shape)
        return np.where(lam > 0, out, np.where(np.isinf(limit), np.inf, limit))
    eta, s = rate
    s = s[:, None]
    x = eta * lam
    with np.errstate(invalid="ignore", divide="ignore"):
        # 1 - (1 - x)^s: by expm1 and log1p while 1 - x > 0 (accurate for small x), by the power past it
        # (1 <= x < 2: the iteration oscillates while it converges).
        one_minus = np.where(x < 1, -np.expm1(s * np.log1p(-np.where(x < 1, x, 0.0))), 1 - np.power(1 - x, s))
        out = one_minus / lam
    return np.where(lam > 0, out, eta * s)


def transfer(train: TrainTrain, k_test_train: np.ndarray, times, *, steps: bool = False,
             rate_scale: float = 1.0) -> np.ndarray:
    """T_t = k_xX K^-1 (I - decay(K)), shape (len(times), M, N); ``times`` None means t = infinity
    (then shape (1, M, N))."""
    if times is None:
        return _solve(train, k_test_train.T).T[None]
    values, vectors = train.eigenvalues, train.eigenvectors
    if steps:
        factor = _spectral_factor(values, (rate_scale, np.asarray(times, dtype=float)), True)
    else:
        factor = _spectral_factor(values, rate_scale * np.asarray(times, dtype=float), False)
    projected = k_test_train @ vectors  # (M, N)
    return np.einsum("mi,ti,ji->tmj", projected, factor, vectors, optimize=True)


def ensemble(mode: str, y_train: np.ndarray, train: TrainTrain, k_test_train: np.ndarray, times, *,
             steps: bool = False, rate_scale: float = 1.0, covariance: str | None = None,
             prior_test_test: np.ndarray | None = None, nngp_train: np.ndarray | None = None,
             nngp_test_train: np.ndarray | None = None) -> Gaussian:
    """Mean and covariance of the test outputs of one chunk of test points (module docstring).

    ``train`` is the mode's train-train kernel (with noise), ``k_test_train`` the mode's test-train
    block, ``times`` None (t = infinity) or a 1-d array of times (or step counts with ``steps``),
    ``rate_scale`` eta / |Y|. The covariance (``covariance`` "full" or "diagonal") needs
    ``prior_test_test``, the prior covariance of the test outputs (the NNGP's K_xx, or the NTK's for
    "ntkgp"), full (M, M) or its diagonal (M,); the "ntk" mode also the NNGP's train-train and
    test-train blocks.
    """
    if mode == "ntkgp" and times is not None:
        raise DeriveError("the NTK-GP is a posterior (t = infinity only)")
    T = transfer(train, k_test_train, times, steps=steps, rate_scale=rate_scale)
    mean = np.einsum("tmn,nk->tmk", T, y_train, optimize=True)
    if covariance is None:
        return Gaussian(mean)
    full = covariance == "full"
    if mode in ("nngp", "ntkgp"):
        # K_xx - k_xX K^-1 (I - decay^2) k_Xx: the decay squared is twice the time (or steps).
        T2 = T if times is None else transfer(train, k_test_train, 2 * np.asarray(times, dtype=float),
                                               steps=steps, rate_scale=rate_scale)
        if full:
            cov = prior_test_test[None] - np.einsum("tmn,ln->tml", T2, k_test_train, optimize=True)
            return Gaussian(mean, (cov + np.swapaxes(cov, -1, -2)) / 2, True)
        return Gaussian(mean, prior_test_test[None] - np.einsum("tmn,mn->tm", T2, k_test_train, optimize=True))
    # "ntk": K_xx + T K_XX T^T - (T K_Xx + K_xX T^T), K the NNGP
    TK = np.einsum("tmn,nl->tml", T, nngp_train, optimize=True)
    if full:
        cross = np.einsum("tmn,ln->tml", T, nngp_test_train, optimize=True)
        cov = (prior_test_test[None] + np.einsum("tml,tjl->tmj", TK, T, optimize=True)
               - cross - np.swapaxes(cross, -1, -2))
        return Gaussian(mean, (cov + np.swapaxes(cov, -1, -2)) / 2, True)
    var = (prior_test_test[None] + np.einsum("tml,tml->tm", TK, T, optimize=True)
           - 2 * np.einsum("tmn,mn->tm", T, nngp_test_train, optimize=True))
    return Gaussian(mean, var)


def check_learning_rate(train: TrainTrain, learning_rate: float, targets: int) -> None:
    """Discrete gradient descent on the linear model diverges when eta lambda_max / |Y| >= 2."""
    largest = float(np.max(train.eigenvalues, initial=0.0))
    if learning_rate * largest / targets >= 2.0:
        raise DeriveError(f"gradient descent diverges at learning rate {learning_rate:g}: it must be below "
                          f"2 |Y| / lambda_max = {2.0 * targets / largest:.6g} (lambda_max = {largest:.6g}, "
                          f"the train-train kernel's largest eigenvalue; |Y| = {targets} targets)")


__all__ = ["JITTER_STEPS", "MODES", "Gaussian", "TrainTrain", "check_learning_rate", "ensemble", "prepare",
           "transfer"]
