"""The NTK's fluctuations A, B, D, F over sites (several inputs, positions): derive.finite.tensor_ntk.

Checked against: the single-input walker (derive.finite.arch, itself checked against PDLT's eqs.
8.89) on the diagonal, to 1e-12; the maps after one hidden layer written out by hand for two inputs
and evaluated by brute-force quadrature; the infinite-width NTK of derive.kernels.arch; the mixed four-point
expectations against mpmath and against a second quadrature; and sampled networks (dense, CNNs with
positions at the output, pooling and flattening) at three widths after a 1/n fit, where a map that
treats the positions' fluctuations as independent is rejected with the same samples.
"""

import mpmath as mp
import numpy as np
import pytest

import derive.finite.tensor as tensor
import derive.finite.tensor_ntk as tensor_ntk
from derive import arch
from derive.core.errors import DeriveError
from derive.finite.arch import arch_finite_width
from derive.finite.moments import MomentRule, moment_rule, product_moment
from derive.finite.tensor import arch_finite_width_tensor
from derive.kernels.arch import arch_kernels
from derive.rules.activations import resolve
from derive.validation.arch import check_finite_width, compare_finite_width, sample_kernel_estimates

MP_FUNCTIONS = {
    "tanh": (mp.tanh, lambda t: 1 / mp.cosh(t) ** 2),
    "relu": (lambda t: max(t, 0), lambda t: mp.mpf(1) if t > 0 else mp.mpf(0)),
    "gelu": (lambda t: t * (1 + mp.erf(t / mp.sqrt(2))) / 2,
             lambda t: (1 + mp.erf(t / mp.sqrt(2))) / 2 + t * mp.exp(-t * t / 2) / mp.sqrt(2 * mp.pi)),
    "elu": (lambda t: t if t > 0 else mp.exp(t) - 1, lambda t: mp.mpf(1) if t > 0 else mp.exp(t)),
}


def _mp_expect2(f, K) -> float:
    """E[f(z0, z1)], z ~ N(0, K), by nested mpmath quadrature in whitened coordinates, each level split
    where its own coordinate crosses 0 (the kinks)."""
    mp.mp.dps = 15
    L = np.linalg.cholesky(np.asarray(K, float))
    phi = lambda u: mp.exp(-u * u / 2) / mp.sqrt(2 * mp.pi)  # noqa: E731

    def inner(u0):
        z0 = L[0, 0] * u0
        kink = -L[1, 0] * u0 / L[1, 1]
        return mp.quad(lambda u1: f(z0, L[1, 0] * u0 + L[1, 1] * u1) * phi(u1), [-12, kink, 12] if abs(kink) < 12
                       else [-12, 12])

    return float(mp.quad(lambda u0: inner(u0) * phi(u0), [-12, 0, 12]))


NP_FUNCTIONS = {
    "tanh": (np.tanh, lambda t: 1 / np.cosh(t) ** 2),
    "relu": (lambda t: np.maximum(t, 0), lambda t: (t > 0).astype(float)),
}


def _gl_expect2(f, K, order: int = 200) -> float:
    """E[f(z0, z1)], z ~ N(0, K), by brute-force nested Gauss-Legendre (``order`` nodes on each side of
    every kink, on [-12, 12] in whitened coordinates); a reference independent of the project's rules."""
    L = np.linalg.cholesky(np.asarray(K, float))
    t, v = np.polynomial.legendre.leggauss(order)

    def nodes(lo, hi):  # lo, hi broadcastable arrays -> (..., order) nodes and weights
        half = (hi - lo)[..., None] / 2
        x = lo[..., None] + half * (t + 1)
        return x, half * v * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)

    u0 = np.concatenate([nodes(np.array(-12.0), np.array(0.0))[0], nodes(np.array(0.0), np.array(12.0))[0]])
    w0 = np.concatenate([nodes(np.array(-12.0), np.array(0.0))[1], nodes(np.array(0.0), np.array(12.0))[1]])
    kink = np.clip(-L[1, 0] * u0 / L[1, 1], -12, 12)
    lo_u, lo_w = nodes(np.full_like(u0, -12.0), kink)
    hi_u, hi_w = nodes(kink, np.full_like(u0, 12.0))
    u1, w1 = np.concatenate([lo_u, hi_u], axis=1), np.concatenate([lo_w, hi_w], axis=1)
    z0, z1 = L[0, 0] * u0[:, None] + 0 * u1, L[1, 0] * u0[:, None] + L[1, 1] * u1
    return float(np.sum(w0[:, None] * w1 * f(z0, z1)))


# ------------------------------------------------------------------------------------------------
# Mixed four-point expectations of the activation and its derivative


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "relu" else n
                                  for n in sorted(MP_FUNCTIONS)])
def test_mixed_expectations_of_two_inputs_against_mpmath(name):
    a = resolve(name)
    s, ds = a.sigma_numeric, a.derivative(numeric=True)
    ms, mds = MP_FUNCTIONS[name]
    K = np.array([[1.3, 0.55], [0.55, 0.8]])
    rule = moment_rule(a, "auto", 1.3)
    cases = [((ds**2, s**2), lambda x, y: mds(x) ** 2 * ms(y) ** 2),
             ((ds * s, ds * s), lambda x, y: mds(x) * ms(x) * mds(y) * ms(y)),
             ((ds**3, ds), lambda x, y: mds(x) ** 3 * mds(y))][: 1 if name == "gelu" else 3]  # gelu: slow in mpmath
    for factors, f in cases:
        want = _mp_expect2(f, K)
        assert product_moment(rule, factors, K) == pytest.approx(want, rel=1e-9, abs=1e-12), factors


@pytest.mark.parametrize("name,order", [("relu", 16), pytest.param("tanh", 20, marks=pytest.mark.slow)])
def test_mixed_expectations_of_four_inputs_by_two_rules(name, order):
    """Three and four distinct inputs (three for tanh): the rule the activation gets (exact for relu,
    trapezoid for tanh) against Gauss-Legendre panels split at every kink, a different algorithm
    (``order`` points per panel: its own error for tanh is about 3e-8 relative, the trapezoid rule's
    1e-13)."""
    a = resolve(name)
    s, ds = a.sigma_numeric, a.derivative(numeric=True)
    X = np.random.default_rng(4).standard_normal((4, 5))
    K = X @ X.T / 5
    rule = moment_rule(a, "auto", float(np.max(np.diag(K))))
    panels = MomentRule("panels", order)
    cases = [(ds, s, ds, s), (ds, ds, ds, ds), (ds * s, ds, s)] if name == "relu" else [(ds * s, ds, s), (ds, s, ds)]
    for factors in cases:  # tanh: three inputs (20-point panels on four take about 2 GB)
        sub = K[: len(factors), : len(factors)]
        got, want = product_moment(rule, factors, sub), product_moment(panels, factors, sub)
        assert got == pytest.approx(want, rel=1e-7, abs=1e-10), factors


# ------------------------------------------------------------------------------------------------
# The maps


def test_compiled_product_moments_equal_numpy_ones():
    """The batched JAX trapezoid rule (derive.finite.moments_jax) against product_moment's NumPy one,
    moment by moment, on random covariances of two to four sites (one singular), mixed powers of
    sigma and sigma': the same quadrature, so equal to rounding (1e-14 of the moment's scale)."""
    from derive.finite.moments_jax import trapezoid_product_moments

    act = resolve("tanh")
    s, ds = act.sigma_numeric, act.derivative(numeric=True)
    rng = np.random.default_rng(4)
    covs, powers = [], []
    for d in (2, 3, 4, 4):
        A = rng.standard_normal((d, d + 1))
        covs.append(A @ A.T / (d + 1))
        powers.append([tuple(rng.integers(0, 3, 2)) for _ in range(d)])
    v = rng.standard_normal(3)
    covs.append(np.outer(v, v) + np.diag([0.0, 0.5, 0.2]))  # singular: the eigen-root's triangular factor
    powers.append([(1, 1), (0, 2), (2, 0)])
    rule = moment_rule(act, 40)
    got = trapezoid_product_moments(s, ds, 40, covs, powers)
    for value, cov, pw in zip(got, covs, powers):
        want = product_moment(rule, tuple(s**i * ds**j for i, j in pw), cov)
        assert value == pytest.approx(want, rel=1e-14, abs=1e-14), (pw, value, want)


