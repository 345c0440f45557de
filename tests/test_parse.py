"""The safe parser: valid expressions become SymPy; hostile or malformed text is refused, unrun."""

from __future__ import annotations

import builtins
import os

import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from derive.core import symbols as S
from derive.core.errors import ParseError
from derive.core.parse import MAX_LENGTH, parse_expression

Z = {"z": S.z}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("z*erf(z)", S.z * sp.erf(S.z)),
        ("0.1*z^2", S.z**2 / 10),
        ("z**3 - 2*z", S.z**3 - 2 * S.z),
        ("Max(z, 0)", sp.Max(S.z, 0)),
        ("sigmoid(z)", 1 / (1 + sp.exp(-S.z))),
        ("softplus(z)", sp.log(1 + sp.exp(S.z))),
        ("step(z) * z", S.z * sp.Heaviside(S.z)),
        ("-pi + E", -sp.pi + sp.E),
        ("1e-3 * z", S.z / 1000),
        ("arccos(z/2)", sp.acos(S.z / 2)),
    ],
)
def test_valid_expressions(text, expected):
    assert sp.simplify(parse_expression(text, Z) - expected) == 0


def test_documented_symbols_keep_their_assumptions():
    e = parse_expression("sqrt(K11*K22 - K12**2)", ["K11", "K12", "K22"])
    assert e.free_symbols == {S.K11, S.K12, S.K22}


SENTINEL = "derive_parser_sentinel"

HOSTILE = [
    f"__import__('os').system('touch {SENTINEL}')",
    "().__class__.__bases__[0].__subclasses__()",
    "z.__class__",
    "lambda: 0",
    "(lambda x: x)(z)",
    "exec('1')",
    "eval('1')",
    "open('/etc/passwd')",
    "globals()",
    "getattr(z, 'x')",
    "Symbol('x')",
    "sympify('z')",
    "[z for z in range(10)]",
    "{z: 1}",
    "z[0]",
    "'a' * 10",
    "f'{z}'",
    "b'z'",
    "z if z else 1",
    "z; import os",
    "import os",
    "9**9**9**9",
    "z**(10**10)",
    "2**10000",
    "z @ z",
    "z // 2",
    "z % 2",
    "z << 2",
    "~z",
    "not z",
    "z and z",
    "z < 1",
    "Heaviside(z, 1)",
    "exp(z=1)",
    "exp(*[z])",
    "exp(**{})",
    "(x := 1)",
    "z\x00",
    "1/0",
    "unknown_name",
    "foo(z)",
    "",
    "   ",
    "1e999",
    "True",
    "None",
    "...",
    "1j*z",
    "(" * 500 + "z" + ")" * 500,
    "-" * 1000 + "z",
    "exp(" * 100 + "z" + ")" * 100,
    "1" * (MAX_LENGTH + 1),
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_input_is_refused_without_running(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    real_import = builtins.__import__

    def spy_import(name, *args, **kwargs):
        calls.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy_import)
    with pytest.raises(ParseError) as info:
        parse_expression(text, Z, where="--activation")
    monkeypatch.setattr(builtins, "__import__", real_import)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--activation: ")
    assert not os.path.exists(SENTINEL)
    assert "os" not in calls and "subprocess" not in calls


@pytest.mark.parametrize(
    "text, column, words",
    [
        ("z + foo(z)", 5, "unknown function 'foo'"),
        ("z + os", 5, "unknown name 'os'"),
        ("exp(z).real", 1, "attribute access"),
        ("1 + z[0]", 5, "subscript"),
        ("z + 'a'", 5, "string literal"),
        ("z**100", 4, "exponent 100 too large"),
    ],
)
def test_errors_name_the_token_and_column(text, column, words):
    with pytest.raises(ParseError) as info:
        parse_expression(text, Z)
    assert words in str(info.value)
    assert info.value.column == column
    assert f"at column {column}" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="z+-*/^()., 0123456789eEabcdefghijklmnopqrstuvwxyz_[]{}'\":;=<>!@#%&|~", max_size=40))
def test_arbitrary_text_either_parses_or_is_refused(text):
    try:
        out = parse_expression(text, Z)
    except ParseError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(out, sp.Basic)
        assert out.free_symbols <= {S.z}
