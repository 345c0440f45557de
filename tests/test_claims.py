"""derive.claims, derive.check and ``derive check``: is a hand derivation right, and where is it not?

Correct claims are written in forms deliberately unlike the engine's (arcsin for arccos, theta and rho
forms, expanded, LaTeX); wrong ones by the classic slips (a factor 2, a sign, a dropped term, a term
that only matters as rho -> 1). The empirical verdict is tested with the engine's derivation replaced
by the same wrong formula: only sampling can then tell, and it does.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sympy as sp

import cli
import derive
from derive.claims import check as claim_check
from derive.claims import claim, empirical, numeric, quantities, report, symbolic
from derive.claims import latex as latex_claims
from derive.core import symbols as S
from derive.core.errors import DeriveError, ParseError
from derive.symbolic import recursions

RELU_THETA = r"\frac{\sqrt{K_{11}K_{22}}}{2\pi}\left(\sin\theta + (\pi-\theta)\cos\theta\right)"
THETA_DEF = r"\theta = \arccos\left(\frac{K_{12}}{\sqrt{K_{11}K_{22}}}\right)"


def verdicts(rep) -> tuple[str, str, str]:
    m = rep.methods
    return rep.verdict, m["symbolic"]["result"], m["numeric"]["result"]


# ----------------------------------------------------------------------------------------------
# Right claims, written differently


@pytest.mark.parametrize("activation, quantity, claim", [
    # arcsin instead of the engine's arccos, and the rho form
    ("relu", "expectation", "sqrt(K11*K22)/(2*pi)*(sqrt(1 - rho**2) + (pi/2 + asin(rho))*rho)"),
    # theta form with a trigonometric rewrite: sin(theta) = sin(2 theta) / (2 cos(theta))
    ("relu", "expectation", "sqrt(K11*K22)/(2*pi)*(sin(2*theta)/(2*cos(theta)) + (pi - theta)*cos(theta))"),
    # expanded recursion, C_W distributed over every term
    ("relu", "recursion", "C_b + C_W*K12/2 - C_W*K12*theta/(2*pi) + C_W*sqrt(K11*K22 - K12**2)/(2*pi)"),
    ("relu", "derivative_expectation", "(pi - acos(rho))/(2*pi)"),
    # arccos instead of the engine's arcsin, with the product under the root multiplied out
    ("erf", "expectation", "2/pi*(pi/2 - acos(2*K12/sqrt(1 + 2*K11 + 2*K22 + 4*K11*K22)))"),
    ("erf", "single_input", "C_b + 2*C_W/pi*asin(1 - 1/(1 + 2*K))"),
    ("relu", "ntk_recursion", "lambda_b + lambda_W*sqrt(K11*K22)/(2*pi)*(sin(theta) + (pi-theta)*cos(theta))"
                              " + C_W*Theta12*(1 - theta/pi)/2"),
    ("relu", "chi_perp", "C_W/2"),
    ("relu", "V", "C_W**2*(3*K**2/2 - K**2/4) + r*(C_W/2)**2*V"),
    ("leaky_relu", "single_input", "C_b + C_W*K*(1 + a**2)/2"),
])
def test_equivalent_forms_are_equal(activation, quantity, claim):
    rep = derive.check(activation, quantity, claim)
    assert verdicts(rep) == ("equal", "equal", "equal"), rep.to_text()
    assert rep.counterexample is None and rep.hint is None
    assert rep.methods["numeric"]["max_rel_error"] <= numeric.RTOL_EXACT


def test_latex_claim_with_theta_definition_and_builtin_theta():
    for defs in ([THETA_DEF], None):
        rep = derive.check("relu", "expectation", latex=RELU_THETA, definitions=defs)
        assert verdicts(rep) == ("equal", "equal", "equal"), rep.to_text()
    # the numeric verdict visited the edges of the domain
    assert {"rho -> 1", "rho -> -1", "K -> 0", "large K"} <= set(rep.methods["numeric"]["regions"])


def test_latex_names_map_to_documented_symbols():
    tex = (r"\lambda_b + \lambda_{W}\frac{\sqrt{K_{11}K_{22}}}{2\pi}"
           r"\left(\sin\theta + (\pi-\theta)\cos\theta\right)"
           r" + C_{W}\,\Theta_{12}\,\frac{\pi - \theta}{2\pi}")
    assert derive.check("relu", "ntk_recursion", latex=tex).verdict == "equal"
    q = quantities.quantity("single_input")
    act = derive.activation("erf")
    tex = r"\sigma_b^2 + \sigma_w^2\,\frac{2}{\pi}\arcsin\frac{2K}{1+2K}"
    got = claim.parse_claim(tex, q, act, syntax="latex")
    assert got.expr == S.C_b + 2 * S.C_W * sp.asin(2 * S.K / (2 * S.K + 1)) / sp.pi
    tex = r"\operatorname{erf}(K) + \mathrm{erf}(K) - 2\erf(K) + e^{0}"
    erf = claim.parse_claim(tex, q, act, syntax="latex")
    assert erf.expr == 1


def test_latex_as_pasted_from_a_paper():
    q = quantities.quantity("expectation")
    act = derive.activation("relu")
    tex = r"$$ \left|K_{12}\right| \cdot \Big( \tfrac{1}{2} \Big) $$"
    got = claim.parse_claim(tex, q, act, syntax="latex")
    assert got.expr == sp.Abs(S.K12) / 2


def test_symbolic_time_budget_gives_undecided_not_a_hang():
    q = quantities.quantity("expectation")
    eng = quantities.derivation(derive.activation("gelu"), "expectation")
    claim = eng.replace(lambda e: isinstance(e, sp.asin), lambda e: sp.pi / 2 - sp.acos(e.args[0])) + S.K12**2
    out = symbolic.symbolic_verdict(claim, eng, q, budget=1e-3)
    assert out["result"] == "undecided" and "time budget" in out["detail"]


def test_symbolic_alone_proves_an_identity_the_numbers_cannot_see_apart():
    q = quantities.quantity("expectation")
    eng = quantities.derivation(derive.activation("relu"), "expectation")
    theta = sp.acos(S.K12 / sp.sqrt(S.K11 * S.K22))
    form = sp.sqrt(S.K11 * S.K22) / (2 * sp.pi) * (sp.sin(theta) + (sp.pi - theta) * sp.cos(theta))
    assert symbolic.symbolic_verdict(form, eng, q)["result"] == "equal"
    off = symbolic.symbolic_verdict(form + sp.Rational(1, 10**40) * S.K12**3, eng, q)
    assert off["result"] == "not-equal"  # below any numeric tolerance, still not identically 0


# ----------------------------------------------------------------------------------------------
# Wrong claims, and what the report says about them


def test_off_by_a_factor_two():
    rep = derive.check("relu", "expectation", latex=RELU_THETA.replace(r"{2\pi}", r"{\pi}"))
    assert verdicts(rep) == ("not-equal", "not-equal", "not-equal")
    assert "factor 2" in rep.hint
    assert rep.max_rel_error == pytest.approx(0.5, rel=1e-12)
    assert rep.values["claim"] == pytest.approx(2 * rep.values["derivation"], rel=1e-12)
    assert {"K11", "K12", "K22", "rho"} <= set(rep.counterexample)


def test_wrong_sign_and_missing_terms():
    sign = derive.check("relu", "single_input", "-(C_b + C_W*K/2)")
    assert sign.verdict == "not-equal" and "wrong sign" in sign.hint
    no_sin = derive.check("relu", "expectation", "sqrt(K11*K22)/(2*pi)*(pi - theta)*cos(theta)")
    assert no_sin.verdict == "not-equal"
    assert "sqrt(K11*K22 - K12**2)/(2*pi) is missing" in no_sin.hint
    no_bias = derive.check("relu", "recursion",
                           "C_W*sqrt(K11*K22)/(2*pi)*(sin(theta) + (pi - theta)*cos(theta))")
    assert no_bias.verdict == "not-equal" and "C_b is missing" in no_bias.hint
    doubled = derive.check("relu", "V", "5*C_W**2*K**2/4 + r*C_W**2*V/2")
    assert doubled.verdict == "not-equal" and "C_W**2*V*r/4 appears twice" in doubled.hint


def test_claim_right_at_rho_zero_wrong_towards_rho_one():
    # sqrt(K11 K22) rho^40 is below 1e-16 of the kernel for |rho| <= 0.3 but of its size at rho = 1.
    claim = "sqrt(K11*K22)/(2*pi)*(sin(theta) + (pi - theta)*cos(theta)) + sqrt(K11*K22)*rho**40"
    rep = derive.check("relu", "expectation", claim)
    assert rep.verdict == "not-equal"
    assert "differs only near rho -> +-1" in rep.hint
    assert abs(rep.counterexample["rho"]) > 0.9
    # and the textbook slip that agrees at rho = 0 only
    rho0 = derive.check("relu", "expectation", "K12/4 + sqrt(K11*K22)/(2*pi)")
    assert rho0.verdict == "not-equal" and rho0.counterexample is not None


def test_claim_undefined_at_a_point_is_judged_elsewhere():
    # sin(2 theta) / (2 cos theta) is 0/0 at rho = 0: left out, and said so.
    rep = derive.check("relu", "expectation",
                       "sqrt(K11*K22)/(2*pi)*(sin(2*theta)/(2*cos(theta)) + (pi - theta)*cos(theta))")
    assert rep.verdict == "equal"
    assert "undefined at 1 point" in rep.methods["numeric"]["detail"]


def test_quadrature_derivation_is_compared_numerically():
    rep = derive.check("tanh", "single_input", "C_b + C_W*K")
    assert rep.methods["symbolic"]["result"] == "undecided"
    assert rep.verdict == "not-equal" and rep.methods["numeric"]["tolerance"] == numeric.RTOL_QUADRATURE


# ----------------------------------------------------------------------------------------------
# Empirical: the claim against sampling, never against the engine


def test_empirical_agrees_with_a_right_claim():
    rep = derive.check("relu", "expectation", latex=RELU_THETA, empirical=True)
    emp = rep.methods["empirical"]
    assert emp["result"] == "equal" and emp["max_abs_z"] <= empirical.Z_MAX
    assert all(p["stderr"] > 0 for p in emp["points"])


def test_empirical_catches_a_wrong_claim_the_engine_also_gets_wrong(monkeypatch):
    """Replace the engine's kernel by the wrong formula: symbolic and numeric now agree with the wrong
    claim, and only the empirical verdict (sampled Gaussians) says not-equal."""
    wrong = "sqrt(K11*K22)/(2*pi)*(pi - theta)*cos(theta)"  # the sin(theta) term dropped
    real = recursions.derive_kernel

    def broken_kernel(spec, *args, **kwargs):
        d = real(spec, *args, **kwargs)
        theta = sp.acos(S.K12 / sp.sqrt(S.K11 * S.K22))
        bad = sp.sqrt(S.K11 * S.K22) / (2 * sp.pi) * (sp.pi - theta) * sp.cos(theta)
        return dataclasses.replace(d, expectation=bad)

    monkeypatch.setattr(recursions, "derive_kernel", broken_kernel)
    rep = derive.check("relu", "expectation", wrong, empirical=True)
    assert rep.methods["symbolic"]["result"] == "equal"
    assert rep.methods["numeric"]["result"] == "equal"
    assert rep.methods["empirical"]["result"] == "not-equal"
    assert rep.verdict == "not-equal"
    assert abs(rep.values["z"]) > empirical.Z_MAX and "sampl" in rep.hint
    # the same wrong formula, now as a layer map checked against sampled two-layer networks
    rec = derive.check("relu", "recursion", f"C_b + C_W*({wrong})", empirical=True)
    assert rec.methods["numeric"]["result"] == "equal"
    assert rec.methods["empirical"]["result"] == "not-equal" and rec.verdict == "not-equal"


@pytest.mark.slow
def test_empirical_finite_width_map_at_the_first_layer_state():
    right = derive.check("relu", "B", "B*C_W**2*r/4 + C_W**2*Theta**2/2", empirical=True)
    assert right.methods["empirical"]["result"] == "equal"
    wrong = derive.check("relu", "A", "A*C_W**2*r/4 + C_W**2*Theta**2/2 + C_W*D*lambda_W*r/2"
                         " + C_W*K*Theta*lambda_W/2 + 5*K**2*lambda_W**2/4 + V*lambda_W**2*r/4",
                         empirical=True)
    assert wrong.methods["empirical"]["result"] == "not-equal"


# ----------------------------------------------------------------------------------------------
# Hostile input: refused in one line, before anything runs


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a refused claim reaches the engine or the numerics."""
    def boom(*args, **kwargs):
        raise AssertionError("a refused claim reached the engine")

    monkeypatch.setattr(report, "derivation", boom)
    monkeypatch.setattr(claim_check, "judge", boom)


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/derive-pwned')",
    "K11.__class__.__mro__",
    "(lambda: 1)()",
    "eval('1')",
    "K11 if 1 else K12",
    "[K11 for _ in ()]",
])
def test_code_injection_in_sympy_syntax_is_refused(nothing_runs, text):
    with pytest.raises(ParseError) as err:
        derive.check("relu", "expectation", text)
    assert "\n" not in str(err.value)
    assert not Path("/tmp/derive-pwned").exists()


