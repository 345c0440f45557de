"""Finite-width corrections at order 1/n for a single input (PDLT ch. 4, 5, 8, 9; Yaida 2019).

With K = K^(l), r = n_l / n_{l-1}, chi_par = C_W d<sigma^2>_K/dK, chi_perp = C_W <sigma'^2>_K and
Omega(z) = lambda_W sigma(z)^2 + C_W Theta sigma'(z)^2, the one-step maps derived here are

    K'     = C_b + C_W <sigma^2>_K
    V'     = C_W^2 (<sigma^4>_K - <sigma^2>_K^2) + r chi_par^2 V                       (PDLT 4.90)
    G1'    = r [chi_par G1 + C_W/(8 K^4) <sigma^2 (z^4 - 6 K z^2 + 3 K^2)>_K V]     (PDLT 4.115)
    Theta' = lambda_b + lambda_W <sigma^2>_K + chi_perp Theta                           (PDLT 8.8)
    B'     = C_W^2 <sigma'^4>_K Theta^2 + r chi_perp^2 B
    F'     = C_W^2 <sigma^2 sigma'^2>_K Theta + r chi_par^2 F
    D'     = C_W Cov_K(sigma^2, Omega) + r C_W/(4 K^4) V <(z^2-K) sigma^2>_K <(z^2-K) Omega>_K
             + r chi_par chi_perp D
    A'     = Var_K(Omega) + r V/(4 K^4) <(z^2-K) Omega>_K^2 + r chi_perp^2 A
             + r chi_perp <(z^2-K) Omega>_K D / K^2                                      (PDLT 8.89)

and, for the dNTK dH_{i0i1i2} = sum lambda_mu lambda_nu (d^2 z_i0 / dtheta_mu dtheta_nu)
(dz_i1 / dtheta_mu)(dz_i2 / dtheta_nu) (PDLT ch. 11), whose leading statistic is

    E[dH_{i0i1i2} z_i3] = (1/n_{l-1}) [d_{i0i3} d_{i1i2} P + (d_{i0i1} d_{i2i3} + d_{i0i2} d_{i1i3}) Q],

    P'     = C_W^2 Theta^2 <sigma sigma'^2 sigma''>_K + r C_W chi_perp <sigma sigma''>_K B + r chi_par chi_perp P
    Q'     = lambda_W C_W Theta <sigma^2 sigma'^2>_K + C_W^2 Theta^2 <sigma sigma'^2 sigma''>_K
             + r [lambda_W C_W <(sigma sigma')'>_K^2 + C_W^2 Theta <(sigma' sigma'')'>_K <(sigma sigma')'>_K] F
             + r chi_par chi_perp Q

derived from dH' = d_{i0i1} (lambda_W/n) sum sigma_j sigma'_j W_{i2k} sigma'_k Theta_jk + (i1 <-> i2)
+ sum W_{i0j} W_{i1k} W_{i2m} [sigma''_j sigma'_k sigma'_m Theta_jk Theta_jm + sigma'_j sigma'_k sigma'_m dH_jkm]
by Wick contraction of the new weights with those of z_i3 = b_i3 + W_{i3j} sigma_j, keeping the
off-diagonal (j != k) sums whose O(1/n) correlations B and F contribute at the same order. Second
derivatives are removed by Gaussian integration by parts, so kinks need no delta functions:
<sigma sigma'^2 sigma''> = (<z sigma sigma'^3>/K - <sigma'^4>)/3, <sigma sigma''> = <z sigma sigma'>/K
- <sigma'^2>, <(sigma sigma')'> = <z sigma sigma'>/K and <(sigma' sigma'')'> = <(z^2-K) sigma'^2>/(2K^2).

with V = G1 = A = B = D = F = P = Q = 0 at layer 1 (the first layer is linear in its parameters). Here E[z_i z_j] = delta_ij (K + G1/n_{l-1}),
Cov(z_i^2, z_j^2) = V/n_{l-1} (i != j), Var(H_ii) = (A + 2B)/n_{l-1} and
Cov(H_ii, z_i^2) = (D + 2F)/n_{l-1} for the NTK H, E[dH_iii z_i] = (P + 2Q)/n_{l-1} and, for
i != j, E[dH_ijj z_i] = P/n_{l-1}, E[dH_iij z_j] = Q/n_{l-1}. Every expectation goes through the rules
engine, so the maps are closed forms wherever the activation allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import sympy as sp

from . import symbols as S
from .activations import Activation
from .errors import DeriveError
from .expectations import gaussian_expectation, tidy
from .numeric import evaluate
from .quadrature import DEFAULT_TOL, GaussianExpectation

r = sp.Symbol("r", positive=True)
A_, B_, D_, F_, P_, Q_ = (sp.Symbol(n, real=True) for n in ("A", "B", "D", "F", "P", "Q"))

#: Order of the per-layer quantities (JSON keys).
QUANTITIES = ("K", "V", "G1", "Theta", "A", "B", "D", "F", "P", "Q")
STATE = {"K": S.K, "V": S.V, "G1": S.G1, "Theta": S.Theta, "A": A_, "B": B_, "D": D_, "F": F_, "P": P_, "Q": Q_}


@dataclass(frozen=True)
class FiniteWidthMaps:
    """The Gaussian expectations and the one-step maps of every quantity (see module docstring)."""

    activation: Activation
    expectations: dict
    recursions: dict

    @property
    def closed_form(self) -> bool:
        return not any(e.has(GaussianExpectation) for e in self.expectations.values())


@lru_cache(maxsize=64)
def _expectations(sigma: sp.Expr, dsigma: sp.Expr, tol: float) -> dict:
    z, K = S.z, S.K

    def E(f):
        return tidy(gaussian_expectation(f, (z,), tol=tol))

    return {
        "s2": E(sigma**2),
        "s4": E(sigma**4),
        "d2": E(dsigma**2),
        "d4": E(dsigma**4),
        "s2d2": E(sigma**2 * dsigma**2),
        "s2_h4": E(sigma**2 * (z**4 - 6 * K * z**2 + 3 * K**2)),
        "s2_h2": E(sigma**2 * (z**2 - K)),
        "d2_h2": E(dsigma**2 * (z**2 - K)),
        "zsd": E(z * sigma * dsigma),
        "zsd3": E(z * sigma * dsigma**3),
    }


def finite_width_maps(activation: Activation, tol: float = DEFAULT_TOL) -> FiniteWidthMaps:
    """Derive the single-input finite-width maps for ``activation`` (parameters at their values).

    K, V and G1 come from the dense layer rule (rules/layers/dense.toml, ``[finite_width]``) through
    the delta method of :mod:`derive.collective`, the one derivation every architecture uses; the
    NTK and dNTK maps are derived here."""
    from .collective import dense_after_activation

    sigma = activation.sigma_numeric
    dsigma = activation.derivative(numeric=True)
    e = _expectations(sigma, dsigma, tol)
    K, V, G1, Th = S.K, S.V, S.G1, S.Theta
    C_W, C_b, lW, lb = S.C_W, S.C_b, S.lambda_W, S.lambda_b
    chi_par = C_W * tidy(sp.diff(e["s2"], K))
    chi_perp = C_W * e["d2"]
    omega_h2 = lW * e["s2_h2"] + C_W * Th * e["d2_h2"]
    cov_s2_omega = lW * (e["s4"] - e["s2"] ** 2) + C_W * Th * (e["s2d2"] - e["s2"] * e["d2"])
    var_omega = (lW**2 * (e["s4"] - e["s2"] ** 2) + 2 * lW * C_W * Th * (e["s2d2"] - e["s2"] * e["d2"])
                 + C_W**2 * Th**2 * (e["d4"] - e["d2"] ** 2))
    dense = dense_after_activation(activation, tol)
    rec = {
        "K": dense["K"],
        "V": dense["V"],
        "G1": dense["G1"],
        "Theta": lb + lW * e["s2"] + chi_perp * Th,
        "B": C_W**2 * e["d4"] * Th**2 + r * chi_perp**2 * B_,
        "F": C_W**2 * e["s2d2"] * Th + r * chi_par**2 * F_,
        "D": (C_W * cov_s2_omega + r * C_W / (4 * K**4) * V * e["s2_h2"] * omega_h2
              + r * chi_par * chi_perp * D_),
        "A": (var_omega + r * V / (4 * K**4) * omega_h2**2 + r * chi_perp**2 * A_
              + r * chi_perp * omega_h2 * D_ / K**2),
    }
    # dNTK (module docstring); second derivatives of sigma integrated by parts
    s_d2_dd = (e["zsd3"] / K - e["d4"]) / 3  # <sigma sigma'^2 sigma''>
    s_dd = e["zsd"] / K - e["d2"]  # <sigma sigma''>
    d_sd = e["zsd"] / K  # <(sigma sigma')'>
    d_ddd = e["d2_h2"] / (2 * K**2)  # <(sigma' sigma'')'>
    rec["P"] = C_W**2 * Th**2 * s_d2_dd + r * C_W * chi_perp * s_dd * B_ + r * chi_par * chi_perp * P_
    rec["Q"] = (lW * C_W * Th * e["s2d2"] + C_W**2 * Th**2 * s_d2_dd
                + r * (lW * C_W * d_sd**2 + C_W**2 * Th * d_ddd * d_sd) * F_ + r * chi_par * chi_perp * Q_)
    return FiniteWidthMaps(activation, e, rec)


def _per_layer(value, depth: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=float), (depth,)).astype(float)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise DeriveError(f"{name} must be finite and >= 0")
    return arr


def _layer_setup(depth, C_W, C_b, lambda_W, lambda_b, k1, widths, input_norm):
    """Validated per-layer hyperparameters, widths and the input norm x.x/n_0 implied by K^(1)."""
    if int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    cw, cb = _per_layer(C_W, depth, "C_W"), _per_layer(C_b, depth, "C_b")
    lw = cw if lambda_W is None else _per_layer(lambda_W, depth, "lambda_W")
    lb = cb if lambda_b is None else _per_layer(lambda_b, depth, "lambda_b")
    n = np.broadcast_to(np.asarray(1.0 if widths is None else widths, dtype=float), (depth,)).astype(float)
    if np.any(n < 1):
        raise DeriveError("widths must be >= 1")
    if k1 is not None:
        if k1 <= 0:
            raise DeriveError(f"K^(1) must be > 0, got {k1}")
        input_norm = (k1 - cb[0]) / cw[0]
        if input_norm < 0:
            raise DeriveError(f"K^(1) = {k1} is below C_b = {cb[0]}: no input has that kernel")
    return cw, cb, lw, lb, n, input_norm


@dataclass
class FiniteWidthProfile:
    """Per-layer values, index 0 = layer 1, plus normalised fluctuations."""

    values: dict
    widths: np.ndarray  # n_1..n_L
    closed_form: dict = field(default_factory=dict)

    def normalised(self) -> dict:
        """V/(n_{l-1} K^2), G1/(n_{l-1} K), Var(H)/Theta^2 = (A + 2B)/(n_{l-1} Theta^2) and the dNTK's
        E[dH_iii z_i]/Theta^2 = (P + 2Q)/(n_{l-1} Theta^2) (dimensionless: dH ~ Theta^2 / z)."""
        K, V, G1 = self.values["K"], self.values["V"], self.values["G1"]
        Th, A, B = self.values["Theta"], self.values["A"], self.values["B"]
        P, Q = self.values["P"], self.values["Q"]
        n_prev = np.concatenate([[np.inf], self.widths[:-1]])
        with np.errstate(all="ignore"):
            return {"V_over_nK2": V / (n_prev * K**2), "G1_over_nK": G1 / (n_prev * K),
                    "varH_over_Theta2": (A + 2 * B) / (n_prev * Th**2),
                    "dH_over_nTheta2": (P + 2 * Q) / (n_prev * Th**2), "l_over_n": np.arange(1, len(K) + 1) / n_prev}


def iterate(maps: FiniteWidthMaps, depth: int, C_W, C_b, lambda_W=None, lambda_b=None, *, k1: float | None = None,
            widths=None, input_norm: float = 1.0) -> FiniteWidthProfile:
    """Iterate the maps through ``depth`` layers.

    Args:
        C_W, C_b, lambda_W, lambda_b: scalars or per-layer sequences (entry l is used by layer l+1;
            entry 0 by the first layer); lambda_W, lambda_b default to C_W, C_b.
        k1: K^(1); default C_b + C_W * input_norm with input_norm = x.x/n_0.
        widths: n_1..n_L (a scalar for a uniform width); only ratios r = n_l/n_{l-1} and the
            normalisations use them. Default: uniform (r = 1).
    """
    cw, cb, lw, lb, n, input_norm = _layer_setup(depth, C_W, C_b, lambda_W, lambda_b, k1, widths, input_norm)
    state = {"K": cb[0] + cw[0] * input_norm, "Theta": lb[0] + lw[0] * input_norm,
             "V": 0.0, "G1": 0.0, "A": 0.0, "B": 0.0, "D": 0.0, "F": 0.0, "P": 0.0, "Q": 0.0}
    out = {q: np.empty(depth) for q in QUANTITIES}
    order = QUANTITIES
    fns = {q: _compiled(maps.recursions[q]) for q in order}
    for i in range(depth):
        for q in order:
            out[q][i] = state[q]
        if i == depth - 1:
            break
        values = {STATE[q]: state[q] for q in order}
        values.update({S.C_W: cw[i + 1], S.C_b: cb[i + 1], S.lambda_W: lw[i + 1], S.lambda_b: lb[i + 1],
                       r: n[i] / n[i - 1] if i >= 1 else 1.0})
        with np.errstate(all="ignore"):
            state = {q: float(fns[q](values)) for q in order}
    return FiniteWidthProfile(out, n)


def _compiled(expr: sp.Expr):
    def f(values):
        return evaluate(expr, values)
    return f


def _solve_first_order(c: sp.Expr, g: sp.Expr, f1, l: sp.Symbol) -> sp.Expr | None:
    """f(l+1) = c f(l) + g(l), f(1) = f1  =>  f(l) = c^(l-1) f1 + sum_{k=1}^{l-1} c^(l-1-k) g(k).

    The sum of polynomial-times-geometric terms is done by SymPy's summation (the same result
    ``rsolve`` gives, without its failure modes); returns None when it does not come out closed.
    """
    k = sp.Dummy("k", integer=True, positive=True)
    try:
        total = sp.summation(sp.expand(c ** (l - 1 - k) * g.xreplace({l: k})), (k, 1, l - 1))
    except (ValueError, NotImplementedError, TypeError, AttributeError):
        return None
    if total.has(sp.Sum):
        return None
    out = c ** (l - 1) * f1 + total
    out = sp.piecewise_fold(out)
    if isinstance(out, sp.Piecewise):  # c == 1 branches: keep the one valid for this c
        out = out.args[-1].expr if len(out.args) else out
    return sp.factor_terms(sp.simplify(out))


def closed_forms_in_depth(maps: FiniteWidthMaps, C_W: float, C_b: float, lambda_W: float, lambda_b: float,
                          k1: float, theta1: float) -> dict:
    """Solve the recursions in closed form in l where they are linear with constant coefficients.

    This is the case for a scale-invariant activation (sigma = z sigma' a.e.) with C_b = 0 and a
    uniform width (r = 1): every expectation is then homogeneous in K, K^(l) = (C_W A_2)^(l-1) K^(1),
    and each later quantity obeys a first-order linear recursion whose inhomogeneity is a
    polynomial-exponential in l, which SymPy's ``rsolve`` solves exactly. Returns {} otherwise.
    """
    l = S.l
    if C_b != 0 or maps.closed_form is False:
        return {}
    from .critical import is_scale_invariant

    if not is_scale_invariant(maps.activation):
        return {}
    Cw, lw, lb = sp.nsimplify(C_W), sp.nsimplify(lambda_W), sp.nsimplify(lambda_b)
    K1, T1 = sp.Symbol("K1", positive=True), sp.Symbol("Theta1", nonnegative=True)
    consts = {S.C_W: Cw, S.C_b: 0, S.lambda_W: lw, S.lambda_b: lb, r: 1}
    A2 = sp.simplify(maps.expectations["s2"] / S.K)
    known = {"K": K1 * (Cw * A2) ** (l - 1)}
    order = ("V", "G1", "Theta", "B", "F", "D", "A", "P", "Q")
    initial = {"V": 0, "G1": 0, "Theta": T1, "B": 0, "F": 0, "D": 0, "A": 0, "P": 0, "Q": 0}
    for q in order:
        step = maps.recursions[q].xreplace(consts)
        step = step.xreplace({STATE[k]: v for k, v in known.items()})
        own = STATE[q]
        coeff = sp.simplify(sp.diff(step, own))
        inhom = sp.simplify(step - coeff * own)
        if coeff.has(own) or any(inhom.has(STATE[k]) for k in order):
            return {}
        sol = _solve_first_order(coeff, inhom, initial[q], l)
        if sol is None:
            return {}
        known[q] = sol
    return {q: _tidy_in_depth(v.xreplace({K1: sp.nsimplify(k1), T1: sp.nsimplify(theta1)}), l)
            for q, v in known.items()}


def _tidy_in_depth(expr: sp.Expr, l: sp.Symbol) -> sp.Expr:
    """Write a polynomial-exponential in l as sum_j P_j(l) rho_j^l with each rho_j one rational."""
    x = sp.powsimp(sp.expand(sp.powsimp(sp.expand(expr), force=True)), force=True, combine="base")
    return sp.collect(x, [p for p in x.atoms(sp.Pow) if p.exp.has(l)], func=sp.factor)


#: Normalised fluctuation above which the leading-order 1/n expansion is no longer trustworthy.
TRUST_LIMIT = 0.1


def depth_to_width(profile: FiniteWidthProfile) -> dict:
    """Slopes of V/(n K^2), Var(H)/Theta^2 and (P + 2Q)/(n Theta^2) against l/n at the deepest layers,
    and the first layer where each exceeds :data:`TRUST_LIMIT` in size (there the O(1/n^2) terms are no
    longer small)."""
    norm = profile.normalised()
    x = norm["l_over_n"]
    out: dict = {}
    for key in ("V_over_nK2", "varH_over_Theta2", "dH_over_nTheta2"):
        y = norm[key]
        ok = np.isfinite(y) & np.isfinite(x)
        idx = np.flatnonzero(ok)
        if len(idx) >= 4:
            tail = idx[len(idx) // 2:]
            slope = np.polyfit(x[tail], y[tail], 1)[0] if np.ptp(x[tail]) > 0 else float("nan")
        else:
            slope = float("nan")
        out[f"{key}_slope"] = float(slope)
        beyond = np.flatnonzero(ok & (np.abs(y) > TRUST_LIMIT))
        out[f"{key}_untrusted_from_layer"] = int(beyond[0]) + 1 if len(beyond) else None
    return out


def finite_width_report(activation: Activation, depth: int, C_W, C_b, lambda_W=None, lambda_b=None, *,
                        k1: float | None = None, widths=None, tol: float = DEFAULT_TOL) -> dict:
    """Everything ``derive finite-width`` reports, as a JSON-ready dict (index 0 = layer 1)."""
    maps = finite_width_maps(activation, tol)
    prof = iterate(maps, depth, C_W, C_b, lambda_W, lambda_b, k1=k1, widths=widths)
    cw0, cb0 = np.atleast_1d(C_W)[0], np.atleast_1d(C_b)[0]
    lw0 = cw0 if lambda_W is None else np.atleast_1d(lambda_W)[0]
    lb0 = cb0 if lambda_b is None else np.atleast_1d(lambda_b)[0]
    uniform = (np.ndim(C_W) == 0 and np.ndim(C_b) == 0 and (lambda_W is None or np.ndim(lambda_W) == 0)
               and (lambda_b is None or np.ndim(lambda_b) == 0) and (widths is None or np.ndim(widths) == 0))
    closed = {}
    if uniform:
        closed = closed_forms_in_depth(maps, float(cw0), float(cb0), float(lw0), float(lb0),
                                       float(prof.values["K"][0]), float(prof.values["Theta"][0]))

    def clean(a):
        return [None if not np.isfinite(v) else float(v) for v in a]

    out = {"activation": activation.name, "params": activation.describe_params(), "depth": int(depth),
           **{q: clean(prof.values[q]) for q in QUANTITIES},
           "widths": clean(prof.widths) if widths is not None else None,
           "closed_form": {q: str(v) for q, v in closed.items()},
           "recursions": {q: str(maps.recursions[q]) for q in QUANTITIES},
           "normalised": {k: clean(v) for k, v in prof.normalised().items()} if widths is not None else None,
           "depth_to_width": depth_to_width(prof) if widths is not None else None,
           "closed_form_expectations": maps.closed_form}
    return out


_ARGS = (*(STATE[q] for q in QUANTITIES), S.C_W, S.C_b, S.lambda_W, S.lambda_b, r)
_JAX_STEPS: dict = {}


def iterate_jax(maps: FiniteWidthMaps, depth: int, C_W, C_b, lambda_W=None, lambda_b=None, *,
                k1: float | None = None, widths=None, input_norm: float = 1.0) -> dict:
    """The same iteration as :func:`iterate`, code-generated to JAX and jit-compiled (``lax.scan``
    over layers). Returns {quantity: array of per-layer values}."""
    import jax
    import jax.numpy as jnp

    from .codegen import to_jax

    cw, cb, lw, lb, n, input_norm = _layer_setup(depth, C_W, C_b, lambda_W, lambda_b, k1, widths, input_norm)
    ratio = np.concatenate([[1.0], n[1:-1] / n[:-2]]) if depth > 2 else np.ones(max(depth - 1, 1))
    key = tuple(maps.recursions[q] for q in QUANTITIES)
    if key not in _JAX_STEPS:
        fns = [to_jax(maps.recursions[q], list(_ARGS)) for q in QUANTITIES]

        @jax.jit
        def run(init, hyper):
            def step(state, h):
                new = tuple(f(*state, *h) for f in fns)
                return new, state
            last, hist = jax.lax.scan(step, init, hyper)
            return hist, last

        _JAX_STEPS[key] = run
    run = _JAX_STEPS[key]
    init = tuple(jnp.asarray(v, jnp.float64) for v in
                 (cb[0] + cw[0] * input_norm, 0.0, 0.0, lb[0] + lw[0] * input_norm) + (0.0,) * (len(QUANTITIES) - 4))
    steps = depth - 1
    hyper = tuple(jnp.asarray(a[1:depth] if steps else a[:0], jnp.float64) for a in (cw, cb, lw, lb)) + (
        jnp.asarray(ratio[:steps], jnp.float64),)
    hist, last = run(init, hyper)
    return {q: np.concatenate([np.asarray(hist[i]), [float(last[i])]]) for i, q in enumerate(QUANTITIES)}


# ------------------------------------------------------------------------------------------------
# Several inputs: the tensor form of V and G1


@dataclass(frozen=True)
class BatchExpectations:
    """Two-input Gaussian expectations (SymPy in K11, K12, K22) the batch recursions need.

    ``E`` = <sigma(z1) sigma(z2)>_K and its K-derivatives of order 1 and 2 give every
    <sigma^(i)(z1) sigma^(j)(z2)>_K with i + j <= 4 by Price's theorem (d/dK11 = <d1^2>/2,
    d/dK12 = <d1 d2>, d/dK22 = <d2^2>/2); ``quartic[(p, q)]`` = <sigma(z1)^p sigma(z2)^q>_K for
    p + q = 4 (four-point functions on two distinct inputs).
    """

    E: sp.Expr
    dE: dict
    d2E: dict
    quartic: dict


@lru_cache(maxsize=32)
def _batch_expectations(sigma: sp.Expr, tol: float) -> BatchExpectations:
    from .recursions import _pair

    K11, K12, K22 = S.K11, S.K12, S.K22
    E = tidy(gaussian_expectation(_pair(sigma, sigma), (S.z1, S.z2), tol=tol))
    keys = {"11": K11, "12": K12, "22": K22}
    dE = {k: sp.diff(E, v) for k, v in keys.items()}
    d2E = {a + "," + b: sp.diff(E, keys[a], keys[b]) for a in keys for b in keys}
    quartic = {}
    for p, q in ((2, 2), (3, 1), (1, 3)):
        quartic[(p, q)] = tidy(gaussian_expectation(_pair(sigma**p, sigma**q), (S.z1, S.z2), tol=tol))
    return BatchExpectations(E, dE, d2E, quartic)


def batch_expectations(activation: Activation, tol: float = DEFAULT_TOL) -> BatchExpectations:
    return _batch_expectations(activation.sigma_numeric, tol)


@dataclass(frozen=True)
class BatchTerms:
    """Every SymPy coefficient of the batch recursions (parameters at their values).

    ``pairs`` holds the two-input expectations in K11, K12, K22 (:class:`BatchExpectations`) and
    ``E2`` = <sigma(z1) sigma(z2)>_K as the kernel derivation writes it; the single-input ones are
    in K: ``s2`` = <sigma^2>_K, ``s4`` = <sigma^4>_K, ``g1`` = d<sigma^2>_K/dK and
    ``g2`` = d^2<sigma^2>_K/dK^2 (so <d^2 sigma^2/dz^2>_K = 2 g1, <d^4 sigma^2/dz^4>_K = 4 g2).
    """

    pairs: BatchExpectations
    E2: sp.Expr
    s2: sp.Expr
    s4: sp.Expr
    g1: sp.Expr
    g2: sp.Expr


def batch_terms(activation: Activation, tol: float = DEFAULT_TOL) -> BatchTerms:
    """The coefficients :func:`iterate_batch` evaluates (and the JAX batch iteration compiles)."""
    from .recursions import derive_kernel

    fw = finite_width_maps(activation, tol)
    s2 = fw.expectations["s2"]
    d = derive_kernel(activation, tol)
    return BatchTerms(batch_expectations(activation, tol), d.numeric(d.expectation), s2,
                      fw.expectations["s4"], sp.diff(s2, S.K), sp.diff(s2, S.K, 2))


def _pair_values(expr: sp.Expr, k11, k12, k22):
    with np.errstate(all="ignore"):
        return float(evaluate(expr, {S.K11: k11, S.K12: k12, S.K22: k22}))


def _derivative_table(bx: BatchExpectations, single: dict, K: np.ndarray, a: int, b: int) -> dict:
    """<d_a^i d_b^j (sigma_a sigma_b)>_K for i + j in {2, 4}, keyed by the multiset of indices."""
    if a == b:
        k = K[a, a]
        g1 = float(evaluate(single["g1"], {S.K: k}))
        g2 = float(evaluate(single["g2"], {S.K: k}))
        return {2: {(a, a): 2 * g1}, 4: {(a, a, a, a): 4 * g2}}
    v = (K[a, a], K[a, b], K[b, b])
    d1 = {k: _pair_values(e, *v) for k, e in bx.dE.items()}
    d2 = {k: _pair_values(e, *v) for k, e in bx.d2E.items()}
    two = {(a, a): 2 * d1["11"], (a, b): d1["12"], (b, b): 2 * d1["22"]}
    four = {(a, a, a, a): 4 * d2["11,11"], (a, a, a, b): 2 * d2["11,12"], (a, a, b, b): 4 * d2["11,22"],
            (a, b, b, b): 2 * d2["12,22"], (b, b, b, b): 4 * d2["22,22"]}
    return {2: two, 4: four}


def _lookup(table: dict, idx: tuple) -> float:
    return table[tuple(sorted(idx))] if tuple(sorted(idx)) in table else table[tuple(sorted(idx, reverse=True))]


def _four_point(bx: BatchExpectations, single_s4: sp.Expr, K: np.ndarray, idx: tuple, rule: MomentRule,
                numeric: NumpyMoments) -> float:
    """<sigma_a1 sigma_a2 sigma_a3 sigma_a4>_K: closed/two-input forms when at most two inputs are
    distinct, :func:`distinct_moment` over the distinct inputs otherwise."""
    distinct = sorted(set(idx))
    if len(distinct) == 1:
        return float(evaluate(single_s4, {S.K: K[idx[0], idx[0]]}))
    if len(distinct) == 2:
        a, b = distinct
        p = idx.count(a)
        v = (K[a, a], K[a, b], K[b, b])
        if p == 2:
            return _pair_values(bx.quartic[(2, 2)], *v)
        return _pair_values(bx.quartic[(3, 1)] if p == 3 else bx.quartic[(1, 3)], *v)
    cov = K[np.ix_(distinct, distinct)]
    with np.errstate(all="ignore"):
        return float(distinct_moment(np, rule, numeric.sigma, numeric.smoothed, cov,
                                     tuple(idx.count(c) for c in distinct), _root))


# ------------------------------------------------------------------------------------------------
# Four-point functions on three or four distinct inputs
#
# <prod_i sigma(z_i)^p_i>_K, z ~ N(0, K) on d = 3 or 4 distinct inputs (sum_i p_i = 4), by one of three
# rules (:class:`MomentRule`), each written once against an array namespace ``xp`` (NumPy or
# jax.numpy) so that the NumPy and the generated-JAX iterations evaluate the same arithmetic:
#
# * "exact": sigma piecewise polynomial with its only break at 0 (ReLU, leaky ReLU, |z|, step,
#   sign, polynomials). Then sigma(z)^p = A_p(z) + B_p(z) H(z) with polynomials A_p, B_p, and the
#   moment is a sum of E[prod_i z_i^k_i prod_{i in S} H(z_i)], reduced exactly by Stein's lemma
#   E[z_i F] = sum_j K_ij E[d_j F] (d_j H(z_j) = delta(z_j), a delta conditions the Gaussian on
#   z_j = 0) to orthant probabilities, closed up to three variables (Sheppard; 1/8 + sum asin/4pi)
#   and, for four, Plackett's (1954) one-dimensional integral. Error: that integral's quadrature,
#   below 1e-13 of the moment's scale for definite K; a numerically singular K is lifted to an
#   eigenvalue of EXACT_LIFT times its mean variance first (error then ~1e-10 to 1e-8).
# * "trapezoid": smooth sigma. In whitened coordinates z = L u (L the lower-triangular root of the
#   sub-covariance) the tensor trapezoid rule with the Gaussian weight on [-R, R]^(d-1), nested so
#   that sigma(z_k) is evaluated on the first k coordinates only; the last coordinate, which only
#   z_d depends on, is integrated beforehand: <sigma(m + s v)>_v (s = L_dd) in closed form where the
#   rules give one, else tabulated at TABLE_FACTOR * order intervals and interpolated by the
#   polynomial through the LAGRANGE_POINTS nearest nodes (adds < 1e-13). The trapezoid rule
#   converges geometrically for integrands analytic in a strip (tanh's poles at +-i pi/2 are what
#   limit Gauss-Hermite); the order is chosen from the largest variance (see :func:`moment_rule`).
#   Measured against exact and independent references: 1e-11 relative or better for tanh, erf,
#   GELU and swish at variances up to 3.4. The window [-R, R] (R = MOMENT_HALF_WIDTH) suits
#   integrands growing like |z|^4 at most; faster-growing activations lose digits to its tails.
# * "panels": other kinked sigma (ELU, SELU, ...). Nested Gauss-Legendre panels in the same
#   coordinates, split at the kink of the level's own factor (a known point given the outer
#   coordinates) and at 0; the first level also at +-LAYER_WIDTHS conditional widths of every
#   later factor, where smoothed later kinks curve the integrand most; last coordinate in closed
#   form where possible. About 1e-9 of the moment's scale for moderately correlated inputs, 1e-6 to
#   1e-4 when the sub-covariance is nearly singular with correlations of both signs.

#: Half-width, in standard deviations of the whitened coordinates, of the tensor rules (the tail
#: of u^4 exp(-u^2/2) beyond it is ~1e-12 of its integral).
MOMENT_HALF_WIDTH = 8.0
#: Trapezoid orders (points per whitened coordinate) ``quad_order="auto"`` chooses from.
AUTO_ORDERS = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192)
#: Gauss-Legendre points per panel of the "panels" rule under ``quad_order="auto"``.
PANEL_ORDER = 16
#: Gauss-Legendre nodes of Plackett's integral for four-variate orthant probabilities.
ORTHANT_ORDER = 128
#: The tabulated smoothed activation: TABLE_FACTOR * order intervals, interpolation through
#: LAGRANGE_POINTS nodes.
TABLE_FACTOR, LAGRANGE_POINTS = 8, 8
#: Extra first-level breakpoints of the "panels" rule, in conditional widths (see above).
LAYER_WIDTHS = 6.0
#: Largest polynomial degree of a piecewise-polynomial sigma taken by the "exact" rule.
MAX_EXACT_DEGREE = 4
#: Smallest eigenvalue, relative to the mean variance, the "exact" rule lifts a covariance of three
#: or four inputs to: its conditional variances then keep enough digits (errors about 1e-10 for
#: singular covariances of three inputs, 1e-8 of four; well-conditioned ones are not touched).
EXACT_LIFT = {3: 1e-11, 4: 1e-9}

#: The shift m and variance s^2 of the smoothed activation <sigma(m + s v)>_v, v ~ N(0, 1).
SHIFT, SMOOTH_VAR = sp.Symbol("m_shift", real=True), sp.Symbol("s2_smooth", positive=True)


@dataclass(frozen=True)
class MomentRule:
    """How :func:`distinct_moment` computes four-point functions on three or four distinct inputs.

    ``kind`` is "exact", "trapezoid" or "panels" (see the section comment above); ``order`` the
    trapezoid points per whitened coordinate or the Gauss-Legendre points per panel (0 for
    "exact"); ``pieces[p - 1]`` = (A_p, B_p), the ascending coefficients of sigma^p = A_p + B_p H(z)
    (p = 1, 2; "exact" only); ``smoothed`` = <sigma(SHIFT + sqrt(SMOOTH_VAR) v)>_v in closed form, or
    None; ``error`` the estimated relative error of the trapezoid order (a one-dimensional probe,
    :func:`trapezoid_probe_error`), None for the other rules.
    """

    kind: str
    order: int
    pieces: tuple | None = None
    smoothed: sp.Expr | None = None
    error: float | None = field(default=None, compare=False)


def _coefficients(poly: sp.Poly) -> tuple:
    return tuple(float(c) for c in reversed(poly.all_coeffs()))


@lru_cache(maxsize=64)
def piecewise_polynomial(sigma: sp.Expr) -> tuple | None:
    """((A_1, B_1), (A_2, B_2)) with sigma^p = A_p(z) + B_p(z) H(z), A_p and B_p polynomials (ascending
    coefficients), when sigma is a polynomial on each side of 0 of degree <= MAX_EXACT_DEGREE; else None."""
    sides = []
    for side in (sp.Symbol("z_below", negative=True), sp.Symbol("z_above", positive=True)):
        expr = sp.expand(sigma.xreplace({S.z: side}).doit()).xreplace({side: S.z})
        if expr.free_symbols - {S.z} or not expr.is_polynomial(S.z):
            return None
        poly = sp.Poly(expr, S.z)
        if poly.degree() > MAX_EXACT_DEGREE:
            return None
        sides.append(poly)
    below, above = sides
    return tuple((_coefficients(below**p), _coefficients(above**p - below**p)) for p in (1, 2))


def _kinked_line_expectation(sigma_np, m: float, s: float) -> float:
    """<sigma(m + s v)>_v by composite Gauss-Legendre on [-12, 12] split at the kink v = -m/s."""
    t, v = np.polynomial.legendre.leggauss(40)
    edges = np.unique(np.clip(np.concatenate([np.linspace(-12, 12, 25), [-m / s]]), -12, 12))
    a, b = edges[:-1, None], edges[1:, None]
    x = ((a + b) / 2 + (b - a) / 2 * t).ravel()
    w = ((b - a) / 2 * v).ravel() * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    return float(np.sum(w * sigma_np(m + s * x)))


@lru_cache(maxsize=64)
def smoothed_activation(sigma: sp.Expr, tol: float = DEFAULT_TOL) -> sp.Expr | None:
    """<sigma(m + s v)>_v, v ~ N(0, 1), in SHIFT = m and SMOOTH_VAR = s^2, when the rules close it and
    it agrees with quadrature at a few (m, s^2) to 1e-9; else None."""
    shifted = sigma.xreplace({S.z: S.z + SHIFT})
    expr = gaussian_expectation(shifted, (S.z,), (SMOOTH_VAR,), tol=tol, numeric_subs={SHIFT: sp.Float(0.3)})
    if expr.has(GaussianExpectation) or expr.free_symbols - {SHIFT, SMOOTH_VAR}:
        return None

    def sigma_np(z):
        return np.asarray(evaluate(sigma, {S.z: z}), dtype=float)

    for m, s2 in ((0.0, 1.0), (0.7, 0.3), (-1.3, 2.5), (2.2, 0.01), (-0.4, 1e-4)):
        with np.errstate(all="ignore"):
            got = float(evaluate(expr, {SHIFT: m, SMOOTH_VAR: s2}))
            want = _kinked_line_expectation(sigma_np, m, np.sqrt(s2))
        if not np.isfinite(got) or abs(got - want) > 1e-9 * (1 + abs(want)):
            return None
    return expr


def trapezoid_rule(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and normalised Gaussian weights of the trapezoid rule on [-R, R], R = MOMENT_HALF_WIDTH."""
    x = np.linspace(-MOMENT_HALF_WIDTH, MOMENT_HALF_WIDTH, order)
    w = np.exp(-0.5 * x * x)
    return x, w / w.sum()


