"""Infinite-width predictions: derive.predict against Neural Tangents' nt.predict, and its cost at scale.

    python benchmarks/predict.py                          # derive alone: 10^3 training, 10^4 test points
    python benchmarks/predict.py --nt-python "$(bash ../shared/tools/make-nt-venv.sh)"   # and NT beside it
    python benchmarks/predict.py --nt-python PY --write-reference tests/data/nt_predict.npz

The large case trains on N = 10^3 points and predicts M = 10^4 (d = 16, relu and erf networks of
depth 5, means and variances of the "nngp" and "ntk" modes at t = infinity and at three finite
times); each run is a fresh process, its wall time and peak resident memory are printed, and with
``--nt-python`` the same predictions by ``nt.predict.gradient_descent_mse_ensemble`` (Neural Tangents
0.6.5, its own JAX, float64) with the ratio and the largest difference. ``--write-reference`` stores
small cases (inputs and Neural Tangents' outputs) for tests/test_predict.py, which compares
derive.predict with them to 1e-10 in every run of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

#: The networks compared: activation -> (Neural Tangents layer, C_W, C_b).
NETWORKS = {"relu": ("Relu", 2.0, 0.1), "erf": ("Erf", 1.5, 0.05)}
#: Reference cases: depth, learning rate, noise, times (None = infinity).
REFERENCE = {"depth": 3, "learning_rate": 0.7, "times": [0.5, 5.0, 50.0], "noise": [0.0, 0.01]}

# Runs inside the Neural Tangents environment (inputs from an .npz, settings from JSON; nothing evaluated).
NT_WORKER = r'''
import json, sys, time, resource
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import neural_tangents as nt
from neural_tangents import stax

spec = json.load(open(sys.argv[1]))
data = np.load(spec["inputs"])
out = {}
start = time.perf_counter()
for name, (layer, cw, cb) in spec["networks"].items():
    layers = [stax.Dense(1, W_std=cw ** 0.5, b_std=cb ** 0.5)]
    for _ in range(spec["depth"] - 1):
        layers += [getattr(stax, layer)(), stax.Dense(1, W_std=cw ** 0.5, b_std=cb ** 0.5)]
    _, _, kernel_fn = stax.serial(*layers)
    kernel_fn = nt.batch(kernel_fn, batch_size=spec.get("batch", 0)) if spec.get("batch") else kernel_fn
    for noise in spec["noise"]:
        predict_fn = nt.predict.gradient_descent_mse_ensemble(
            kernel_fn, data["x_train"], data["y_train"], learning_rate=spec["learning_rate"],
            diag_reg=noise, diag_reg_absolute_scale=True)
        for label, t in [("inf", None)] + [(f"t{i}", t) for i, t in enumerate(spec["times"])]:
            res = predict_fn(t=t, x_test=data["x_test"], get=("nngp", "ntk"), compute_cov=True)
            for mode in ("nngp", "ntk"):
                g = getattr(res, mode)
                out[f"{name}/{noise}/{label}/{mode}/mean"] = np.asarray(g.mean)
                cov = np.asarray(g.covariance)
                out[f"{name}/{noise}/{label}/{mode}/" + ("variance" if spec.get("diagonal") else "covariance")] = (
                    np.diagonal(cov) if spec.get("diagonal") else cov)
elapsed = time.perf_counter() - start
np.savez(spec["output"], **out)
print(json.dumps({"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

# Runs derive in a fresh process for the timing (same settings as the worker above).
DERIVE_WORKER = r'''
import json, sys, time, resource
import numpy as np
sys.path.insert(0, sys.argv[2])
import derive
spec = json.load(open(sys.argv[1]))
data = np.load(spec["inputs"])
out = {}
start = time.perf_counter()
for name, (layer, cw, cb) in spec["networks"].items():
    for noise in spec["noise"]:
        for label, t in [("inf", None)] + [(f"t{i}", t) for i, t in enumerate(spec["times"])]:
            res = derive.predict(name, data["x_train"], data["y_train"], data["x_test"], depth=spec["depth"],
                                 C_W=cw, C_b=cb, t=t, learning_rate=spec["learning_rate"], noise=noise)
            for mode in ("nngp", "ntk"):
                out[f"{name}/{noise}/{label}/{mode}/mean"] = res[mode].mean
                out[f"{name}/{noise}/{label}/{mode}/variance"] = res[mode].variance
elapsed = time.perf_counter() - start
np.savez(spec["output"], **out)
print(json.dumps({"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def make_data(n_train: int, n_test: int, d: int, k: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x_train = rng.normal(size=(n_train, d))
    x_test = rng.normal(size=(n_test, d))
    w = rng.normal(size=(d, k))
    y_train = np.sin(x_train @ w / np.sqrt(d)) + 0.1 * rng.normal(size=(n_train, k))
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test}


def run_worker(python: str, script: str, spec: dict, data: dict, workdir: str, *extra: str) -> tuple[dict, dict]:
    inputs, output = os.path.join(workdir, "inputs.npz"), os.path.join(workdir, "output.npz")
    np.savez(inputs, **data)
    spec = {**spec, "inputs": inputs, "output": output}
    spec_path = os.path.join(workdir, "spec.json")
    script_path = os.path.join(workdir, "worker.py")
    Path(spec_path).write_text(json.dumps(spec))
    Path(script_path).write_text(script)
    done = subprocess.run([python, script_path, spec_path, *extra], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(output) as f:
        return report, {key: f[key] for key in f.files}


def write_reference(nt_python: str, path: str) -> None:
    """Small cases, computed by Neural Tangents, stored with their inputs for the test suite."""
    data = make_data(12, 5, 4, 2, seed=7)
    spec = {"networks": NETWORKS, **REFERENCE}
    with tempfile.TemporaryDirectory() as tmp:
        _, out = run_worker(nt_python, NT_WORKER, spec, data, tmp)
    meta = json.dumps({"networks": NETWORKS, **REFERENCE, "neural_tangents": "0.6.5", "jax": "0.4.30"})
    np.savez_compressed(path, **{f"input/{k}": v for k, v in data.items()}, **out, meta=np.array(meta))
    print(f"wrote {path} ({len(out)} arrays)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nt-python", help="python of a Neural Tangents 0.6.5 environment")
    parser.add_argument("--write-reference", metavar="PATH", help="store the small reference cases (needs NT)")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=10000)
    args = parser.parse_args()
    if args.write_reference:
        if not args.nt_python:
            raise SystemExit("--write-reference needs --nt-python")
        write_reference(args.nt_python, args.write_reference)
        return
    data = make_data(args.train, args.test, 16, 1, seed=0)
    spec = {"networks": NETWORKS, "depth": 5, "learning_rate": 1.0, "times": [1.0, 10.0, 100.0], "noise": [1e-3],
            "diagonal": True, "batch": 0}
    print(f"predictions: {args.train} training points, {args.test} test points, d = 16, depth 5, relu and erf, "
          f"t = inf and 3 finite times, nngp and ntk means and variances")
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_out = run_worker(sys.executable, DERIVE_WORKER, spec, data, tmp, str(ROOT))
    print(f"  derive: {ours['seconds']:.2f} s, peak memory {ours['peak_rss_mb']:.0f} MB")
    if args.nt_python:
        with tempfile.TemporaryDirectory() as tmp:
            nt, nt_out = run_worker(args.nt_python, NT_WORKER, spec, data, tmp)
        worst = max(float(np.max(np.abs(ours_out[k] - nt_out[k])) / max(np.max(np.abs(nt_out[k])), 1e-300))
                    for k in nt_out)
        print(f"  Neural Tangents: {nt['seconds']:.2f} s, peak memory {nt['peak_rss_mb']:.0f} MB")
        print(f"  time ratio derive / NT: {ours['seconds'] / nt['seconds']:.2f}; largest relative difference "
              f"{worst:.2e}")


if __name__ == "__main__":
    main()
