"""The expectation engine and the kernel derivations against an independent mpmath reference.

Every shipped activation (default parameters, and one other parameter set for a few), and a handful
of user expressions, is derived by :func:`derive.symbolic.recursions.derive_kernel`; the four expectations it
returns are evaluated with :func:`derive.symbolic.numeric.evaluate` and compared with tests/reference.py,
which integrates sigma (the rule's formula, SymPy -> mpmath) numerically at 25 digits, in polar
coordinates when sigma has kinks and on a Cartesian trapezoidal grid when it is smooth; it shares
no code with the engine. sigma' for the reference is SymPy's derivative of sigma with the Dirac
deltas dropped (the almost-everywhere derivative the NTK uses), checked against mpmath's numerical
differentiation away from the kinks.

Direct :func:`derive.symbolic.expectations.gaussian_expectation` calls cover each rewrite: Stein's lemma,
Wick/Isserlis, the characteristic function, exponential tilting, the erf-squared and shifted-step
single-input forms and conditioning on a Dirac delta.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mpmath as mp
import pytest
import sympy as sp
from reference import expect1, expect2

from derive.core import symbols as S
from derive.rules.activations import resolve
from derive.rules.files import activation_names
from derive.symbolic.expectations import gaussian_expectation
from derive.symbolic.numeric import evaluate
from derive.symbolic.recursions import derive_kernel

#: Agreement required between the engine and the reference (see ``assert_close``).
RTOL = 1e-10
#: Fraction of the Cauchy-Schwarz scale below which an expectation counts as vanishing.
FLOOR = 1e-3

#: A second parameter set for some rules (the defaults are always tested).
OTHER_PARAMS = {
    "leaky_relu": {"a": "0.2"},
    "abrelu": {"a": "-0.5", "b": "2"},
    "erf": {"a": "1.5", "b": "0.7", "c": "0.3"},
    "sin": {"a": "2", "b": "1.5", "c": "0.4"},
    "exp": {"a": "0.5", "b": "0.8"},
    "rectified_monomial": {"degree": "3"},
}

#: Activations typed as expressions (rule functions may be called inside them).
USER_EXPRESSIONS = ["z*erf(z)", "relu(z) + 0.1*z", "z**3 - z", "exp(-z**2)*z", "Abs(z)*z", "Max(z, 0.2*z)",
                    "sin(2*z)*z"]


def _rho_cov(k11: float, rho: float, k22: float) -> tuple[float, float, float]:
    return k11, rho * math.sqrt(k11 * k22), k22


#: Two-input covariances (K11, K12, K22): small and moderate variances, rho = 0.3, -0.7, +-(1 - 1e-6),
#: and exactly +-1 (K12 = +-K11 = +-K22, where sqrt(K11 K22 - K12^2) vanishes exactly).
COVARIANCES = {
    "small-rho0.3": _rho_cov(1e-3, 0.3, 2e-3),
    "K4-rho-0.7": _rho_cov(4.0, -0.7, 1.0),
    "rho0.999999": _rho_cov(2.0, 0.999999, 0.5),
    "rho-0.999999": _rho_cov(0.3, -0.999999, 3.0),
    "rho1-exact": (1.5, 1.5, 1.5),
    "rho-1-exact": (0.7, -0.7, 0.7),
}
#: Single-input variances.
VARIANCES = (1e-3, 0.5, 2.0, 4.0)

_KINKY = (sp.Heaviside, sp.Abs, sp.sign, sp.Max, sp.Min, sp.Piecewise)


# ------------------------------------------------------------------------------------ helpers


def _case_id(spec: str, params: dict | None) -> str:
    return spec if not params else spec + "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]"


CASES = ([(name, None) for name in activation_names()] + [(n, p) for n, p in OTHER_PARAMS.items()]
         + [(e, None) for e in USER_EXPRESSIONS])
CASE_IDS = [_case_id(*c) for c in CASES]
CASE_BY_ID = dict(zip(CASE_IDS, CASES))
#: A kinked activation without a closed form (see test_kinked_activation_without_closed_form).
KINKED_QUADRATURE = "relu(z)*tanh(z)"
CASE_BY_ID[KINKED_QUADRATURE] = (KINKED_QUADRATURE, None)


def kinks(expr: sp.Expr, var: sp.Symbol) -> tuple[float, ...]:
    """Points where ``expr`` (in ``var``) or a derivative may jump: zeros of step/abs/sign/max args."""
    pts = set()
    for node in expr.atoms(*_KINKY):
        if isinstance(node, (sp.Max, sp.Min)):
            args = [a - b for a in node.args for b in node.args if a is not b]
        elif isinstance(node, sp.Piecewise):
            args = [c.lhs - c.rhs for _, c in node.args if isinstance(c, sp.core.relational.Relational)]
        else:
            args = [node.args[0]]
        for arg in args:
            for root in sp.solve(sp.Eq(arg, 0), var):
                if root.is_real:
                    pts.add(float(root))
    return tuple(sorted(pts))


def ae_derivative(expr: sp.Expr, var: sp.Symbol) -> sp.Expr:
    """sigma' almost everywhere: SymPy's derivative with every Dirac delta set to zero."""
    d = sp.diff(expr, var)
    return d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))


def mp_function(expr: sp.Expr, var: sp.Symbol):
    """``expr`` as a callable on mpmath numbers."""
    return sp.lambdify(var, expr, modules="mpmath")


class Reference:
    """sigma and sigma' of one case as mpmath callables, with cached reference expectations."""

    def __init__(self, case_id: str):
        spec, params = CASE_BY_ID[case_id]
        self.activation = resolve(spec, params)
        self.sigma = self.activation.sigma_numeric
        self.dsigma = ae_derivative(self.sigma, S.z)
        self.kinks = kinks(self.sigma, S.z)
        self.fn = {"sigma": mp_function(self.sigma, S.z), "dsigma": mp_function(self.dsigma, S.z)}

    @lru_cache(maxsize=None)
    def single(self, which: str, K: float):
        """<f(z)^2>_K for f = sigma or sigma'."""
        f = self.fn[which]
        return expect1(lambda t: f(t) ** 2, K, kinks=self.kinks)

    @lru_cache(maxsize=None)
    def pair(self, which: str, cov: tuple):
        """<f(z1) f(z2)>_K for f = sigma or sigma'."""
        f = self.fn[which]
        return expect2((f, f), *cov, kinks1=self.kinks, kinks2=self.kinks)