def test_compiled_product_moments_in_uneven_steps_equal_numpy_ones():
    """70 sets of four sites at order 48 run as a full call of 64 and a short one of 6, each in steps of
    18 (moments_jax.STEP_POINTS // 48^3), the last step of the full call shifted back to end at 64: every
    moment equals NumPy's, to 1e-14."""
    import derive.finite.moments_jax as moments_jax

    assert moments_jax.CHUNK == 64 and moments_jax.STEP_POINTS // 48**3 == 18
    act = resolve("tanh")
    s, ds = act.sigma_numeric, act.derivative(numeric=True)
    rng = np.random.default_rng(7)
    covs, powers = [], []
    for _ in range(70):
        A = rng.standard_normal((4, 6))
        covs.append(A @ A.T / 6)
        powers.append([tuple(rng.integers(0, 3, 2)) for _ in range(4)])
    got = moments_jax.trapezoid_product_moments(s, ds, 48, covs, powers)
    rule = moment_rule(act, 48)
    want = [product_moment(rule, tuple(s**i * ds**j for i, j in pw), cov) for cov, pw in zip(covs, powers)]
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)


def test_compiled_tables_equal_numpy_tables(monkeypatch):
    """activation_tables with every set of sites through the compiled batch equals the one computed moment
    by moment in NumPy, to 1e-14."""
    import derive.finite.moments_jax as moments_jax

    K = np.array([[1.2, 0.4, -0.3, 0.1], [0.4, 0.9, 0.2, 0.0], [-0.3, 0.2, 1.1, 0.5], [0.1, 0.0, 0.5, 0.8]])
    act = resolve("tanh")
    monkeypatch.setattr(moments_jax, "COMPILE_POINTS", np.inf)
    numpy_tables = tensor_ntk.activation_tables(act, K, 1e-11)
    monkeypatch.setattr(moments_jax, "COMPILE_POINTS", 0)
    compiled = tensor_ntk.activation_tables(act, K, 1e-11)
    for name in ("D4", "X4"):
        np.testing.assert_allclose(getattr(compiled, name), getattr(numpy_tables, name), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", ["tanh", "gelu", "elu"])  # the trapezoid rule; with a smoothed last factor; panels
def test_compiled_four_point_table_equals_numpy_channel_means(name, monkeypatch):
    """The channel means' covariance with the four-point functions of three and four distinct sites from
    the compiled table (derive.finite.batch_jax.four_point_table, the jitted iteration's code) equals the
    one from NumPy's moments, to 1e-14 (measured: 2e-16), for every quadrature rule."""
    import derive.finite.moments_jax as moments_jax
    from derive.finite.batch import batch_terms, channel_means
    from derive.finite.batch_jax import four_point_table
    from derive.finite.moments import NumpyMoments

    K = np.array([[1.2, 0.4, -0.3, 0.1], [0.4, 0.9, 0.2, 0.0], [-0.3, 0.2, 1.1, 0.5], [0.1, 0.0, 0.5, 0.8]])
    act = resolve(name)
    rule = moment_rule(act, "auto", float(np.max(np.diag(K))), 1e-11)
    args = (batch_terms(act, 1e-11), K, np.zeros((4,) * 4), np.zeros((4, 4)), 1.0, rule,
            NumpyMoments(act.sigma_numeric, rule.smoothed))
    monkeypatch.setattr(moments_jax, "COMPILE_POINTS", 0)
    quartic = four_point_table(act.sigma_numeric, rule, K)
    assert len(quartic) == 13  # every sorted quadruple of three (12) or four (1) distinct sites
    monkeypatch.setattr(moments_jax, "COMPILE_POINTS", np.inf)
    assert four_point_table(act.sigma_numeric, rule, K) == {}
    want = channel_means(*args).cov
    np.testing.assert_allclose(channel_means(*args, quartic=quartic).cov, want, rtol=1e-14, atol=1e-15)


ONE_INPUT = {  # the first: the identity run; the residual ones: through residual blocks
    "dense on dense": lambda: arch.serial(arch.dense(1.3, 0.1), arch.dense(1.2, 0.05), arch.activation("tanh"),
                                          arch.dense(1.5, 0.1)),
    "relu residual blocks": lambda: arch.serial(arch.dense(1.0), arch.repeat(2, arch.residual(
        arch.dense(2.0), arch.activation("relu"), arch.dense(2.0), xi=0.8, gamma=0.6))),
    "tanh residual, a deep branch, then tanh": lambda: arch.serial(arch.dense(1.3, 0.1), arch.residual(
        arch.dense(1.5, 0.1), arch.activation("tanh"), arch.dense(1.2, 0.05), arch.activation("tanh"),
        arch.dense(1.1, 0.1), gamma=0.5), arch.activation("tanh"), arch.dense(1.4, 0.1)),
    "gelu residual with a dense skip-only start": lambda: arch.serial(arch.dense(1.0), arch.residual(
        arch.dense(1.2), arch.dense(1.5, 0.1), arch.activation("gelu"), arch.dense(1.3), xi=0.9, gamma=0.7)),
    "LayerNorm stack": lambda: arch.serial(arch.dense(1.0), arch.layer_norm(), arch.dense(1.5, 0.1),
                                           arch.activation("tanh"), arch.dense(1.3, 0.1), arch.layer_norm(),
                                           arch.dense(2.0, 0.05)),
    "pre-LN residual gelu": lambda: arch.serial(arch.dense(1.0), arch.repeat(2, arch.residual(
        arch.layer_norm(), arch.dense(1.0), arch.activation("gelu"), arch.dense(1.0), gamma=0.7))),
}


@pytest.mark.parametrize("name", ["tanh", "relu", "gelu", *ONE_INPUT])
def test_one_input_is_the_single_input_form(name):
    net = ONE_INPUT[name]() if name in ONE_INPUT else arch.mlp(3, name, 1.5, 0.1)
    tf = arch_finite_width_tensor(net, np.ones((1, 8)))
    single = arch_finite_width(net)
    for q in "ABDF":
        for a, b in zip(tf.values[q], single.values[q]):
            assert (a is None) == (b is None)
            if a is not None:
                assert float(np.ravel(a)[0]) == pytest.approx(float(b), rel=1e-12, abs=1e-14), q


@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_two_inputs_after_one_hidden_layer_by_hand(name):
    """dense -> sigma -> dense on two inputs: the first layer's output is exactly Gaussian with a
    deterministic NTK Theta1 = lambda_b + lambda_W x.x/d, so the second layer's are plain covariances
    over one channel z ~ N(0, K1) (evaluated by :func:`_gl_expect2`): with
    w_ab = lambda_W s_a s_b + C_W Theta1_ab s'_a s'_b,
    A_(ab)(cd) = Cov(w_ab, w_cd), D_(ab)(cd) = Cov(w_ab, C_W s_c s_d),
    B_(ac)(bd) = C_W^2 <s'_a s'_c s'_b s'_d> Theta1_ab Theta1_cd, F_(ac)(bd) = C_W^2 <s'_a s_c s'_b s_d> Theta1_ab."""
    x = np.array([[1.0, 0.3, -0.5], [0.2, -1.1, 0.7]])
    c1, b1, c2, b2 = 1.7, 0.2, 1.5, 0.1
    net = arch.serial(arch.dense(c1, b1), arch.activation(name), arch.dense(c2, b2))
    tf = arch_finite_width_tensor(net, x)
    A, B, D, F = (tf.values[q][-1] for q in "ABDF")
    gram = x @ x.T / x.shape[1]
    K1, T1 = b1 + c1 * gram, b1 + c1 * gram  # lambda_W = C_W, lambda_b = C_b by default
    s, ds = NP_FUNCTIONS[name]

    def z(i, u, v):
        return u if i == 0 else v

    def w(a, b):
        return lambda u, v: c2 * s(z(a, u, v)) * s(z(b, u, v)) + c2 * T1[a, b] * ds(z(a, u, v)) * ds(z(b, u, v))

    def E(f):
        return _gl_expect2(f, K1)

    for (a, b), (c, d) in [((0, 1), (0, 1)), ((0, 0), (1, 1)), ((0, 1), (1, 1))]:
        wab, wcd = w(a, b), w(c, d)
        cov = E(lambda u, v: wab(u, v) * wcd(u, v)) - E(wab) * E(wcd)
        assert A[a, b, c, d] == pytest.approx(cov, rel=1e-8, abs=1e-12)
        g = lambda u, v, c=c, d=d: c2 * s(z(c, u, v)) * s(z(d, u, v))  # noqa: E731
        assert D[a, b, c, d] == pytest.approx(E(lambda u, v: wab(u, v) * g(u, v)) - E(wab) * E(g), rel=1e-8, abs=1e-12)
    for a, c, b, d in [(0, 1, 0, 1), (0, 0, 1, 1), (0, 1, 1, 0), (1, 1, 1, 0)]:
        quad = E(lambda u, v: ds(z(a, u, v)) * ds(z(c, u, v)) * ds(z(b, u, v)) * ds(z(d, u, v)))
        assert B[a, c, b, d] == pytest.approx(c2**2 * quad * T1[a, b] * T1[c, d], rel=1e-8, abs=1e-12)
        mixed = E(lambda u, v: ds(z(a, u, v)) * s(z(c, u, v)) * ds(z(b, u, v)) * s(z(d, u, v)))
        assert F[a, c, b, d] == pytest.approx(c2**2 * mixed * T1[a, b], rel=1e-8, abs=1e-12)


def test_the_ntk_recursion_gives_the_infinite_width_ntk(monkeypatch):
    """Theta' = t0 + t1 L<ss> + C_W L(Theta <s's'>), xi^2 Theta + gamma^2 Theta_b through a residual
    block, and attention's values-then-output steps, carried with A..F, equal the generated kernels'."""
    seen = []

    def recording(original):
        def record(*args, **kwargs):
            seen.append(original(*args, **kwargs))
            return seen[-1]
        return record

    monkeypatch.setattr(tensor, "weighted_state", recording(tensor.weighted_state))
    monkeypatch.setattr(tensor, "residual_state", recording(tensor.residual_state))
    monkeypatch.setattr(tensor, "attention_state", recording(tensor.attention_state))
    x = np.random.default_rng(1).standard_normal((2, 4, 3))
    for net in (arch.load_arch("examples/architectures/cnn.toml"), CNNS["pooling before tanh, global pooling"](),
                RESIDUAL_CNN["tanh residual CNN"][0](), arch.serial(
                    arch.conv(filter=(2,), C_W=1.5), arch.layer_norm(), arch.avg_pool(window=(2,)),
                    arch.conv(filter=(2,), C_W=1.2, C_b=0.1), arch.residual(arch.layer_norm(), arch.conv(filter=(2,)),
                                                                            arch.activation("gelu"), arch.conv())),
                ATTENTION["tied attention, then dense"](), arch.serial(arch.conv(filter=(2,), C_W=1.5), arch.attention(
                    heads=2, C_Q=2.0, C_K=2.0, C_V=0.8, C_O=1.2, C_b=0.1, lambda_V=0.3, lambda_O=0.7, lambda_b=0.2))):
        seen.clear()
        arch_finite_width_tensor(net, x)
        want = np.asarray(arch_kernels(net, x).ntk[-1])
        np.testing.assert_allclose(seen[-1].Theta, want.reshape(seen[-1].Theta.shape), rtol=1e-10)


@pytest.mark.parametrize("net", [
    arch.serial(arch.conv(filter=(2,)), arch.residual(arch.layer_norm(), arch.attention()), arch.dense()),
    arch.serial(arch.conv(filter=(2,)), arch.activation("tanh"), arch.conv(filter=(2,))),
])
def test_where_not_derived_the_reason_reaches_the_user(net, monkeypatch):
    """A layer rule whose NTK map is not affine in op(K12) and op(Theta12) leaves K, V, G1 derived and
    says why A..F are not; validating Theta_var then refuses before sampling. Every shipped rule's map
    is affine, so the refusal is simulated for all of them."""
    match = "not affine in K12 and Theta12"

    def not_affine(layer, op):
        raise DeriveError(f"layer '{layer.type}': its NTK map is not affine in K12 and Theta12")

    monkeypatch.setattr(tensor, "ntk_constants", not_affine)
    x = np.random.default_rng(0).standard_normal((1, 4, 3))
    tf = arch_finite_width_tensor(net, x)
    assert tf.values["A"][-1] is None and tf.theta_var()[-1] is None
    assert match in tf.ntk_reasons[-1]
    assert tf.values["V"][-1] is not None  # K, V, G1 still derived
    with pytest.raises(DeriveError, match=match):
        check_finite_width(net, (8, 16, 32), samples=10, inputs=x, quantities=("K", "Theta_var"))


def test_without_ntk_the_tensor_form_skips_it():
    x = np.random.default_rng(0).standard_normal((2, 3))
    tf = arch_finite_width_tensor(arch.mlp(2, "tanh", 1.5, 0.1), x, ntk=False)
    assert tf.values["A"][-1] is None and "not asked" in tf.ntk_reasons[-1]


# ------------------------------------------------------------------------------------------------
# Against sampled networks

ATTENTION = {  # logits scaled by C_Q C_K = 4, where the attention weights' fluctuations matter
    "tied attention, then dense": lambda: arch.serial(
        arch.dense(1.0), arch.attention(heads=2, C_Q=2.0, C_K=2.0, C_V=0.8, C_O=1.2, C_b=0.1), arch.dense(1.5)),
    "tied attention, then tanh and dense": lambda: arch.serial(
        arch.dense(1.0), arch.attention(heads=2, C_Q=2.0, C_K=2.0, C_V=0.8, C_O=1.2, C_b=0.1),
        arch.activation("tanh"), arch.dense(1.5, 0.1)),
}

CNNS = {
    "1-d CNN (examples/architectures/cnn.toml)": lambda: arch.load_arch("examples/architectures/cnn.toml"),
    "pooling before tanh, global pooling": lambda: arch.serial(
        arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.avg_pool(window=(2,)), arch.activation("tanh"),
        arch.conv(filter=(2,), C_W=1.6), arch.activation("relu"), arch.global_avg_pool(), arch.dense(2.0)),
    "conv output with positions": lambda: arch.serial(
        arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.activation("tanh"), arch.conv(filter=(2,), C_W=1.6)),
    "2-d CNN, 2 x 2 positions at the output": lambda: arch.serial(
        arch.conv(filter=(2, 2), C_W=2.0, C_b=0.05), arch.activation("relu"),
        arch.conv(filter=(2, 2), padding="VALID", C_W=1.8), arch.activation("tanh"), arch.conv(filter=(1, 1), C_W=1.5)),
}
SHAPES = {"1-d CNN (examples/architectures/cnn.toml)": (1, 6, 4), "pooling before tanh, global pooling": (1, 6, 4),
          "conv output with positions": (1, 3, 4), "2-d CNN, 2 x 2 positions at the output": (1, 3, 3, 2)}
WIDTHS, SAMPLES = (32, 64, 128), 3000


def _independent_positions(monkeypatch):
    """The wrong map: B's four-point expectation <s's's's'> kept only where the four sites coincide,
    as if the positions' derivatives fluctuated independently."""
    original = tensor.weighted_state

    def wrong(state, K, V, Es, JP, CPP, run, *args, **kwargs):
        M = K.shape[0]
        D4 = np.zeros_like(run.D4)
        s = np.arange(M)
        D4[s, s, s, s] = run.D4[s, s, s, s]
        run = tensor_ntk.RunTables(run.Ed, run.JQ, run.g, D4, run.X4)
        return original(state, K, V, Es, JP, CPP, run, *args, **kwargs)

    monkeypatch.setattr(tensor, "weighted_state", wrong)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CNNS))
