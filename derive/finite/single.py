"""Finite-width corrections at order 1/n for a single input through a dense network (PDLT ch. 4, 5, 8,
9, 11; Yaida 2019).

The dense network is the architecture ``dense, (activation, dense) x (L - 1)``, and everything here
comes from its layer rules through the one finite-width engine: K, V and G1 from the dense rule's
conditional variance by the delta method (:mod:`derive.finite.collective`), Theta from the rules'
NTK maps, and A, B, D, F, P, Q from the dense rule's ``[finite_width.ntk]`` table
(``rules/layers/dense.toml``), where the maps below are written as data with E(.) and s = sigma;
:func:`iterate` walks the architecture (:func:`derive.finite.arch.arch_finite_width`).

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

from derive.backends.precision import float64
from derive.core import budget
from derive.core import symbols as S
from derive.core.display import QUANTITY_LATEX, aligned, markdown_table, markdown_text
from derive.core.errors import DeriveError
from derive.finite.collective import activation_table, dense_after_activation, ntk_maps
from derive.rules.activations import Activation, as_activation
from derive.rules.layers import act, find_layer_rule
from derive.symbolic.expectations import expect
from derive.symbolic.maps import activation_maps, after_dense, ntk_coefficient
from derive.symbolic.quadrature import DEFAULT_TOL, GaussianExpectation

r = S.r
A_, B_, D_, F_, P_, Q_ = S.A, S.B, S.D, S.F, S.P, S.Q

#: Order of the per-layer quantities (JSON keys).
QUANTITIES = ("K", "V", "G1", "Theta", "A", "B", "D", "F", "P", "Q")
STATE = {"K": S.K, "V": S.V, "G1": S.G1, "Theta": S.Theta, "A": A_, "B": B_, "D": D_, "F": F_, "P": P_, "Q": Q_}


@dataclass(frozen=True)
class FiniteWidthMaps:
    """The one-step maps of every quantity for a dense layer after ``activation`` (module docstring),
    in the state symbols, C_W, C_b, lambda_W, lambda_b and r; ``expectations`` the Gaussian
    expectations they are written with (from the same cache)."""

    activation: Activation
    expectations: dict
    recursions: dict
    tol: float = DEFAULT_TOL

    @property
    def closed_form(self) -> bool:
        return not any(e.has(GaussianExpectation) for e in self.recursions.values())


@lru_cache(maxsize=64)
def single_expectations(sigma: sp.Expr, dsigma: sp.Expr, tol: float) -> dict:
    """The single-input Gaussian expectations PDLT's maps are written with (module docstring)."""
    z, K = S.z, S.K

    def E(f):
        return expect(f, (z,), tol)

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
    """The single-input finite-width maps of a dense layer after ``activation`` (parameters at their
    values; the layer's C_W, C_b, lambda_W, lambda_b symbolic), derived from the layer rules: the one
    derivation every architecture uses (module docstring). ``activation``: an Activation, or a rule
    name or expression in z."""
    activation = as_activation(activation)
    dense = find_layer_rule("dense")
    fw = dense_after_activation(activation, tol)
    am = activation_maps(activation, tol, numeric=True)
    theta = after_dense(am.single_kernel, "single_ntk", ntk_coefficient(am.single_ntk, S.Theta))
    fluctuations = ntk_maps(dense.finite_width_ntk, (), act(0, 0, S.z), (activation_table(activation),), tol)
    recursions = {"K": fw["K"], "V": fw["V"], "G1": fw["G1"], "Theta": theta, **fluctuations}
    e = single_expectations(activation.sigma_numeric, activation.derivative(numeric=True), tol)
    return FiniteWidthMaps(activation, e, {q: recursions[q] for q in QUANTITIES}, tol)


def _per_layer(value, depth: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=float), (depth,)).astype(float)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise DeriveError(f"{name} must be finite and >= 0")
    return arr


