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

with V = G1 = A = B = D = F = 0 at layer 1. Here E[z_i z_j] = delta_ij (K + G1/n_{l-1}),
Cov(z_i^2, z_j^2) = V/n_{l-1} (i != j), Var(H_ii) = (A + 2B)/n_{l-1} and
Cov(H_ii, z_i^2) = (D + 2F)/n_{l-1} for the NTK H. Every expectation goes through the rules
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
A_, B_, D_, F_ = (sp.Symbol(n, real=True) for n in ("A", "B", "D", "F"))

#: Order of the per-layer quantities (JSON keys).
QUANTITIES = ("K", "V", "G1", "Theta", "A", "B", "D", "F")
STATE = {"K": S.K, "V": S.V, "G1": S.G1, "Theta": S.Theta, "A": A_, "B": B_, "D": D_, "F": F_}


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
    }


def finite_width_maps(activation: Activation, tol: float = DEFAULT_TOL) -> FiniteWidthMaps:
    """Derive the single-input finite-width maps for ``activation`` (parameters at their values)."""
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
    rec = {
        "K": C_b + C_W * e["s2"],
        "V": C_W**2 * (e["s4"] - e["s2"] ** 2) + r * chi_par**2 * V,
        "G1": r * (chi_par * G1 + C_W / (8 * K**4) * e["s2_h4"] * V),
        "Theta": lb + lW * e["s2"] + chi_perp * Th,
        "B": C_W**2 * e["d4"] * Th**2 + r * chi_perp**2 * B_,
        "F": C_W**2 * e["s2d2"] * Th + r * chi_par**2 * F_,
        "D": (C_W * cov_s2_omega + r * C_W / (4 * K**4) * V * e["s2_h2"] * omega_h2
              + r * chi_par * chi_perp * D_),
        "A": (var_omega + r * V / (4 * K**4) * omega_h2**2 + r * chi_perp**2 * A_
              + r * chi_perp * omega_h2 * D_ / K**2),
    }
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
        """V/(n_{l-1} K^2), G1/(n_{l-1} K) and Var(H)/Theta^2 = (A + 2B)/(n_{l-1} Theta^2)."""
        K, V, G1 = self.values["K"], self.values["V"], self.values["G1"]
        Th, A, B = self.values["Theta"], self.values["A"], self.values["B"]
        n_prev = np.concatenate([[np.inf], self.widths[:-1]])
        with np.errstate(all="ignore"):
            return {"V_over_nK2": V / (n_prev * K**2), "G1_over_nK": G1 / (n_prev * K),
                    "varH_over_Theta2": (A + 2 * B) / (n_prev * Th**2), "l_over_n": np.arange(1, len(K) + 1) / n_prev}


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
             "V": 0.0, "G1": 0.0, "A": 0.0, "B": 0.0, "D": 0.0, "F": 0.0}
    out = {q: np.empty(depth) for q in QUANTITIES}
    order = ("K", "V", "G1", "Theta", "A", "B", "D", "F")
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
    order = ("V", "G1", "Theta", "B", "F", "D", "A")
    initial = {"V": 0, "G1": 0, "Theta": T1, "B": 0, "F": 0, "D": 0, "A": 0}
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
    """Slopes of V/(n K^2) and Var(H)/Theta^2 against l/n at the deepest layers, and the first layer
    where either exceeds :data:`TRUST_LIMIT` (there the O(1/n^2) terms are no longer small)."""
    norm = profile.normalised()
    x = norm["l_over_n"]
    out: dict = {}
    for key in ("V_over_nK2", "varH_over_Theta2"):
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


_ARGS = (S.K, S.V, S.G1, S.Theta, A_, B_, D_, F_, S.C_W, S.C_b, S.lambda_W, S.lambda_b, r)
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
                 (cb[0] + cw[0] * input_norm, 0.0, 0.0, lb[0] + lw[0] * input_norm, 0.0, 0.0, 0.0, 0.0))
    steps = depth - 1
    hyper = tuple(jnp.asarray(a[1:depth] if steps else a[:0], jnp.float64) for a in (cw, cb, lw, lb)) + (
        jnp.asarray(ratio[:steps], jnp.float64),)
    hist, last = run(init, hyper)
    order = ("K", "V", "G1", "Theta", "A", "B", "D", "F")
    return {q: np.concatenate([np.asarray(hist[i]), [float(last[i])]]) for i, q in enumerate(order)}


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


