"""Throughput of the Monte Carlo sampler's forward statistics against the machine's matmul peak.

For dense networks of depth L, N inputs of dimension d and uniform width n (n_0 = d), one network's
forward statistics (``derive.sampling.dense.sample_kernels`` with ``ntk=False``: K_hat^(l) and G_hat^(l) of
every layer) take two kinds of matmul:

- the forward pass, W^(l) times the N preactivations: 2 N n_{l-1} n_l FLOPs per layer ("fwd");
- the Gram matrices h h^T of the N inputs, for K_hat^(l) (h = z^(l)) and G_hat^(l+1) (h = sigma(z^(l))):
  N (N + 1) n_l FLOPs each, counting the N (N + 1) / 2 distinct entries of a symmetric product (XLA
  computes all N^2); G_hat^(1) depends on the inputs only and is not counted ("+Gram").

Each weight is drawn once and used for 2 N forward FLOPs, so the FLOP rate grows with N until the
matmuls, not the draws, dominate. The sampler is timed after compilation for every N, width, dtype and
PRNG implementation (``prng=``), and its FLOP/s is compared, in the same run and at the same dtype, with

- the matmul peak: ``jnp.dot`` of two n x n matrices (jit-compiled, best of several runs);
- the forward pass's matmuls alone (W h^T per layer for a chunk of networks, weights already in
  memory): what the forward pass could reach if drawing the weights were free;
- drawing the weights alone (``jax.random.normal`` of every layer, as ``init_network`` does, with the
  same PRNG): a ceiling on networks per second for any sampler that draws every weight;
- the moment updates alone (mean and M_2..M_4 of the 2 L N^2 kernel entries, network after network, as
  the sampler accumulates them): O(N^2) work per network that bounds networks per second at large N.

It also times the conditional sampler (``method="conditional"``, default PRNG), which draws each
layer's N x n_l preactivations from their exact Gaussian law given the previous layer instead of the
n_l x n_{l-1} weights; its FLOP/s are "equivalent": the FLOPs of the weight-based computation it
replaces, per second (so the ratio to the peak may exceed 1: it measures work avoided, not arithmetic
done).

The target (issue "Throughput"): the weight sampler's forward statistics at >= 0.5 of the jnp.dot peak
at width >= 512. The verdict is printed for the forward-pass FLOPs alone (the strict count) and with the
Gram FLOPs, with the cases (dtype, n, N, PRNG) that meet it.

Run:  python benchmarks/montecarlo_throughput.py [--widths 512,1024] [--dtypes float64,float32]
          [--inputs 4,64,256] [--prngs philox4x32,threefry2x32] [--depth 4] [--seconds 2] [--format json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from derive.sampling import dense as mc

jax.config.update("jax_enable_x64", True)  # this script's own process: its float64 baselines

TARGET = 0.5  # fraction of the jnp.dot peak
TARGET_MIN_WIDTH = 512


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


def forward_flops(widths, n_inputs: int) -> float:
    """Forward-pass matmul FLOPs of one network: sum over layers of 2 N n_{l-1} n_l."""
    return sum(2.0 * n_inputs * widths[l - 1] * widths[l] for l in range(1, len(widths)))


def gram_flops(widths, n_inputs: int) -> float:
    """FLOPs of the distinct entries of the Gram matrices of K_hat^(1..L) and G_hat^(2..L)."""
    per_neuron = n_inputs * (n_inputs + 1.0)
    return per_neuron * (sum(widths[1:]) + sum(widths[1:-1]))


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

    return chunk * forward_flops(widths, n_inputs) / _best_time(run, h0, Ws, seconds=seconds)


def weight_draws(widths, chunk: int, dtype, prng: str, seconds: float) -> float:
    """Networks per second when only drawing every layer's W and b (as ``init_network`` does)."""
    root = jax.random.key(3, impl=prng)

    @jax.jit
    def run(indices):
        def one(k):
            params = mc.init_network(jax.random.fold_in(root, k), widths, 1.0, 0.1, dtype)
            return sum(jnp.sum(W) + jnp.sum(b) for W, b in params)

        return jax.vmap(one)(indices)

    return chunk / _best_time(run, jnp.arange(chunk), seconds=seconds)


def sampler_chunk(widths, n_inputs: int, dtype, method: str = "weights") -> int:
    """The chunk ``sample_kernels`` picks by default (``ntk=False``) on the current devices."""
    per_device = mc._auto_chunk(widths, n_inputs, 10**9, mc.DEFAULT_CHUNK_BYTES, np.dtype(dtype).itemsize,
                                ntk=False, method=method)
    return max(per_device, mc.MIN_NETWORKS_PER_DEVICE) * len(jax.devices())


