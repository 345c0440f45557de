"""Throughput of the Monte Carlo sampler's forward statistics against the machine's matmul peak.

For dense networks of depth L, N inputs of dimension d and uniform width n, one network's forward pass
multiplies every layer's weights into the N preactivations: 2 N n_{l-1} n_l floating-point operations
per layer (n_0 = d). The sampler (``derive.montecarlo.sample_kernels`` with ``ntk=False``: kernels
K_hat^(l) and empirical kernels G_hat^(l) of every layer) is timed after compilation, and its achieved
FLOP/s is compared, in the same run and at the same dtype, with

- the matmul peak: ``jnp.dot`` of two n x n matrices (jit-compiled, best of several runs);
- the same matmuls as the forward pass, W (n x n) times h^T (n x N) for a chunk of networks, with the
  weights already in memory: what the forward pass could reach if drawing the weights were free;
- drawing the weights alone (``jax.random.normal`` of every layer, as ``init_network`` does): a ceiling
  on networks per second for any sampler that draws every weight of every network.

It also times the conditional sampler (``method="conditional"``), which draws each layer's N x n_l
preactivations from their exact Gaussian law given the previous layer instead of the n_l x n_{l-1}
weights; its "equivalent" FLOP/s counts the matmul FLOPs of the weight-based pass it replaces (so the
ratio to the matmul peak may exceed 1: it measures work avoided, not arithmetic done).

Run:  python benchmarks/montecarlo_throughput.py [--widths 512,1024] [--dtypes float64,float32]
                                                 [--depth 4] [--inputs 4] [--seconds 2] [--format json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from derive import montecarlo as mc


def _best_time(fn, *args, seconds: float, min_repeats: int = 3) -> float:
    """Shortest wall time of ``fn(*args)`` (blocked until ready) over repeats filling ``seconds``."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    best, spent, repeats = np.inf, 0.0, 0
    while repeats < min_repeats or spent < seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def matmul_peak(n: int, dtype, seconds: float) -> float:
    """FLOP/s of a jit-compiled n x n by n x n ``jnp.dot``."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return 2.0 * n**3 / _best_time(jax.jit(jnp.dot), a, b, seconds=seconds)


def forward_matmuls(widths, n_inputs: int, chunk: int, dtype, seconds: float) -> float:
    """FLOP/s of the forward pass's matmuls (W h^T per layer, a chunk of networks) with stored weights."""
    keys = jax.random.split(jax.random.key(2), len(widths))
    Ws = [jax.random.normal(keys[l], (chunk, widths[l], widths[l - 1]), dtype) for l in range(1, len(widths))]
    h0 = jax.random.normal(keys[0], (chunk, n_inputs, widths[0]), dtype)

    @jax.jit
    def run(h, Ws):
        for W in Ws:
            h = jnp.tanh(jnp.einsum("kji,kai->kaj", W, h))
        return h

    flops = chunk * sum(2.0 * n_inputs * widths[l - 1] * widths[l] for l in range(1, len(widths)))
    return flops / _best_time(run, h0, Ws, seconds=seconds)


def weight_draws(widths, chunk: int, dtype, seconds: float) -> float:
    """Networks per second when only drawing every layer's W and b (as ``init_network`` does)."""

    @jax.jit
    def run(indices):
        def one(k):
            params = mc.init_network(jax.random.fold_in(jax.random.key(3), k), widths, 1.0, 0.1, dtype)
            return sum(jnp.sum(W) + jnp.sum(b) for W, b in params)

        return jax.vmap(one)(indices)

    return chunk / _best_time(run, jnp.arange(chunk), seconds=seconds)