def test_sampled_cnns_agree_and_independent_positions_are_rejected(name, monkeypatch):
    net = CNNS[name]()
    x = np.random.default_rng(1).standard_normal(SHAPES[name])
    quantities = ("K", "Theta", "Theta_var")
    theory = arch_finite_width_tensor(net, x)
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES, seed=3, inputs=x, ntk=True)
    check = compare_finite_width(theory, estimates, quantities=quantities)
    assert check.passed, check.worst
    rows = [r for r in check.rows if r["quantity"] == "Theta_var"]
    assert rows and not any(r["weak"] for r in rows)
    _independent_positions(monkeypatch)
    wrong = arch_finite_width_tensor(net, x)
    assert not compare_finite_width(wrong, estimates, quantities=("Theta_var",)).passed


@pytest.mark.slow
def test_sampled_dense_network_on_two_inputs_agrees():
    x = np.random.default_rng(1).standard_normal((2, 5))
    check = check_finite_width(arch.mlp(3, "relu", 2.0, 0.1), WIDTHS, samples=SAMPLES, seed=3, inputs=x,
                               quantities=("K", "Theta", "Theta_var"))
    assert check.passed, check.worst
    assert len([r for r in check.rows if r["quantity"] == "Theta_var"]) == 3


LAYERNORM_SITES = {
    "pre-LN residual gelu on two inputs": (lambda: ONE_INPUT["pre-LN residual gelu"](), (2, 5)),
    "conv -> LayerNorm -> conv -> relu -> conv, three positions": (lambda: arch.serial(
        arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.layer_norm(), arch.conv(filter=(2,), C_W=1.6),
        arch.activation("relu"), arch.conv(filter=(2,), C_W=2.0)), (1, 3, 4)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERNORM_SITES))