@lru_cache(maxsize=None)
def reference(case_id: str) -> Reference:
    return Reference(case_id)


@lru_cache(maxsize=None)
def derivation(case_id: str):
    spec, params = CASE_BY_ID[case_id]
    return derive_kernel(resolve(spec, params))


def assert_close(value: float, ref, scale, what: str) -> None:
    """|value - ref| <= RTOL * max(|ref|, FLOOR * scale()).

    ``scale()`` is a natural size of the quantity, an upper bound of |ref|: the Cauchy-Schwarz bound
    sqrt(<f(z1)^2> <f(z2)^2>) >= |<f(z1) f(z2)>| for kernels, <|f|> for a direct integrand. A purely
    relative test is meaningless where the expectation vanishes or nearly vanishes by symmetry or
    cancellation (an odd integrand such as exp(-z1^2) erf(z2), sin/cos kernels crossing zero):
    there both sides are rounding noise of terms of size ``scale``. The floor, a thousandth of
    that scale, only takes over in such cases (it is computed only then); elsewhere the test is
    the full relative 1e-10.
    """
    ref = float(ref)
    assert math.isfinite(value), f"{what}: engine gave {value}"
    bound = RTOL * abs(ref)
    if abs(value - ref) > bound:
        bound = max(bound, RTOL * FLOOR * float(scale()))
    assert abs(value - ref) <= bound, (
        f"{what}: engine {value!r}, reference {ref!r}, |diff| {abs(value - ref):.3e} > {bound:.3e}")


