"""The finite-width maps of an architecture against sampled networks at several widths.

For each recorded output that is a Gaussian point (:mod:`derive.finite.arch`, and with
positions or several inputs :mod:`derive.finite.tensor`), the sampler
(:mod:`derive.sampling.arch`) gives, at width n, the mean and the variance over networks of every
entry of the empirical kernel K_hat_st = (1/n) sum_i z_is z_it (sites s, t: input and position).
To order 1/n

    E[K_hat_st]                                          = K_st + G1_st/n
    n Var(K_hat_st) - (E K_hat_ss E K_hat_tt + E[K_hat_st]^2) = V_(st)(st) + O(1/n)

(n Var(K_hat_st) = Var(z_s z_t) + (n - 1) Cov(z_is z_it, z_js z_jt); for one site,
Var(z^2) = 2 E[z^2]^2 + 3V/n), so a
weighted fit a + b/n over the widths (:func:`derive.sampling.estimators.fit_inverse_width`) compares its
intercept with K and its slope with G1, and the intercept of the second line with V. Standard
errors: s/sqrt(S) for the mean; for the V estimate the delta method with the sample third moment
(Cov(mean, s^2) = mu_3 / S). With ``Theta`` the output NTK of each network is sampled too (one
vector-Jacobian product per network) and the intercept of its mean is compared with the
infinite-width NTK; with ``Theta_var`` the intercept of n Var(H) of one output channel is compared
with A + 2B (PDLT ch. 8: Var(H_ii) = (A + 2B)/n_{L-1}), where the walker derives A and B. Every row also states the smallest deviation the run could detect,
z_max standard errors, so that a check without power is visible as one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from derive.arch.description import Serial
from derive.backends.precision import float64
from derive.core import budget
from derive.core.display import markdown_table, markdown_text, quantity_cell, rounded, verdict, worst_z
from derive.core.errors import DeriveError
from derive.finite.arch import arch_finite_width
from derive.sampling.arch import sample_arch
from derive.sampling.arch import work_estimate as sampling_estimate
from derive.sampling.estimators import Moments, fit_inverse_width, z_score

#: Quantities this check compares (Theta: the output NTK's mean, against its infinite-width value;
#: Theta_var: n Var of one output channel's NTK, against A + 2B, for one input).
CHECKED = ("K", "V", "G1", "Theta", "Theta_var")


def kernel_moments(m: Moments, width: int) -> dict:
    """Estimates of E[K_hat] and of V_(st)(st) for every entry at one width, with standard errors
    (arrays of shape (M, M); module docstring)."""
    S = m.count
    M = int(round(np.sqrt(m.mean.size)))
    mean, se = m.mean.reshape(M, M), m.mean_stderr.reshape(M, M)
    var, var_se = m.var.reshape(M, M), m.var_stderr.reshape(M, M)
    d, dse = np.diag(mean), np.diag(se)
    v = width * var - (d[:, None] * d[None, :] + mean**2)
    # the products of means enter with their own errors; on the diagonal (2 E[K_hat]^2) with the
    # covariance of the mean and the variance, mu_3 / S, as well
    v_var = (width**2 * var_se**2 + (d[None, :] * dse[:, None]) ** 2 + (d[:, None] * dse[None, :]) ** 2
             + (2 * mean * se) ** 2)
    diag = np.arange(M)
    mu3 = np.diag(m.m3.reshape(M, M)) / S
    v_var[diag, diag] = width**2 * np.diag(var_se) ** 2 + 16 * d**2 * dse**2 - 8 * width * d * mu3 / S
    return {"mean": mean, "mean_stderr": se, "V": v, "V_stderr": np.sqrt(np.maximum(v_var, 0.0))}


@dataclass(repr=False)
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

    def _quantities(self) -> list[str]:
        return list(dict.fromkeys(r["quantity"] for r in self.rows))

    def __repr__(self) -> str:
        name = f"{self.name}: " if self.name else ""
        return (f"FiniteWidthCheck({name}{verdict(self.passed)}; {len(self.rows)} fits of "
                f"{', '.join(self._quantities())} over widths {list(self.widths)}, {self.samples} networks each"
                f"{worst_z(self.worst)})")

    def _repr_markdown_(self) -> str:
        w = self.worst
        worst = "" if w is None else (f"; worst $z$ = {rounded(w['z'], 3)} ({markdown_text(w['quantity'])}, {markdown_text(w['layer'])}, "
                                      f"entry {tuple(w['entry'])})")
        head = (f"**Finite-width maps of {markdown_text(self.name) or 'an architecture'}** against {self.samples} sampled networks "
                f"at each of the widths {list(self.widths)} (seed {self.seed}): {verdict(self.passed, markdown=True)}, every "
                f"$\\lvert z\\rvert < {self.z_max:g}${worst}")
        legend = ("Each entry $(s, t)$ of the empirical kernel is fitted as $a + b/n$ over the widths: $K$ is compared "
                  "with the intercept of its mean, $G^{\\{1\\}}$ with the slope, $V$ with the intercept of "
                  "$n\\,\\mathrm{Var}\\,\\hat K_{st} - (\\mathbb{E}\\hat K_{ss}\\,\\mathbb{E}\\hat K_{tt} + "
                  "\\mathbb{E}[\\hat K_{st}]^2)$. *detectable*: the smallest deviation the run could detect "
                  f"({self.z_max:g} standard errors); *weak*: a deviation as large as the theory would pass.")
        if {"Theta", "Theta_var"} & set(self._quantities()):
            legend += (" $\\Theta$: the intercept of the output NTK's mean; $n\\,\\mathrm{Var}\\,\\hat\\Theta$: the "
                       "intercept of n times its variance, against $A + 2B$.")
        rows = [[quantity_cell(r["quantity"]), markdown_text(r["layer"]),
                 ", ".join(map(str, r["entry"])), r["theory"], r["estimate"], rounded(r["stderr"]),
                 rounded(r["z"], 3), rounded(r["detectable"]), "weak" if r.get("weak") else ""] for r in self.rows]
        return "\n".join([head, "", legend, "", markdown_table(
            ["quantity", "output", "entry", "theory", "fitted", "±", "z", "detectable", ""], rows)])


def _seed(seed: int, width: int) -> int:
    return int(np.random.SeedSequence([seed, width]).generate_state(1, np.uint32)[0])


@float64
def sample_kernel_estimates(net: Serial, widths, *, samples: int = 4000, seed: int = 0, inputs=None,
                            input_dim: int = 8, ntk: bool = False,
                            progress: bool | Callable[[int, int], None] | None = None) -> dict:
    """{width: [kernel_moments of every recorded output]} from ``samples`` networks per width (the seed
    of width n is derived from (seed, n)); ``inputs`` (N, *positions, d), default one input with
    x.x/n_0 = 1 in ``input_dim`` dimensions. With ``ntk`` the entry ``("ntk", width)`` holds (mean,
    standard error) of the output NTK, (M, M) arrays."""
    ws = tuple(int(w) for w in widths)
    if len(ws) < 2 or len(set(ws)) != len(ws) or min(ws) < 1:
        raise DeriveError(f"give at least two distinct positive widths for the 1/n fit, got {list(widths)}")
    if samples < 3:
        raise DeriveError(f"samples must be at least 3, got {samples}")
    x = np.ones((1, int(input_dim))) if inputs is None else np.asarray(inputs, dtype=float)
    estimates = {}
    for k, w in enumerate(ws):
        if progress is True:  # a stage per width
            cb = True
        else:
            cb = None if not progress else (lambda done, k=k: progress(k * samples + done, len(ws) * samples))
        mc = sample_arch(net, x, w, n_networks=samples, seed=_seed(seed, w), ntk=ntk, progress=cb)
        estimates[w] = [kernel_moments(m, w) for m in mc.nngp]
        if ntk:
            M = int(round(np.sqrt(mc.ntk.mean.size)))
            estimates["ntk", w] = (mc.ntk.mean.reshape(M, M), mc.ntk.mean_stderr.reshape(M, M),
                                   w * mc.ntk.var.reshape(M, M), w * mc.ntk.var_stderr.reshape(M, M))
    return estimates


def _as_matrix(x) -> np.ndarray:
    return np.atleast_2d(np.asarray(x, dtype=float))


def _vertex_diagonal(V) -> np.ndarray:
    """V_(st)(st) of a (M, M, M, M) vertex (a number for one site)."""
    V = np.asarray(V, dtype=float)
    if V.ndim == 0:
        return V.reshape(1, 1)
    return np.einsum("stst->st", V)


def compare_finite_width(theory, estimates: dict, *, quantities=("K", "V", "G1"), z_max: float = 5.0,
                         samples: int = 0, seed: int = 0) -> FiniteWidthCheck:
    """Fit the estimates of :func:`sample_kernel_estimates` in 1/n and score ``theory`` (the result of
    :func:`~derive.finite.arch.arch_finite_width` or of
    :func:`~derive.finite.tensor.arch_finite_width_tensor`) entry by entry (module docstring)."""
    unknown = set(quantities) - set(CHECKED)
    if unknown:
        raise DeriveError(f"unknown quantity {', '.join(sorted(unknown))}; known: {', '.join(CHECKED)}")
    ws = tuple(sorted(w for w in estimates if isinstance(w, int)))
    if {"Theta", "Theta_var"} & set(quantities) and not all(("ntk", w) in estimates for w in ws):
        raise DeriveError("Theta and Theta_var need the sampled NTK (sample_kernel_estimates(..., ntk=True))")
    rows, per_width = [], []
    W = np.array(ws, dtype=float)
    for i, label in enumerate(theory.labels):
        if theory.values["V"][i] is None:
            continue
        est = [estimates[w][i] for w in ws]
        values = {"K": _as_matrix(theory.values["K"][i]), "G1": _as_matrix(theory.values["G1"][i]),
                  "V": _vertex_diagonal(theory.values["V"][i])}
        if i == len(theory.labels) - 1 and "Theta" in quantities:  # the sampler's NTK is the output's
            values["Theta"] = _as_matrix(theory.values["Theta"][i])
        if i == len(theory.labels) - 1 and "Theta_var" in quantities:
            values["Theta_var"] = _as_matrix(_ntk_variance(theory, i))
        M = values["K"].shape[0]
        for s_ in range(M):
            for t in range(s_, M):
                entry = [s_, t]
                per_width.extend({"layer": label, "index": i + 1, "entry": entry, "width": w,
                                  **{k: float(e[k][s_, t]) for k in ("mean", "mean_stderr", "V", "V_stderr")}}
                                 for w, e in zip(ws, est))
                fit_k = fit_inverse_width(W, [e["mean"][s_, t] for e in est], [e["mean_stderr"][s_, t] for e in est])
                fit_v = fit_inverse_width(W, [e["V"][s_, t] for e in est], [e["V_stderr"][s_, t] for e in est])
                found = {"K": (fit_k.intercept, fit_k.intercept_stderr), "G1": (fit_k.slope, fit_k.slope_stderr),
                         "V": (fit_v.intercept, fit_v.intercept_stderr)}
                if "Theta" in values:
                    fit_t = fit_inverse_width(W, [estimates["ntk", w][0][s_, t] for w in ws],
                                              [estimates["ntk", w][1][s_, t] for w in ws])
                    found["Theta"] = (fit_t.intercept, fit_t.intercept_stderr)
                if "Theta_var" in values:
                    fit_n = fit_inverse_width(W, [estimates["ntk", w][2][s_, t] for w in ws],
                                              [estimates["ntk", w][3][s_, t] for w in ws])
                    found["Theta_var"] = (fit_n.intercept, fit_n.intercept_stderr)
                for q in quantities:
                    if q not in values:
                        continue
                    value, stderr = found[q]
                    th = float(values[q][s_, t])
                    detectable = z_max * stderr
                    rows.append({"quantity": q, "layer": label, "index": i + 1, "entry": entry, "theory": th,
                                 "estimate": value, "stderr": stderr, "z": z_score(value, stderr, th),
                                 "detectable": detectable, "weak": bool(detectable >= abs(th)) if th != 0 else None})
    return FiniteWidthCheck(theory.name, ws, int(samples), int(seed), float(z_max), rows, per_width)


def _ntk_variance(theory, i: int):
    """n Var(H_ii) of one output channel's NTK at output ``i`` (PDLT ch. 8): A + 2B for one input, and
    A_(st)(st) + B_(ss)(tt) + B_(st)(ts) over sites (:func:`derive.finite.tensor_ntk.ntk_variance`)."""
    values = theory.values
    if "A" not in values or values["A"][i] is None:
        reasons = getattr(theory, "ntk_reasons", None)
        why = f": {reasons[i]}" if reasons and reasons[i] else ""
        raise DeriveError("Theta_var: this architecture's output has no derived NTK fluctuations (A, B)" + why)
    A, B = values["A"][i], values["B"][i]
    if np.ndim(A) == 4:
        from derive.finite.tensor_ntk import ntk_variance

        return ntk_variance(np.asarray(A), np.asarray(B))
    return A + 2 * B


@float64
def check_finite_width(net: Serial, widths, *, samples: int = 4000, seed: int = 0, z_max: float = 5.0,
                       quantities=("K", "V", "G1"), inputs=None, input_dim: int = 8,
                       progress: bool | Callable[[int, int], None] | None = None) -> FiniteWidthCheck:
    """Sample ``samples`` networks of ``net`` at each of ``widths`` and compare K, V and G1 of every
    Gaussian-point output (and with ``Theta`` in ``quantities`` the output NTK) with the theory after
    a fit in 1/n: one input without positions by default (:func:`~derive.finite.arch.arch_finite_width`),
    else every entry of ``inputs`` (:func:`~derive.finite.tensor.arch_finite_width_tensor`)."""
    shape = (1, input_dim) if inputs is None else np.shape(inputs)
    ntk = bool({"Theta", "Theta_var"} & set(quantities))
    if len(shape) >= 2 and isinstance(samples, (int, np.integer)) and all(
            isinstance(w, (int, np.integer)) and w >= 1 for w in widths):
        total = sum((sampling_estimate(net, shape, int(w), samples, ntk=ntk) for w in widths),
                    budget.Estimate("", 0.0))
        budget.check(budget.Estimate(f"{samples} sampled networks at each of the widths "
                                     f"{', '.join(map(str, widths))}", total.ops, total.bytes))
    if inputs is None:
        theory = arch_finite_width(net)
    else:
        from derive.finite.tensor import arch_finite_width_tensor

        theory = arch_finite_width_tensor(net, inputs, ntk="Theta_var" in quantities)
    ntk = bool({"Theta", "Theta_var"} & set(quantities))
    if theory.values["V"][-1] is None and ntk:
        raise DeriveError("Theta and Theta_var are checked at the output, which here is not a dense or residual "
                          "output")
    if "Theta_var" in quantities:
        _ntk_variance(theory, len(theory.labels) - 1)  # refuse before sampling
        if any(layer.width is not None for layer in net.distinct_layers()):
            raise DeriveError("Theta_var is checked for architectures of one width (no per-layer width)")
    estimates = sample_kernel_estimates(net, widths, samples=samples, seed=seed, inputs=inputs,
                                        input_dim=input_dim, ntk=ntk, progress=progress)
    return compare_finite_width(theory, estimates, quantities=quantities, z_max=z_max, samples=samples, seed=seed)


__all__ = ["CHECKED", "FiniteWidthCheck", "check_finite_width", "compare_finite_width", "kernel_moments",
           "sample_kernel_estimates"]
