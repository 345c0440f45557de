"""The multiplication gate of Lin, Tegmark & Rolnick (derive.gate, derive.gates.networks).

The references here do not use the engine's derivation: the activations are written again with
mpmath functions, the gate is evaluated at 60 digits, and its error is fitted over lambda; counts are
compared with the papers' statements (4(n-1) neurons in ceil(log2 n) layers for a tree, 2^n for one
hidden layer).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import mpmath as mp
import numpy as np
import pytest
import sympy as sp
from typer.testing import CliRunner

import cli
import derive
from derive.core.errors import DeriveError
from derive.gates.counts import polynomial_counts, product_counts
from derive.gates.gate import LAM, X, Y, gate, generic_error_series, taylor_symbols
from derive.symbolic.numeric import evaluate

#: The five activations of the issue, written independently of the rule files.
MP_ACTIVATIONS = {
    "softplus": lambda t: mp.log(1 + mp.exp(t)),
    "tanh": mp.tanh,
    "exp": mp.exp,
    "gelu": lambda t: t * (1 + mp.erf(t / mp.sqrt(2))) / 2,
    "swish": lambda t: t / (1 + mp.exp(-t)),
}
NAMES = sorted(MP_ACTIVATIONS)


@pytest.fixture(scope="module")
def results():
    return {name: gate(name, orders=2) for name in NAMES}


def _mp_gate(f, c, lam, x, y, s2):
    u, v = lam * x, lam * y
    return (f(c + u + v) + f(c - u - v) - f(c + u - v) - f(c - u + v)) / (4 * lam**2 * s2)


def _term(res, power, x, y):
    expr = dict(res.error).get(power, sp.Integer(0))
    return mp.mpf(str(sp.N(expr.subs({X: sp.Rational(x), Y: sp.Rational(y)}), 50)))


# ---------------------------------------------------------------------------------------------
# (i) the derived error series against a fit of the gate's error over lambda, at 60 digits


@pytest.mark.parametrize("name", NAMES)
def test_error_coefficients_against_mpmath_fit(results, name):
    res = results[name]
    assert res.exists and len(res.error) == 2
    f = MP_ACTIVATIONS[name]
    with mp.workdps(60):
        c = mp.mpf(str(sp.N(res.shift, 55)))
        s2 = mp.diff(f, c, 2)  # numerical differentiation, not the engine's Taylor data
        x, y = "0.7", "-0.45"
        xm, ym = mp.mpf(x), mp.mpf(y)
        lams = [mp.mpf(k) / 400 for k in range(1, 8)]
        # (gate - xy)/lam^2 = a + b lam^2 + O(lam^4): least squares in lam^2, cubic.
        rows = [[1, t**2, t**4, t**6] for t in lams]
        rhs = [(_mp_gate(f, c, t, xm, ym, s2) - xm * ym) / t**2 for t in lams]
        A = mp.matrix(rows)
        coef = mp.lu_solve(A.T * A, A.T * mp.matrix(rhs))
        lead, nxt = _term(res, 2, x, y), _term(res, 4, x, y)
        assert abs(coef[0] - lead) < mp.mpf("1e-12") * abs(lead)
        assert abs(coef[1] - nxt) < mp.mpf("1e-6") * abs(nxt)
        # the documented closed form a = s''''(c) / (6 s''(c)), with mpmath's derivatives
        a = mp.diff(f, c, 4) / (6 * s2)
        assert abs(mp.mpf(str(sp.N(res.leading_coefficient, 50))) - a) < mp.mpf("1e-20")


def test_tanh_shift_is_the_nearest_maximum_of_curvature(results):
    res = results["tanh"]
    with mp.workdps(50):
        c = mp.mpf(str(sp.N(res.shift, 50)))
        assert abs(c - mp.atanh(1 / mp.sqrt(3))) < mp.mpf("1e-40")  # tanh''' = 0 at tanh^2 = 1/3
        assert abs(mp.diff(mp.tanh, c, 3)) < mp.mpf("1e-30")
        assert mp.diff(mp.tanh, 0, 2) == 0 and abs(mp.diff(mp.tanh, c, 2)) > abs(mp.diff(mp.tanh, c / 2, 2))
    assert "s''(0) = 0" in res.reason and res.shift.is_positive


@pytest.mark.parametrize("name,expected", [("sigmoid", mp.log(2 + mp.sqrt(3))), ("erf", 1 / mp.sqrt(2)),
                                           ("sin", mp.pi / 2)])
def test_closed_form_shifts(name, expected):
    res = gate(name, orders=1)
    assert res.exists and not res.shift.has(sp.Float)
    assert abs(float(res.shift) - float(expected)) < 1e-14


def test_generic_series_against_the_sum_over_even_orders():
    """The expansion of the network equals sum_k 2 s^(2k) lam^(2k-2) (p^2k - q^2k) / ((2k)! 4 s'')."""
    sig = taylor_symbols(8)
    p, q = X + Y, X - Y
    for power, coeff in generic_error_series(3):
        k = power // 2 + 1
        closed = 2 * sig[2 * k] * (p ** (2 * k) - q ** (2 * k)) / (sp.factorial(2 * k) * 4 * sig[2])
        assert sp.expand(coeff - closed) == 0
    lead = dict(generic_error_series(1))[2]
    assert sp.expand(lead - sig[4] / (6 * sig[2]) * (X**3 * Y + X * Y**3)) == 0


def test_shallow_product_error_by_expansion():
    """sum_e prod(e) T(lam e.x) / (2^n lam^n s^(n)) = prod x + lam^2 s^(n+2)/(6 s^(n)) |x|^2 prod x
    + O(lam^4), T the Taylor polynomial: the formula the shallow network reports."""
    import itertools

    for n in (2, 3, 4):
        sig = taylor_symbols(n + 3)
        xs = sp.symbols(f"x1:{n + 1}")
        net = 0
        for e in itertools.product((1, -1), repeat=n):
            arg = LAM * sum(ei * xi for ei, xi in zip(e, xs))
            net += math.prod(e) * sum(sig[k] * arg**k / sp.factorial(k) for k in range(n + 4))
        net = sp.expand(net / (2**n * LAM**n * sig[n]))
        prod = math.prod(xs)
        want = prod + LAM**2 * sig[n + 2] / (6 * sig[n]) * sum(x**2 for x in xs) * prod
        assert sp.expand(net - want).subs(LAM, 0) == 0
        assert sp.expand((net - want) / LAM**2).subs(LAM, 0) == 0


# ---------------------------------------------------------------------------------------------
# (ii) the generated JAX networks against x*y


@pytest.mark.parametrize("name", NAMES)
def test_jax_gate_against_product(results, name):
    from derive.gates.networks import gate_network

    res = results[name]
    lam = 0.02
    net = gate_network(res, lam=lam)
    rng = np.random.default_rng(7)
    x, y = rng.uniform(-1.5, 1.5, (2, 300))
    err = np.asarray(net(x, y)) - x * y
    lead = evaluate(dict(res.error)[2], {X: x, Y: y}) * lam**2
    nxt = evaluate(dict(res.error)[4], {X: x, Y: y}) * lam**4
    s_c = abs(float(res.taylor[0])) + 1.0
    roundoff = 64 * np.finfo(float).eps * s_c / (lam**2 * abs(float(res.taylor[2])))
    assert np.all(np.abs(err) <= 2 * (np.abs(lead) + np.abs(nxt)) + roundoff)
    assert np.all(np.abs(err - lead - nxt) <= 1e-3 * np.abs(lead) + roundoff)
    assert np.max(np.abs(err)) > 10 * roundoff  # the lam^2 error is what is seen, not noise


@pytest.mark.parametrize("name,n", [("softplus", 3), ("tanh", 5), ("gelu", 4), ("exp", 6), ("swish", 7)])
def test_jax_product_tree(results, name, n):
    from derive.gates.networks import product_network

    res = results[name]
    lam = 0.01
    tree = product_network(res, n, lam=lam)
    rng = np.random.default_rng(n)
    xs = rng.uniform(-1, 1, (200, n))
    got = np.asarray(tree(xs))
    a = float(res.leading_coefficient)

    def ref(vals):  # exact products and first-order error propagation through the same tree
        vals = [(v, np.zeros_like(v)) for v in vals]
        while len(vals) > 1:
            nxt = []
            for i in range(0, len(vals) - 1, 2):
                (p, ep), (q, eq) = vals[i], vals[i + 1]
                nxt.append((p * q, a * lam**2 * (p**3 * q + p * q**3) + q * ep + p * eq))
            if len(vals) % 2:
                nxt.append(vals[-1])
            vals = nxt
        return vals[0]

    prod, err = ref(list(xs.T))
    assert np.allclose(prod, xs.prod(axis=1))
    roundoff = 1e-11 * n
    assert np.all(np.abs(got - prod) <= 1.5 * np.abs(err) + roundoff)
    assert np.all(np.abs(got - prod - err) <= 0.05 * np.abs(err) + roundoff)


def test_jax_shallow_product():
    from derive.gates.networks import shallow_network

    res = gate("gelu", inputs=3)
    # the rule: the first of 0, the gate's shift (0), 1, ... with s^(3)(c) != 0; gelu^(3)(0) = 0
    f = MP_ACTIVATIONS["gelu"]
    assert abs(mp.diff(f, 0, 3)) < 1e-12 and res.shallow.neurons == 8 and res.shallow.shift == 1
    assert abs(mp.diff(f, 1, 3) - float(res.shallow.derivative)) < 1e-12
    lam = 0.05
    net = shallow_network(res, lam=lam)
    assert net.W.shape == (8, 3)
    rng = np.random.default_rng(3)
    xs = rng.uniform(-1, 1, (100, 3))
    prod = xs.prod(axis=1)
    lead = float(res.shallow.leading_ratio) * lam**2 * (xs**2).sum(axis=1) * prod
    err = np.asarray(net(xs)) - prod
    assert np.all(np.abs(err - lead) <= 0.05 * np.abs(lead) + 1e-9)


def test_exact_gate_for_a_locally_quadratic_activation():
    from derive.gates.networks import gate_network

    res = gate("rectified_monomial", ["degree=2"])
    assert res.exists and res.exact and res.shift == 1 and res.error == () and res.kink_distance == 1
    net = gate_network(res, lam=0.1)
    x, y = np.random.default_rng(0).uniform(-4, 4, (2, 50))  # lam (|x| + |y|) < 1
    assert np.allclose(np.asarray(net(x, y)), x * y, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# (iii) neuron counts against the papers


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 10, 16, 33, 64])
def test_product_counts(n):
    p = product_counts(n)
    assert p.gates == n - 1 and p.neurons == 4 * (n - 1)
    assert p.layers == math.ceil(math.log2(n))
    assert p.shallow_neurons == 2**n
    assert sum(p.gates_per_layer) == n - 1 and p.gates_per_layer[-1] == 1
    if n & (n - 1) == 0:
        assert p.carried == 0


def test_tree_linear_shallow_exponential():
    tree = [product_counts(n).neurons for n in range(2, 11)]
    shallow = [product_counts(n).shallow_neurons for n in range(2, 11)]
    assert all(b - a == 4 for a, b in zip(tree, tree[1:]))
    assert all(b == 2 * a for a, b in zip(shallow, shallow[1:]))


def test_polynomial_counts():
    q = polynomial_counts("x1*x2*x3*x4")
    assert (q.neurons, q.layers, q.shallow_neurons) == (12, 2, 16)
    q = polynomial_counts("x1^4")  # two squarings against three gates
    assert (q.squarings, q.multiplications, q.neurons, q.layers) == (2, 0, 4, 2)
    assert (q.plain_neurons, q.plain_layers, q.shallow_neurons) == (12, 2, 5)
    q = polynomial_counts("x1*x2 + x3^2 + 3 - x4")
    assert (q.neurons, q.layers, q.shallow_neurons) == (6, 1, 7)
    q = polynomial_counts("(x1 + x2)^2")  # expanded: x1^2 + 2 x1 x2 + x2^2
    assert len(q.monomials) == 3 and q.neurons == 2 + 4 + 2


@pytest.mark.parametrize("text,fragment", [("x1/x2", "negative power"), ("sin(x1) + x2", "function (sin)"),
                                           ("x1^x2", "exponent"), ("x1^0.5", "non-integer"),
                                           ("y + x1", "unknown name 'y'"), ("x1 +", "invalid syntax"),
                                           ("(x1+x2+x3+x4+x5+x6+x7)^20", "more than")])
def test_polynomial_rejected(text, fragment):
    with pytest.raises(DeriveError, match="polynomial") as exc:
        polynomial_counts(text)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# (iv) activations without the gate


@pytest.mark.parametrize("name,kind", [("relu", "piecewise linear"), ("leaky_relu", "piecewise linear"),
                                       ("abs", "piecewise linear"), ("linear", "affine"),
                                       ("step", "piecewise constant"),
                                       ("z*Heaviside(z) + 1", "piecewise linear")])
def test_no_gate(name, kind):
    res = gate(name)
    assert not res.exists and res.shift is None and kind in res.reason
    d = res.as_dict()
    assert d["exists"] is False and d["neurons"] is None
    if kind == "piecewise linear":
        assert "Yarotsky" in res.alternative and "log(1/eps)" in res.alternative
        assert "Dirac delta" in res.origin
    with pytest.raises(DeriveError):
        from derive.gates.networks import gate_network

        gate_network(res)


def test_kinked_smooth_pieces_shift_into_a_piece():
    res = gate("elu")
    assert "jumps" in res.origin and res.shift == -1 and res.kink_distance == 1
    assert res.leading_coefficient == sp.Rational(1, 6)  # e^z near -1: s'''' = s''


def test_bad_arguments():
    for kwargs in ({"lam": -1}, {"lam": 0}, {"lam": float("nan")}, {"lam": float("inf")}, {"lam": "inf"},
                   {"inputs": 1}, {"inputs": 65}, {"inputs": 2.5}, {"orders": 0}):
        with pytest.raises(DeriveError):
            gate("tanh", **kwargs)
    with pytest.raises(DeriveError, match="unknown activation"):
        gate("nosuch")


def test_result_object(results):
    res = results["softplus"]
    d = json.loads(json.dumps(res.as_dict()))
    assert d["leading_coefficient"] == "-1/12" and d["shift"] == "0" and d["neurons"] == 4
    assert "lam" in repr(res) and "softplus" in repr(res)
    assert r"\lambda" in res.to_latex() and res._repr_latex_().startswith("$")
    assert derive.gate("softplus", lam=0.5).hidden_weights[0, 0] == sp.Rational(1, 2)
    assert derive.GateResult is type(res)
    numeric = gate("softplus", lam="1/10")
    assert numeric.mu == 100  # 1 / (4 lam^2 s''(0)), s''(0) = 1/4


# ---------------------------------------------------------------------------------------------
# (v) the command


runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, list(args))


def test_cli_json():
    res = invoke("gate", "--activation", "tanh", "--inputs", "8", "--polynomial", "x1*x2 + x3^2",
                 "-f", "json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["exists"] is True and d["product"]["tree_neurons"] == 28 and d["product"]["tree_layers"] == 3
    assert d["product"]["shallow_neurons"] == 256 and d["polynomial"]["neurons"] == 6
    lead = derive.parse_expression(d["error_series"]["lam**2"], {"x": X, "y": Y})
    assert sp.expand(lead + sp.Rational(2, 3) * (X**3 * Y + X * Y**3)) == 0  # s''''(c)/(6 s''(c)) = -2/3


def test_cli_text_fits_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = invoke("gate", "--activation", "tanh", "--polynomial", "x1^3*x2 + x2*x3")
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    assert "atanh(sqrt(3)/3)" in res.stdout and "-2/3" in res.stdout


def test_cli_latex_and_relu():
    res = invoke("gate", "-a", "gelu", "-f", "latex")
    assert res.exit_code == 0 and r"\sigma''(c)" in res.stdout
    res = invoke("gate", "-a", "relu")
    assert res.exit_code == 0 and "does not exist" in res.stdout and "Yarotsky" in res.stdout


@pytest.mark.parametrize("args,fragment", [(["-a", "nosuch"], "unknown activation"),
                                           (["-a", "tanh", "--lambda", "-1"], "lambda"),
                                           (["-a", "tanh", "--lambda", "nan"], "finite"),
                                           (["-a", "tanh", "--lambda", "0"], "lambda"),
                                           (["-a", "tanh", "--inputs", "1"], "inputs"),
                                           (["-a", "tanh", "--inputs", "65"], "inputs"),
                                           (["-a", "tanh", "--polynomial", "exp(x1)"], "not a polynomial")])
def test_cli_bad_input(args, fragment):
    res = invoke("gate", *args)
    assert res.exit_code == 2
    assert fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert res.stdout == ""


def test_cli_out_writes_a_runnable_module(tmp_path):
    path = tmp_path / "g.py"
    res = invoke("gate", "-a", "swish", "--lambda", "0.01", "--out", str(path), "-f", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["wrote"] == str(path)
    spec = importlib.util.spec_from_file_location("generated_gate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # our own generated file, not user text
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1, 1, (2, 20))
    bound = (1 / 6) * 1e-4 * np.abs(x**3 * y + x * y**3) * 1.01 + 1e-10
    assert np.all(np.abs(np.asarray(mod.gate(x, y)) - x * y) <= bound)
    xs = rng.uniform(-1, 1, (20, 5))
    assert np.allclose(np.asarray(mod.product(xs)), xs.prod(axis=1), atol=1e-3)


def test_symbolic_gate_command_does_not_import_jax():
    code = ("import sys; sys.argv = ['derive', 'gate', '--activation', 'tanh', '--inputs', '5', "
            "'--polynomial', 'x1*x2', '--format', 'json']\n"
            "import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX', file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stderr.strip().endswith("NOJAX"), res.stderr
    assert json.loads(res.stdout)["product"]["tree_neurons"] == 16