def engine_value(expr: sp.Expr, values: dict) -> float:
    return float(evaluate(expr, values))


# ----------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("cov", [(1.0, 0.0, 2.0), _rho_cov(0.5, -0.7, 3.0), _rho_cov(4.0, 1 - 1e-9, 1.0),
                                 (2.0, 2.0, 2.0)])
def test_reference_wick_moments(cov):
    k11, k12, k22 = cov
    assert expect2(lambda a, b: a * a * b * b, *cov) == pytest.approx(k11 * k22 + 2 * k12 ** 2, rel=1e-14)
    assert expect2(lambda a, b: a ** 3 * b, *cov) == pytest.approx(3 * k11 * k12, rel=1e-14, abs=1e-15)
    assert expect1(lambda t: t ** 4, k11) == pytest.approx(3 * k11 ** 2, rel=1e-14)


@pytest.mark.parametrize("rho", [0.0, 0.3, -0.7, 0.999999, -0.999999, 1 - 1e-12, 1.0, -1.0])
def test_reference_sheppard_and_arccos(rho):
    """Orthant probability (Sheppard 1899) and the order-1 arc-cosine kernel (Cho & Saul 2009)."""
    k11, k12, k22 = 0.5, rho, 2.0  # rho = K12 exactly
    with mp.workdps(30):
        theta = mp.acos(mp.mpf(k12) / mp.sqrt(mp.mpf(k11) * k22))
        orthant = (mp.pi - theta) / (2 * mp.pi)
        arccos1 = (mp.sqrt(k11 * k22) * (mp.sin(theta) + (mp.pi - theta) * mp.cos(theta))) / (2 * mp.pi)
    step = expect2(lambda a, b: (a > 0) * (b > 0) * mp.mpf(1), k11, k12, k22)
    relu = expect2(lambda a, b: max(a, 0) * max(b, 0), k11, k12, k22)
    # Both vanish at rho = -1: measured against their sizes at rho = 1 (1/2 and sqrt(K11 K22) / 2).
    assert abs(step - orthant) <= 1e-14 * max(orthant, 0.5)
    assert abs(relu - arccos1) <= 1e-14 * max(arccos1, 0.5)
    if rho == 0.0:
        assert step == pytest.approx(0.25, rel=1e-15)


def test_reference_product_at_zero_correlation_and_marginals():
    """2-D integration of integrands with poles near the real axis against 1-D integrals."""
    def sigmoid(t):
        return 1 / (1 + mp.exp(-t))

    def tanh2(t):
        return mp.tanh(t) ** 2

    both = expect2((tanh2, sigmoid), 4.0, 0.0, 3.0, kinks1=(), kinks2=())
    assert both == pytest.approx(expect1(tanh2, 4.0, kinks=()) * expect1(sigmoid, 3.0, kinks=()), rel=1e-13)
    marginal = expect2((lambda t: 1, tanh2), *_rho_cov(1.0, 0.999999, 4.0), kinks1=(), kinks2=())
    assert marginal == pytest.approx(expect1(tanh2, 4.0, kinks=()), rel=1e-13)


def test_reference_shifted_kinks():
    """P(z1 > 0.5, z2 > -0.3) against a 1-D integral of the conditional normal CDF."""
    k11, k12, k22 = _rho_cov(1.3, 0.6, 0.8)
    got = expect2(lambda a, b: mp.mpf((a > 0.5) * (b > -0.3)), k11, k12, k22, kinks1=(0.5,), kinks2=(-0.3,))
    with mp.workdps(30):
        cond_sd = mp.sqrt(k22 - mp.mpf(k12) ** 2 / k11)

        def integrand(z1):
            dens = mp.npdf(z1, 0, mp.sqrt(k11))
            return dens * mp.ncdf((mp.mpf(k12) / k11 * z1 + mp.mpf("0.3")) / cond_sd)

        want = mp.quad(integrand, [0.5, 3, 8, mp.inf])
    assert abs(got - want) <= 1e-14