@pytest.mark.parametrize("text, says", [
    (r"\input{/etc/passwd}", r"'\input' is not allowed"),
    (r"\def\x{K_{11}} \x", r"'\def' is not allowed"),
    (r"\newcommand{\k}{K_{11}}\k", r"'\newcommand' is not allowed"),
    (r"\immediate\write18{ls}", r"'\immediate' is not allowed"),
    (r"\operatorname{exec}(K_{11})", "unknown function"),
    (r"\text{\input{x}}", "must wrap a function name"),
    (r"K_{11} % comment", "'%' is not allowed"),
    (r"\int_0^1 K_{11}\,dx", r"'\int' is not allowed"),
    (r"\sigma(K_{11})", "unknown function 'sigma'"),
    (r"10^{10^{10}}", "exponent"),
    (r"\exp(\exp(\exp(K_{11})))", "exponentials nested"),
    (r"x + K_{11}", "unknown symbol 'x'"),
    (r"K_{11} = K_{22}", "not an equation"),
    ("{" * 25 + "K_{11}" + "}" * 25, "nested too deeply"),
    (r"\exp(" * 21 + "K_{11}" + ")" * 21, "nested too deeply"),
    ("|" * 12 + "K_{11}", "too many '|'"),
    ("K_{11}+" * 300 + "K_{22}", "too long"),
])
def test_hostile_latex_is_refused_quickly(nothing_runs, text, says):
    start = time.perf_counter()
    with pytest.raises(ParseError) as err:
        derive.check("relu", "expectation", latex=text)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 5.0


