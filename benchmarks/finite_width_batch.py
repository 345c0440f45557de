"""Speed and agreement of the generated-JAX batch iteration of V and G1 against the NumPy one.

For each activation, N inputs of dimension d = 8 (standard normal, fixed seed), depth L, C_W = 1.7,
C_b = 0.1 and widths (32, 64, 48, ...), it times :func:`derive.finite.batch.iterate_batch` (NumPy)
and :func:`derive.finite.batch_jax.iterate_batch_jax` (generated JAX, one jitted ``lax.scan``).
The SymPy derivation is done once beforehand and is cached, so neither time includes it. The JAX
compilation is reported separately (first call minus a warm call); the times are the median of
``--repeats`` warm calls, each ended by converting the result to NumPy. Agreement is the largest
normwise relative difference max |A - B| / max |B| over the layers of K, V and G1.

Run:  python benchmarks/finite_width_batch.py [--inputs 4] [--depth 10] [--repeats 5]
                                              [--activations relu,tanh,erf,swish]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from derive.finite.batch import iterate_batch
from derive.finite.batch_jax import iterate_batch_jax
from derive.rules.activations import resolve


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def _normwise(a, b) -> float:
    return max(float(np.max(np.abs(a[l] - b[l])) / max(np.max(np.abs(b[l])), 1e-300)) for l in range(len(b)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--activations", default="relu,tanh,erf,swish")
    args = parser.parse_args(argv)

    x = np.random.default_rng(0).normal(size=(args.inputs, 8))
    widths = np.resize([32, 64, 48, 128, 96], args.depth)
    print(f"N = {args.inputs} inputs, depth {args.depth}, float64; median of {args.repeats} warm calls")
    print(f"{'activation':<10} {'numpy [s]':>10} {'jax [s]':>10} {'compile [s]':>12} {'numpy/jax':>10} "
          f"{'max rel diff':>13}")
    for name in args.activations.split(","):
        act = resolve(name)

        def numpy_run():
            return iterate_batch(act, x, args.depth, 1.7, 0.1, widths=widths)

        def jax_run():
            return iterate_batch_jax(act, x, args.depth, 1.7, 0.1, widths=widths)

        numpy_run()  # derives and caches the SymPy coefficients
        start = time.perf_counter()
        jax_run()
        first = time.perf_counter() - start
        t_np, ref = _timed(numpy_run, args.repeats)
        t_jax, got = _timed(jax_run, args.repeats)
        diff = max(_normwise(getattr(got, q), getattr(ref, q)) for q in ("K", "V", "G1"))
        print(f"{name:<10} {t_np:>10.4f} {t_jax:>10.4f} {first - t_jax:>12.2f} {t_np / t_jax:>10.1f} "
              f"{diff:>13.1e}")


if __name__ == "__main__":
    main()