def trapezoid_probe_error(sigma_np, scale: float, order: int) -> float:
    """Relative error of the ``order``-point trapezoid rule for <sigma(a x + b)^P>, x ~ N(0, 1),
    a = ``scale``, b in {0, 0.37 a}, P in {2, 4}, against a rule four times finer.

    P = 4 is the worst case of a four-point function: all four inputs aligned, every factor then
    has its poles (or growth) along the same whitened coordinate.
    """
    x, w = trapezoid_rule(order)
    xr, wr = trapezoid_rule(4 * order + 1)
    worst = 0.0
    with np.errstate(all="ignore"):
        for b in (0.0, 0.37 * scale):
            s, sr = sigma_np(scale * x + b), sigma_np(scale * xr + b)
            for P in (2, 4):
                ref, size = np.sum(wr * sr**P), np.sum(wr * np.abs(sr) ** P)
                err = abs(np.sum(w * s**P) - ref) / max(size, 1e-300)
                worst = max(worst, err if np.isfinite(err) else np.inf)
    return worst


def moment_rule(activation: Activation, quad_order="auto", variance: float = 1.0, tol: float = DEFAULT_TOL
                ) -> MomentRule:
    """The rule for four-point functions on three or four distinct inputs (section comment above).

    Piecewise-polynomial activations get the exact reduction (``quad_order`` is not used), other
    kinked ones Gauss-Legendre panels of ``quad_order`` points (auto: :data:`PANEL_ORDER`), smooth ones
    the trapezoid rule of ``quad_order`` points per coordinate; ``"auto"`` takes the smallest order
    in :data:`AUTO_ORDERS` whose probe error (:func:`trapezoid_probe_error`) at the scale
    sqrt(``variance``), the largest variance of the inputs, is at most ``tol`` (the largest order
    if none is).
    """
    from .quadrature import is_kinked

    check_quad_order(quad_order)
    sigma = activation.sigma_numeric
    pieces = piecewise_polynomial(sigma)
    if pieces is not None:
        return MomentRule("exact", 0, pieces=pieces)
    smoothed = smoothed_activation(sigma, tol)
    if is_kinked(sigma):
        order = PANEL_ORDER if quad_order == "auto" else int(quad_order)
        return MomentRule("panels", order, smoothed=smoothed)
    scale = float(np.sqrt(max(variance, 0.0)))
    if quad_order != "auto":
        order = int(quad_order)
        return MomentRule("trapezoid", order, smoothed=smoothed, error=_probe(sigma, scale, order))
    for order in AUTO_ORDERS:
        err = _probe(sigma, scale, order)
        if err <= tol:
            break
    return MomentRule("trapezoid", order, smoothed=smoothed, error=err)


