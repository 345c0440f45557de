"""Estimators with standard errors for the statistics of sampled networks, and a registry of quantities.

Every estimate here is a function of per-network statistics of S independent networks (the samples of
:func:`derive.montecarlo.sample_kernels`), so its standard error comes from the spread across networks.
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

Registry. :data:`QUANTITIES` maps a name to a :class:`Quantity`: where its entries live (layers,
input pairs or single inputs), an estimator from a sampling result, and a theory function (or None,
in which case rows carry the estimate and its standard error with theory and z = None). "K" and
"Theta" take their infinite-width theory from the engine (:mod:`derive.evaluate`); "V", "G1" and
"Theta_var" the leading-order single-input recursions of :mod:`derive.finite_width`, run per input.
Another theory plugs in with :func:`register_theory`, or by passing a mapping of quantities to
:func:`derive.validate.validate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import DeriveError

__all__ = [
    "Moments", "Setup", "Quantity", "InverseWidthFit", "QUANTITIES", "mean_with_stderr",
    "variance_with_stderr", "kernel_mean", "ntk_mean", "four_point_vertex", "nlo_kernel", "ntk_variance",
    "fit_inverse_width", "z_score", "register_quantity", "register_theory", "quantity_rows",
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
# Estimators from a sampling result (derive.montecarlo.MonteCarloResult)


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


# ----------------------------------------------------------------------------------------------
# The registry of quantities


@dataclass(frozen=True)
class Setup:
    """What a theory function or an estimator may need about one sampled configuration.

    ``widths`` = (n_0, ..., n_L); ``kernel`` and ``ntk`` are the engine's infinite-width K^(l) and
    Theta^(l) of ``inputs`` for l = 1..L, shape (L, N, N); ``activation`` the resolved
    :class:`derive.activations.Activation` (for finite-width theories to derive from).
    """

    widths: tuple[int, ...]
    C_W: float
    C_b: float
    lambda_W: float
    lambda_b: float
    inputs: np.ndarray
    kernel: np.ndarray | None = None
    ntk: np.ndarray | None = None
    activation: Any = None
    dntk: Any = None  # per input, a derive.dntk_sampling.DNTKSamples (quantities with needs_dntk)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1


Estimator = Callable[[Any, Setup], tuple[np.ndarray, np.ndarray]]
Theory = Callable[[Setup], np.ndarray]


@dataclass(frozen=True)
class Quantity:
    """A statistic checked against sampled networks.

    Arrays of a quantity are laid out per layer: (L, N, N) when ``pairs`` (input pairs a <= b are
    reported) and (L, N) otherwise (single inputs); axis 0 is layer l = 1..L. ``estimator(result,
    setup)`` returns (estimate, stderr) in that layout and ``theory(setup)`` the theory (or the
    quantity has none: ``theory`` = None). ``layers(L)`` lists the reported layers.
    """

    name: str
    description: str
    estimator: Estimator
    theory: Theory | None = None
    pairs: bool = True
    first_layer: int = 1
    output_only: bool = False
    needs_ntk: bool = False
    needs_dntk: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    def layers(self, depth: int) -> list[int]:
        if self.output_only:
            return [depth]
        return list(range(self.first_layer, depth + 1))

    def entries(self, n_inputs: int) -> list[tuple[int, ...]]:
        if self.pairs:
            return [(a, b) for a in range(n_inputs) for b in range(a, n_inputs)]
        return [(a,) for a in range(n_inputs)]


def _per_layer_output(values: np.ndarray, depth: int) -> np.ndarray:
    """Place an output-layer array at index L - 1 of a per-layer array filled with NaN."""
    out = np.full((depth,) + values.shape, np.nan)
    out[-1] = values
    return out


def _estimate_kernel(result, setup: Setup):
    return kernel_mean(result)


def _estimate_ntk(result, setup: Setup):
    est, se = ntk_mean(result)
    return _per_layer_output(est, setup.depth), _per_layer_output(se, setup.depth)


def _estimate_vertex(result, setup: Setup):
    return four_point_vertex(result)


def _estimate_nlo(result, setup: Setup):
    if setup.kernel is None:
        raise DeriveError("G1 needs the infinite-width kernel K^(l) of the inputs")
    return nlo_kernel(result, setup.kernel)


def _estimate_ntk_variance(result, setup: Setup):
    est, se = ntk_variance(result)
    return _per_layer_output(est, setup.depth), _per_layer_output(se, setup.depth)


def _dntk_estimator(name: str) -> Estimator:
    """n_{l-1} E[dH z] of each single input (its own sampled networks), NaN at layer 1, (L, N)."""
    def estimate(result, setup: Setup):
        if setup.dntk is None:
            raise DeriveError(f"{name} needs the sampled dNTK (derive.dntk_sampling.sample_dntk)")
        pairs = [d.estimate(name) for d in setup.dntk]
        pad = np.full((1, len(pairs)), np.nan)
        return (np.concatenate([pad, np.stack([p[0] for p in pairs], axis=1)]),
                np.concatenate([pad, np.stack([p[1] for p in pairs], axis=1)]))
    return estimate


def _dntk_theory(name: str) -> Theory:
    def theory(setup: Setup) -> np.ndarray:
        return np.stack([p.values[name] for p in _single_input_profiles(setup)], axis=1)
    return theory


def _kernel_theory(setup: Setup) -> np.ndarray:
    return setup.kernel


def _ntk_theory(setup: Setup) -> np.ndarray:
    return setup.ntk


def _single_input_profiles(setup: Setup) -> list:
    """The leading-order finite-width recursions of :mod:`derive.finite_width`, one run per input
    (its own x_a . x_a / n_0), at the sampled widths (only the ratios r = n_l / n_{l-1} enter)."""
    from .finite_width import finite_width_maps, iterate

    if setup.activation is None:
        raise DeriveError("a finite-width theory needs the activation in the setup")
    maps = finite_width_maps(setup.activation)
    x = np.asarray(setup.inputs, dtype=float)
    return [iterate(maps, setup.depth, setup.C_W, setup.C_b, setup.lambda_W, setup.lambda_b,
                    input_norm=float(xa @ xa) / x.shape[1], widths=list(setup.widths[1:]))
            for xa in x]


def _vertex_theory(setup: Setup) -> np.ndarray:
    """V^(l) of each single input, (L, N)."""
    return np.stack([p.values["V"] for p in _single_input_profiles(setup)], axis=1)


def _nlo_theory(setup: Setup) -> np.ndarray:
    """G1^(l) of each single input, (L, N)."""
    return np.stack([p.values["G1"] for p in _single_input_profiles(setup)], axis=1)


def _ntk_variance_theory(setup: Setup) -> np.ndarray:
    """A^(L) + 2 B^(L) / n_L of each single input at the output layer, NaN elsewhere, (L, N)."""
    profiles = _single_input_profiles(setup)
    last = np.array([p.values["A"][-1] + 2 * p.values["B"][-1] / setup.widths[-1] for p in profiles])
    return _per_layer_output(last, setup.depth)


#: The quantities known to :func:`derive.validate.validate`, by name.
QUANTITIES: dict[str, Quantity] = {
    q.name: q
    for q in (
        Quantity("K", "kernel K^(l)_ab: mean of (1/n_l) z_a . z_b", _estimate_kernel, _kernel_theory),
        Quantity("Theta", "output NTK Theta^(L)_ab: mean empirical NTK", _estimate_ntk, _ntk_theory,
                 output_only=True, needs_ntk=True),
        Quantity("V", "four-point vertex V^(l)_(aa)(aa) = n_{l-1} Var(G_hat^(l)_aa)", _estimate_vertex,
                 _vertex_theory, pairs=False, first_layer=2),
        Quantity("G1", "NLO kernel G1^(l)_aa = n_{l-1} (E G_hat^(l)_aa - K^(l)_aa)", _estimate_nlo,
                 _nlo_theory, pairs=False, first_layer=2),
        Quantity("Theta_var", "NTK fluctuation n_{L-1} Var(Theta_hat_aa) = A + 2B/n_L",
                 _estimate_ntk_variance, _ntk_variance_theory, pairs=False, output_only=True, needs_ntk=True),
        Quantity("dNTK_P", "dNTK P^(l) = n_{l-1} E[dH_ijj z_i], i != j (PDLT ch. 11)", _dntk_estimator("P"),
                 _dntk_theory("P"), pairs=False, first_layer=2, needs_dntk=True),
        Quantity("dNTK_Q", "dNTK Q^(l) = n_{l-1} E[dH_iij z_j], i != j (PDLT ch. 11)", _dntk_estimator("Q"),
                 _dntk_theory("Q"), pairs=False, first_layer=2, needs_dntk=True),
    )
}


def register_quantity(quantity: Quantity) -> None:
    """Add (or replace) a quantity in :data:`QUANTITIES`."""
    QUANTITIES[quantity.name] = quantity


def register_theory(name: str, theory: Theory) -> None:
    """Attach a theory function to the registered quantity ``name`` (e.g. a finite-width V^(l))."""
    if name not in QUANTITIES:
        raise DeriveError(f"unknown quantity '{name}'; known: {', '.join(QUANTITIES)}")
    QUANTITIES[name] = replace(QUANTITIES[name], theory=theory)


def _number(x) -> float | None:
    return None if x is None else float(x)


def quantity_rows(quantity: Quantity, result, setup: Setup) -> list[dict]:
    """One row per reported layer and entry: quantity, layer, inputs, theory, estimate, stderr, z.

    ``inputs`` are 0-based input indices ([a, b] for pairs, [a] for single inputs); ``theory`` and
    ``z`` are None when the quantity has no theory.
    """
    estimate, stderr = quantity.estimator(result, setup)
    theory = None if quantity.theory is None else np.asarray(quantity.theory(setup), dtype=float)
    if theory is not None and theory.shape != np.shape(estimate):
        raise DeriveError(f"theory of {quantity.name} has shape {theory.shape}, "
                          f"the estimate {np.shape(estimate)}")
    rows = []
    for layer in quantity.layers(setup.depth):
        for entry in quantity.entries(setup.inputs.shape[0]):
            index = (layer - 1,) + entry
            t = None if theory is None else float(theory[index])
            e, s = float(estimate[index]), float(stderr[index])
            rows.append({"quantity": quantity.name, "layer": layer, "inputs": list(entry), "theory": t,
                         "estimate": e, "stderr": s, "z": _number(z_score(e, s, t))})
    return rows
