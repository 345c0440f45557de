"""The rule library (rules/): identities checked against the mpmath reference, activation rule files
well formed, and which shipped activations the engine closes.

The identity integrands and results are read here straight from the TOML with :mod:`tomllib` and
turned into mpmath callables with ``sympify``/``lambdify`` (fine in tests, which only read the shipped
files), so that a slip in the engine's own loading would show up as a disagreement.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path

import mpmath as mp
import pytest
import sympy as sp
import tomllib
from reference import expect1, expect2

from derive.core import symbols as S
from derive.core.parse import parse_expression
from derive.rules.activations import resolve
from derive.rules.files import activation_names, builtin_rules_dir
from derive.symbolic.expectations import gaussian_expectation, identities
from derive.symbolic.numeric import evaluate
from derive.symbolic.quadrature import GaussianExpectation
from derive.symbolic.recursions import derive_kernel

RULES = builtin_rules_dir()
IDENTITY_FILES = sorted((RULES / "identities").glob("*.toml"))
ACTIVATION_FILES = sorted((RULES / "activations").glob("*.toml"))

#: Agreement of an identity's result with the reference (both computed at 25-30 digits; the
#: reference is good to about 1e-14 of E|integrand|).
IDENTITY_RTOL = 1e-12
#: Agreement of the engine's double-precision evaluation with the reference (as in test_expectations).
ENGINE_RTOL = 1e-10
#: Covariances the identities are checked at: variances for one input, (K11, K12, K22) for two.
VARIANCES = (0.05, 1.0, 3.0)
COVARIANCES = tuple((k11, rho * math.sqrt(k11 * k22), k22)
                    for k11, rho, k22 in ((1.0, 0.3, 2.0), (0.5, -0.7, 3.0), (2.0, 0.999999, 1.5)))
#: Random draws of the wild symbols per identity (exact rationals: multiples of 1/4 in [-2, 2], not 0).
DRAWS = 2

COV_SYMBOLS = {"K": S.K, "K11": S.K11, "K12": S.K12, "K22": S.K22}
VARIABLE_SYMBOLS = {"z": S.z, "z1": S.z1, "z2": S.z2}


def _identity_entries() -> list[tuple[str, dict]]:
    out = []
    for path in IDENTITY_FILES:
        for k, entry in enumerate(tomllib.loads(path.read_text(encoding="utf-8")).get("identity", [])):
            out.append((f"{path.stem}:{k + 1}:{entry.get('name', '?')}", entry))
    return out


IDENTITIES = _identity_entries()


def _table(entry: dict) -> dict[str, sp.Symbol]:
    table = {v: VARIABLE_SYMBOLS[v] for v in entry["variables"]}
    table.update({w: sp.Symbol(w, real=True) for w in entry.get("wild", [])})
    return table


def _draw(entry: dict, k: int) -> dict[sp.Symbol, sp.Rational]:
    rng = random.Random(f"{entry['name']}/{k}")
    values = {}
    for w in entry.get("wild", []):
        q = rng.choice([n for n in range(-8, 9) if n])
        values[sp.Symbol(w, real=True)] = sp.Rational(Fraction(q, 4))
    return values


def _kinks(expr: sp.Expr, var: sp.Symbol) -> tuple[float, ...]:
    """Zeros in ``var`` of the arguments of the steps in ``expr`` (linear in the identities)."""
    pts = set()
    for step in expr.atoms(sp.Heaviside):
        if step.args[0].has(var):
            pts.update(float(r) for r in sp.solve(step.args[0], var))
    return tuple(sorted(pts))


def _reference(integrand: sp.Expr, variables: list[sp.Symbol], cov) -> tuple:
    """(<integrand>, a callable giving <|integrand|>) by tests/reference.py."""
    f = sp.lambdify(variables, integrand, modules="mpmath")
    g = sp.lambdify(variables, sp.Abs(integrand), modules="mpmath")
    if len(variables) == 1:
        kinks = _kinks(integrand, variables[0])
        return expect1(f, cov[0], kinks=kinks), lambda: expect1(g, cov[0], kinks=kinks)
    kinks1, kinks2 = (_kinks(integrand, v) for v in variables)
    return (expect2(f, *cov, kinks1=kinks1, kinks2=kinks2),
            lambda: expect2(g, *cov, kinks1=kinks1, kinks2=kinks2))


def _assert_close(value, ref, scale, rtol: float, what: str) -> None:
    """|value - ref| <= rtol max(|ref|, 1e-3 <|integrand|>): relative, except where the expectation
    (nearly) vanishes by symmetry, when it is measured against the integrand's size (see
    tests/test_expectations.py, assert_close)."""
    ref = mp.mpf(ref)
    bound = rtol * abs(ref)
    if abs(value - ref) > bound:
        bound = max(bound, rtol * 1e-3 * scale())
    assert abs(value - ref) <= bound, f"{what}: got {mp.nstr(value, 17)}, reference {mp.nstr(ref, 17)}"


def _cases():
    for ident_id, entry in IDENTITIES:
        covs = [(k,) for k in VARIANCES] if len(entry["variables"]) == 1 else COVARIANCES
        draws = range(DRAWS) if entry.get("wild") else range(1)
        for ci, cov in enumerate(covs):
            for k in draws:
                yield pytest.param(ident_id, cov, k, id=f"{ident_id}-cov{ci}-draw{k}")


# ------------------------------------------------------------------------------ identities


def test_identity_files_exist():
    assert IDENTITY_FILES and IDENTITIES


@pytest.mark.slow
@pytest.mark.parametrize(("ident_id", "cov", "draw"), list(_cases()))
def test_identity_against_reference(ident_id, cov, draw):
    """The TOML result equals <integrand> (reference), and so does the engine on that integrand."""
    entry = dict(IDENTITIES)[ident_id]
    table = _table(entry)
    variables = [table[v] for v in entry["variables"]]
    wild = _draw(entry, draw)
    integrand = sp.sympify(entry["integrand"], locals=table).xreplace(wild)
    result = sp.sympify(entry["result"], locals={**table, **COV_SYMBOLS}).xreplace(wild)
    cov_values = dict(zip((S.K,) if len(variables) == 1 else (S.K11, S.K12, S.K22), cov))
    want, scale = _reference(integrand, variables, cov)
    what = f"{entry['name']} with {wild} at {cov}"

    with mp.workdps(30):
        formula = sp.lambdify(list(cov_values), result, modules="mpmath")(*(mp.mpf(c) for c in cov))
        _assert_close(formula, want, scale, IDENTITY_RTOL, f"TOML result of {what}")

    engine = gaussian_expectation(integrand, variables)
    assert not engine.has(GaussianExpectation), f"{what}: the engine did not close it"
    value = float(evaluate(engine, cov_values))
    _assert_close(mp.mpf(value), want, scale, ENGINE_RTOL, f"engine on {what}")


@pytest.mark.parametrize("ident_id", [i for i, _ in IDENTITIES])
def test_identity_loaded_as_written(ident_id):
    """Each identity is read (derive.rules.files.load_identities) and matched as the TOML states it."""
    entry = dict(IDENTITIES)[ident_id]
    (ident,) = [i for i in identities() if i.name == entry["name"]]
    table = _table(entry)
    assert [v.name for v in ident.variables] == list(entry["variables"])
    assert [w.name for w in ident.wild] == list(entry.get("wild", []))
    integrand = sp.sympify(entry["integrand"], locals=table)
    factors = sp.Mul.make_args(integrand)
    n_special = sum(1 for f in factors if isinstance(f, (sp.Heaviside, sp.erf)))
    assert len(ident.specials) == n_special
    degrees = tuple(sp.degree(sp.Mul(*[f for f in factors if not isinstance(f, (sp.Heaviside, sp.erf))]), v)
                    for v in (table[v] for v in entry["variables"]))
    assert tuple(ident.powers) == degrees
    result = sp.sympify(entry["result"], locals={**table, **COV_SYMBOLS})
    symbols = sorted(result.free_symbols, key=str)
    point = {s: sp.Rational(3, 7) + sp.Rational(k, 5) for k, s in enumerate(symbols)}
    point.update({S.K: sp.Rational(6, 5), S.K11: sp.Rational(6, 5), S.K22: 2, S.K12: sp.Rational(2, 5)})
    ours, theirs = result.xreplace(point), ident.result.xreplace(point)
    assert abs(sp.N(ours - theirs, 30)) < 1e-25, (ident.result, entry["result"])


# ----------------------------------------------------------------------- activation rules


@pytest.mark.parametrize("path", ACTIVATION_FILES, ids=lambda p: p.stem)
def test_activation_rule_file(path):
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for key in ("name", "expression", "description"):
        assert isinstance(data.get(key), str) and data[key].strip(), f"{path.name}: missing '{key}'"
    params = data.get("params", {})
    table = {"z": S.z}
    for pname, spec in params.items():
        assert "default" in spec, f"{path.name}: parameter {pname} has no default"
        default = parse_expression(str(spec["default"]), {}, where=f"{path.name} default of {pname}")
        assert default.is_real and default.is_number, f"{path.name}: default of {pname} is {default}"
        # The declared domain matters to the parser (hermite(degree, z) needs an integer degree).
        if spec.get("integer"):
            table[pname] = sp.Symbol(pname, integer=True, nonnegative=True)
        elif spec.get("positive"):
            table[pname] = sp.Symbol(pname, positive=True)
        else:
            table[pname] = sp.Symbol(pname, real=True)
    expr = parse_expression(data["expression"], table, where=f"{path.name} expression")
    assert expr.has(S.z), f"{path.name}: expression does not depend on z"
    assert expr.free_symbols <= set(table.values()), f"{path.name}: unknown symbols in {expr}"
    assert data["name"] in activation_names()
    sigma = resolve(data["name"]).sigma_numeric
    with mp.workdps(20):
        for t in (-1.3, 0.4, 2.2):
            assert mp.isfinite(sp.lambdify(S.z, sigma, modules="mpmath")(mp.mpf(t)))


def test_activation_names_and_aliases_are_unique():
    """No name or alias (compared as the loader does: case-, '-'/'_'-insensitive) is in two files."""
    seen: dict[str, str] = {}
    for path in ACTIVATION_FILES:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for key in {k.strip().lower().replace("-", "_") for k in (data["name"], *data.get("aliases", []))}:
            assert key not in seen, f"'{key}' is in {path.name} and in {seen.get(key)}"
            seen[key] = path.name


#: Activations whose kernel and NTK the engine must derive in closed form, and those it integrates
#: numerically (no closed form is known for these).
CLOSED = ["relu", "leaky_relu", "abrelu", "linear", "abs", "step", "sign", "erf", "sin", "cos", "exp",
          "gaussian", "gelu"]
QUADRATURE = ["tanh", "swish", "softplus", "sigmoid", "mish"]


@pytest.mark.parametrize("name", CLOSED)
def test_closed_form_activations(name):
    d = derive_kernel(resolve(name))
    assert d.closed_form, f"{name}: quadrature nodes left: {d.nodes()}"


@pytest.mark.parametrize("name", QUADRATURE)
def test_quadrature_activations(name):
    assert not derive_kernel(resolve(name)).closed_form


def test_builtin_rules_found_next_to_the_source_tree(monkeypatch):
    """From a checkout the shipped rules are the checkout's ``rules/`` folder, found without the
    installed package data (which a checkout run with a non-editable install does not have)."""
    import derive
    import derive.rules.files as files

    checkout = Path(derive.__file__).resolve().parent.parent
    if not (checkout / "rules" / "activations").is_dir():
        pytest.skip("derive is imported from an installed copy, not a checkout")

    def no_package_data(name):
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(files.resources, "files", no_package_data)
    assert builtin_rules_dir() == checkout / "rules"


def test_layer_rules_are_read_once():
    """Every architecture layer asks for its rule; the files are parsed once per folder set (a lost
    cache made a 10^4-layer finite-width walk take minutes instead of seconds)."""
    from derive.rules.layers import find_layer_rule, layer_rules

    assert layer_rules() is layer_rules()
    assert find_layer_rule("dense") is find_layer_rule("Dense")
