"""derive computes in float64 without changing JAX's global configuration.

A fresh interpreter (without this suite's conftest, which enables float64 for the internals' tests)
imports derive and calls the public API; JAX's ``jax_enable_x64`` must stay off, a float32 pipeline
beside derive must stay float32, and derive's numbers must be float64 and equal to the same calls
made here with float64 enabled globally.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import derive
from derive import arch

ROOT = Path(__file__).resolve().parents[1]

X = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.9, 0.1, 0.4]])
Y = np.array([[0.3], [-0.2], [0.5]])
XT = np.array([[0.1, 0.2, 0.3], [-0.5, 0.4, 0.0]])


def _calls():
    """The API calls compared, as (name, function of the derive module and arch)."""
    net = arch.serial(arch.dense(1.5, 0.1), arch.layer_norm(), arch.activation("erf"), arch.dense(1.2))
    return {
        "gram": lambda: derive.gram("tanh", X, 3, 1.5, 0.1).ntk,
        "gram_test": lambda: derive.gram("relu", X, 2, 2.0, 0.0, x_test=XT).nngp,
        "arch_gram": lambda: derive.arch_gram(net, X).ntk,
        "predict": lambda: derive.predict("erf", X, Y, XT, 3, 1.4, 0.1, t=2.0).ntk.mean,
        "finite_width_batch": lambda: derive.finite_width(
            arch.serial(arch.dense(1.5, 0.1), arch.activation("tanh"), arch.dense(1.2)), inputs=X).values["V"][-1],
    }


SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[1])
    import test_precision as t
    import derive

    out, dtypes = {}, {}
    for name, call in t._calls().items():
        value = np.asarray(call())
        dtypes[name] = str(value.dtype)
        out[name] = value.tolist()
        assert not jax.config.jax_enable_x64, name
    net = t.derive.arch.serial(t.derive.arch.dense(1.0), t.derive.arch.activation("tanh"), t.derive.arch.dense(1.0))
    check = derive.validate(net, widths=(8, 16, 32), samples=50, quantities=("K", "V"))
    dtypes["validate"] = str(np.asarray(check.rows[-1]["theory"]).dtype)
    source = derive.emit_code("erf")
    module = sys.argv[2]
    with open(module, "w") as f:
        f.write(source)
    import importlib.util
    spec = importlib.util.spec_from_file_location("emitted", module)
    emitted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emitted)
    value = emitted.sigma_sigma(np.array(1.0), np.array(0.3), np.array(2.0))
    dtypes["emitted"] = str(value.dtype)
    out["emitted"] = float(value)
    from derive.gates.networks import gate_network
    gate = gate_network(derive.gate("softplus"))
    dtypes["gate"] = str(gate(np.array(0.3), np.array(0.2)).dtype)
    float32 = jnp.sin(jnp.ones(3)) * np.float32(2)
    print(json.dumps({"x64": bool(jax.config.jax_enable_x64), "float32": str(float32.dtype),
                      "default": str(jnp.asarray(1.0).dtype), "dtypes": dtypes, "values": out}))
""")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    module = tmp_path_factory.mktemp("emitted") / "emitted.py"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(module)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_jax_configuration_is_left_alone(fresh):
    assert fresh["x64"] is False
    assert fresh["float32"] == "float32" and fresh["default"] == "float32"


def test_results_are_float64(fresh):
    assert all(dtype == "float64" for dtype in fresh["dtypes"].values()), fresh["dtypes"]


@pytest.mark.parametrize("name", sorted(_calls()))
def test_results_equal_those_with_float64_enabled_globally(fresh, name):
    expected = np.asarray(_calls()[name]())
    np.testing.assert_allclose(np.asarray(fresh["values"][name]), expected, rtol=1e-13, atol=1e-15)


def test_emitted_code_computes_in_float64(fresh):
    from derive.api import kernel

    expectation = kernel("erf")
    assert expectation is not None
    import mpmath as mp

    # <erf(z1) erf(z2)> at K11 = 1, K12 = 0.3, K22 = 2: (2/pi) asin(2 K12 / sqrt((1 + 2 K11)(1 + 2 K22)))
    exact = float(2 / mp.pi * mp.asin(2 * 0.3 / mp.sqrt(3 * 5)))
    assert fresh["values"]["emitted"] == pytest.approx(exact, rel=1e-13)


def test_public_entry_points_of_jax_modules_are_wrapped():
    """Each JAX module's public computing functions run in float64 whoever calls them."""
    from derive.kernels import engine, gram
    from derive.sampling import arch as sampling_arch
    from derive.sampling import dense, training

    for fn in (engine.network_gram, engine.network_cross_gram, gram.gram_matrices, gram.gram_profile,
               dense.sample_kernels, sampling_arch.sample_arch, sampling_arch.validate_arch,
               training.train_ensemble, derive.gram, derive.arch_gram, derive.predict, derive.validate):
        assert getattr(fn, "__wrapped_float64__", False), fn.__qualname__