def test_reference_polar_and_cartesian_agree():
    """The two 2-D methods on smooth integrands with poles near the real axis (K up to 4)."""
    def sigmoid(t):
        return 1 / (1 + mp.exp(-t))

    for cov in (_rho_cov(4.0, -0.7, 1.0),):
        polar = expect2((mp.tanh, sigmoid), *cov, kinks1=(), kinks2=(), method="polar")
        cartesian = expect2((mp.tanh, sigmoid), *cov, kinks1=(), kinks2=(), method="cartesian")
        assert abs(polar - cartesian) <= 1e-14 * abs(cartesian), cov


def test_reference_single_input_shift_and_zero_variance():
    assert expect1(lambda t: mp.mpf(t > 0.3), 0.7, kinks=(0.3,)) == pytest.approx(
        float(mp.ncdf(-0.3 / mp.sqrt(0.7))), rel=1e-14)
    assert expect1(mp.cos, 0.0) == 1


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_reference_derivative_is_sigma_prime(case_id):
    """The reference's sigma' (SymPy, deltas dropped) is sigma' by numerical differentiation."""
    ref = reference(case_id)
    sigma, dsigma = ref.fn["sigma"], ref.fn["dsigma"]
    with mp.workdps(30):
        for t in (-2.3, -0.7, -0.05, 0.11, 0.9, 1.7):
            if any(abs(t - k) < 0.02 for k in ref.kinks):
                continue
            num = mp.diff(sigma, mp.mpf(t))
            assert abs(dsigma(mp.mpf(t)) - num) <= 1e-20 * max(1, abs(num)), (case_id, t)


# ------------------------------------------------------------------- activations, two inputs


