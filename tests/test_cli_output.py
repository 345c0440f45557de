"""Nothing the derive command prints is ever cut: formulas and numbers whole at any terminal width.

Every command runs in its own process at COLUMNS=60 (rich reads the terminal width from it) and
its text output must hold no ellipsis; the formulas ``derive kernel`` prints must parse back (with
the safe parser) to the ones of its JSON output, and architecture maps print rationals as
rationals and quadrature nodes as the Gaussian integrals they are.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

from derive.core.parse import parse_expression

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "examples" / "architectures"

NAMES = ("K11", "K12", "K22", "K", "C_W", "C_b", "lambda_W", "lambda_b", "Theta12", "Theta", "a", "b", "c")

COMMANDS = [
    ["kernel", "--activation", "relu"],
    ["kernel", "--activation", "gelu"],
    ["kernel", "--activation", "tanh"],
    ["kernel", "--arch", str(ARCH / "pre_ln_transformer.toml")],
    ["kernel", "--arch", str(ARCH / "pre_ln_transformer_dot_product.toml")],
    ["criticality", "--activation", "tanh"],
    ["criticality", "--arch", str(ARCH / "residual_mlp.toml")],
    ["finite-width", "--activation", "tanh", "--cw", "1", "--depth", "10", "--width", "256"],
    ["finite-width", "--arch", str(ARCH / "residual_mlp.toml"), "--width", "128"],
    ["activations"],
    ["gate", "--activation", "tanh"],
    ["check", "--activation", "relu", "--quantity", "single_input", "--claim", "C_b + C_W*K/2"],
]


def _run(args, columns=60):
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    out = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(Path(x).name for x in a))
def test_nothing_is_cut_at_sixty_columns(args):
    text = _run(args)
    assert "…" not in text, text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "gelu", "erf", "leaky_relu"])
def test_printed_formulas_parse_back_to_the_json_ones(name):
    text = _run(["kernel", "--activation", name])
    data = json.loads(_run(["kernel", "--activation", name, "--format", "json"]))
    printed = {}
    for line in text.splitlines():
        if line.startswith("  ") and " = " in line:
            key, formula = line.strip().split(" = ", 1)
            printed[key.strip()] = formula
    keys = ("expectation", "derivative_expectation", "recursion", "ntk_recursion", "single_input",
            "single_input_ntk")
    assert set(keys) <= set(printed), printed
    for key in keys:
        a, b = parse_expression(printed[key], NAMES), parse_expression(data[key], NAMES)
        assert sp.simplify(a - b) == 0, (key, printed[key], data[key])


def test_architecture_maps_print_rationals_and_gaussian_integrals():
    text = _run(["kernel", "--arch", str(ARCH / "pre_ln_transformer.toml")])
    assert "1.0*" not in text and "0.333333" not in text
    assert "C_O=1/3" in text and "attend(K12)/6" in text
    text = _run(["criticality", "--activation", "tanh"])
    assert "GaussianExpectation" not in text and "Lambda(" not in text
    assert "E[(1 - tanh(z)**2)**2; z ~ N(0, K)]" in text


def test_latex_of_a_quadrature_node_is_the_gaussian_integral():
    import derive

    latex = sp.latex(derive.kernel("tanh").expectation)
    assert latex.startswith(r"\mathbb{E}_{(z_{1},\, z_{2}) \sim \mathcal{N}")
    assert latex.count("{") == latex.count("}") and "GaussianExpectation" not in latex