@lru_cache(maxsize=4096)
def _probe(sigma: sp.Expr, scale: float, order: int) -> float:
    """:func:`trapezoid_probe_error` of the SymPy ``sigma``, memoised."""

    def sigma_np(z):
        return np.asarray(evaluate(sigma, {S.z: z}), dtype=float)

    return trapezoid_probe_error(sigma_np, scale, order)


def check_quad_order(quad_order) -> None:
    """Raise DeriveError unless ``quad_order`` is "auto" or an integer >= 1."""
    if isinstance(quad_order, str):
        if quad_order != "auto":
            raise DeriveError(f"quad_order must be 'auto' or an integer >= 1, got '{quad_order}'")
        return
    if isinstance(quad_order, bool) or int(quad_order) != quad_order or quad_order < 1:
        raise DeriveError(f"quad_order must be 'auto' or an integer >= 1, got {quad_order}")


def diagonal_profile(s2: sp.Expr, k1: np.ndarray, depth: int, C_W: float, C_b: float) -> np.ndarray:
    """K_aa of layers 1..depth (the single-input recursion K' = C_b + C_W <sigma^2>_K), shape (depth, N)."""
    out = np.empty((depth, len(k1)))
    out[0] = k1
    for layer in range(1, depth):
        with np.errstate(all="ignore"):
            out[layer] = C_b + C_W * np.asarray(evaluate(s2, {S.K: out[layer - 1]}), dtype=float)
    return out


