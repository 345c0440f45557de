"""validate(): derived theory against sampled networks for closed-form and quadrature activations.

Sizes. ReLU (arc-cosine closed form), tanh and SWISH (quadrature only) at depth 3, width n = 128,
S = 400 networks, three inputs. The mean of a per-network statistic differs from the infinite-width
value by c / n and its per-network variance is a / n (c, a in the units of the entry), so the bias
is (c / sqrt(a)) sqrt(S / n) standard errors. Measured with 2e4 networks at widths 16 and 32 for these
inputs and hyperparameters, |c| / sqrt(a) <= 0.2 for every kernel entry (layers 1-3) and every NTK
entry of all three activations (largest: the ReLU kernel at layer 3, the SWISH NTK), so the bias is at
most 0.2 sqrt(400 / 128) = 0.35 standard errors: small against the 5-standard-error tolerance. A 5%
error in C_W, on the other hand, moves the depth-3 kernel or NTK by about 11 standard errors (ReLU,
SWISH) to 60 (tanh, whose NTK diagonal fluctuates little), so |z| > 5 detects it.

Chunk-size and device-count independence of the sampler are tested in tests/test_montecarlo.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from derive import api
from derive.core.errors import DeriveError
from derive.kernels.gram import gram_profile
from derive.symbolic.recursions import numeric_kernel_expressions
from derive.validation.quantities import QUANTITIES
from derive.validation.validate import EXTRAPOLATED, default_inputs, validate

CASES = {"relu": (2.0, 0.1), "tanh": (1.5, 0.05), "swish": (1.8, 0.1)}
DEPTH, WIDTH, SAMPLES, SEED = 3, 128, 400, 1
ROW_KEYS = {"quantity", "layer", "inputs", "width", "theory", "estimate", "stderr", "z"}


@pytest.fixture(scope="module")
def reports():
    return {name: validate(name, cw, cb, DEPTH, width=WIDTH, samples=SAMPLES, seed=SEED)
            for name, (cw, cb) in CASES.items()}


def _theory(name, C_W, lambda_W):
    """Per-layer K^(l) and Theta^(l) of the default inputs, as the engine derives them."""
    _, C_b = CASES[name]
    e, d = numeric_kernel_expressions(api.kernel(name))
    K, T = gram_profile(e, d, default_inputs(), DEPTH, C_W, C_b, lambda_W, C_b)
    return np.asarray(K), np.asarray(T)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sampled_kernel_and_ntk_agree_with_theory(reports, name):
    report = reports[name]
    assert report.passed, report.worst
    K_rows = [r for r in report.results if r["quantity"] == "K"]
    T_rows = [r for r in report.results if r["quantity"] == "Theta"]
    assert len(K_rows) == DEPTH * 6 and len(T_rows) == 6 and {r["layer"] for r in T_rows} == {DEPTH}
    assert all(ROW_KEYS <= set(r) and r["width"] == WIDTH for r in report.results)
    assert max(abs(r["z"]) for r in report.results) < 5


@pytest.mark.parametrize("name", list(CASES))
def test_detects_five_percent_error_in_C_W(reports, name):
    report = reports[name]
    C_W, _ = CASES[name]
    wrong_K, wrong_T = _theory(name, 1.05 * C_W, C_W)
    z = []
    for r in report.results:
        a, b = r["inputs"]
        wrong = wrong_K[r["layer"] - 1, a, b] if r["quantity"] == "K" else wrong_T[-1, a, b]
        z.append((r["estimate"] - wrong) / r["stderr"])
    assert max(np.abs(z)) > 5


@pytest.mark.slow
def test_wrong_theory_plugged_into_the_registry_fails_the_report():
    """The same relu sample (same seed and sizes) against a K theory with C_W off by 5%."""
    C_W, C_b = CASES["relu"]
    wrong_K, _ = _theory("relu", 1.05 * C_W, C_W)
    registry = {"K": replace(QUANTITIES["K"], theory=lambda setup: wrong_K)}
    report = validate("relu", C_W, C_b, DEPTH, width=WIDTH, samples=SAMPLES, seed=SEED, quantities=["K"],
                      registry=registry)
    assert not report.passed and abs(report.worst["z"]) > 5
    assert report.as_dict()["passed"] is False


def test_conditional_sampler_agrees_with_theory():
    """The relu kernel sampled layer by layer from the conditional law (same sizes as above)."""
    C_W, C_b = CASES["relu"]
    report = validate("relu", C_W, C_b, DEPTH, width=WIDTH, samples=SAMPLES, seed=SEED, quantities="K,V",
                      method="conditional")
    assert report.passed, report.worst
    assert report.as_dict()["method"] == "conditional"
    with pytest.raises(DeriveError):
        validate("relu", C_W, C_b, DEPTH, width=WIDTH, samples=SAMPLES, method="conditional")  # Theta


def test_same_seed_same_numbers():
    def run(seed):
        return validate("tanh", 1.5, 0.05, 2, width=16, samples=21, seed=seed, quantities="K,Theta,V").results

    a = run(3)
    assert a == run(3)
    assert a != run(4)


@pytest.mark.slow
def test_several_widths_extrapolate_in_inverse_width(tmp_path):
    calls = []
    report = validate("tanh", 1.5, 0.05, 2, widths=[64, 32], samples=150, seed=2, quantities="K,V",
                      progress=lambda done, total: calls.append((done, total)))
    assert report.widths == (32, 64) and calls[-1] == (300, 300)
    extrapolated = [r for r in report.results if r["width"] == EXTRAPOLATED]
    per_width = [r for r in report.results if r["width"] != EXTRAPOLATED]
    assert len(extrapolated) == 2 * 6 + 3 and len(per_width) == 2 * len(extrapolated)
    assert all(r["checked"] for r in extrapolated) and not any(r["checked"] for r in per_width)
    assert all({"slope", "slope_stderr", "chi2", "dof"} <= set(r) for r in extrapolated)
    def entry(r):
        return r["quantity"], r["layer"], r["inputs"]

    # extrapolating to 1/n = 0 costs precision: the intercept is less certain than any single width
    assert all(r["stderr"] > max(p["stderr"] for p in per_width if entry(p) == entry(r)) for r in extrapolated)
    assert report.passed, report.worst
    out = json.loads(json.dumps(report.as_dict()))
    assert {"activation", "widths", "samples", "seed", "results"} <= set(out)
    assert out["widths"] == [32, 64] and out["samples"] == 150 and out["seed"] == 2
    report.plot(str(tmp_path / "mc.png"))
    assert (tmp_path / "mc.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dntk_quantities_agree_and_a_wrong_theory_is_detected():
    """Layer-2 dNTK statistics are exact at any width (Gaussian layer 1, deterministic layer-1 NTK), so
    one small width suffices; the same sample rejects a theory 25% off (about 10 standard errors)."""
    args = dict(activation="tanh", C_W=1.5, C_b=0.05, depth=2, width=24, samples=300, seed=5,
                quantities="dNTK_P,dNTK_Q", lambda_W=0.7, lambda_b=0.4)
    report = validate(**args)
    rows = [r for r in report.results if r["checked"]]
    assert sorted({(r["quantity"], r["layer"]) for r in rows}) == [("dNTK_P", 2), ("dNTK_Q", 2)]
    assert len(rows) == 2 * len(default_inputs()) and report.passed, report.worst
    scaled = {name: replace(QUANTITIES[name], theory=lambda setup, t=QUANTITIES[name].theory: 1.25 * t(setup))
              for name in ("dNTK_P", "dNTK_Q")}
    assert not validate(**args, registry=scaled).passed
    with pytest.raises(DeriveError, match="depth >= 2"):
        validate(**{**args, "depth": 1})


@pytest.mark.parametrize("kwargs", [
    dict(samples=1), dict(width=None), dict(quantities=["K", "nonsense"]), dict(z_max=0.0),
    dict(width=None, widths=[16, 32], fit_order=2), dict(width=0), dict(C_W=-1.0), dict(inputs=np.ones(3)),
])
def test_rejects_bad_arguments(kwargs):
    args = dict(activation="relu", C_W=2.0, C_b=0.0, depth=2, width=8, samples=10)
    with pytest.raises(DeriveError):
        validate(**{**args, **kwargs})


# ----------------------------------------------------------------------------------------------
# The command


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "validate", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_json_is_one_object_and_exit_status_zero():
    res = run("--activation", "relu", "--cw", "2", "--cb", "0.1", "--depth", "2", "--width", "32",
              "--samples", "60", "--quantities", "K,Theta,V", "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"activation", "widths", "samples", "seed", "results"} <= set(out)
    assert out["activation"] == "relu" and out["widths"] == [32] and out["samples"] == 60 and out["seed"] == 0
    assert {r["quantity"] for r in out["results"]} == {"K", "Theta", "V"}
    assert all(ROW_KEYS <= set(r) for r in out["results"])


@pytest.mark.slow
def test_cli_failed_check_exits_one_and_writes_the_figure(tmp_path):
    fig = tmp_path / "check.png"
    res = run("-a", "relu", "--cw", "2", "--depth", "2", "--width", "16", "--samples", "30",
              "--z-max", "0.001", "--out", str(fig))
    assert res.returncode == 1, res.stderr
    assert "failed" in res.stdout and "theory" in res.stdout and fig.stat().st_size > 10_000


@pytest.mark.parametrize("args", [
    ["--width", "8", "--samples", "1"],
    ["--widths", "8,x"],
    [],
    ["--width", "8", "--quantities", "K,nonsense"],
])
@pytest.mark.slow
def test_cli_bad_input_exits_two_with_one_line(args):
    res = run("-a", "relu", "--cw", "2", "--depth", "2", *args)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_rows_state_their_power():
    """Every checked row says the smallest deviation it could detect (z_max standard errors) and
    whether a deviation as large as the value itself would pass; G1 at these sizes has no power."""
    from derive.validation.validate import validate as run_validation
    from derive.validation.validate import weak_quantities

    report = run_validation("tanh", 1.5, 0.1, 3, widths=(32, 64, 128), samples=100, seed=0,
                            quantities=("K", "G1"))
    for r in report.results:
        if r["checked"]:
            assert r["detectable"] == pytest.approx(report.z_max * r["stderr"])
            if r["theory"]:
                assert r["weak"] == (r["detectable"] >= abs(r["theory"]))
    weak = weak_quantities(report)
    assert "G1" in weak and weak["G1"][0] >= 1
    assert "K" not in weak or weak["K"][0] < weak["K"][1]
