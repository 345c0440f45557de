"""The ``derive`` command end to end, run as a subprocess like a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from derive.core import symbols as S
from derive.core.parse import parse_expression
from derive.symbolic.numeric import evaluate


def run(*args: str, cwd=None, env_columns: int | None = None) -> subprocess.CompletedProcess:
    env = None if env_columns is None else {**os.environ, "COLUMNS": str(env_columns)}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


def test_kernel_relu_json_keys_and_values():
    res = run("kernel", "--activation", "relu", "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("activation", "params", "closed_form", "expectation", "derivative_expectation",
                "recursion", "ntk_recursion", "single_input"):
        assert key in out
    assert out["activation"] == "relu" and out["closed_form"] is True
    names = ["K11", "K12", "K22", "K", "C_W", "C_b", "lambda_W", "lambda_b", "Theta12"]
    expectation = parse_expression(out["expectation"], names)
    k11, k22, k12 = 1.3, 0.7, 0.4
    rho = k12 / np.sqrt(k11 * k22)
    arccos1 = (np.sqrt(k11 * k22) / (2 * np.pi)) * (np.sqrt(1 - rho**2) + (np.pi - np.arccos(rho)) * rho)
    got = evaluate(expectation, {S.K11: k11, S.K12: k12, S.K22: k22})
    assert got == pytest.approx(arccos1, rel=1e-13)
    single = parse_expression(out["single_input"], names)
    assert evaluate(single, {S.C_W: 2.0, S.C_b: 0.1, S.K: 3.0}) == pytest.approx(3.1, rel=1e-14)


@pytest.mark.parametrize("fmt", ["text", "latex"])
def test_kernel_other_formats(fmt):
    res = run("kernel", "--activation", "leaky_relu", "--param", "a=0.2", "--format", fmt)
    assert res.returncode == 0, res.stderr
    assert "acos" in res.stdout or "operatorname{acos}" in res.stdout


def test_kernel_quadrature_activation_reports_order():
    out = json.loads(run("kernel", "-a", "tanh", "-f", "json").stdout)
    assert out["closed_form"] is False and out["quadrature_order"] > 0


def test_symbolic_command_does_not_import_jax():
    code = ("import sys; sys.argv = ['derive', 'kernel', '--activation', 'relu', '--format', 'json']\n"
            "import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX', file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stderr.strip().endswith("NOJAX"), res.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (("kernel", "-a", "no_such_activation"), "unknown activation"),
        (("kernel", "-a", "__import__('os').system('echo hacked')"), "attribute access"),
        (("kernel", "-a", "__import__('os')"), "unknown function '__import__'"),
        (("kernel", "-a", "z.__class__"), "attribute access"),
        (("kernel", "-a", "leaky_relu", "-p", "b=1"), "unknown parameter 'b'"),
        (("kernel", "-a", "leaky_relu", "-p", "a"), "expected NAME=VALUE"),
        (("gram", "-a", "relu", "--depth", "2", "--cw", "-1"), "C_W is a variance"),
        (("gram", "-a", "relu", "--depth", "0", "--cw", "2"), "depth"),
    ],
)
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(args, words):
    res = run(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert "hacked" not in res.stdout


@pytest.mark.slow
def test_gram_npz_and_json(tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 5))
    np.save(tmp_path / "x.npy", x)
    res = run("gram", "-a", "relu", "--depth", "3", "--cw", "2", "--cb", "0.1", "--inputs", "x.npy",
              "--out", "k.npz", "--format", "json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    data = np.load(tmp_path / "k.npz")
    assert np.allclose(data["nngp"], out["nngp"]) and np.allclose(data["ntk"], out["ntk"])
    assert data["nngp"].shape == (3, 3)


def test_gram_refuses_non_psd_kernel_and_leaves_nothing(tmp_path):
    np.save(tmp_path / "k.npy", np.array([[1.0, 2.0], [2.0, 1.0]]))
    res = run("gram", "-a", "relu", "--depth", "2", "--cw", "2", "--input-kernel", "k.npy", "--out", "o.npz",
              cwd=tmp_path)
    assert res.returncode == 2 and "positive semi-definite" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npy"]


def test_gram_refuses_bad_inputs_file(tmp_path):
    np.save(tmp_path / "x.npy", np.ones(4))
    res = run("gram", "-a", "relu", "--depth", "2", "--cw", "2", "--inputs", "x.npy", cwd=tmp_path)
    assert res.returncode == 2 and "2-D array" in res.stderr
    (tmp_path / "bad.npy").write_text("not an array")
    res = run("gram", "-a", "relu", "--depth", "2", "--cw", "2", "--inputs", "bad.npy", cwd=tmp_path)
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_help_explains_options_with_examples():
    res = run("gram", "--help")
    assert res.returncode == 0
    for opt in ("--activation", "--depth", "--cw", "--cb", "--inputs", "--out", "Example"):
        assert opt in res.stdout


def test_finite_width_json_has_the_dntk_and_its_closed_form():
    """ReLU at criticality: per-layer lists K..F, P, Q; the closed forms solve the recursions in l
    (checked against the per-layer values the command printed)."""
    import sympy as sp

    res = run("finite-width", "--activation", "relu", "--cw", "2", "--cb", "0", "--depth", "7", "--width", "50",
              "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("K", "V", "G1", "Theta", "A", "B", "D", "F", "P", "Q"):
        assert len(out[key]) == 7 and key in out["recursions"]
    assert out["P"] == [0.0] * 7
    l = sp.Symbol("l")
    for q in ("Q", "A", "B"):
        expr = parse_expression(out["closed_form"][q], variables={"l": l})
        assert [float(expr.subs(l, k)) for k in range(1, 8)] == pytest.approx(out[q], rel=1e-12)
    assert out["depth_to_width"]["dH_over_nTheta2_slope"] > 0


def test_kernel_small_surface_fixes():
    """A paste-ready LaTeX align block; the header names every quadrature order the table shows; a
    misspelt activation gets a suggestion; --help shows the architecture file's [[layers]] table."""
    latex = run("kernel", "--activation", "relu", "--format", "latex")
    assert latex.returncode == 0, latex.stderr
    body = [line for line in latex.stdout.splitlines() if not line.startswith("%")]
    assert body[0] == r"\begin{align}" and body[-1] == r"\end{align}" and not body[-2].endswith("\\\\")
    assert all(line.endswith(" \\\\") for line in body[1:-2]) and all("&=" in line for line in body[1:-1])
    text = run("kernel", "--activation", "tanh", env_columns=200)
    assert "orders 129, 193" in text.stdout, text.stdout[:300]
    bad = run("kernel", "--activation", "relus")
    assert bad.returncode == 2 and "did you mean 'relu'?" in bad.stderr
    assert "[[layers]]" in run("validate", "--help", env_columns=200).stdout