@dataclass(frozen=True)
class NumpyMoments:
    """sigma(z) and the smoothed activation as NumPy callables (the JAX iteration compiles its own)."""

    sigma_expr: sp.Expr
    smoothed_expr: sp.Expr | None

    def sigma(self, z):
        return np.asarray(evaluate(self.sigma_expr, {S.z: z}), dtype=float)

    def smoothed(self, m, s2):
        return np.asarray(evaluate(self.smoothed_expr, {SHIFT: m, SMOOTH_VAR: s2}), dtype=float)


def distinct_moment(xp, rule: MomentRule, sigma, smoothed, cov, powers: tuple, root):
    """E[prod_i sigma(z_i)^p_i], z ~ N(0, cov), by ``rule`` (see the section comment).

    ``xp`` is numpy or jax.numpy; ``sigma(z)`` and ``smoothed(m, s2)`` evaluate the activation and
    its smoothing in that namespace (``smoothed`` unused unless ``rule.smoothed``); ``root(cov)``
    returns the lower-triangular root. The quadrature rules put the inputs in decreasing order of
    their power, so that the last, integrated beforehand, has power 1.
    """
    if rule.kind == "exact":
        return exact_moment(xp, rule.pieces, cov, powers)
    order = np.argsort([-p for p in powers], kind="stable")
    cov = cov[order[:, None], order[None, :]]
    powers = tuple(powers[i] for i in order)
    L = root(cov)
    last = smoothed if rule.smoothed is not None else None
    if rule.kind == "trapezoid":
        return _trapezoid_moment(xp, sigma, last, L, powers, rule.order)
    return _panel_moment(xp, sigma, last, L, powers, rule.order)