def test_sampled_theta_var_through_layernorm_over_sites_agrees(name):
    """n Var of the output channel's NTK at every pair of sites through LayerNorm (3000 networks at
    widths 32, 64, 128 fitted in 1/n). Theta_var moves little under the wrong LayerNorm maps here; the
    one-by-one test below rejects them on A and F."""
    factory, shape = LAYERNORM_SITES[name]
    x = np.random.default_rng(1).standard_normal(shape)
    check = check_finite_width(factory(), WIDTHS, samples=SAMPLES, seed=3, inputs=x,
                               quantities=("K", "Theta", "Theta_var"))
    assert check.passed, check.worst
    rows = [r for r in check.rows if r["quantity"] == "Theta_var"]
    assert len(rows) == (3 if shape[0] == 2 else 6)
    assert not any(r["weak"] for r in rows)


def _residual_dropping(term):
    """The residual block's NTK maps (:func:`derive.finite.tensor_ntk.residual_state`) with one term
    dropped or replaced: the wrong maps the sampled networks must reject."""
    original = tensor_ntk.residual_state

    def wrong(a2, c2, skip, K, V, branch, jac):
        M2 = K.size
        if term == "one-sided derivative as half the two-sided one":
            jac = tensor_ntk.BranchJacobians(jac.kk, jac.tk, jac.tt, jac.kk / 2, np.zeros_like(jac.kk))
        out = original(a2, c2, skip, K, V, branch, jac)
        A, D, B = (X.reshape(M2, M2) for X in (skip.A, skip.D, skip.B))
        if term == "skip-branch covariance":
            cross = D @ jac.tk.T + A @ jac.tt.T
            out.A = out.A - a2 * c2 * (cross + cross.T).reshape(out.A.shape)
        elif term == "B in the cross term":
            out.B = out.B - a2 * c2 * (jac.tt @ B + B @ jac.tt.T).reshape(out.B.shape)
        return out

    return wrong


RESIDUAL_CNN = {  # name: (network, inputs' shape, the dropped term the same samples reject)
    "tanh residual CNN": (lambda: arch.serial(arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.repeat(2, arch.residual(
        arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.activation("tanh"), arch.conv(filter=(2,), C_W=1.6),
        gamma=1.0))), (1, 3, 4), "B in the cross term"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_sampled_ntk_fluctuations_through_attention_agree_and_fixed_attention_weights_are_rejected(name, monkeypatch):
    """n Var of the output channel's NTK over three tokens after tied attention (its A and B through the
    next dense layer; through tanh also its D and F) against 3000 sampled networks at widths 32, 64 and
    128, with K, Theta, V and G1; the same samples reject the maps with the attention weights held at
    their infinite-width value (the logits' fluctuations, JU, dropped)."""
    net = ATTENTION[name]()
    x = np.random.default_rng(1).standard_normal((1, 3, 4))
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES, seed=3, inputs=x, ntk=True)
    quantities = ("K", "Theta", "V", "G1", "Theta_var")
    check = compare_finite_width(arch_finite_width_tensor(net, x), estimates, quantities=quantities)
    assert check.passed, check.worst
    rows = [r for r in check.rows if r["quantity"] == "Theta_var"]
    assert len(rows) == 6 and not any(r["weak"] for r in rows)
    original = tensor_ntk.attention_state

    def fixed_weights(state, Es, CPP, CNP, CNN, run, L, weights, JS, JU, r=1.0):
        return original(state, Es, CPP, CNP, CNN, run, L, weights, JS, lambda X: 0 * JU(X), r)

    monkeypatch.setattr(tensor, "attention_state", fixed_weights)
    wrong = compare_finite_width(arch_finite_width_tensor(net, x), estimates, quantities=("Theta_var",))
    assert not wrong.passed


@pytest.mark.slow
def test_sampled_pre_ln_transformer_theta_var_agrees_and_fixed_attention_weights_are_rejected(monkeypatch):
    """Two pre-LN transformer blocks (LayerNorm -> tied attention, two heads, logits scaled by C_Q C_K =
    4; LayerNorm -> dense -> GELU -> dense) on three tokens: n Var of the output channel's NTK at every
    pair of tokens, with K, Theta, V and G1, against 3000 sampled transformers at widths 32, 64 and 128;
    the same samples reject the maps with the attention weights held at their infinite-width value."""
    net = arch.serial(arch.dense(1.0), arch.repeat(2, arch.residual(arch.layer_norm(), arch.attention(
        heads=2, C_Q=2.0, C_K=2.0, C_V=0.8, C_O=1.2)), arch.residual(arch.layer_norm(), arch.dense(0.6),
                                                                    arch.activation("gelu"), arch.dense(1.6))))
    x = np.random.default_rng(1).standard_normal((1, 3, 4))
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES, seed=3, inputs=x, ntk=True)
    check = compare_finite_width(arch_finite_width_tensor(net, x), estimates,
                                 quantities=("K", "Theta", "V", "G1", "Theta_var"))
    assert check.passed, check.worst
    rows = [r for r in check.rows if r["quantity"] == "Theta_var"]
    assert len(rows) == 6 and not any(r["weak"] for r in rows)
    state, jacobians = tensor_ntk.attention_state, tensor_ntk.BranchJacobians.attention
    monkeypatch.setattr(tensor, "attention_state", lambda *a: state(*a[:9], lambda X: 0 * a[9](X), *a[10:]))
    monkeypatch.setattr(tensor_ntk.BranchJacobians, "attention",
                        lambda self, *a: jacobians(self, *a[:6], 0 * a[6], 0 * a[7]))
    wrong = compare_finite_width(arch_finite_width_tensor(net, x), estimates, quantities=("Theta_var",))
    assert not wrong.passed, wrong.worst