def check_depth(depth) -> int:
    """``depth`` as an int >= 1 whose walk fits the work limit (:func:`derive.core.budget.finite_width`)."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer, float)) or not np.isfinite(depth) \
            or int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    budget.check(budget.finite_width(int(depth)))
    return int(depth)


def _layer_setup(depth, C_W, C_b, lambda_W, lambda_b, k1, widths, input_norm):
    """Validated per-layer hyperparameters, widths and the input norm x.x/n_0 implied by K^(1)."""
    depth = check_depth(depth)
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


@dataclass(repr=False)
class FiniteWidthProfile:
    """Per-layer values, index 0 = layer 1, plus normalised fluctuations; ``activation`` names sigma."""

    values: dict
    widths: np.ndarray  # n_1..n_L
    closed_form: dict = field(default_factory=dict)
    activation: str = ""

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

    @property
    def depth(self) -> int:
        return len(self.values["K"])

    def _uniform(self) -> bool:
        return bool(np.all(self.widths == 1.0))

    def __repr__(self) -> str:
        name = f"{self.activation}, " if self.activation else ""
        widths = "quantities per 1/n" if self._uniform() else f"widths {_widths_text(self.widths)}"
        return (f"FiniteWidthProfile({name}{self.depth} layers, {widths}: "
                f"{', '.join(q for q in QUANTITIES if q in self.values)})")

    def _repr_markdown_(self) -> str:
        per_n = self._uniform()
        norm = {} if per_n else self.normalised()
        layers = range(self.depth)
        head = (f"**Finite-width corrections** of {markdown_text(self.activation) or 'a dense network'}, {self.depth} layers, "
                + ("widths not given: every 1/n quantity is shown as its coefficient" if per_n
                   else f"widths $n_1, \\dots, n_L$ = {_widths_text(self.widths)}") + " (PDLT ch. 4, 8, 11)")
        legend = ("With $n = n_{\\ell-1}$: $\\mathbb{E}[z_i z_i] = K + G^{\\{1\\}}/n$, $V$ the four-point vertex "
                  "(the connected four-point function is of order $V/n$), $\\mathbb{E}[\\hat\\Theta] = \\Theta$ at "
                  "infinite width, $A, B, D, F$ the NTK's fluctuations ($\\mathrm{Var}\\,\\hat\\Theta = (A + 2B)/n$) "
                  "and $P, Q$ the dNTK's.")

        def table(quantities, extra):
            header = ["$\\ell$", *(f"${QUANTITY_LATEX[q]}$" for q in quantities), *(label for label, _ in extra)]
            rows = [[i + 1, *(self.values[q][i] for q in quantities), *(norm[k][i] for _, k in extra)]
                    for i in layers]
            return markdown_table(header, rows)

        kernel_extra = [] if per_n else [("$V/(nK^2)$", "V_over_nK2"), ("$G^{\\{1\\}}/(nK)$", "G1_over_nK")]
        ntk_extra = [] if per_n else [("$\\mathrm{Var}\\,\\hat\\Theta/\\Theta^2$", "varH_over_Theta2"),
                                      ("$(P + 2Q)/(n\\Theta^2)$", "dH_over_nTheta2")]
        lines = [head, "", legend, "", table([q for q in ("K", "G1", "V") if q in self.values], kernel_extra), "",
                 table([q for q in ("Theta", "A", "B", "D", "F", "P", "Q") if q in self.values], ntk_extra)]
        if self.closed_form:
            lines += ["", "Closed forms in the depth $\\ell$:", "",
                      aligned([f"{QUANTITY_LATEX.get(q, q)}^{{(\\ell)}} &= {sp.latex(e)}"
                               for q, e in self.closed_form.items()])]
        return "\n".join(lines)


def _widths_text(widths) -> str:
    w = np.asarray(widths, dtype=float)
    if w.size and np.all(w == w[0]):
        return f"{w[0]:g} (uniform)"
    return "[" + ", ".join(f"{x:g}" for x in w) + "]"


def iterate(maps: FiniteWidthMaps, depth: int, C_W, C_b, lambda_W=None, lambda_b=None, *, k1: float | None = None,
            widths=None, input_norm: float = 1.0) -> FiniteWidthProfile:
    """Walk the dense network of ``depth`` layers with ``maps.activation`` through the finite-width engine
    (:func:`derive.finite.arch.arch_finite_width`): per-layer values of every quantity.

    Args:
        C_W, C_b, lambda_W, lambda_b: scalars or per-layer sequences (entry l is used by layer l+1;
            entry 0 by the first layer); lambda_W, lambda_b default to C_W, C_b.
        k1: K^(1); default C_b + C_W * input_norm with input_norm = x.x/n_0.
        widths: n_1..n_L (a scalar for a uniform width); only ratios r = n_l/n_{l-1} and the
            normalisations use them. Default: uniform (r = 1).
    """
    from derive.arch.description import dense_network
    from derive.finite.arch import arch_finite_width

    cw, cb, lw, lb, n, input_norm = _layer_setup(depth, C_W, C_b, lambda_W, lambda_b, k1, widths, input_norm)
    net = dense_network(maps.activation, int(depth), cw, cb, lw, lb, None if widths is None else n)
    with np.errstate(all="ignore"):
        fw = arch_finite_width(net, input_norm=float(input_norm), tol=maps.tol)
    return FiniteWidthProfile({q: np.array(fw.values[q], dtype=float) for q in QUANTITIES}, n,
                              activation=maps.activation.name)


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
    from derive.symbolic.critical import is_scale_invariant

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
    """Everything ``derive finite-width`` reports, as a JSON-ready dict (index 0 = layer 1); the
    activation an Activation, or a rule name or expression in z."""
    check_depth(depth)
    activation = as_activation(activation)
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


@float64
def iterate_jax(maps: FiniteWidthMaps, depth: int, C_W, C_b, lambda_W=None, lambda_b=None, *,
                k1: float | None = None, widths=None, input_norm: float = 1.0) -> dict:
    """The same iteration as :func:`iterate`, code-generated to JAX and jit-compiled (``lax.scan``
    over layers). Returns {quantity: array of per-layer values}."""
    import jax
    import jax.numpy as jnp

    from derive.backends.codegen import to_jax

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


__all__ = ["FiniteWidthMaps", "FiniteWidthProfile", "QUANTITIES", "STATE", "TRUST_LIMIT", "closed_forms_in_depth",
           "depth_to_width", "finite_width_maps", "finite_width_report", "iterate", "iterate_jax", "r",
           "single_expectations"]