def test_lexically_refused_latex_never_reaches_the_parser(monkeypatch):
    import sympy.parsing.latex as latex

    def boom(*args, **kwargs):
        raise AssertionError("the LaTeX parser saw refused text")

    monkeypatch.setattr(latex, "parse_latex", boom)
    for text in (r"\input{/etc/passwd}", r"\def\a{1}", r"\catcode`\^=13", "K_{11}\x00"):
        with pytest.raises(ParseError):
            latex_claims.parse_latex_claim(text, {"K11": S.K11})


def test_bad_requests_are_one_line_errors():
    for call in (lambda: derive.check("relu", "kernel_of_doom", "K"),
                 lambda: derive.check("relu", "expectation", "K"),  # K is not a two-input variable
                 lambda: derive.check("relu", "expectation", "K11", latex="K_{11}"),
                 lambda: derive.check("relu", "single_input", "C_b + C_W*theta"),
                 lambda: derive.check("relu", "expectation", "K11", definitions=["K12 = 1"])):
        with pytest.raises(DeriveError) as err:
            call()
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Claim files


def test_claim_file_mixes_syntaxes_and_shares_definitions(tmp_path):
    path = tmp_path / "claims.toml"
    path.write_text('''
activation = "leaky_relu"
params = { a = "0.2" }
[claims]
single_input = "C_b + C_W*K*(1 + a**2)/2"
chi_perp = "C_W*(1 + a**2)/3"
[claims.latex]
derivative_expectation = '\\frac{(1 - a)^2}{2\\pi}(\\pi - \\theta) + a'
[definitions.latex]
theta = '\\arccos(\\rho)'
''')
    rep = derive.check(file=path)
    assert [r.quantity for r in rep.reports] == ["single_input", "chi_perp", "derivative_expectation"]
    assert [r.verdict for r in rep.reports] == ["equal", "not-equal", "equal"]
    assert rep.verdict == "not-equal" and rep.params == {"a": "1/5"}
    out = rep.as_dict()
    assert out["verdict"] == "not-equal" and len(out["claims"]) == 3