def _four_point(bx: BatchExpectations, single_s4: sp.Expr, act: Activation, K: np.ndarray, idx: tuple,
                quad_order: int) -> float:
    """<sigma_a1 sigma_a2 sigma_a3 sigma_a4>_K: closed/two-input forms when at most two inputs are
    distinct, tensor Gauss-Hermite quadrature over the distinct inputs otherwise."""
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
    return _gaussian_moment(act, K[np.ix_(distinct, distinct)], [idx.count(c) for c in distinct], quad_order)


def _gaussian_moment(act: Activation, cov: np.ndarray, powers: list, order: int) -> float:
    """E[prod_i sigma(z_i)^p_i], z ~ N(0, cov), by a tensor Gauss-Hermite rule on cov's Cholesky factor."""
    from .numeric import evaluate as ev

    x, w = np.polynomial.hermite_e.hermegauss(order)
    w = w / w.sum()
    d = len(powers)
    grids = np.meshgrid(*([x] * d), indexing="ij")
    weights = np.prod(np.meshgrid(*([w] * d), indexing="ij"), axis=0)
    L = _root(cov)
    pts = np.stack([g.ravel() for g in grids])  # (d, M)
    z = L @ pts
    vals = np.ones(z.shape[1])
    for i, p in enumerate(powers):
        vals = vals * np.asarray(ev(act.sigma_numeric, {S.z: z[i]}), dtype=float) ** p
    return float(np.sum(weights.ravel() * vals))


def _root(cov: np.ndarray) -> np.ndarray:
    """L with L L^T = cov: the Cholesky factor, or the eigen-root where cov is singular (including
    in floating point only, where the eigenvalues are all positive but Cholesky breaks down)."""
    if np.all(np.linalg.eigvalsh(cov) > 0):
        try:
            return np.linalg.cholesky(cov + 1e-300 * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            pass
    return _psd_root(cov)


def _psd_root(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return v * np.sqrt(np.clip(w, 0.0, None))


@dataclass
class BatchProfile:
    """Per-layer tensors (index 0 = layer 1): K (L, N, N), V (L, N, N, N, N), G1 (L, N, N)."""

    K: np.ndarray
    V: np.ndarray
    G1: np.ndarray


def iterate_batch(activation: Activation, inputs, depth: int, C_W: float, C_b: float, *, widths=None,
                  quad_order: int = 24, tol: float = DEFAULT_TOL) -> BatchProfile:
    """Multi-input V_{(a1 a2)(a3 a4)} and G1_{ab} through depth (PDLT eqs. 4.90 and 4.115, with the
    raised indices contracted by Gaussian integration by parts).

    <(z_b1 z_b2 - K_b1b2) F>_K = sum_cd K_b1c K_b2d <d_c d_d F>_K turns the K^{-1}-raised sums of the
    reference recursion into lowered ones, so with f = sigma_a1 sigma_a2 and c's over {a1, a2}:

        V'_{(a1a2)(a3a4)} = C_W^2 [<s_a1 s_a2 s_a3 s_a4> - <s_a1 s_a2><s_a3 s_a4>]
                            + r C_W^2 / 4 sum_{c} V_{(c1c2)(c3c4)} <d_c1 d_c2 (s_a1 s_a2)> <d_c3 d_c4 (s_a3 s_a4)>
        G1'_{ab} = r C_W [ 1/2 sum_{cd} G1_{cd} <d_c d_d (s_a s_b)> + 1/8 sum_{c1..c4} V_{(c1c2)(c3c4)} <d^4 (s_a s_b)> ]

    On the diagonal (all indices equal) these are the single-input recursions. Four-point functions
    on three or four distinct inputs use a tensor Gauss-Hermite rule of ``quad_order`` points per
    input (accurate for smooth activations; slowly convergent for kinks).
    """
    from .api import check_inputs

    x = check_inputs(inputs)
    N = x.shape[0]
    if int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    n = np.broadcast_to(np.asarray(1.0 if widths is None else widths, dtype=float), (depth,)).astype(float)
    terms = batch_terms(activation, tol)
    bx, E2, s2, s4 = terms.pairs, terms.E2, terms.s2, terms.s4
    single = {"g1": terms.g1, "g2": terms.g2}

    Ks = np.empty((depth, N, N))
    Vs = np.zeros((depth, N, N, N, N))
    Gs = np.zeros((depth, N, N))
    K = C_b + C_W * x @ x.T / x.shape[1]
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
                quartic_cache[key] = _four_point(bx, s4, activation, K, (a1, a2, a3, a4), quad_order)
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
    return BatchProfile(Ks, Vs, Gs)


def __getattr__(name: str):
    # iterate_batch_jax lives in finite_width_batch, which imports JAX; load it on first use only.
    if name == "iterate_batch_jax":
        from .finite_width_batch import iterate_batch_jax

        return iterate_batch_jax
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