# ----- exact rule


class _SteppedMoments:
    """E[prod_i z_i^k_i prod_{i in S} H(z_i) | z_J = 0] for z ~ N(0, C), C of shape (..., d, d),
    memoised over (J, k, S) (see the section comment; one instance per covariance batch)."""

    def __init__(self, xp, C):
        self.xp = xp
        self.conditioned = {frozenset(): C}
        self.memo: dict = {}

    def cov(self, J: frozenset):
        """The covariance given z_J = 0 (rows and columns of J left as they fall)."""
        if J not in self.conditioned:
            xp, j = self.xp, max(J)
            C = self.cov(J - {j})
            cjj = C[..., j, j]
            positive = cjj > 0
            update = C[..., :, j, None] * C[..., None, j, :] / xp.where(positive, cjj, 1.0)[..., None, None]
            self.conditioned[J] = C - xp.where(positive[..., None, None], update, 0.0)
        return self.conditioned[J]

    def moment(self, J: frozenset, k: tuple, steps: frozenset):
        key = (J, k, steps)
        if key in self.memo:
            return self.memo[key]
        i = next((a for a, ka in enumerate(k) if ka > 0), None)
        if i is None:
            out = self.orthant(J, sorted(steps))
        else:
            xp, C = self.xp, self.cov(J)
            rest = list(k)
            rest[i] -= 1
            out = 0.0
            for j in range(len(k)):
                if j in J:
                    continue
                if rest[j] > 0:  # d_j z_j^r = r z_j^(r-1)
                    lower = list(rest)
                    lower[j] -= 1
                    out = out + C[..., i, j] * rest[j] * self.moment(J, tuple(lower), steps)
                elif j in steps:  # d_j H(z_j) = delta(z_j): density at 0 times the conditioned moment
                    density = 1.0 / xp.sqrt(2 * np.pi * xp.maximum(C[..., j, j], 1e-300))
                    out = out + C[..., i, j] * density * self.moment(J | {j}, tuple(rest), steps - {j})
        self.memo[key] = out
        return out

    def orthant(self, J: frozenset, steps: list):
        """P(z_i > 0 for i in steps | z_J = 0)."""
        m = len(steps)
        if m == 0:
            return 1.0
        if m == 1:
            return 0.5
        C = self.cov(J)
        if m == 2:
            return 0.25 + _asin_correlation(self.xp, C, *steps) / (2 * np.pi)
        if m == 3:
            a, b, c = steps
            angles = (_asin_correlation(self.xp, C, a, b) + _asin_correlation(self.xp, C, a, c)
                      + _asin_correlation(self.xp, C, b, c))
            return 0.125 + angles / (4 * np.pi)
        return _orthant4(self.xp, C, steps)