@pytest.mark.slow
def test_sampled_residual_cnn_agrees_and_a_dropped_term_is_rejected(monkeypatch):
    """n Var of the output channel's NTK at every pair of three positions after two residual conv
    blocks z + W2 tanh(W1 z) (the branch's Jacobian mixes positions), 3000 networks at widths 32, 64,
    128 fitted in 1/n; the maps without B in the cross term J H + H J^T are rejected by the same
    samples (|z| 7.7)."""
    factory, shape, dropped = RESIDUAL_CNN["tanh residual CNN"]
    net = factory()
    x = np.random.default_rng(1).standard_normal(shape)
    theory = arch_finite_width_tensor(net, x)
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES, seed=3, inputs=x, ntk=True)
    check = compare_finite_width(theory, estimates, quantities=("K", "Theta", "Theta_var"))
    assert check.passed, check.worst
    rows = [r for r in check.rows if r["quantity"] == "Theta_var"]
    assert len(rows) == 6 and not any(r["weak"] for r in rows)
    monkeypatch.setattr(tensor, "residual_state", _residual_dropping(dropped))
    wrong = arch_finite_width_tensor(net, x)
    assert not compare_finite_width(wrong, estimates, quantities=("Theta_var",)).passed


@pytest.mark.slow
def test_sampled_cnn_with_zero_borders_agrees_and_copied_derivatives_are_rejected(monkeypatch):
    """A relu CNN on an input with zero borders: the end positions' receptive fields are all padding, so
    after the first conv they are the same random variable (the bias), where relu's K-derivatives
    diverge. Derived over the distinct sites (Sites), K, Theta, V, G1 and Theta_var at every entry
    agree with 3000 sampled networks at widths 32, 64, 128 (165 rows; worst |z| 1.9, through a
    residual block whose branch reads the identical sites pointwise); the same samples reject the
    K-derivatives copied to each member of a class instead of split over it (V: |z| 13)."""
    net = arch.serial(arch.conv(filter=(3,), C_W=2.0, C_b=0.1), arch.residual(
        arch.conv(filter=(1,), C_W=2.0), arch.activation("relu"), arch.conv(filter=(2,), C_W=2.0, C_b=0.1),
        xi=0.8, gamma=0.6), arch.activation("relu"), arch.conv(filter=(3,), C_W=2.0, C_b=0.1))
    x = np.zeros((1, 5, 2))
    x[0, 2] = [1.0, -0.7]
    theory = arch_finite_width_tensor(net, x)
    assert tensor_ntk.Sites.of(theory.values["K"][0]).rep.tolist() == [0, 1, 2, 3, 0]
    estimates = sample_kernel_estimates(net, WIDTHS, samples=SAMPLES, seed=3, inputs=x, ntk=True)
    quantities = ("K", "Theta", "V", "G1", "Theta_var")
    check = compare_finite_width(theory, estimates, quantities=quantities)
    assert check.passed, check.worst
    assert {r["quantity"] for r in check.rows} == set(quantities)
    monkeypatch.setattr(tensor_ntk.Sites, "derivatives", lambda self, X, axes: self.values(X))
    assert not compare_finite_width(arch_finite_width_tensor(net, x), estimates, quantities=("V",)).passed


def _network_samples(x, n: int, networks: int, seed: int, forward, shapes):
    """Per network, the outputs z (M, n), the NTK's diagonal H_ii(s, t) (M, M, n) and the means over
    pairs of distinct output channels i != j of n H_ij(s,t) H_ij(u,v) and n H_ij(s,t) z_i(u) z_j(v)
    (M, M, M, M each) of a network written out in a test, over the M sites of ``x`` (its leading axes;
    the channels last). ``forward(eps, p, n)`` returns the output and, for every preactivation h_l
    (each shifted by eps[l]), G_l (M, M), the products of that layer's input (+ C_b) that its weight
    and bias gradients contribute between flattened sites (a convolution's summed over its filter
    offsets); ``shapes`` the parameters' shapes (standard normal; the forward scales them). H = sum_l J_l G_l J_l^T, J_l = dz/dh_l by autodiff through eps, is the NTK
    independently of the project's sampler."""
    import jax
    import jax.numpy as jnp

    from derive.backends.precision import x64

    sites = x.shape[:-1]
    off = 1 - jnp.eye(n)

    def one(key):
        keys = jax.random.split(key, len(shapes))
        p = [jax.random.normal(k, shape) for k, shape in zip(keys, shapes)]
        eps = [jnp.zeros((*sites, n))] * len(forward(None, p, n)[1])
        z, G = forward(eps, p, n)
        J = jax.jacrev(lambda e: forward(e, p, n)[0])(eps)
        M = z.size // n
        H = 0
        for Jl, Gl in zip(J, G):
            Jl = Jl.reshape(M, n, M, n)  # (output site, i, site, k)
            H = H + jnp.einsum("siun,tjvn,uv->stij", Jl, Jl, Gl)
        z = z.reshape(M, n)
        B = n * jnp.einsum("stij,uvij,ij->sutv", H, H, off) / (n * (n - 1))
        F = n * jnp.einsum("stij,ui,vj,ij->sutv", H, z, z, off) / (n * (n - 1))
        return z, jnp.einsum("stii->sti", H), B, F

    with x64():
        out = jax.lax.map(jax.jit(one), jax.random.split(jax.random.PRNGKey(seed), networks))
        return tuple(np.asarray(o) for o in out)


def _shifted(eps, k, h):
    return h if eps is None else h + eps[k]


def _residual_forward(x, blocks: int, xi: float, gamma: float):
    """dense(1) -> blocks x [xi z + gamma (W3 relu(W2 z) + b3)], C_W = 2 in the branch, C_b = 0.1 on
    its last layer: (forward, shapes) for :func:`_network_samples`."""
    import jax
    import jax.numpy as jnp

    d = x.shape[1]

    def forward(eps, p, n):
        z = _shifted(eps, 0, x @ p[0].T / np.sqrt(d))
        G = [x @ x.T / d]
        for k in range(blocks):
            W2, W3, b3 = p[3 * k + 1: 3 * k + 4]
            s = jax.nn.relu(_shifted(eps, 2 * k + 1, jnp.sqrt(2.0 / n) * z @ W2.T))
            b = _shifted(eps, 2 * k + 2, jnp.sqrt(2.0 / n) * s @ W3.T + jnp.sqrt(0.1) * b3)
            G += [2.0 / n * z @ z.T, 2.0 / n * s @ s.T + 0.1]
            z = xi * z + gamma * b
        return z, G

    return forward, lambda n: [(n, d)] + [(n, n), (n, n), (n,)] * blocks


