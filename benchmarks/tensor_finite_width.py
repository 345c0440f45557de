"""Cost of the tensor form's NTK fluctuations over sites, and of its compiled four-point tables.

For a residual tanh CNN (conv, then two blocks z + conv(tanh(conv z))) on N inputs of P positions
(standard normal, fixed seed), it times :func:`derive.finite.tensor.arch_finite_width_tensor` with
``ntk=False`` (K, V, G1) and ``ntk=True`` (also A, B, D, F), the latter twice: with the four-point
tables of the NTK's fluctuations computed moment by moment in NumPy
(:func:`derive.finite.moments.product_moment`) and with the sets of four sites in one compiled JAX
program (:mod:`derive.finite.moments_jax`, what runs by default from about eight sites on). Each time
is the median of ``--repeats`` calls after one warm-up call (which compiles); the ratio is NumPy
over compiled, measured in this one run. Agreement is max |A - B| / max |B| over A, B, D, F at the
output.

Run:  python benchmarks/tensor_finite_width.py [--sites 1x4,2x4,3x4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import derive.finite.moments_jax as moments_jax
from derive import arch
from derive.finite.tensor import arch_finite_width_tensor


def _network():
    return arch.serial(arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.repeat(2, arch.residual(
        arch.conv(filter=(3,), C_W=1.5, C_b=0.1), arch.activation("tanh"), arch.conv(filter=(2,), C_W=1.6),
        gamma=1.0)))


def _timed(fn, repeats: int) -> tuple[float, object]:
    fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", default="1x4,2x4,3x4", help="inputs x positions, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    net = _network()
    default = moments_jax.COMPILE_POINTS
    print(f"residual tanh CNN, float64; median of {args.repeats} call(s) after a warm-up")
    print(f"{'sites':>8} {'ntk=False [s]':>14} {'NumPy tables [s]':>17} {'compiled [s]':>13} "
          f"{'NumPy/compiled':>15} {'max rel diff':>13}")
    for item in args.sites.split(","):
        N, P = (int(v) for v in item.split("x"))
        x = np.random.default_rng(1).standard_normal((N, P, 4))
        t_kernel, _ = _timed(lambda: arch_finite_width_tensor(net, x, ntk=False), args.repeats)
        try:
            moments_jax.COMPILE_POINTS = np.inf
            t_numpy, slow = _timed(lambda: arch_finite_width_tensor(net, x), args.repeats)
            moments_jax.COMPILE_POINTS = 0
            t_jax, fast = _timed(lambda: arch_finite_width_tensor(net, x), args.repeats)
        finally:
            moments_jax.COMPILE_POINTS = default
        diff = max(float(np.max(np.abs(fast.values[q][-1] - slow.values[q][-1])) / np.max(np.abs(slow.values[q][-1])))
                   for q in "ABDF")
        print(f"{N * P:>3} ({N}x{P}) {t_kernel:>14.2f} {t_numpy:>17.2f} {t_jax:>13.2f} {t_numpy / t_jax:>15.2f} "
              f"{diff:>13.1e}")


if __name__ == "__main__":
    main()
