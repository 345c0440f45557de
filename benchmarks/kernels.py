"""Speed and agreement of derive's generated NNGP/NTK kernels against two baselines.

For each case (activation, N inputs of dimension d = 100, depth L dense layers) it times, on the
same inputs and in float64:

- **derive**: :func:`derive.gram`, the public path: the dense network built as an architecture and
  planned by :mod:`derive.kernels.engine` onto the tiled method of :mod:`derive.kernels.gram`;
- **jnp**: a plain ``jax.numpy`` recursion written here, jitted, one ``lax.scan`` over the layers,
  whole N x N matrices per layer (arccos/sqrt straight formula for ReLU, arcsin for erf, a
  two-dimensional Gauss-Hermite rule for tanh);
- **NT**: Neural Tangents 0.6.5 (``--nt-python PATH``, run in a subprocess with its own JAX; inputs
  and results travel as ``.npy`` files): ``stax.serial(Dense(512, W_std, b_std), act, Dense, ...)``
  with L Dense layers, ``kernel_fn(x, x, ("nngp", "ntk"))``, W_std^2 = C_W, b_std^2 = C_b (NTK
  parametrisation, so lambda_W = C_W and lambda_b = C_b).

Times exclude compilation (one warm-up call), are the median of ``--repeats`` calls ended by
``block_until_ready``, and are reported as nanoseconds per matrix entry per layer,
time / (N^2 L), for the pair of matrices. Agreement is the largest normwise relative difference
max_ab |A_ab - B_ab| / max_ab |B_ab| over the NNGP and NTK matrices. For tanh, derive is also
checked against its direct quadrature (the derived node, order chosen for 1e-11) on a subset of
rows (every entry depends only on its own two rows), and float32 cases report their error against
float64. ``--large`` measures the peak resident memory (VmHWM) of one N = 20000 ReLU evaluation
in a fresh process.

    python benchmarks/kernels.py --nt-python "$(bash /work/shared/tools/make-nt-venv.sh)"
    python benchmarks/kernels.py --format json --large
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

DIM = 100
#: name, activation, N, depth, C_W, C_b, NT layer, NT quadrature degree, dtype
CASES = [
    dict(name="relu-L10-N500", activation="relu", n=500, depth=10, C_W=2.0, C_b=0.1, nt="relu"),
    dict(name="relu-L10-N2000", activation="relu", n=2000, depth=10, C_W=2.0, C_b=0.1, nt="relu"),
    dict(name="relu-L100-N500", activation="relu", n=500, depth=100, C_W=2.0, C_b=0.1, nt="relu"),
    dict(name="relu-L100-N2000", activation="relu", n=2000, depth=100, C_W=2.0, C_b=0.1, nt="relu"),
    dict(name="erf-L10-N2000", activation="erf", n=2000, depth=10, C_W=1.5, C_b=0.1, nt="erf"),
    dict(name="tanh-L10-N200 (NT deg 25)", activation="tanh", n=200, depth=10, C_W=1.5, C_b=0.05, nt="tanh",
         deg=25),
    dict(name="tanh-L10-N200 (NT deg 50)", activation="tanh", n=200, depth=10, C_W=1.5, C_b=0.05, nt="tanh",
         deg=50),
    dict(name="relu-L10-N2000 float32", activation="relu", n=2000, depth=10, C_W=2.0, C_b=0.1,
         dtype="float32"),
    dict(name="erf-L10-N2000 float32", activation="erf", n=2000, depth=10, C_W=1.5, C_b=0.1, dtype="float32"),
    dict(name="tanh-L10-N200 float32", activation="tanh", n=200, depth=10, C_W=1.5, C_b=0.05,
         dtype="float32"),
]
#: Gauss-Hermite points per dimension of the plain jnp tanh baseline (about 1e-9 here).
BASELINE_TANH_DEGREE = 48
#: Rows of the direct-quadrature check of the tanh cases.
CHECK_ROWS = 12


def inputs_for(case) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(case["n"], DIM))


def relative_difference(a, b, part: str = "all") -> float:
    """max |a - b| / max |b| over the NNGP and NTK matrices (``part``: all entries, the diagonal,
    or the off-diagonal ones)."""
    out = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        mask = {"all": np.ones(y.shape, bool), "diagonal": np.eye(len(y), dtype=bool),
                "off-diagonal": ~np.eye(len(y), dtype=bool)}[part]
        out = max(out, float(np.max(np.abs(x - y)[mask]) / np.max(np.abs(y))))
    return out


def exact_diagonal(case, x: np.ndarray):
    """K^(L)_aa and Theta^(L)_aa from the single-input recursion in closed form, written here
    (rho = 1: the ReLU maps are K/2 and 1/2; erf's are (2/pi) asin(2K / (1 + 2K)) and
    4 / (pi sqrt(1 + 4K)), Williams 1997), or None for other activations."""
    c_w, c_b = case["C_W"], case["C_b"]
    K = c_b + c_w * np.sum(x * x, axis=1) / x.shape[1]
    Theta = K.copy()
    for _ in range(case["depth"] - 1):
        if case["activation"] == "relu":
            E, Ed = K / 2, 0.5
        elif case["activation"] == "erf":
            E, Ed = 2 / np.pi * np.arcsin(2 * K / (1 + 2 * K)), 4 / (np.pi * np.sqrt(1 + 4 * K))
        else:
            return None
        K, Theta = c_b + c_w * E, c_b + c_w * E + c_w * Ed * Theta
    return K, Theta


def diagonal_error(result, diagonal) -> float:
    return max(float(np.max(np.abs(np.diagonal(np.asarray(m)) - d) / np.abs(d)))
               for m, d in zip(result, diagonal))


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls after one warm-up call, and the last result."""
    import jax

    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