def _asin_correlation(xp, C, a: int, b: int):
    """asin(rho_ab) = atan2(C_ab, sqrt(C_aa C_bb - C_ab^2)), accurate as |rho| -> 1."""
    det = C[..., a, a] * C[..., b, b] - C[..., a, b] ** 2
    return xp.arctan2(C[..., a, b], xp.sqrt(xp.maximum(det, 0.0)))


@lru_cache(maxsize=None)
def _orthant_nodes(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractions u = 1 - (1 - s)^2 of the angle and weights (Gauss-Legendre in s on [0, 1], times
    du/ds): the substitution removes the square-root end point singularity of a singular R."""
    t, v = np.polynomial.legendre.leggauss(n)
    s, w = (t + 1) / 2, v / 2
    return 1 - (1 - s) ** 2, w * 2 * (1 - s), s


def _orthant4(xp, C, steps: list):
    """P(z > 0) for four Gaussian variables (Plackett 1954): along R(t) = I + t (R - I),

        P(R) = 1/16 + (1/2 pi) sum_{i<j} int_0^{asin rho_ij} P(z_k > 0, z_l > 0 | z_i = z_j = 0; R(t)) dtheta,

    t = sin(theta) / rho_ij, with the bivariate orthant probability 1/4 + asin(rho_kl|ij)/(2 pi) of
    the conditional correlation. The angle is integrated by :data:`ORTHANT_ORDER` Gauss nodes.
    """
    sd = [xp.sqrt(xp.maximum(C[..., a, a], 1e-300)) for a in steps]
    rho = {(x, y): C[..., steps[x], steps[y]] / (sd[x] * sd[y]) for x in range(4) for y in range(4) if x != y}
    u, w, _ = _orthant_nodes(ORTHANT_ORDER)
    total = 1.0 / 16
    for i in range(4):
        for j in range(i + 1, 4):
            k, l = (x for x in range(4) if x not in (i, j))
            top = _asin_correlation(xp, C, steps[i], steps[j])[..., None]
            flat = xp.abs(top) < 1e-8
            t = xp.where(flat, u, xp.sin(top * u) / xp.where(flat, 1.0, xp.sin(top)))
            r = {key: value[..., None] * t for key, value in rho.items()}
            rij = r[i, j]
            # Schur complement of the (i, j) block, times 1 - r_ij^2.
            gap = 1 - rij * rij
            ckl = r[k, l] * gap - (r[k, i] * r[l, i] - rij * (r[k, i] * r[l, j] + r[k, j] * r[l, i])
                                   + r[k, j] * r[l, j])
            ckk = gap - (r[k, i] ** 2 - 2 * rij * r[k, i] * r[k, j] + r[k, j] ** 2)
            cll = gap - (r[l, i] ** 2 - 2 * rij * r[l, i] * r[l, j] + r[l, j] ** 2)
            angle = xp.arctan2(ckl, xp.sqrt(xp.maximum(ckk * cll - ckl * ckl, 0.0)))
            total = total + top[..., 0] * xp.sum(w * (0.25 + angle / (2 * np.pi)), axis=-1) / (2 * np.pi)
    return total


def _lift(xp, cov):
    """cov + max(0, EXACT_LIFT[d] * mean(diag cov) - lambda_min) I: a (numerically) singular
    covariance, whose conditional variances the reduction divides by, is made definite by that much."""
    d = cov.shape[-1]
    floor = EXACT_LIFT.get(d, EXACT_LIFT[4]) * xp.trace(cov, axis1=-2, axis2=-1) / d
    lift = xp.maximum(floor - xp.linalg.eigvalsh(cov)[..., 0], 0.0)
    return cov + lift[..., None, None] * np.eye(d)


def exact_moment(xp, pieces: tuple, cov, powers: tuple):
    """E[prod_i sigma(z_i)^p_i] for sigma^p = A_p + B_p H (``pieces``), z ~ N(0, cov), cov of shape
    (..., d, d): the expansion into E[prod z_i^k_i prod_{i in S} H(z_i)], each reduced exactly."""
    from itertools import product

    moments = _SteppedMoments(xp, _lift(xp, cov))
    choices = []
    for p in powers:
        below, step = pieces[p - 1]
        choices.append([(k, c, False) for k, c in enumerate(below) if c != 0]
                       + [(k, c, True) for k, c in enumerate(step) if c != 0])
    total = 0.0
    for combo in product(*choices):
        coeff = float(np.prod([c for _, c, _ in combo]))
        k = tuple(kk for kk, _, _ in combo)
        steps = frozenset(i for i, (_, _, s) in enumerate(combo) if s)
        total = total + coeff * moments.moment(frozenset(), k, steps)
    return total


# ----- quadrature rules


def _along(x: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    return x.reshape((1,) * axis + (-1,) + (1,) * (ndim - 1 - axis))


def _last_factor(xp, sigma, smoothed, m, s2, kdd):
    """<sigma(m + s v)>_v in closed form; sigma(m) itself where s^2 is negligible (singular K)."""
    live = s2 > 1e-100 * kdd
    return xp.where(live, smoothed(m, xp.where(live, s2, kdd)), sigma(m))


@lru_cache(maxsize=None)
def _interpolation_matrix(q: int) -> np.ndarray:
    """P with P @ f = the monomial coefficients, in tau = t - 1/2, of the polynomial through
    (t_j, f_j) at the q nodes t_j = j - q/2 + 1 (j = 0 .. q - 1) around the interval [0, 1]."""
    offsets = np.arange(q) - q / 2 + 0.5
    return np.linalg.inv(offsets[:, None] ** np.arange(q)[None, :])


def _tabulated_last_factor(xp, sigma, m, s, spread, x, w):
    """<sigma(m + s v)>_v tabulated with the trapezoid rule (x, w) at spacing delta on
    [-R spread, R spread] (TABLE_FACTOR * len(x) intervals, R = MOMENT_HALF_WIDTH, spread = the
    standard deviation of m; m is clipped to it, where the weight is below exp(-R^2/2)), and
    interpolated by the degree LAGRANGE_POINTS - 1 polynomial through the nodes around m's interval,
    kept per interval as monomial coefficients and evaluated by Horner's rule."""
    size, q = TABLE_FACTOR * len(x), LAGRANGE_POINTS
    pad = q // 2
    half = xp.maximum(MOMENT_HALF_WIDTH * spread, 1e-300)
    delta = 2 * half / size
    nodes = delta * (np.arange(size + 2 * pad + 1) - pad) - half
    table = xp.sum(w * sigma(nodes[:, None] + s * x), axis=-1)
    stencil = xp.stack([table[j + 1: j + 1 + size] for j in range(q)])  # (q, size): nodes i+1 .. i+q
    coefficients = _interpolation_matrix(q) @ stencil  # (q, size)
    offset = (xp.clip(m, -half, half) + half) / delta
    interval = xp.clip(xp.floor(offset).astype(np.int64), 0, size - 1)
    tau = offset - interval - 0.5
    out = coefficients[q - 1][interval]
    for k in range(q - 2, -1, -1):
        out = out * tau + coefficients[k][interval]
    return out


def _trapezoid_moment(xp, sigma, smoothed, L, powers: tuple, order: int):
    """The nested tensor trapezoid rule (section comment): coordinates u_0 .. u_(d-2) on the grid,
    sigma(z_k) on the first k + 1 of them, z_(d-1) integrated beforehand."""
    x, w = trapezoid_rule(order)
    d = len(powers)
    outer = d - 1
    m = sum(L[outer, j] * _along(x, j, outer) for j in range(outer))
    s2 = L[outer, outer] ** 2
    if smoothed is not None:
        G = _last_factor(xp, sigma, smoothed, m, s2, s2 + sum(L[outer, j] ** 2 for j in range(outer)))
    else:
        spread = xp.sqrt(sum(L[outer, j] ** 2 for j in range(outer)))
        G = _tabulated_last_factor(xp, sigma, m, L[outer, outer], spread, x, w)
    for k in reversed(range(outer)):
        z = sum(L[k, j] * _along(x, j, k + 1) for j in range(k + 1))
        G = xp.sum(_along(w, k, k + 1) * sigma(z) ** powers[k] * G, axis=-1)
    return G


def _panels(xp, breaks: list, order: int):
    """Gauss-Legendre nodes and Gaussian-weighted weights, ``order`` per panel between the sorted
    ``breaks`` (arrays of one shape, clipped to [-R, R]) and +-R; shape breaks' + (panels * order,)."""
    R = MOMENT_HALF_WIDTH
    t, v = np.polynomial.legendre.leggauss(order)
    shape = breaks[0].shape
    edges = xp.sort(xp.stack([xp.clip(b, -R, R) for b in breaks]
                             + [xp.full(shape, -R), xp.full(shape, R)], axis=-1), axis=-1)
    lo, hi = edges[..., :-1, None], edges[..., 1:, None]
    half = (hi - lo) / 2
    u = lo + half * (t + 1)
    weights = half * v * xp.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)
    return u.reshape(shape + (-1,)), weights.reshape(shape + (-1,))