def _conv1d(h, W, C_W: float):
    """A 1-d 'SAME' convolution written out: h (N, P, c), W (k, c, c') standard normal, zero padding
    (k - 1) // 2 before and the rest after; returns the output (without bias) and the products sum over
    offsets of the shifted inputs (M, M) times C_W / (c k) that its weights contribute to the NTK."""
    import jax.numpy as jnp

    k, c = W.shape[0], W.shape[1]
    N, P = h.shape[:2]
    low = (k - 1) // 2
    hp = jnp.pad(h, ((0, 0), (low, k - 1 - low), (0, 0)))
    shifted = [hp[:, a:a + P] for a in range(k)]
    scale = C_W / (c * k)
    out = np.sqrt(scale) * sum(S @ W[a] for a, S in enumerate(shifted))
    G = scale * sum(S.reshape(N * P, c) @ S.reshape(N * P, c).T for S in shifted)
    return out, G


def _residual_conv_forward(x, blocks: int, xi: float, gamma: float):
    """conv(3; 1.5, 0.1) -> blocks x [xi z + gamma (conv(2; 1.6, 0.1) tanh(pool(conv(3; 1.5) z)))], pool the
    stride-1 'SAME' window-2 average: (forward, shapes) for :func:`_network_samples`."""
    import jax.numpy as jnp

    d = x.shape[-1]

    def pool(h):
        hp = jnp.pad(h, ((0, 0), (0, 1), (0, 0)))
        return (hp[:, :-1] + hp[:, 1:]) / 2

    def forward(eps, p, n):
        out, G0 = _conv1d(x, p[0], 1.5)
        z = _shifted(eps, 0, out + np.sqrt(0.1) * p[1])
        G = [G0 + 0.1]
        for k in range(blocks):
            W2, W3, b3 = p[3 * k + 2: 3 * k + 5]
            h, G2 = _conv1d(z, W2, 1.5)
            s = jnp.tanh(pool(_shifted(eps, 2 * k + 1, h)))
            out, G3 = _conv1d(s, W3, 1.6)
            b = _shifted(eps, 2 * k + 2, out + np.sqrt(0.1) * b3)
            G += [G2, G3 + 0.1]
            z = xi * z + gamma * b
        return z, G

    return forward, lambda n: [(3, d, n), (n,)] + [(3, n, n), (2, n, n), (n,)] * blocks


def _site_pair_statistics(z: np.ndarray, diag: np.ndarray, B: np.ndarray, F: np.ndarray) -> dict:
    """Per network (:func:`_network_samples`), the means over pairs of distinct output channels i != j
    whose expectations times n are A_(st)(uv) = n Cov(H_ii(s,t), H_jj(u,v)), B_(su)(tv) =
    n E[H_ij(s,t) H_ij(u,v)], D_(st)(uv) = n Cov(H_ii(s,t), z_j(u) z_j(v)) and F_(su)(tv) =
    n E[H_ij(s,t) z_i(u) z_j(v)] (the module docstring's definitions; A and D centred at the means over
    every network and channel)."""
    n = z.shape[2]
    pairs = n * (n - 1)
    d = diag - diag.mean(axis=(0, 3), keepdims=True)
    zz = np.einsum("kui,kvi->kuvi", z, z)
    e = zz - zz.mean(axis=(0, 3), keepdims=True)
    return {"A": n * (np.einsum("ksti,kuvj->kstuv", d, d) - np.einsum("ksti,kuvi->kstuv", d, d)) / pairs,
            "B": B,
            "D": n * (np.einsum("ksti,kuvj->kstuv", d, e) - np.einsum("ksti,kuvi->kstuv", d, e)) / pairs,
            "F": F}


def _fitted(per_width: list, widths) -> dict:
    """{(quantity, entry): (intercept, stderr)} of a + b/n fits of :func:`_site_pair_statistics`."""
    X = np.stack([np.ones(len(widths)), 1 / np.asarray(widths, float)], 1)
    fits = {}
    for q in "ABDF":
        for idx in np.ndindex(per_width[0][q].shape[1:]):
            y = np.array([s[q][(slice(None), *idx)].mean() for s in per_width])
            w = np.array([len(s[q]) / s[q][(slice(None), *idx)].var() for s in per_width])
            cov = np.linalg.inv(X.T @ (X * w[:, None]))
            fits[q, idx] = ((cov @ X.T @ (w * y))[0], np.sqrt(cov[0, 0]))
    return fits


def _worst_z(fits: dict, result, quantities: str = "ABDF") -> dict:
    """The largest |z| of each of A, B, D, F at the output of a tensor-form result against the fits."""
    return {q: max(abs(fit - result.values[q][-1][idx]) / err for (p, idx), (fit, err) in fits.items() if p == q)
            for q in quantities}


@pytest.mark.slow
def test_sampled_residual_ntk_statistics_over_two_inputs_one_by_one(monkeypatch):
    """A, B, D, F over two inputs after two blocks z' = 0.8 z + 0.6 (W3 relu(W2 z) + b3), every entry
    against its own estimate from networks written out in this test (3000 at widths 32, 64, 128, fitted
    in 1/n): all within 5 standard errors. Rejected by the same samples: A without the skip-branch
    covariance, F with the branch's derivative taken in both arguments of E[b(v) b(s)] (halved) instead
    of in the second one only, and B without its own term in the cross term J H + H J^T."""
    blocks, xi, gamma = 2, 0.8, 0.6
    net = arch.serial(arch.dense(1.0), arch.repeat(blocks, arch.residual(
        arch.dense(2.0), arch.activation("relu"), arch.dense(2.0, 0.1), xi=xi, gamma=gamma)))
    x = np.random.default_rng(1).standard_normal((2, 4))
    fits = _agrees_one_by_one(net, x, *_residual_forward(x, blocks, xi, gamma))
    _rejects_residual_changes(net, x, fits, monkeypatch)


def _agrees_one_by_one(net, x, forward, shapes, quantities: str = "ABDF") -> dict:
    """Fits of every entry of A, B, D, F from networks written out in the test (3000 at widths 32, 64,
    128; :func:`_fitted`), checked: each derived entry of ``quantities`` within 5 standard errors, each
    diagonal entry's error under a fifth of its value (the samples' power)."""
    widths = (32, 64, 128)
    fits = _fitted([_site_pair_statistics(*_network_samples(x, n, 3000, n, forward, shapes(n))) for n in widths],
                   widths)
    theory = arch_finite_width_tensor(net, x)
    assert max(_worst_z(fits, theory, quantities).values()) < 5, _worst_z(fits, theory, quantities)
    for q in quantities:
        value, stderr = theory.values[q][-1][0, 0, 0, 0], fits[q, (0, 0, 0, 0)][1]
        assert stderr < 0.2 * abs(value), (q, value, stderr)
    return fits


def _rejects_residual_changes(net, x, fits: dict, monkeypatch) -> None:
    """The residual maps with a term dropped (:func:`_residual_dropping`) miss the fits by over 5
    standard errors in the statistic each term enters."""
    for term, shows in (("skip-branch covariance", "A"), ("one-sided derivative as half the two-sided one", "F"),
                        ("B in the cross term", "B")):
        monkeypatch.setattr(tensor, "residual_state", _residual_dropping(term))
        off = _worst_z(fits, arch_finite_width_tensor(net, x))
        assert all(off[q] > 5 for q in shows), (term, off)