# --------------------------------------------------------------------------------------------------
# The plain jnp recursion


def plain_recursion(activation: str, depth: int):
    """The infinite-width recursion written directly in jax.numpy, whole matrices per layer."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def relu_maps(K):
        diag = jnp.diagonal(K)
        norm = jnp.sqrt(diag[:, None] * diag[None, :])
        rho = jnp.clip(K / norm, -1.0, 1.0)
        theta = jnp.arccos(rho)
        E = norm * (jnp.sqrt(1 - rho * rho) + (jnp.pi - theta) * rho) / (2 * jnp.pi)
        return E, (jnp.pi - theta) / (2 * jnp.pi)

    def erf_maps(K):
        diag = 1 + 2 * jnp.diagonal(K)
        prod = diag[:, None] * diag[None, :]
        E = 2 / jnp.pi * jnp.arcsin(jnp.clip(2 * K / jnp.sqrt(prod), -1.0, 1.0))
        return E, 4 / (jnp.pi * jnp.sqrt(prod - 4 * K * K))

    def tanh_maps(K):
        x, w = np.polynomial.hermite_e.hermegauss(BASELINE_TANH_DEGREE)
        x, w = jnp.asarray(x), jnp.asarray(w / w.sum())
        W = w[:, None] * w[None, :]
        diag = jnp.diagonal(K)

        def row(args):
            k11, k12 = args
            s1, s2 = jnp.sqrt(k11), jnp.sqrt(diag)
            rho = jnp.clip(k12 / (s1 * s2), -1.0, 1.0)[:, None, None]
            z1 = s1 * x[:, None]
            z2 = s2[:, None, None] * (rho * x[:, None] + jnp.sqrt(1 - rho * rho) * x[None, :])
            t1, t2 = jnp.tanh(z1), jnp.tanh(z2)
            return (jnp.sum(W * t1 * t2, axis=(1, 2)),
                    jnp.sum(W * (1 - t1 * t1) * (1 - t2 * t2), axis=(1, 2)))

        return lax.map(row, (diag, K), batch_size=8)

    maps = {"relu": relu_maps, "erf": erf_maps, "tanh": tanh_maps}[activation]

    def run(x, C_W, C_b):
        overlap = x @ x.T / x.shape[1]
        K, Theta = C_b + C_W * overlap, C_b + C_W * overlap

        def layer(carry, _):
            K, Theta = carry
            E, Ed = maps(K)
            return (C_b + C_W * E, C_b + C_W * E + C_W * Ed * Theta), None

        (K, Theta), _ = lax.scan(layer, (K, Theta), None, length=depth - 1)
        return K, Theta

    return jax.jit(run)


# --------------------------------------------------------------------------------------------------
# Neural Tangents, in its own interpreter


def nt_worker(spec_path: str) -> int:
    """Run inside Neural Tangents' Python: time kernel_fn on the inputs of a spec file."""
    import warnings

    warnings.filterwarnings("ignore")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from neural_tangents import stax

    with open(spec_path) as f:
        spec = json.load(f)
    x = np.load(spec["inputs"])
    w_std, b_std = np.sqrt(spec["C_W"]), np.sqrt(spec["C_b"])
    if spec["nt"] == "relu":
        act = stax.Relu()
    elif spec["nt"] == "erf":
        act = stax.Erf()
    else:
        act = stax.ElementwiseNumerical(jnp.tanh, deg=spec["deg"], df=lambda z: 1 - jnp.tanh(z) ** 2)
    layers = [stax.Dense(512, w_std, b_std)]
    for _ in range(spec["depth"] - 1):
        layers += [act, stax.Dense(512, w_std, b_std)]
    kernel_fn = jax.jit(stax.serial(*layers)[2], static_argnames="get")
    start = time.perf_counter()
    out = jax.block_until_ready(kernel_fn(x, x, get=("nngp", "ntk")))
    first = time.perf_counter() - start
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        out = jax.block_until_ready(kernel_fn(x, x, get=("nngp", "ntk")))
        times.append(time.perf_counter() - start)
    np.save(spec["output"], np.stack([np.asarray(out.nngp), np.asarray(out.ntk)]))
    print(json.dumps({"seconds": float(np.median(times)), "first_call_seconds": first,
                      "jax": jax.__version__}))
    return 0