def _safe_ratio(xp, num, den, fallback):
    ok = xp.abs(den) > 1e-300
    return xp.where(ok, num / xp.where(ok, den, 1.0), fallback)


def _panel_moment(xp, sigma, smoothed, L, powers: tuple, order: int):
    """The nested kink-aware rule (section comment); the last coordinate in closed form when
    ``smoothed`` is given, else as one more level."""
    R = MOMENT_HALF_WIDTH
    d = len(powers)
    levels = d - 1 if smoothed is not None else d
    coords, factors = [], []
    for k in range(levels):
        m = sum(L[k, j] * coords[j] for j in range(k)) if k else xp.zeros(())
        if k == 0:
            breaks = [m]
            for j in range(1, d):
                spread = xp.sqrt(sum(L[j, i] ** 2 for i in range(1, d)))
                width = _safe_ratio(xp, LAYER_WIDTHS * spread, xp.abs(L[j, 0]), R)
                breaks += [-width, width]
        else:
            breaks = [_safe_ratio(xp, -m, L[k, k], 0.0), xp.zeros(m.shape)]
        u, wk = _panels(xp, [xp.broadcast_to(b, m.shape) for b in breaks], order)
        coords = [c[..., None] for c in coords] + [u]
        factors.append(wk * sigma(m[..., None] + L[k, k] * u) ** powers[k])
    G = 1.0
    if smoothed is not None:
        last = d - 1
        m = sum(L[last, j] * coords[j] for j in range(last))
        s2 = L[last, last] ** 2
        G = _last_factor(xp, sigma, smoothed, m, s2, s2 + sum(L[last, j] ** 2 for j in range(last)))
    for k in reversed(range(levels)):
        G = xp.sum(factors[k] * G, axis=-1)
    return G