@pytest.mark.slow
def test_sampled_residual_conv_ntk_statistics_over_positions_one_by_one(monkeypatch):
    """A, B, D, F over three positions after two blocks z' = 0.8 z + 0.6 conv(tanh(pool(conv(z)))), the
    pooling a stride-1 window-2 average of the branch's Gaussian point (the branch's Jacobians through
    a pooling, :meth:`BranchJacobians.mapped`), every entry against its own estimate from networks
    written out in this test (3000 at widths 32, 64, 128, fitted in 1/n): all within 5 standard errors
    (worst |z| 2.4). Rejected by the same samples: the pooling skipped in the branch's Jacobians
    (|z| 129 and more), F with the branch's derivative taken in both arguments of E[b(v) b(s)] (halved;
    55), B without its own term in the cross term (131) and A without the skip-branch covariance (12.7)."""
    blocks, xi, gamma = 2, 0.8, 0.6
    net = arch.serial(arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.repeat(blocks, arch.residual(
        arch.conv(filter=(3,), C_W=1.5), arch.avg_pool(window=(2,), stride=(1,), padding="SAME"),
        arch.activation("tanh"), arch.conv(filter=(2,), C_W=1.6, C_b=0.1), xi=xi, gamma=gamma)))
    x = np.random.default_rng(1).standard_normal((1, 3, 2))
    fits = _agrees_one_by_one(net, x, *_residual_conv_forward(x, blocks, xi, gamma))
    with monkeypatch.context() as m:
        m.setattr(tensor_ntk.BranchJacobians, "mapped", lambda self, L: self)
        off = _worst_z(fits, arch_finite_width_tensor(net, x))
        assert all(off[q] > 5 for q in "ABDF"), ("pooling skipped", off)
    _rejects_residual_changes(net, x, fits, monkeypatch)


def _attention_forward(x, blocks: int, xi: float, gamma: float, heads: int = 2):
    """dense(1) -> blocks x [xi z + gamma attention(z)], tied attention over the tokens of x (1, T, d)
    with heads of n/H channels, logits 2 q.q / (n/H) (C_Q = C_K = 2), C_V = 0.8, C_O = 1.2, C_b = 0.1 and
    the query weights' NTK factor 1/n as the sampler's: (forward, shapes) for :func:`_network_samples`."""
    import jax
    import jax.numpy as jnp

    d = x.shape[-1]

    def flat(h):
        return h.reshape(-1, h.shape[-1])

    def forward(eps, p, n):
        z = _shifted(eps, 0, x @ p[0].T / np.sqrt(d))
        G = [flat(x) @ flat(x).T / d]
        per = n // heads
        for k in range(blocks):
            WQ, WV, WO, b = p[4 * k + 1: 4 * k + 5]
            u = _shifted(eps, 3 * k + 1, z @ WQ.T / np.sqrt(n)).reshape(z.shape[:2] + (heads, per))
            v = _shifted(eps, 3 * k + 2, np.sqrt(0.8 / n) * z @ WV.T).reshape(z.shape[:2] + (heads, per))
            A = jax.nn.softmax(2.0 * jnp.einsum("ashc,athc->ahst", u, u) / per, axis=-1)
            y = jnp.einsum("ahst,athc->ashc", A, v).reshape(z.shape)
            out = _shifted(eps, 3 * k + 3, np.sqrt(1.2 / n) * y @ WO.T + np.sqrt(0.1) * b)
            G += [flat(z) @ flat(z).T / n, 0.8 / n * flat(z) @ flat(z).T, 1.2 / n * flat(y) @ flat(y).T + 0.1]
            z = xi * z + gamma * out
        return z, G

    return forward, lambda n: [(n, d)] + [(n, n), (n, n), (n, n), (n,)] * blocks


@pytest.mark.slow
def test_sampled_attention_blocks_ntk_statistics_one_by_one(monkeypatch):
    """A, B and D over three tokens after two blocks z' = 0.8 z + 0.6 attention(z) (tied, two heads,
    logits scaled by C_Q C_K = 4): every entry against its own estimate from networks written out in this
    test (3000 at widths 32, 64, 128, fitted in 1/n), within 5 standard errors. Rejected by the same
    samples: the attention weights held at their infinite-width value in the layer's maps and in the
    branch's Jacobians. F is not derived after attention (None); the same samples show why: the two
    weighted steps' F alone misses the fit by more than 5 standard errors."""
    blocks, xi, gamma = 2, 0.8, 0.6
    net = arch.serial(arch.dense(1.0), arch.repeat(blocks, arch.residual(arch.attention(
        heads=2, C_Q=2.0, C_K=2.0, C_V=0.8, C_O=1.2, C_b=0.1), xi=xi, gamma=gamma)))
    x = np.random.default_rng(1).standard_normal((1, 3, 4))
    fits = _agrees_one_by_one(net, x, *_attention_forward(x, blocks, xi, gamma), quantities="ABD")
    assert arch_finite_width_tensor(net, x).values["F"][-1] is None
    state, jacobians = tensor_ntk.attention_state, tensor_ntk.BranchJacobians.attention

    def fixed_weights(st, Es, CPP, CNP, CNN, run, L, weights, JS, JU, r=1.0):
        return state(st, Es, CPP, CNP, CNN, run, L, weights, JS, lambda X: 0 * JU(X), r)

    def fixed_in_branch(self, Theta, JP, run, L, weights, JS, JG, JT):
        return jacobians(self, Theta, JP, run, L, weights, JS, 0 * JG, 0 * JT)

    for where, change in (("layer", fixed_weights), ("branch", fixed_in_branch)):
        with monkeypatch.context() as m:
            if where == "layer":
                m.setattr(tensor, "attention_state", change)
            else:
                m.setattr(tensor_ntk.BranchJacobians, "attention", change)
            off = _worst_z(fits, arch_finite_width_tensor(net, x), "ABD")
            assert max(off.values()) > 5, (where, off)

    def steps_only(st, Es, CPP, CNP, CNN, run, L, weights, JS, JU, r=1.0):  # the F the steps would give
        out = state(st, Es, CPP, CNP, CNN, run, L, weights, JS, JU, r)
        M1 = int(round(np.sqrt(L.shape[0])))
        values = tensor_ntk._assemble(st, Es, CPP, CNP, CNN, run, L, (0.0, weights["lambda_V"], weights["C_V"]),
                                      weights["C_V"], r).mapped(JS)
        Ky = (JS @ (weights["C_V"] * (L @ Es.reshape(-1)))).reshape(M1, M1)
        y = tensor_ntk.weighted_state(values, Ky, np.zeros((M1,) * 4), Ky, np.eye(M1 * M1), np.zeros((M1**2,) * 2),
                                      tensor_ntk.identity_tables(Ky), np.eye(M1 * M1),
                                      (weights["lambda_b"], weights["lambda_O"], weights["C_O"]), weights["C_O"], r)
        out.F = y.F
        return out

    monkeypatch.setattr(tensor, "attention_state", steps_only)
    assert _worst_z(fits, arch_finite_width_tensor(net, x), "F")["F"] > 5


def _layernorm_forward(x):
    """dense(1) -> tanh -> dense(1.5, 0.1) -> LayerNorm -> dense(2, 0.1): (forward, shapes) for
    :func:`_network_samples`; LayerNorm over the channels of each input, eps = 1e-12 (the rule's)."""
    import jax.numpy as jnp

    d = x.shape[1]

    def forward(eps, p, n):
        W1, W2, b2, W3, b3 = p
        z1 = _shifted(eps, 0, x @ W1.T / np.sqrt(d))
        s = jnp.tanh(z1)
        z2 = _shifted(eps, 1, jnp.sqrt(1.5 / n) * s @ W2.T + jnp.sqrt(0.1) * b2)
        mu = z2.mean(axis=1, keepdims=True)
        phi = (z2 - mu) / jnp.sqrt(((z2 - mu) ** 2).mean(axis=1, keepdims=True) + 1e-12)
        z3 = _shifted(eps, 2, jnp.sqrt(2.0 / n) * phi @ W3.T + jnp.sqrt(0.1) * b3)
        return z3, [x @ x.T / d, 1.5 / n * s @ s.T + 0.1, 2.0 / n * phi @ phi.T + 0.1]

    return forward, lambda n: [(n, d), (n, n), (n,), (n, n), (n,)]