def run_nt(nt_python: str, case, x: np.ndarray, repeats: int, workdir: str):
    inputs = os.path.join(workdir, "inputs.npy")
    output = os.path.join(workdir, "nt.npy")
    np.save(inputs, x)
    spec = {**case, "inputs": inputs, "output": output, "repeats": repeats}
    spec_path = os.path.join(workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    done = subprocess.run([nt_python, os.path.abspath(__file__), "--nt-worker", spec_path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"Neural Tangents worker failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    result = np.load(output)
    return report, (result[0], result[1])


# --------------------------------------------------------------------------------------------------
# Cases


def run_case(case, args, workdir: str, expressions: dict) -> dict:
    import jax.numpy as jnp

    import derive
    from derive.kernels.gram import gram_matrices, plan_summary

    e, de = expressions[case["activation"]]
    x = inputs_for(case)
    n, depth = case["n"], case["depth"]
    dtype = case.get("dtype", "float64")
    per_entry = 1e9 / (n * n * depth)
    row = {"case": case["name"], "activation": case["activation"], "N": n, "depth": depth, "dtype": dtype,
           "method": plan_summary(e, de).split(":")[0]}

    def derive_call(dt=dtype):  # the public path: the dense network as an architecture, planned by the engine
        g = derive.gram(case["activation"], x, depth, case["C_W"], case["C_b"], dtype=dt)
        return g.nngp, g.ntk

    seconds, ours = timed(derive_call, args.repeats)
    row["derive_ns"] = seconds * per_entry
    if dtype == "float32":
        _, reference = timed(lambda: derive_call("float64"), 1)
        row["float32_error"] = relative_difference(ours, reference)
        return row
    repeats_jnp = args.repeats if case["activation"] != "tanh" else 1
    baseline = plain_recursion(case["activation"], depth)
    seconds, plain = timed(lambda: baseline(jnp.asarray(x), case["C_W"], case["C_b"]), repeats_jnp)
    row["jnp_ns"] = seconds * per_entry
    row["jnp_over_derive"] = row["jnp_ns"] / row["derive_ns"]
    row["diff_vs_jnp"] = relative_difference(ours, plain)
    exact = exact_diagonal(case, x)
    if exact is not None:
        row["derive_diagonal_error"] = diagonal_error(ours, exact)
        row["jnp_diagonal_error"] = diagonal_error(plain, exact)
    if case["activation"] == "tanh":
        subset = np.random.default_rng(1).choice(n, CHECK_ROWS, replace=False)
        direct = gram_matrices(e, de, x[subset], depth, case["C_W"], case["C_b"], method="direct")
        row["diff_vs_direct_quadrature"] = relative_difference(
            [np.asarray(m)[np.ix_(subset, subset)] for m in ours], direct)
        row["jnp_diff_vs_direct_quadrature"] = relative_difference(
            [np.asarray(m)[np.ix_(subset, subset)] for m in plain], direct)
    if args.nt_python and case.get("nt"):
        repeats = args.repeats if n * n * depth <= 500 * 500 * 10 or case["activation"] != "relu" else 1
        report, nt = run_nt(args.nt_python, case, x, max(1, repeats if depth < 100 else 1), workdir)
        row["nt_ns"] = report["seconds"] * per_entry
        row["nt_first_call_s"] = report["first_call_seconds"]
        row["nt_over_derive"] = row["nt_ns"] / row["derive_ns"]
        row["diff_vs_nt"] = relative_difference(ours, nt)
        row["diff_vs_nt_off_diagonal"] = relative_difference(ours, nt, "off-diagonal")
        if exact is not None:
            row["nt_diagonal_error"] = diagonal_error(nt, exact)
        if case["activation"] == "tanh":
            row["nt_deg"] = case["deg"]
            row["nt_diff_vs_direct_quadrature"] = relative_difference(
                [m[np.ix_(subset, subset)] for m in nt], direct)
    return row


LARGE_SCRIPT = r"""
import json, sys, time
import numpy as np
import derive
n, depth = int(sys.argv[1]), int(sys.argv[2])
x = np.random.default_rng(0).normal(size=(n, 100))
start = time.perf_counter()
result = derive.gram("relu", x, depth, C_W=2.0, C_b=0.1)
seconds = time.perf_counter() - start
peak = None
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
out_bytes = result.nngp.nbytes + result.ntk.nbytes
corner = result.nngp[:: n // 7, :: n // 7]
ok = bool(np.isfinite(corner).all() and np.array_equal(result.nngp[:5, -5:], result.nngp[-5:, :5].T))
print(json.dumps({"N": n, "depth": depth, "seconds": seconds, "peak_rss_bytes": peak,
                  "output_bytes": out_bytes, "peak_over_output": peak / out_bytes, "finite_and_symmetric": ok}))
"""


def run_large(n: int, depth: int) -> dict:
    done = subprocess.run([sys.executable, "-c", LARGE_SCRIPT, str(n), str(depth)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"large run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def text_report(rows, large, load) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["derive NNGP+NTK Gram matrices (float64 unless noted), d = 100; ns per entry per layer = "
             f"time / (N^2 L), median of warm calls; load average at start {load}",
             "diff = max |A - B| / max |B| over both matrices",
             "",
             f"{'case':28s} {'method':12s} {'derive':>8s} {'jnp':>8s} {'NT':>9s} {'jnp/der':>8s} "
             f"{'NT/der':>8s} {'diff jnp':>9s} {'diff NT':>9s}"]
    notes = []
    for r in rows:
        lines.append(f"{r['case']:28s} {r['method']:12s} {f(r.get('derive_ns'), '8.2f')} "
                     f"{f(r.get('jnp_ns'), '8.2f')} {f(r.get('nt_ns'), '9.2f')} "
                     f"{f(r.get('jnp_over_derive'), '8.1f')} {f(r.get('nt_over_derive'), '8.1f')} "
                     f"{f(r.get('diff_vs_jnp'), '9.1e')} {f(r.get('diff_vs_nt'), '9.1e')}")
        other = []
        if "float32_error" in r:
            other.append(f"float32 max rel error vs float64 {r['float32_error']:.1e}")
        if "diff_vs_direct_quadrature" in r:
            other.append(f"derive vs direct quadrature ({CHECK_ROWS} rows) {r['diff_vs_direct_quadrature']:.1e}")
        if "jnp_diff_vs_direct_quadrature" in r:
            other.append(f"jnp (Gauss-Hermite {BASELINE_TANH_DEGREE}) vs direct quadrature "
                         f"{r['jnp_diff_vs_direct_quadrature']:.1e}")
        if "nt_diff_vs_direct_quadrature" in r:
            other.append(f"NT deg {r['nt_deg']} vs direct quadrature {r['nt_diff_vs_direct_quadrature']:.1e}")
        if "diff_vs_nt_off_diagonal" in r:
            other.append(f"diff NT off-diagonal {r['diff_vs_nt_off_diagonal']:.1e}")
        if "derive_diagonal_error" in r:
            errors = [f"{who} {r[key]:.1e}" for who, key in (("derive", "derive_diagonal_error"),
                                                            ("jnp", "jnp_diagonal_error"),
                                                            ("NT", "nt_diagonal_error")) if key in r]
            other.append("diagonal vs exact single-input recursion: " + ", ".join(errors))
        if "nt_first_call_s" in r:
            other.append(f"NT first call (compile) {r['nt_first_call_s']:.0f} s")
        if other:
            notes.append(f"  {r['case']}: " + "; ".join(other))
    lines += ["", *notes]
    if large:
        lines.append(f"large: N = {large['N']}, L = {large['depth']} (derive.gram, relu): {large['seconds']:.1f} s, "
                     f"peak RSS {large['peak_rss_bytes'] / 2**30:.2f} GiB for "
                     f"{large['output_bytes'] / 2**30:.2f} GiB of output ({large['peak_over_output']:.2f}x), "
                     f"finite and symmetric: {large['finite_and_symmetric']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nt-python", help="python of a Neural Tangents 0.6.5 environment")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--large", action="store_true", help="also measure the peak memory of N = 20000")
    parser.add_argument("--large-n", type=int, default=20000)
    parser.add_argument("--nt-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nt_worker:
        return nt_worker(args.nt_worker)

    import jax

    jax.config.update("jax_enable_x64", True)  # this script's own process: the float64 jnp baseline
    from derive.api import kernel
    from derive.symbolic.recursions import numeric_kernel_expressions

    cases = CASES if not args.cases else [c for c in CASES if c["name"] in args.cases.split(",")]
    names = {c["activation"] for c in cases}
    expressions = {name: numeric_kernel_expressions(kernel(name)) for name in names}
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for case in cases:
            rows.append(run_case(case, args, workdir, expressions))
            if args.format == "text":
                print(f"  done {case['name']}", file=sys.stderr)
    large = run_large(args.large_n, 10) if args.large else None
    if args.format == "json":
        print(json.dumps({"load_average": load, "cases": rows, "large": large}))
    else:
        print(text_report(rows, large, f"{load:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
