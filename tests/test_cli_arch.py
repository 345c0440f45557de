"""``derive <command> --arch FILE`` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from derive import arch as A
from derive.kernels.arch import arch_kernels

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "architectures"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_kernel_arch_json_lists_every_layer_and_imports_no_jax():
    code = ("import sys, cli; sys.argv = ['derive', 'kernel', '--arch', %r, '--format', 'json'];\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX', file=sys.stderr)") % str(EXAMPLES / "pre_ln_transformer.toml")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "NOJAX" in res.stderr
    out = json.loads(res.stdout)
    assert out["architecture"] == "pre-LN transformer"
    types = [layer["type"] for layer in out["layers"]]
    assert types == ["dense", "layernorm", "attention", "residual", "layernorm", "dense", "activation", "dense",
                     "residual"]
    assert "attend(K12)" in out["layers"][2]["kernel"]


def test_criticality_arch_reports_the_residual_condition():
    res = run("criticality", "--arch", str(EXAMPLES / "residual_mlp.toml"), "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    rows = out["layers"]
    assert len(rows) == 21
    for row in rows[1:]:  # xi^2 + gamma^2 C_W1 C_W2 / 2 = 3/4 + 1/4 = 1: critical
        assert row["chi_perp"] == pytest.approx(1.0, rel=1e-12)
        assert row["chi_par"] == pytest.approx(1.0, rel=1e-8)
    assert any("makes it 1" in note for note in out["notes"])


@pytest.mark.slow
def test_gram_arch_matches_the_api_and_writes_npz(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 6, 3))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "k.npz"
    res = run("gram", "--arch", str(EXAMPLES / "cnn.toml"), "--inputs", str(tmp_path / "x.npy"), "--out", str(out),
              "--format", "json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    ref = arch_kernels(A.load_arch(EXAMPLES / "cnn.toml"), x)
    np.testing.assert_allclose(np.array(got["nngp"]), ref.nngp[-1], rtol=1e-13)
    saved = np.load(out)
    np.testing.assert_allclose(saved["ntk"], ref.ntk[-1], rtol=1e-13)


@pytest.mark.slow
def test_validate_arch_json_and_exit_code(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text("[[layers]]\ntype = 'dense'\nC_W = 2\n[[layers]]\ntype = 'layernorm'\n"
                    "[[layers]]\ntype = 'activation'\nactivation = 'relu'\n[[layers]]\ntype = 'dense'\n")
    res = run("validate", "--arch", str(path), "--width", "64", "--samples", "60", "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] and out["samples"] == 60 and out["widths"] == [64]
    assert {r["quantity"] for r in out["results"]} == {"K", "Theta"}
    for key in ("quantity", "layer", "width", "theory", "estimate", "stderr", "z"):
        assert key in out["results"][0]
    strict = run("validate", "--arch", str(path), "--width", "64", "--samples", "60", "--format", "json",
                 "--z-max", "0.01")
    assert strict.returncode == 1


@pytest.mark.parametrize("args, message", [
    (["kernel", "--arch", "missing.toml"], "cannot read architecture file"),
    (["kernel"], "give --activation or --arch"),
    (["kernel", "--activation", "relu", "--arch", "x.toml"], "not both"),
    (["gram", "--arch", "examples/architectures/cnn.toml", "--depth", "3"], "sets the depth"),
    (["finite-width", "--activation", "relu", "--cw", "2", "--depth", "3", "--inputs", "x.npy", "--k1", "1"],
     "no --k1"),
    (["finite-width", "--arch", "examples/architectures/pre_ln_transformer_dot_product.toml"],
     "logits stay random at infinite width"),
    (["finite-width", "--arch", "examples/architectures/residual_mlp.toml", "--k1", "2"], "--widths and --k1"),
    (["validate", "--arch", "examples/architectures/residual_mlp.toml", "--widths", "32,64", "-q", "dNTK_P"],
     "checks K, V, G1, Theta"),
    (["validate", "--arch", "examples/architectures/cnn.toml"], "--width"),
    (["criticality", "--arch", "examples/architectures/cnn.toml"], "spatial"),
])
@pytest.mark.slow
def test_arch_errors_are_one_line(args, message):
    res = run(*args)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_arch_file_names_the_layer(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[layers]]\ntype = 'dense'\n[[layers]]\ntype = 'conv'\npadding = 'FULL'\n")
    res = run("kernel", "--arch", str(path))
    assert res.returncode == 2
    assert "layers[2]" in res.stderr and "padding" in res.stderr


@pytest.mark.slow
def test_gram_method_option_gives_the_same_matrices():
    a = run("gram", "--activation", "relu", "--depth", "4", "--cw", "2", "--format", "json", "--method", "direct")
    b = run("gram", "--activation", "relu", "--depth", "4", "--cw", "2", "--format", "json", "--method", "tiled")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    np.testing.assert_allclose(json.loads(a.stdout)["ntk"], json.loads(b.stdout)["ntk"], rtol=1e-12)
    bad = run("gram", "--activation", "relu", "--depth", "4", "--cw", "2", "--method", "fast")
    assert bad.returncode == 2 and "--method" in bad.stderr


def test_finite_width_of_a_dense_architecture_equals_the_activation_form(tmp_path):
    path = tmp_path / "mlp.toml"
    path.write_text("[[layers]]\ntype = 'dense'\nC_W = 1.5\nC_b = 0.1\n[[layers]]\ntype = 'repeat'\ntimes = 4\n"
                    "  [[layers.body]]\n  type = 'activation'\n  activation = 'tanh'\n"
                    "  [[layers.body]]\n  type = 'dense'\n  C_W = 1.5\n  C_b = 0.1\n")
    a = run("finite-width", "--arch", str(path), "--width", "64", "--format", "json")
    b = run("finite-width", "--activation", "tanh", "--cw", "1.5", "--cb", "0.1", "--depth", "5", "--width", "64",
            "--format", "json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    for q in ("K", "V", "G1", "Theta", "A", "B", "D", "F"):
        assert ja[q] == jb[q], q


def test_finite_width_of_a_residual_architecture(tmp_path):
    res = run("finite-width", "--arch", "examples/architectures/residual_mlp.toml", "--width", "128", "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["labels"]) == 21 and out["width"] == 128
    # xi^2 = 3/4, gamma^2 = 1/4, C_W1 C_W2 = 2: V grows by gamma^2 (4 xi^2 + 7 gamma^2) = 1.1875 per block
    np.testing.assert_allclose(out["V"], 1.1875 * np.arange(21), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["V_over_nK2"], 1.1875 * np.arange(21) / 128, rtol=1e-12, atol=1e-14)
    text = run("finite-width", "--arch", "examples/architectures/residual_mlp.toml", "--width", "128",
               "--out", str(tmp_path / "fw.png"))
    assert text.returncode == 0 and (tmp_path / "fw.png").stat().st_size > 0, text.stderr


@pytest.mark.slow
def test_validate_architecture_over_widths(tmp_path):
    path = tmp_path / "res.toml"
    path.write_text("[[layers]]\ntype = 'dense'\n[[layers]]\ntype = 'residual'\ngamma = 0.8\n"
                    "  [[layers.branch]]\n  type = 'dense'\n  C_W = 2\n"
                    "  [[layers.branch]]\n  type = 'activation'\n  activation = 'relu'\n"
                    "  [[layers.branch]]\n  type = 'dense'\n")
    res = run("validate", "--arch", str(path), "--widths", "16,32,64", "--samples", "300", "--format", "json",
              "--quantities", "K,Theta,V,G1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] and {r["quantity"] for r in out["results"]} == {"K", "V", "G1", "Theta"}
    assert [r["layer"] for r in out["results"] if r["quantity"] == "Theta"] == ["2:residual"]
    assert all("detectable" in r for r in out["results"])
    text = run("validate", "--arch", str(path), "--widths", "16,32,64", "--samples", "300")
    assert text.returncode == 0 and "detects" in text.stdout, text.stderr


@pytest.mark.slow
def test_finite_width_and_validate_of_a_cnn():
    res = run("finite-width", "--arch", "examples/architectures/cnn.toml", "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["spatial"][0] == [6] and np.asarray(out["V"][2]).shape == (3, 3, 3, 3)
    assert out["V"][1] is None and np.asarray(out["K"][-1]).shape == (1, 1)
    text = run("finite-width", "--arch", "examples/architectures/cnn.toml", "--width", "64")
    assert text.returncode == 0 and "max V/(n K^2)" in text.stdout, text.stderr
    check = run("validate", "--arch", "examples/architectures/cnn.toml", "--widths", "16,32,64", "--samples", "300",
                "--format", "json")
    assert check.returncode == 0, check.stderr
    rows = json.loads(check.stdout)["results"]
    assert {tuple(r["entry"]) for r in rows if r["layer"] == "3:conv"} == {(a, b) for a in range(3) for b in range(a, 3)}


@pytest.mark.parametrize("args", [
    ("finite-width", "--activation", "tanh", "--cw", "1.5", "--cb", "0.1", "--depth", "5", "--width", "64"),
    ("finite-width", "--arch", "examples/architectures/pre_ln_mlp.toml", "--width", "64"),
])
def test_finite_width_numbers_do_not_depend_on_the_hash_seed(args):
    """Every digit of the JSON is the same in processes with different hash seeds: the derived
    expressions (hence their rounding) must not follow the order of Python's sets."""
    import os

    outs = []
    for seed in ("0", "1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-m", "cli", *args, "--format", "json"], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] == outs[2]