def _layernorm_changed(change):
    """:func:`derive.finite.tensor_ntk.layernorm_tables` with one change (a wrong map)."""
    original = tensor_ntk.layernorm_tables

    def wrong(K, eps):
        t = original(K, eps)
        run = t.run
        if change == "F without the Jacobian's projection":
            M = K.shape[0]
            g = np.zeros_like(run.g)
            for s, u in np.ndindex(M, M):
                g[s, u, u] = np.sqrt(run.Ed[s, s] * run.Ed[u, u])
            X4 = run.Ed[:, :, None, None] * t.X[None, None, :, :]
            run = tensor_ntk.RunTables(run.Ed, run.JQ, g, run.D4, X4)
        elif change == "LayerNorm's variance held in the NTK term":
            return tensor_ntk.LayerNormTables(t.X, t.JX, tensor_ntk.RunTables(
                run.Ed, np.zeros_like(run.JQ), run.g, run.D4, run.X4))
        return tensor_ntk.LayerNormTables(t.X, t.JX, run)

    return wrong


@pytest.mark.slow
def test_sampled_layernorm_ntk_statistics_over_two_inputs_one_by_one(monkeypatch):
    """A, B, D, F over two inputs after dense -> tanh -> dense -> LayerNorm -> dense, every entry against
    its own estimate from networks written out in this test (3000 at widths 32, 64, 128, fitted in 1/n):
    all within 5 standard errors. Rejected by the same samples: F without LayerNorm's Jacobian
    projection (LayerNorm as a per-site scaling), and A with LayerNorm's variance held at its
    infinite-width value in the NTK term."""
    net = arch.serial(arch.dense(1.0), arch.activation("tanh"), arch.dense(1.5, 0.1), arch.layer_norm(),
                      arch.dense(2.0, 0.1))
    x = np.random.default_rng(1).standard_normal((2, 4))
    widths = (32, 64, 128)
    forward, shapes = _layernorm_forward(x)
    fits = _fitted([_site_pair_statistics(*_network_samples(x, n, 3000, n, forward, shapes(n))) for n in widths],
                   widths)
    theory = arch_finite_width_tensor(net, x)
    assert max(_worst_z(fits, theory).values()) < 5, _worst_z(fits, theory)
    for change, shows in (("F without the Jacobian's projection", "F"), ("LayerNorm's variance held in the NTK term",
                                                                          "A")):
        monkeypatch.setattr(tensor, "layernorm_tables", _layernorm_changed(change))
        off = _worst_z(fits, arch_finite_width_tensor(net, x))
        assert all(off[q] > 5 for q in shows), (change, off)


def test_the_result_reports_theta_var_in_json_and_markdown():
    x = np.random.default_rng(0).standard_normal((2, 3))
    tf = arch_finite_width_tensor(arch.mlp(2, "relu", 2.0, 0.0), x)
    out = tf.as_dict()
    var = np.asarray(out["Theta_var"][-1])
    assert var.shape == (2, 2) and np.all(np.diag(var) > 0)
    np.testing.assert_allclose(var, tensor_ntk.ntk_variance(tf.values["A"][-1], tf.values["B"][-1]))
    assert out["ntk_reasons"] == [""] * len(tf.labels)
    text = tf._repr_markdown_()
    assert "Var" in text and "of one output channel" in text
    assert "A, B, D, F" in repr(tf)


def test_parallel_sites_through_a_kink_are_a_clear_error():
    """relu's <s'_a s'_b> has an infinite K-derivative at correlation +-1 between two sites that are not
    the same (antiparallel, or parallel with another variance): one line instead of NaN. Smooth
    activations have finite derivatives there."""
    for y in ([-1.0, -0.5, 0.3], [2.0, 1.0, -0.6]):
        x = np.array([[1.0, 0.5, -0.3], y, [0.2, -1.0, 0.4]])
        with pytest.raises(DeriveError, match="not parallel or antiparallel"):
            arch_finite_width_tensor(arch.mlp(3, "relu", 2.0, 0.0), x)
    x = np.array([[1.0, 0.5, -0.3], [1.0, 0.5, -0.3], [0.2, -1.0, 0.4]])
    tf = arch_finite_width_tensor(arch.mlp(3, "tanh", 1.5, 0.1), x)  # smooth: the duplicate is the same input
    var = tf.theta_var()[-1]
    assert var[0, 0] == pytest.approx(var[1, 1], rel=1e-12)
    assert var[0, 1] == pytest.approx(var[0, 0], rel=1e-12)


IDENTICAL = {  # identical inputs: each site's class of identical sites at every Gaussian point
    "relu MLP": lambda: arch.mlp(3, "relu", 2.0, 0.1),
    "relu residual blocks (a branch's Jacobians at identical sites)": lambda: arch.serial(arch.dense(1.0), arch.repeat(
        2, arch.residual(arch.dense(2.0), arch.activation("relu"), arch.dense(2.0, 0.1), xi=0.8, gamma=0.6)),
        arch.activation("relu"), arch.dense(1.0)),
    "relu, LayerNorm, relu": lambda: arch.serial(arch.dense(1.0), arch.activation("relu"), arch.dense(2.0, 0.1),
                                                 arch.layer_norm(), arch.dense(2.0, 0.1), arch.activation("relu"),
                                                 arch.dense(1.0)),
}


@pytest.mark.parametrize("name", sorted(IDENTICAL))
def test_identical_inputs_are_copies_of_the_distinct_ones(name):
    """Inputs (x0, x1, x0): every quantity at every layer (K, V, G1, Theta, A, B, D, F) is the one of
    (x0, x1) copied to the duplicate, to 1e-12, through a kinked activation whose K-derivatives diverge
    between the two copies (derived over the distinct sites, derive.finite.tensor_ntk.Sites)."""
    net = IDENTICAL[name]()
    x = np.random.default_rng(0).standard_normal((2, 4))
    distinct, with_copy = arch_finite_width_tensor(net, x), arch_finite_width_tensor(net, x[[0, 1, 0]])
    checked = 0
    for q in ("K", "V", "G1", "Theta", "A", "B", "D", "F"):
        for a, b in zip(distinct.values[q], with_copy.values[q]):
            assert (a is None) == (b is None), q
            if a is not None:
                a = np.asarray(a)
                np.testing.assert_allclose(b, a[np.ix_(*[[0, 1, 0]] * a.ndim)], rtol=0, atol=1e-12 * np.abs(a).max())
                checked += 1
    assert checked >= 20


def test_sites_group_identical_ones_only():
    """Sites.of: classes of equal rows of K (and V, G1); a parallel site of another variance, or one whose
    V differs, stays apart; values copy, derivatives split over a class."""
    K = np.array([[1.0, 0.3, 1.0, 2.0], [0.3, 2.0, 0.3, 0.6], [1.0, 0.3, 1.0, 2.0], [2.0, 0.6, 2.0, 4.0]])
    sites = tensor_ntk.Sites.of(K)
    assert sites.rep.tolist() == [0, 1, 0, 2] and sites.keep.tolist() == [0, 1, 3]
    V = np.zeros((4,) * 4)
    V[0, 0, 0, 0] = 1.0
    assert tensor_ntk.Sites.of(K, V).distinct
    g = np.arange(3.0)
    assert sites.values(g).tolist() == [0.0, 1.0, 0.0, 2.0]
    assert sites.derivatives(g, 1).tolist() == [0.0, 1.0, 0.0, 2.0]
    assert sites.derivatives(np.ones((3, 3)), 1)[:, 0].tolist() == [0.5, 0.5, 0.5, 0.5]
    J = sites.pairs(np.eye(9), 1)  # summed over a class's pairs, a derivative is the distinct sites' one
    assert J[0, [0, 2, 8, 10]].sum() == pytest.approx(1.0)