@pytest.mark.slow
@pytest.mark.parametrize("cov_id", list(COVARIANCES))
@pytest.mark.parametrize("quantity", ["expectation", "derivative_expectation"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_two_input_expectations(case_id, quantity, cov_id):
    """<sigma(z1) sigma(z2)>_K and <sigma'(z1) sigma'(z2)>_K as derived, at each covariance."""
    cov = COVARIANCES[cov_id]
    d = derivation(case_id)
    ref = reference(case_id)
    which = "sigma" if quantity == "expectation" else "dsigma"
    value = engine_value(d.numeric(getattr(d, quantity)), dict(zip((S.K11, S.K12, S.K22), cov)))
    want = ref.pair(which, cov)
    assert_close(value, want, lambda: mp.sqrt(ref.single(which, cov[0]) * ref.single(which, cov[2])),
                 f"{case_id} {quantity} at {cov_id} {cov}")


@pytest.mark.parametrize("K", VARIANCES)
@pytest.mark.parametrize("quantity", ["single_expectation", "single_derivative_expectation"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_single_input_expectations(case_id, quantity, K):
    """<sigma(z)^2>_K and <sigma'(z)^2>_K as derived."""
    d = derivation(case_id)
    ref = reference(case_id)
    which = "sigma" if quantity == "single_expectation" else "dsigma"
    value = engine_value(d.numeric(getattr(d, quantity)), {S.K: K})
    want = ref.single(which, K)
    assert_close(value, want, lambda: want, f"{case_id} {quantity} at K = {K}")


def test_kinked_activation_without_closed_form():
    """A user activation with a kink and no closed form: the engine's quadrature must still hold."""
    d, ref = derivation(KINKED_QUADRATURE), reference(KINKED_QUADRATURE)
    cov = _rho_cov(1.0, 0.3, 2.0)
    for quantity, which in (("expectation", "sigma"), ("derivative_expectation", "dsigma")):
        value = engine_value(d.numeric(getattr(d, quantity)), dict(zip((S.K11, S.K12, S.K22), cov)))
        scale = mp.sqrt(ref.single(which, cov[0]) * ref.single(which, cov[2]))
        assert_close(value, ref.pair(which, cov), lambda: scale, f"{KINKED_QUADRATURE} {quantity} at {cov}")


# ------------------------------------------------------------- direct gaussian_expectation calls

z, z1, z2 = S.z, S.z1, S.z2
H = sp.Heaviside
HALF, TENTH = sp.Rational(1, 2), sp.Rational(1, 10)

#: Two-input integrands, one or more per rewrite the engine applies, with their kinks (z1, z2).
DIRECT_TWO = {
    "stein": (z1 * H(z1) * H(z2), (0,), (0,)),
    "stein-erf": (z1 * z2 ** 2 * sp.erf(z2), (), ()),
    "wick": (z1 ** 3 * z2 ** 3, (), ()),
    "wick-mixed": (z1 ** 4 * z2 ** 2 - 3 * z1 * z2, (), ()),
    "characteristic-function": (sp.cos(z1) * sp.sin(z2 + 1), (), ()),
    "tilting-odd": (sp.exp(-z1 ** 2) * sp.erf(z2), (), ()),
    "tilting-shifted": (sp.exp(-z1 ** 2 + z1 / 2) * sp.erf(z2), (), ()),
    "tilting-cross": (sp.exp(-z1 * z2 / 5 + z1 / 2) * z2, (), ()),
    "abs-sign-max-min": (sp.Abs(z1) * sp.sign(z2) + sp.Max(z1, 0) * sp.Min(3 * z2, 0), (0,), (0,)),
    "relu-product-derivative": (sp.diff(z1 * H(z1) * z2 * H(z2), z1, z2), (0,), (0,)),
}

#: Covariances for the direct two-input calls.
DIRECT_COVARIANCES = [_rho_cov(1.0, 0.3, 2.0), _rho_cov(0.5, -0.7, 3.0), _rho_cov(2.0, 0.999999, 1.5),
                      (0.8, 0.8, 0.8)]


#: Engine defects these tests expose, as strict xfails (a fixed defect turns its xfail into a
#: failure, so that the mark is removed). Keys: (integrand name, index of the covariance or
#: variance, or None for all of them). Empty while the engine agrees with the reference everywhere.
ENGINE_BUGS: dict[tuple[str, int | None], str] = {}


def _direct_params(names, values, ids):
    out = []
    for name in names:
        for i, (value, vid) in enumerate(zip(values, ids)):
            reason = ENGINE_BUGS.get((name, i)) or ENGINE_BUGS.get((name, None))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
            out.append(pytest.param(name, value, marks=marks, id=f"{name}-{vid}"))
    return out


def _expect2_sympy(expr: sp.Expr, cov, kinks1, kinks2):
    """(<expr>, a callable giving <|expr|>) by the reference."""
    # Dirac deltas only appear multiplied by their own argument here (d/dz of z H(z)): zero a.e.
    expr = expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    f = sp.lambdify((z1, z2), expr, modules="mpmath")
    g = sp.lambdify((z1, z2), sp.Abs(expr), modules="mpmath")
    kw = {"kinks1": kinks1, "kinks2": kinks2}
    return expect2(f, *cov, **kw), lambda: expect2(g, *cov, **kw)


@pytest.mark.parametrize(("name", "cov"), _direct_params(DIRECT_TWO, DIRECT_COVARIANCES,
                                                         ["rho0.3", "rho-0.7", "rho0.999999", "rho1-exact"]))
@pytest.mark.slow
def test_direct_two_input(name, cov):
    expr, kinks1, kinks2 = DIRECT_TWO[name]
    result = gaussian_expectation(expr, (z1, z2))
    value = engine_value(result, dict(zip((S.K11, S.K12, S.K22), cov)))
    want, scale = _expect2_sympy(expr, cov, kinks1, kinks2)
    # <|f|> bounds |<f>| like the Cauchy-Schwarz scale does for products (see assert_close).
    assert_close(value, want, scale, f"<{expr}> at {cov}")


def test_direct_two_input_closed_forms_are_closed():
    """The rewrites close these integrands: no quadrature node is left."""
    from derive.symbolic.quadrature import GaussianExpectation

    for name, (expr, _, _) in DIRECT_TWO.items():
        assert not gaussian_expectation(expr, (z1, z2)).has(GaussianExpectation), name


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "no rule closes shifted steps in two inputs (a bivariate normal CDF), and the quadrature node they "
    "fall to is a trapezoidal grid that cannot resolve the jumps: at the largest order (385) the result "
    "is 0.7% off, where the node claims an accuracy of 1e-11"))
def test_direct_two_input_shifted_steps():
    """P(z1 > 0.5, z2 > -0.3): the one direct integrand here that the rules leave to quadrature."""
    expr = H(z1 - HALF) * H(z2 + sp.Rational(3, 10))
    cov = _rho_cov(1.3, 0.6, 0.8)
    value = engine_value(gaussian_expectation(expr, (z1, z2)), dict(zip((S.K11, S.K12, S.K22), cov)))
    want, scale = _expect2_sympy(expr, cov, (0.5,), (-0.3,))
    assert_close(value, want, scale, f"<{expr}> at {cov}")


DIRECT_ONE = {
    "erf-squared": (sp.erf(z) ** 2, ()),
    "erf-shifted-squared": (sp.erf(2 * z + HALF) * sp.erf(z - TENTH), ()),
    "shifted-step": (H(z - sp.Rational(3, 10)), (0.3,)),
    "reflected-shifted-step": (H(HALF - 2 * z) * z ** 2, (0.25,)),
    "stein-step": (z ** 3 * H(z + HALF), (-0.5,)),
    "tilted-erf": (sp.exp(-z ** 2 / 3 + z) * sp.erf(z), ()),
}


@pytest.mark.parametrize(("name", "K"), _direct_params(DIRECT_ONE, [1e-3, 0.5, 3.0], ["K1e-3", "K0.5", "K3"]))
def test_direct_single_input(name, K):
    expr, kinks_z = DIRECT_ONE[name]
    result = gaussian_expectation(expr, (z,))
    value = engine_value(result, {S.K: K})
    f = sp.lambdify(z, expr, modules="mpmath")
    g = sp.lambdify(z, sp.Abs(expr), modules="mpmath")
    want = expect1(f, K, kinks=kinks_z)
    assert_close(value, want, lambda: expect1(g, K, kinks=kinks_z), f"<{expr}> at K = {K}")


def _conditional_reference(g, at: float, cov, kinks2):
    """<delta(z1 - at) g(z2)> = p_{z1}(at) <g(z2) | z1 = at>, z2 | z1 ~ N(K12 at / K11, K22 - K12^2 / K11)."""
    k11, k12, k22 = (mp.mpf(c) for c in cov)
    with mp.workdps(30):
        density = mp.npdf(at, 0, mp.sqrt(k11))
        mean = k12 / k11 * at
        var = k22 - k12 ** 2 / k11
    inner = expect1(lambda t: g(mean + t), var, kinks=[k - mean for k in kinks2])
    return density * inner


@pytest.mark.parametrize("cov", DIRECT_COVARIANCES[:3])
@pytest.mark.parametrize("at", [0.0, 0.5, -1.2])
def test_delta_conditioning(at, cov):
    """Dirac deltas (what Stein's lemma makes of steps) are integrated by conditioning."""
    a = sp.nsimplify(at)
    expr = sp.DiracDelta(z1 - a) * (z2 * H(z2) + H(z2 + sp.Rational(3, 10)))
    value = engine_value(gaussian_expectation(expr, (z1, z2)), dict(zip((S.K11, S.K12, S.K22), cov)))

    def g(t):
        return max(t, 0) + (t > -0.3)

    want = _conditional_reference(g, at, cov, (0.0, -0.3))
    assert_close(value, want, lambda: want, f"<{expr}> at {cov}")