def _root(cov: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L L^T = cov: the Cholesky factor, or, where cov is singular
    (including in floating point only, where the eigenvalues are all positive but Cholesky breaks
    down), the triangular factor of the eigen-root (:func:`lower_triangular`)."""
    if np.all(np.linalg.eigvalsh(cov) > 0):
        try:
            return np.linalg.cholesky(cov + 1e-300 * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            pass
    return lower_triangular(np, _psd_root(cov))


def lower_triangular(xp, root):
    """L = R^T from the QR factorisation root^T = Q R, columns signed so that diag(L) >= 0: lower
    triangular with L L^T = root root^T, with no division by small pivots."""
    L = xp.linalg.qr(root.T, mode="r").T
    return L * xp.where(xp.diagonal(L) < 0, -1.0, 1.0)


def _psd_root(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return v * np.sqrt(np.clip(w, 0.0, None))


@dataclass
class BatchProfile:
    """Per-layer tensors (index 0 = layer 1): K (L, N, N), V (L, N, N, N, N), G1 (L, N, N), and how
    four-point functions on three or four distinct inputs were computed (:func:`describe_rules`)."""

    K: np.ndarray
    V: np.ndarray
    G1: np.ndarray
    quadrature: dict = field(default_factory=dict)


def batch_moment_rules(activation: Activation, s2: sp.Expr, k1: np.ndarray, depth: int, C_W: float,
                       C_b: float, quad_order="auto", tol: float = DEFAULT_TOL) -> tuple[MomentRule, ...]:
    """:func:`moment_rule` for each step of a batch iteration (entry l: the four-point functions of
    layer l + 1, l = 0 .. depth - 2; one entry when depth = 1), probed at that layer's largest K_aa
    from the single-input recursion (``s2`` = <sigma^2>_K), so the NumPy and JAX iterations choose
    the same rules. Batches of fewer than three inputs have no such functions: one rule throughout."""
    depth = int(depth)
    if len(k1) < 3 or depth < 2:
        return (moment_rule(activation, quad_order, 1.0, tol),) * max(depth - 1, 1)
    variances = diagonal_profile(s2, k1, depth, C_W, C_b)[:depth - 1].max(axis=1)
    return tuple(moment_rule(activation, quad_order, float(v), tol) for v in variances)


def describe_rules(rules: tuple) -> dict:
    """What :class:`BatchProfile` records: the rule, and the order and error estimate per step."""
    return {"rule": rules[0].kind, "orders": [r.order for r in rules],
            "error_estimates": [None if r.error is None else float(r.error) for r in rules],
            "smoothed_closed_form": rules[0].smoothed is not None}


def iterate_batch(activation: Activation, inputs, depth: int, C_W: float, C_b: float, *, widths=None,
                  quad_order="auto", tol: float = DEFAULT_TOL) -> BatchProfile:
    """Multi-input V_{(a1 a2)(a3 a4)} and G1_{ab} through depth (PDLT eqs. 4.90 and 4.115, with the
    raised indices contracted by Gaussian integration by parts).

    <(z_b1 z_b2 - K_b1b2) F>_K = sum_cd K_b1c K_b2d <d_c d_d F>_K turns the K^{-1}-raised sums of the
    reference recursion into lowered ones, so with f = sigma_a1 sigma_a2 and c's over {a1, a2}:

        V'_{(a1a2)(a3a4)} = C_W^2 [<s_a1 s_a2 s_a3 s_a4> - <s_a1 s_a2><s_a3 s_a4>]
                            + r C_W^2 / 4 sum_{c} V_{(c1c2)(c3c4)} <d_c1 d_c2 (s_a1 s_a2)> <d_c3 d_c4 (s_a3 s_a4)>
        G1'_{ab} = r C_W [ 1/2 sum_{cd} G1_{cd} <d_c d_d (s_a s_b)> + 1/8 sum_{c1..c4} V_{(c1c2)(c3c4)} <d^4 (s_a s_b)> ]

    On the diagonal (all indices equal) these are the single-input recursions. Four-point functions
    on three or four distinct inputs follow :func:`moment_rule` (``quad_order``: "auto" or an
    integer; see the section comment above :data:`MOMENT_HALF_WIDTH`): exact for piecewise-polynomial
    activations, a nested trapezoid rule meeting ``tol`` in its probe at each layer's largest variance
    for smooth ones, kink-aware Gauss-Legendre panels for other kinked ones. ``quadrature`` of the
    result describes the rule (:func:`describe_rules`).
    """
    from .api import check_inputs

    x = check_inputs(inputs)
    N = x.shape[0]
    if int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    n = np.broadcast_to(np.asarray(1.0 if widths is None else widths, dtype=float), (depth,)).astype(float)
    check_quad_order(quad_order)
    terms = batch_terms(activation, tol)
    bx, E2, s2, s4 = terms.pairs, terms.E2, terms.s2, terms.s4
    single = {"g1": terms.g1, "g2": terms.g2}

    Ks = np.empty((depth, N, N))
    Vs = np.zeros((depth, N, N, N, N))
    Gs = np.zeros((depth, N, N))
    K = C_b + C_W * x @ x.T / x.shape[1]
    rules = batch_moment_rules(activation, s2, np.diag(K).copy(), depth, C_W, C_b, quad_order, tol)
    numeric = NumpyMoments(activation.sigma_numeric, rules[0].smoothed)
    V = np.zeros((N,) * 4)
    G = np.zeros((N, N))
    pairs = [(a, b) for a in range(N) for b in range(N)]
    for layer in range(depth):
        Ks[layer], Vs[layer], Gs[layer] = K, V, G
        if layer == depth - 1:
            break
        r_ = n[layer] / n[layer - 1] if layer >= 1 else 1.0
        deriv = {(a, b): _derivative_table(bx, single, K, a, b) for a, b in pairs}
        two = np.empty((N, N))
        for a, b in pairs:
            two[a, b] = (float(evaluate(s2, {S.K: K[a, a]})) if a == b
                         else _pair_values(E2, K[a, a], K[a, b], K[b, b]))
        newV = np.empty_like(V)
        quartic_cache: dict = {}
        for a1, a2, a3, a4 in np.ndindex(*V.shape):
            key = tuple(sorted((a1, a2, a3, a4)))
            if key not in quartic_cache:
                quartic_cache[key] = _four_point(bx, s4, K, (a1, a2, a3, a4), rules[layer], numeric)
            gauss = quartic_cache[key] - two[a1, a2] * two[a3, a4]
            m12, m34 = deriv[(a1, a2)][2], deriv[(a3, a4)][2]
            acc = 0.0
            for c1 in {a1, a2}:
                for c2 in {a1, a2}:
                    for c3 in {a3, a4}:
                        for c4 in {a3, a4}:
                            acc += V[c1, c2, c3, c4] * _lookup(m12, (c1, c2)) * _lookup(m34, (c3, c4))
            newV[a1, a2, a3, a4] = C_W**2 * gauss + r_ * C_W**2 / 4 * acc
        newG = np.empty_like(G)
        for a, b in pairs:
            m2, m4 = deriv[(a, b)][2], deriv[(a, b)][4]
            ids = {a, b}
            acc2 = sum(G[c, dd] * _lookup(m2, (c, dd)) for c in ids for dd in ids)
            acc4 = sum(V[c1, c2, c3, c4] * _lookup(m4, (c1, c2, c3, c4))
                       for c1 in ids for c2 in ids for c3 in ids for c4 in ids)
            newG[a, b] = r_ * C_W * (acc2 / 2 + acc4 / 8)
        K = C_b + C_W * two
        V, G = newV, newG
    return BatchProfile(Ks, Vs, Gs, describe_rules(rules))


def __getattr__(name: str):
    # iterate_batch_jax lives in finite_width_batch, which imports JAX; load it on first use only.
    if name == "iterate_batch_jax":
        from .finite_width_batch import iterate_batch_jax

        return iterate_batch_jax
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