@pytest.mark.parametrize("content, says", [
    ('activation = "relu"\n[claims]\nkernel = "1"\n', "unknown quantity"),
    ('activation = "relu"\n', "holds no claims"),
    ('activation = "relu"\nshell = "rm -rf /"\n[claims]\nchi_perp = "C_W/2"\n', "unknown keys"),
    ('activation = "relu"\n[claims]\nchi_perp = 2\n', "must be a string"),
    ('activation = "relu"\n[claims\n', "claim file"),
])
def test_bad_claim_files(tmp_path, content, says):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(DeriveError) as err:
        derive.check(file=path)
    assert says in str(err.value)


# ----------------------------------------------------------------------------------------------
# The command


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["derive", "check", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_cli_exit_codes_and_json(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "-a", "relu", "-q", "expectation",
                            "--claim-latex", RELU_THETA)
    assert code == 0 and "verdict: equal" in out
    code, out, _ = run_main(monkeypatch, capsys, "-a", "relu", "-q", "single_input", "--claim", "C_b + C_W*K",
                            "--format", "json")
    assert code == 1
    rep = json.loads(out)
    for key in ("quantity", "activation", "verdict", "methods", "max_rel_error", "counterexample", "hint"):
        assert key in rep
    assert rep["verdict"] == "not-equal" and set(rep["methods"]) == {"symbolic", "numeric", "empirical"}
    assert "C_W*K/2 appears twice" in rep["hint"] and rep["counterexample"]["K"] > 0
    code, out, _ = run_main(monkeypatch, capsys, "-a", "relu", "-q", "expectation", "--define",
                            r"\vartheta=\arccos(\rho)", "--claim-latex",
                            r"\frac{\sqrt{K_{11}K_{22}}}{2\pi}(\sin\vartheta + (\pi-\vartheta)\cos\vartheta)")
    assert code == 0


@pytest.mark.parametrize("args", [
    ["-a", "relu", "-q", "expectation", "--claim", "__import__('os').system('touch /tmp/derive-pwned')"],
    ["-a", "relu", "-q", "expectation", "--claim-latex", r"\input{/etc/passwd}"],
    ["-a", "relu", "-q", "expectation", "--claim-latex", r"\def\x{1}\x"],
    ["-a", "relu", "-q", "expectation", "--claim-latex", "(" * 40 + "K_{11}" + ")" * 40],
    ["-a", "relu", "-q", "expectation"],
    ["-a", "relu", "--claim", "K"],
])
def test_cli_refuses_bad_input_with_exit_2(monkeypatch, capsys, args):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not Path("/tmp/derive-pwned").exists()


def test_cli_end_to_end_in_a_subprocess():
    """As a user runs it; without --empirical the command never imports JAX."""
    args = ["derive", "check", "-a", "relu", "-q", "expectation", "--claim-latex",
            RELU_THETA.replace(r"\sin\theta + ", ""), "--format", "json"]
    code = (f"import sys; sys.argv = {args!r}\nimport cli\ntry:\n    cli.main()\nexcept SystemExit as e:\n"
            "    print('JAX' if 'jax' in sys.modules else 'NOJAX', file=sys.stderr); raise")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(cli.__file__).parent)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().endswith("NOJAX")
    out = json.loads(res.stdout)
    assert out["verdict"] == "not-equal" and "is missing from the claim" in out["hint"]