def test_finite_width_of_a_dense_network_over_inputs(tmp_path):
    """finite-width --activation with --inputs: the dense network as an architecture over the batch (the
    tensor form), the same numbers as the API on derive.arch.mlp, in JSON; the text table at 80 columns."""
    import derive

    x = np.random.default_rng(0).standard_normal((3, 4))
    np.save(tmp_path / "x.npy", x)
    args = ("finite-width", "--activation", "relu", "--cw", "2", "--cb", "0.1", "--depth", "3", "--inputs",
            str(tmp_path / "x.npy"))
    res = run(*args, "--format", "json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = derive.finite_width(A.mlp(3, "relu", 2.0, 0.1), inputs=x)
    for q in ("K", "V", "G1", "F"):
        np.testing.assert_allclose(np.asarray(got[q][-1], dtype=float), want.values[q][-1], rtol=1e-12)
    assert derive.finite_width("relu", depth=3, C_W=2.0, C_b=0.1, inputs=x).values["V"][-1] == pytest.approx(
        want.values["V"][-1], rel=1e-12)
    text = run(*args)
    assert text.returncode == 0 and "dense relu network, depth 3: 3 input(s)" in text.stdout
    assert max(len(line) for line in text.stdout.splitlines()) <= 80


def test_validate_theta_var_of_a_residual_network_on_two_inputs(tmp_path):
    """The NTK's fluctuations over two inputs through residual blocks reach the table; its header says
    how many inputs (the tensor form's sites) were checked."""
    spec = tmp_path / "res.toml"
    spec.write_text('name = "two blocks"\n[[layers]]\ntype = "dense"\n[[layers]]\ntype = "repeat"\ntimes = 2\n'
                    '  [[layers.body]]\n  type = "residual"\n  xi = "4/5"\n  gamma = "3/5"\n'
                    '    [[layers.body.branch]]\n    type = "dense"\n    C_W = 2\n'
                    '    [[layers.body.branch]]\n    type = "activation"\n    activation = "relu"\n'
                    '    [[layers.body.branch]]\n    type = "dense"\n    C_W = 2\n')
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((2, 5)))
    res = run("validate", "--arch", str(spec), "--inputs", str(x), "--widths", "8,16", "--samples", "20",
              "-q", "K,Theta,Theta_var")
    assert "2 inputs, fits" in res.stdout, res.stderr
    assert res.stdout.count("Theta_var") == 3, res.stdout  # three pairs of inputs at the output
    assert res.stdout.count("repeat2[2]") == 9, res.stdout  # labels on one line at 80 columns (piped)