def moment_updates(widths, n_inputs: int, chunk: int, dtype, seconds: float) -> float:
    """Networks per second of the sampler's per-network moment updates alone (``ntk=False``): mean and
    M_2..M_4 of the L N^2 entries of K_hat and of G_hat, network after network."""
    depth = len(widths) - 1
    shape = (depth, n_inputs, n_inputs)
    samples = {name: jax.random.normal(jax.random.key(4 + i), (chunk, *shape), dtype)
               for i, name in enumerate(("nngp", "gram"))}
    state = [jax.device_put(mc.zero_moments({name: shape for name in samples}, dtype))]

    def update(samples):  # the state is donated to _accumulate: carry it from call to call
        state[0] = mc._accumulate(state[0], samples, np.int64(0), np.int64(2**62))
        return state[0]

    return chunk / _best_time(update, samples, seconds=seconds)


def sampler(widths, n_inputs: int, dtype, seconds: float, method: str = "weights",
            prng: str = mc.DEFAULT_PRNG, repeats: int = 3) -> float:
    """Networks per second of ``sample_kernels(..., ntk=False, method=method, prng=prng)`` after
    compilation: the best of ``repeats`` runs of a whole number of default-sized chunks, together
    filling about ``seconds`` (the best run, as other work on shared cores only slows runs down)."""
    x = np.random.default_rng(0).standard_normal((n_inputs, widths[0]))
    depth = len(widths) - 1
    chunk = sampler_chunk(widths, n_inputs, dtype, method)

    def run(n_networks):
        return mc.sample_kernels(jnp.tanh, x, depth, widths[1], 1.5, 0.05, n_networks=n_networks, chunk=chunk,
                                 dtype=dtype, ntk=False, method=method, prng=prng).nngp_mean

    run(chunk)  # compile
    start = time.perf_counter()
    run(chunk)
    one_chunk = time.perf_counter() - start
    n_chunks = max(2, int(np.ceil(seconds / repeats / max(one_chunk, 1e-6))))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run(n_chunks * chunk)
        best = min(best, time.perf_counter() - start)
    return n_chunks * chunk / best


def measure(width: int, dtype_name: str, depth: int, n_inputs: int, input_dim: int, prngs, peak: float,
            seconds: float) -> list[dict]:
    """Rows for one (width, dtype, N): the weight sampler with every PRNG, then the conditional one."""
    dtype = jnp.dtype(dtype_name)
    widths = (input_dim,) + (width,) * depth
    fwd, gram = forward_flops(widths, n_inputs), gram_flops(widths, n_inputs)
    chunk = sampler_chunk(widths, n_inputs, dtype)
    matmuls_alone = forward_matmuls(widths, n_inputs, chunk, dtype, seconds) / peak
    moments_alone = moment_updates(widths, n_inputs, chunk, dtype, seconds)
    common = {"width": width, "dtype": dtype_name, "depth": depth, "inputs": n_inputs, "input_dim": input_dim,
              "fwd_flops_per_network": fwd, "gram_flops_per_network": gram,
              "matmul_peak_gflops": peak / 1e9, "fwd_matmuls_alone_ratio_to_peak": matmuls_alone,
              "moment_updates_networks_per_s": moments_alone}
    rows = []
    for method, prng in [("weights", p) for p in prngs] + [("conditional", mc.DEFAULT_PRNG)]:
        rate = sampler(widths, n_inputs, dtype, seconds, method, prng)
        row = {**common, "sampler": method, "prng": prng,
               "chunk": sampler_chunk(widths, n_inputs, dtype, method),
               "networks_per_s": rate,
               "fwd_gflops": rate * fwd / 1e9, "fwd_ratio_to_peak": rate * fwd / peak,
               "all_gflops": rate * (fwd + gram) / 1e9, "all_ratio_to_peak": rate * (fwd + gram) / peak,
               "weight_draw_networks_per_s": None, "ratio_to_weight_draws": None}
        if method == "weights":
            draws = weight_draws(widths, chunk, dtype, prng, seconds)
            row.update(weight_draw_networks_per_s=draws, ratio_to_weight_draws=rate / draws)
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> dict:
    """Which weight-sampler cases at width >= TARGET_MIN_WIDTH reach TARGET of the peak, per FLOP count."""
    eligible = [r for r in rows if r["sampler"] == "weights" and r["width"] >= TARGET_MIN_WIDTH]
    out = {"target_ratio": TARGET, "min_width": TARGET_MIN_WIDTH}
    for count in ("fwd", "all"):
        def case(r, count=count):
            return {**{k: r[k] for k in ("dtype", "width", "inputs", "prng")},
                    "ratio": r[f"{count}_ratio_to_peak"]}

        best = max(eligible, key=lambda r: r[f"{count}_ratio_to_peak"], default=None)
        out[count] = {"met": [case(r) for r in eligible if r[f"{count}_ratio_to_peak"] >= TARGET],
                      "best": None if best is None else case(best)}
    return out


