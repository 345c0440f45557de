"""Estimators with standard errors for the statistics of sampled networks, and a registry of quantities.

Every estimate here is a function of per-network statistics of S independent networks (the samples of
:func:`derive.sampling.dense.sample_kernels`), so its standard error comes from the spread across networks.
PDLT = Roberts, Yaida & Hanin, *The Principles of Deep Learning Theory* (arXiv:2106.10165).

Moments. For one entry with values x_1..x_S the sampler accumulates the mean and the central sums
M_p = sum_k (x_k - mean)^p, p = 2, 3, 4 (:class:`Moments`). Then

    mean:      x_bar,                        stderr^2 = s^2 / S,          s^2 = M_2 / (S - 1)
    variance:  s^2,                          stderr^2 = mu_4 / S - s^4 (S - 3) / (S (S - 1)),  mu_4 = M_4 / S

the second being the sampling variance of the unbiased sample variance (O'Neill 2014, *The American
Statistician* 68:282, eq. 3) with the population moments replaced by the sample ones; it is the
large-S limit of the jackknife variance of s^2.

Empirical-kernel route to the finite-width statistics (PDLT ch. 4; Yaida 2019). Given layer l - 1
of one network, the preactivations z^(l)_i are i.i.d. N(0, G_hat^(l)) across neurons i, with

    G_hat^(l)_ab = C_b + (C_W / n_{l-1}) sum_j sigma(z^(l-1)_{j;a}) sigma(z^(l-1)_{j;b}),
    G_hat^(1)_ab = C_b + (C_W / n_0) x_a . x_b                       (deterministic).

So E[z z] = E[G_hat] and the connected four-point function of one input is
E[z^4] - 3 E[z^2]^2 = 3 Var(G_hat). With the 1/n expansion (effective-theory sheet, sec. 4)

    E[G_hat^(l)_aa]  = K^(l)_aa + G1^(l)_aa / n_{l-1} + O(1/n^2)
    Var(G_hat^(l)_aa) = V^(l)_(aa)(aa) / n_{l-1} + O(1/n^2)

which gives the estimators

    V^(l)_a  = n_{l-1} Var(G_hat^(l)_aa)                           (:func:`four_point_vertex`)
    G1^(l)_a = n_{l-1} (mean G_hat^(l)_aa - K^(l)_aa)                (:func:`nlo_kernel`)

each up to O(1/n) relative corrections. G_hat has far lower variance than raw fourth moments of z
(effective-theory sheet, sec. 7). For the NTK of the output layer, averaged over its n_L neurons,
Theta_hat_aa = (1/n_L) sum_i H_ii;aa, the sheet's sec. 5 gives

    n_{L-1} Var(Theta_hat_aa) = A^(L) + 2 B^(L) / n_L + O(1/n)        (:func:`ntk_variance`)

Extrapolation in 1/n. Estimates at several widths n_k, each with standard error s_k, are fitted by
weighted least squares to a + b/n (+ c/n^2) with weights 1/s_k^2 (:func:`fit_inverse_width`); the
covariance of the coefficients is (X^T W X)^{-1}. The intercept a is the infinite-width value and the
slope b the 1/n coefficient (G1 for the kernel's diagonal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from derive.core.errors import DeriveError

__all__ = [
    "Moments", "InverseWidthFit", "mean_with_stderr", "variance_with_stderr", "kernel_mean", "ntk_mean",
    "four_point_vertex", "nlo_kernel", "ntk_variance", "fit_inverse_width", "z_score",
]


# ----------------------------------------------------------------------------------------------
# Moments over networks


@dataclass(frozen=True)
class Moments:
    """Per-entry moments of S samples: the mean and central sums M_p = sum_k (x_k - mean)^p, p = 2..4."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray

    @classmethod
    def from_samples(cls, samples, axis: int = 0) -> Moments:
        """Moments of ``samples`` along ``axis`` (two-pass, for reference and tests)."""
        x = np.moveaxis(np.asarray(samples, dtype=float), axis, 0)
        mean = x.mean(axis=0)
        d = x - mean
        return cls(x.shape[0], mean, (d**2).sum(0), (d**3).sum(0), (d**4).sum(0))

    @property
    def var(self) -> np.ndarray:
        """Unbiased sample variance s^2 = M_2 / (S - 1)."""
        return self.m2 / (self.count - 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def mean_stderr(self) -> np.ndarray:
        """Standard error of the mean, s / sqrt(S)."""
        return np.sqrt(self.var / self.count)

    @property
    def var_stderr(self) -> np.ndarray:
        """Standard error of s^2: sqrt(mu_4 / S - s^4 (S - 3) / (S (S - 1))), mu_4 = M_4 / S.

        O'Neill (2014), eq. 3, with sample moments for the population ones; clipped at 0.
        """
        S = self.count
        var_of_var = self.m4 / S**2 - self.var**2 * (S - 3) / (S * (S - 1))
        return np.sqrt(np.maximum(var_of_var, 0.0))

    def take(self, index) -> Moments:
        """The moments of the entries ``index`` (any NumPy index)."""
        return Moments(self.count, self.mean[index], self.m2[index], self.m3[index], self.m4[index])


def mean_with_stderr(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard error of the mean) per entry."""
    return m.mean, m.mean_stderr


def variance_with_stderr(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(unbiased variance s^2, its standard error) per entry (module docstring)."""
    return m.var, m.var_stderr


# ----------------------------------------------------------------------------------------------
# Estimators from a sampling result (derive.sampling.dense.MonteCarloResult)


def _fan_in(result) -> np.ndarray:
    """n_{l-1} for layers l = 1..L, shape (L,)."""
    return np.asarray(result.widths[:-1], dtype=float)


def _diagonal(a: np.ndarray) -> np.ndarray:
    """Diagonal entries (..., N, N) -> (..., N)."""
    return np.diagonal(a, axis1=-2, axis2=-1)


def kernel_mean(result) -> tuple[np.ndarray, np.ndarray]:
    """Mean empirical kernel (1/n_l) z^(l)_a . z^(l)_b per layer, (L, N, N), with standard errors.

    Estimates K^(l)_ab + O(1/n) (PDLT ch. 4).
    """
    m = result.nngp_moments
    return m.mean, m.mean_stderr


def ntk_mean(result) -> tuple[np.ndarray, np.ndarray]:
    """Mean empirical NTK of the output layer, (N, N), with standard errors; Theta^(L) + O(1/n)."""
    if result.ntk_moments is None:
        raise DeriveError("the sample has no NTK (sampled with ntk=False)")
    m = result.ntk_moments
    return m.mean, m.mean_stderr


def four_point_vertex(result) -> tuple[np.ndarray, np.ndarray]:
    """V^(l)_a = n_{l-1} Var(G_hat^(l)_aa) per layer and input, (L, N), with standard errors.

    Single-input four-point vertex of layer l at leading order (module docstring); V^(1) = 0.
    """
    var, se = variance_with_stderr(result.gram_moments)
    n = _fan_in(result)[:, None]
    return n * _diagonal(var), n * _diagonal(se)


def nlo_kernel(result, kernel) -> tuple[np.ndarray, np.ndarray]:
    """G1^(l)_a = n_{l-1} (mean G_hat^(l)_aa - K^(l)_aa), (L, N), with standard errors.

    ``kernel``: the infinite-width K^(l) of the sampled inputs, shape (L, N, N).
    """
    kernel = np.asarray(kernel, dtype=float)
    m = result.gram_moments
    if kernel.shape != m.mean.shape:
        raise DeriveError(f"kernel theory has shape {kernel.shape}, the sample {m.mean.shape}")
    n = _fan_in(result)[:, None]
    return n * (_diagonal(m.mean) - _diagonal(kernel)), n * _diagonal(m.mean_stderr)


def ntk_variance(result, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Variance of the output NTK's diagonal across networks, (N,), with standard errors.

    ``scaled``: multiply by n_{L-1}, giving A^(L) + 2 B^(L) / n_L + O(1/n) (module docstring);
    otherwise Var(Theta_hat_aa) itself.
    """
    if result.ntk_moments is None:
        raise DeriveError("the sample has no NTK (sampled with ntk=False)")
    var, se = variance_with_stderr(result.ntk_moments)
    n = float(result.widths[-2]) if scaled else 1.0
    return n * _diagonal(var), n * _diagonal(se)


# ----------------------------------------------------------------------------------------------
# Extrapolation in 1/n


@dataclass(frozen=True)
class InverseWidthFit:
    """Weighted least-squares fit estimate(n) = a + b/n (+ c/n^2).

    ``coefficients`` = (a, b[, c]); ``covariance`` = (X^T W X)^{-1} with W = diag(1/stderr^2);
    ``chi2`` = sum of squared weighted residuals, with ``dof`` = len(widths) - len(coefficients).
    """

    coefficients: np.ndarray
    covariance: np.ndarray
    chi2: float
    dof: int

    @property
    def intercept(self) -> float:
        """a: the infinite-width value."""
        return float(self.coefficients[0])

    @property
    def intercept_stderr(self) -> float:
        return float(np.sqrt(self.covariance[0, 0]))

    @property
    def slope(self) -> float:
        """b: the coefficient of 1/n."""
        return float(self.coefficients[1])

    @property
    def slope_stderr(self) -> float:
        return float(np.sqrt(self.covariance[1, 1]))

    def predict(self, widths) -> np.ndarray:
        """a + b/n (+ c/n^2) at ``widths``."""
        return _design(np.asarray(widths, dtype=float), len(self.coefficients) - 1) @ self.coefficients


def _design(widths: np.ndarray, order: int) -> np.ndarray:
    return np.stack([widths ** -float(p) for p in range(order + 1)], axis=-1)


def fit_inverse_width(widths: Sequence[float], estimates: Sequence[float], stderrs: Sequence[float],
                      order: int = 1) -> InverseWidthFit:
    """Fit estimate(n) = sum_{p <= order} c_p n^-p by weighted least squares (weights 1/stderr^2).

    beta = (X^T W X)^{-1} X^T W y with X_kp = n_k^-p; the covariance of beta is (X^T W X)^{-1}, i.e.
    the stated standard errors are taken as known (no rescaling by chi^2 / dof).

    Args:
        widths: n_k, distinct and positive; at least order + 1 of them.
        estimates, stderrs: y_k and its standard error s_k > 0 at each width.
        order: 1 for a + b/n, 2 for a + b/n + c/n^2 (needs >= 3 widths).
    """
    n = np.asarray(widths, dtype=float)
    y = np.asarray(estimates, dtype=float)
    s = np.asarray(stderrs, dtype=float)
    if order not in (1, 2):
        raise DeriveError(f"order must be 1 (a + b/n) or 2 (a + b/n + c/n^2), got {order}")
    if not (n.ndim == 1 and n.shape == y.shape == s.shape):
        raise DeriveError("widths, estimates and stderrs must be 1-D of the same length")
    if len(n) < order + 1:
        raise DeriveError(f"a fit of order {order} in 1/n needs at least {order + 1} widths, got {len(n)}")
    if np.any(n <= 0) or len(np.unique(n)) != len(n):
        raise DeriveError("widths must be positive and distinct")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(s)) and np.all(s > 0)):
        raise DeriveError("estimates must be finite and standard errors finite and positive")
    X = _design(n, order)
    w = 1.0 / s**2
    covariance = np.linalg.inv(X.T @ (w[:, None] * X))
    beta = covariance @ (X.T @ (w * y))
    chi2 = float(np.sum(w * (y - X @ beta) ** 2))
    return InverseWidthFit(beta, covariance, chi2, len(n) - (order + 1))


# ----------------------------------------------------------------------------------------------
# z-scores


def z_score(estimate: float, stderr: float, theory: float | None) -> float | None:
    """(estimate - theory) / stderr; None without a theory.

    An estimate with zero standard error (a deterministic statistic, e.g. the NTK at depth 1) is
    compared up to rounding: z = 0 if it agrees with the theory to 64 ulps, else +-inf.
    """
    if theory is None:
        return None
    diff = estimate - theory
    if stderr > 0:
        return diff / stderr
    if not np.isfinite(diff):
        return float("nan")
    scale = max(abs(estimate), abs(theory), np.finfo(float).tiny)
    return 0.0 if abs(diff) <= 64 * np.finfo(float).eps * scale else float(np.copysign(np.inf, diff))
