"""The finite-width maps of an architecture against sampled networks at several widths.

For one input and each recorded output that is a Gaussian point (:mod:`derive.arch_finite_width`),
the sampler (:mod:`derive.arch_sampler`) gives, at width n, the mean and the variance over
networks of the empirical kernel K_hat = (1/n) sum_i z_i^2. To order 1/n

    E[K_hat]                       = K + G1/n
    n Var(K_hat) - 2 E[K_hat]^2    = V + O(1/n)

(n Var(K_hat) = Var(z_i^2) + (n - 1) Cov(z_i^2, z_j^2) with Var(z_i^2) = 2 E[z^2]^2 + 3V/n), so a
weighted fit a + b/n over the widths (:func:`derive.estimators.fit_inverse_width`) compares its
intercept with K and its slope with G1, and the intercept of the second line with V. Standard
errors: s/sqrt(S) for the mean; for the V estimate the delta method with the sample third moment
(Cov(mean, s^2) = mu_3 / S). With ``Theta`` the output NTK of each network is sampled too (one
vector-Jacobian product per network) and the intercept of its mean is compared with the
infinite-width NTK. Every row also states the smallest deviation the run could detect,
z_max standard errors, so that a check without power is visible as one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .arch import Serial
from .arch_finite_width import arch_finite_width
from .arch_sampler import sample_arch
from .errors import DeriveError
from .estimators import Moments, fit_inverse_width, z_score

#: Quantities this check compares (Theta: the output NTK's mean, against its infinite-width value).
CHECKED = ("K", "V", "G1", "Theta")


def kernel_moments(m: Moments, width: int) -> dict:
    """Estimates of E[K_hat] and of V at one width, with standard errors (module docstring)."""
    S = m.count
    mean, se = float(m.mean.reshape(-1)[0]), float(m.mean_stderr.reshape(-1)[0])
    var, var_se = float(m.var.reshape(-1)[0]), float(m.var_stderr.reshape(-1)[0])
    mu3 = float(m.m3.reshape(-1)[0]) / S
    v = width * var - 2 * mean**2
    # Var(n s^2 - 2 mean^2) = n^2 Var(s^2) + 16 mean^2 Var(mean) - 8 n mean Cov(mean, s^2)
    v_var = width**2 * var_se**2 + 16 * mean**2 * se**2 - 8 * width * mean * mu3 / S
    return {"mean": mean, "mean_stderr": se, "V": v, "V_stderr": float(np.sqrt(max(v_var, 0.0)))}


@dataclass
class FiniteWidthCheck:
    """Rows per recorded output and quantity: theory, fitted value, its standard error, z, and
    ``detectable`` = z_max standard errors (``weak``: a deviation as large as the value itself would
    pass). ``per_width``: the estimates at each width."""

    name: str
    widths: tuple[int, ...]
    samples: int
    seed: int
    z_max: float
    rows: list[dict]
    per_width: list[dict]

    @property
    def worst(self) -> dict | None:
        return max((r for r in self.rows if r["z"] is not None), key=lambda r: abs(r["z"]), default=None)

    @property
    def passed(self) -> bool:
        w = self.worst
        return w is None or abs(w["z"]) < self.z_max

    def as_dict(self) -> dict:
        return {"architecture": self.name, "widths": list(self.widths), "samples": self.samples,
                "seed": self.seed, "z_max": self.z_max, "passed": self.passed, "results": self.rows,
                "per_width": self.per_width}


def _seed(seed: int, width: int) -> int:
    return int(np.random.SeedSequence([seed, width]).generate_state(1, np.uint32)[0])


def sample_kernel_estimates(net: Serial, widths, *, samples: int = 4000, seed: int = 0, input_dim: int = 8,
                            ntk: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """{width: [kernel_moments of every recorded output]} from ``samples`` networks per width (one
    input with x.x/n_0 = 1; the seed of width n is derived from (seed, n)); with ``ntk`` the entry
    ``("ntk", width)`` holds (mean, standard error) of the output NTK."""
    ws = tuple(int(w) for w in widths)
    if len(ws) < 2 or len(set(ws)) != len(ws) or min(ws) < 1:
        raise DeriveError(f"give at least two distinct positive widths for the 1/n fit, got {list(widths)}")
    if samples < 3:
        raise DeriveError(f"samples must be at least 3, got {samples}")
    x = np.ones((1, int(input_dim)))
    estimates = {}
    for k, w in enumerate(ws):
        cb = None if progress is None else (lambda done, k=k: progress(k * samples + done, len(ws) * samples))
        mc = sample_arch(net, x, w, n_networks=samples, seed=_seed(seed, w), ntk=ntk, progress=cb)
        estimates[w] = [kernel_moments(m, w) for m in mc.nngp]
        if ntk:
            estimates["ntk", w] = (float(mc.ntk.mean.reshape(-1)[0]), float(mc.ntk.mean_stderr.reshape(-1)[0]))
    return estimates


def compare_finite_width(theory, estimates: dict, *, quantities=("K", "V", "G1"), z_max: float = 5.0, samples: int = 0,
                         seed: int = 0) -> FiniteWidthCheck:
    """Fit the estimates of :func:`sample_kernel_estimates` in 1/n and score ``theory`` (an
    :class:`~derive.arch_finite_width.ArchFiniteWidth`) against them (module docstring)."""
    unknown = set(quantities) - set(CHECKED)
    if unknown:
        raise DeriveError(f"unknown quantity {', '.join(sorted(unknown))}; known: {', '.join(CHECKED)}")
    ws = tuple(sorted(w for w in estimates if isinstance(w, int)))
    if "Theta" in quantities and not all(("ntk", w) in estimates for w in ws):
        raise DeriveError("Theta needs the sampled NTK (sample_kernel_estimates(..., ntk=True))")
    rows, per_width = [], []
    W = np.array(ws, dtype=float)
    for i, label in enumerate(theory.labels):
        if theory.values["V"][i] is None:
            continue
        est = [estimates[w][i] for w in ws]
        per_width.extend({"layer": label, "index": i + 1, "width": w, **e} for w, e in zip(ws, est))
        fit_k = fit_inverse_width(W, [e["mean"] for e in est], [e["mean_stderr"] for e in est])
        fit_v = fit_inverse_width(W, [e["V"] for e in est], [e["V_stderr"] for e in est])
        found = {"K": (fit_k.intercept, fit_k.intercept_stderr), "G1": (fit_k.slope, fit_k.slope_stderr),
                 "V": (fit_v.intercept, fit_v.intercept_stderr)}
        last = i == len(theory.labels) - 1
        if last and "Theta" in quantities:
            fit_t = fit_inverse_width(W, [estimates["ntk", w][0] for w in ws], [estimates["ntk", w][1] for w in ws])
            found["Theta"] = (fit_t.intercept, fit_t.intercept_stderr)
        for q in quantities:
            if q not in found:  # Theta: the sampler records the NTK of the output only
                continue
            value, stderr = found[q]
            t = float(theory.values[q][i])
            detectable = z_max * stderr
            rows.append({"quantity": q, "layer": label, "index": i + 1, "theory": t, "estimate": value,
                         "stderr": stderr, "z": z_score(value, stderr, t), "detectable": detectable,
                         "weak": bool(detectable >= abs(t)) if t != 0 else None})
    return FiniteWidthCheck(theory.name, ws, int(samples), int(seed), float(z_max), rows, per_width)


def check_finite_width(net: Serial, widths, *, samples: int = 4000, seed: int = 0, z_max: float = 5.0,
                       quantities=("K", "V", "G1"), input_dim: int = 8,
                       progress: Callable[[int, int], None] | None = None) -> FiniteWidthCheck:
    """Sample ``samples`` networks of ``net`` at each of ``widths`` and compare K, V and G1 of every
    Gaussian-point output with :func:`~derive.arch_finite_width.arch_finite_width` after a fit in 1/n."""
    theory = arch_finite_width(net)
    if theory.values["V"][-1] is None and "Theta" in quantities:
        raise DeriveError("Theta is checked at the output, which here is not a dense or residual output")
    estimates = sample_kernel_estimates(net, widths, samples=samples, seed=seed, input_dim=input_dim,
                                        ntk="Theta" in quantities, progress=progress)
    return compare_finite_width(theory, estimates, quantities=quantities, z_max=z_max, samples=samples, seed=seed)


__all__ = ["CHECKED", "FiniteWidthCheck", "check_finite_width", "compare_finite_width", "kernel_moments",
           "sample_kernel_estimates"]