def _describe(case: dict) -> str:
    return f"{case['dtype']} n={case['width']} N={case['inputs']} {case['prng']} ({case['ratio']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="512,1024", help="comma-separated uniform widths n")
    parser.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64, float32")
    parser.add_argument("--inputs", default="4,64,256", help="comma-separated inputs N per network")
    parser.add_argument("--prngs", default=",".join(mc.PRNGS),
                        help=f"comma-separated generators for the weight sampler ({', '.join(mc.PRNGS)})")
    parser.add_argument("--depth", type=int, default=4, help="dense layers L")
    parser.add_argument("--input-dim", type=int, default=None, help="input dimension d (default: the width)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args()
    prngs = args.prngs.split(",")

    rows, peaks = [], []
    for dtype_name in args.dtypes.split(","):
        for width in (int(w) for w in args.widths.split(",")):
            peak = matmul_peak(width, jnp.dtype(dtype_name), args.seconds)
            peaks.append({"dtype": dtype_name, "width": width, "gflops": peak / 1e9})
            for n_inputs in (int(n) for n in args.inputs.split(",")):
                rows += measure(width, dtype_name, args.depth, n_inputs, args.input_dim or width, prngs, peak,
                                args.seconds)
    meta = {"devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
            "jax": jax.__version__, "depth": args.depth}
    target = verdict(rows)
    if args.format == "json":
        print(json.dumps({**meta, "matmul_peaks": peaks, "results": rows, "target": target}))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    n_dev = len(meta["devices"])
    table = Table("n", "dtype", "N", "sampler", "prng", "networks/s", "fwd GFLOP/s", "fwd / peak",
                  "+Gram GFLOP/s", "+Gram / peak", "draws alone networks/s", "share of draw ceiling",
                  "fwd matmuls alone / peak", "moment updates alone networks/s", "jnp.dot peak GFLOP/s",
                  title=f"forward statistics (ntk=False), depth {args.depth}, {meta['backend']} "
                        f"({n_dev} device{'s' if n_dev > 1 else ''}), jax {meta['jax']}; "
                        "conditional: equivalent FLOPs of the weight sampler")
    previous = None
    for r in rows:
        group = (r["dtype"], r["width"], r["inputs"])
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        draws = r["weight_draw_networks_per_s"]
        table.add_row(str(r["width"]), r["dtype"], str(r["inputs"]), r["sampler"],
                      r["prng"] if r["sampler"] == "weights" else "", f"{r['networks_per_s']:.1f}",
                      f"{r['fwd_gflops']:.2f}", f"{r['fwd_ratio_to_peak']:.3f}", f"{r['all_gflops']:.2f}",
                      f"{r['all_ratio_to_peak']:.3f}", "" if draws is None else f"{draws:.1f}",
                      "" if draws is None else f"{r['ratio_to_weight_draws']:.2f}",
                      f"{r['fwd_matmuls_alone_ratio_to_peak']:.2f}",
                      f"{r['moment_updates_networks_per_s']:.0f}", f"{r['matmul_peak_gflops']:.1f}")
    console.print(table)
    for count, label in (("fwd", "forward-pass FLOPs"), ("all", "forward-pass + Gram FLOPs")):
        result = target[count]
        head = (f"target >= {TARGET} of jnp.dot peak at width >= {TARGET_MIN_WIDTH}, weight sampler, "
                f"{label}: ")
        if result["best"] is None:
            console.print(head + f"no case at width >= {TARGET_MIN_WIDTH} measured")
        elif result["met"]:
            console.print(head + "MET for " + "; ".join(_describe(c) for c in result["met"]))
        else:
            console.print(head + f"NOT MET (best: {_describe(result['best'])})")


if __name__ == "__main__":
    main()