def sampler(widths, n_inputs: int, dtype, seconds: float, method: str = "weights") -> tuple[float, int]:
    """(networks per second, chunk) of ``sample_kernels(..., ntk=False, method=method)`` after compilation."""
    x = np.random.default_rng(0).standard_normal((n_inputs, widths[0]))
    depth = len(widths) - 1
    per_device = mc._auto_chunk(widths, n_inputs, 10**9, mc.DEFAULT_CHUNK_BYTES, np.dtype(dtype).itemsize,
                                ntk=False, method=method)
    chunk = max(per_device, mc.MIN_NETWORKS_PER_DEVICE) * len(jax.devices())

    def run(n_networks):
        return mc.sample_kernels(jnp.tanh, x, depth, widths[1], 1.5, 0.05, n_networks=n_networks, chunk=chunk,
                                 dtype=dtype, ntk=False, method=method).nngp_mean

    run(chunk)  # compile
    start = time.perf_counter()
    run(chunk)
    one_chunk = time.perf_counter() - start
    n_chunks = max(2, int(np.ceil(seconds / max(one_chunk, 1e-6))))
    start = time.perf_counter()
    run(n_chunks * chunk)
    return n_chunks * chunk / (time.perf_counter() - start), chunk


def measure(width: int, dtype_name: str, depth: int, n_inputs: int, input_dim: int, seconds: float) -> dict:
    dtype = jnp.dtype(dtype_name)
    widths = (input_dim,) + (width,) * depth
    flops_per_network = sum(2.0 * n_inputs * widths[l - 1] * widths[l] for l in range(1, len(widths)))
    networks_per_s, chunk = sampler(widths, n_inputs, dtype, seconds)
    peak = matmul_peak(width, dtype, seconds)
    skinny = forward_matmuls(widths, n_inputs, chunk, dtype, seconds)
    draws = weight_draws(widths, chunk, dtype, seconds)
    conditional, _ = sampler(widths, n_inputs, dtype, seconds, method="conditional")
    achieved = networks_per_s * flops_per_network
    return {
        "width": width, "dtype": dtype_name, "depth": depth, "inputs": n_inputs, "chunk": chunk,
        "networks_per_s": networks_per_s, "flops_per_network": flops_per_network,
        "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": peak / 1e9, "ratio_to_peak": achieved / peak,
        "forward_matmul_gflops": skinny / 1e9, "weight_draw_networks_per_s": draws,
        "ratio_to_weight_draws": networks_per_s / draws,
        "conditional_networks_per_s": conditional,
        "conditional_equivalent_gflops": conditional * flops_per_network / 1e9,
        "conditional_equivalent_ratio_to_peak": conditional * flops_per_network / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="512,1024", help="comma-separated uniform widths n")
    parser.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64, float32")
    parser.add_argument("--depth", type=int, default=4, help="dense layers L")
    parser.add_argument("--inputs", type=int, default=4, help="inputs N per network")
    parser.add_argument("--input-dim", type=int, default=None, help="input dimension d (default: the width)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args()

    rows = []
    for dtype_name in args.dtypes.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            rows.append(measure(width, dtype_name, args.depth, args.inputs, args.input_dim or width,
                                args.seconds))
    meta = {"devices": [str(d) for d in jax.devices()], "backend": jax.default_backend()}
    if args.format == "json":
        print(json.dumps({**meta, "results": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("n", "dtype", "networks/s", "GFLOP/s", "matmul peak GFLOP/s", "ratio",
                  "fwd matmuls alone GFLOP/s", "weight draws alone networks/s", "share of draw ceiling",
                  "conditional networks/s", "conditional equiv. ratio",
                  title=f"forward statistics, depth {args.depth}, {args.inputs} inputs, {meta['backend']} "
                        f"({len(meta['devices'])} device{'s' if len(meta['devices']) > 1 else ''})")
    for r in rows:
        table.add_row(str(r["width"]), r["dtype"], f"{r['networks_per_s']:.1f}",
                      f"{r['achieved_gflops']:.2f}",
                      f"{r['matmul_peak_gflops']:.1f}", f"{r['ratio_to_peak']:.3f}",
                      f"{r['forward_matmul_gflops']:.1f}", f"{r['weight_draw_networks_per_s']:.1f}",
                      f"{r['ratio_to_weight_draws']:.2f}", f"{r['conditional_networks_per_s']:.0f}",
                      f"{r['conditional_equivalent_ratio_to_peak']:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
