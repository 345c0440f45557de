"""Monte Carlo of real finite-width networks built from an architecture description.

The description (:mod:`derive.arch`) that drives the theory (:mod:`derive.kernels.arch`) also
builds the sampled networks here, layer by layer, with the rule's ``sampler`` naming the algorithm:

    dense        z = h W^T + b on the channels at every position, W ~ N(0, C_W / n_in), b ~ N(0, C_b)
    activation   z = sigma(h) (the activation generated from its rule)
    layernorm    z = (h - mean_c h) / sqrt(var_c h + eps) at every position
    residual     z = xi h + gamma branch(h)
    conv         z = b + conv(h, W), W ~ N(0, C_W / (n_in |filter|)), zero padding ('SAME'/'VALID')
    avg_pool     window means (divided by the window size, zero padding)
    global_avg_pool, flatten   means over positions / positions and channels as one axis
    attention    H heads of n/H channels: q = sqrt(C_Q) W x, k = sqrt(C_K) W x with one shared W
                 (tied, W ~ N(0, 1/n_in)), logits (q_s . k_t) / (n/H), softmax over t, values
                 v = W_V x (W_V ~ N(0, C_V / n_in)), output (concatenated heads) W_O^T + b with
                 W_O ~ N(0, C_O / n), b ~ N(0, C_b)
    dot_product_attention   the same with independent q = W_Q x, k = W_K x (W_Q ~ N(0, C_Q / n_in),
                 W_K ~ N(0, C_K / n_in)) and logits (q_s . k_t) / sqrt(n/H); softmax over t, or the
                 logits themselves (mechanism "identity")

with every weighted layer ``width`` channels wide (or the layer's own ``width``). For each network
the sampler records the empirical kernel of every recorded output (top-level layers and each
repetition, as :func:`derive.kernels.arch.arch_kernels` does),

    K_hat[(a,p),(b,q)] = (1/n) sum_i z_{i;a,p} z_{i;b,q}   (n channels),

and the empirical NTK of the output, Theta_hat[(a,p),(b,q)] = (1/k) sum_(i<k) sum_mu lambda_mu
dz_{i;a,p}/dtheta_mu dz_{i;b,q}/dtheta_mu over the first k = ``ntk_outputs`` output channels (each
channel has the same law, so the mean over networks is unbiased for any k), with lambda_mu =
lambda_W / fan_in for weights and lambda_b for biases (Neural Tangents' NTK parametrisation when
lambda = C); the tied query/key weights use lambda = 1 / n_in (their contribution vanishes at
infinite width), independent ones lambda_Q / n_in and lambda_K / n_in. Gradients come from one
vector-Jacobian product per (input, position, channel).

Network k draws its parameters from ``fold_in(key(seed), k)``; networks are computed in chunks
(``lax.map`` over the networks of a chunk, so every network runs the same single-network program),
sharded over devices with ``shard_map`` and accumulated in index order as
:func:`derive.sampling.dense.sample_kernels` does. The numbers are therefore bit-for-bit independent of
the chunk size; across device counts they agree to rounding (about 1e-16 relative: with several
simulated CPU devices XLA fuses some elementwise-and-reduce steps, LayerNorm's for one,
differently), which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from derive.arch.description import Layer, Repeat, Serial, check_derivable
from derive.backends.precision import float64
from derive.core import budget
from derive.core.display import (
    markdown_table,
    markdown_text,
    quantity_cell,
    rounded,
    upper_entries,
    verdict,
    worst_z,
)
from derive.core.errors import DeriveError
from derive.core.inputs import check_arch_inputs
from derive.core.progress import stage
from derive.sampling.dense import (
    DEFAULT_CHUNK_BYTES,
    MIN_NETWORKS_PER_DEVICE,
    NETWORK_AXIS,
    _accumulate,
    network_mesh,
    z_scores,
    zero_moments,
)
from derive.sampling.estimators import Moments

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# ------------------------------------------------------------------------------------------------
# Parameters: drawn during a first pass (whose arithmetic XLA drops, only shapes matter), replayed


class _Draw:
    """Draws each parameter when the forward pass first needs it: the i-th array from
    ``fold_in(key, i)``, standard deviation ``std``; records it with its NTK scale."""

    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype
        self.params, self.scales = [], []

    def take(self, shape, std, scale):
        value = std * jax.random.normal(jax.random.fold_in(self.key, len(self.params)), shape, self.dtype)
        self.params.append(value)
        self.scales.append(scale)
        return value


class _Replay:
    """Hands out given parameters in the order they were drawn."""

    def __init__(self, params):
        self.params = iter(params)

    def take(self, shape, std, scale):
        return next(self.params)


def _width(layer: Layer, width: int) -> int:
    return layer.width or width


# ------------------------------------------------------------------------------------------------
# Forward pass


def _conv(h, W, stride, padding):
    k = W.ndim - 2
    dims = lax.conv_dimension_numbers(h.shape, W.shape,
                                      ("N" + "".join("HWDXYZ"[:k]) + "C", "".join("HWDXYZ"[:k]) + "IO",
                                       "N" + "".join("HWDXYZ"[:k]) + "C"))
    return lax.conv_general_dilated(h, W, stride, padding, dimension_numbers=dims,
                                    precision=lax.Precision.HIGHEST)


def _avg_pool(h, window, stride, padding):
    dims = (1,) + tuple(window) + (1,)
    strides = (1,) + tuple(stride) + (1,)
    summed = lax.reduce_window(h, 0.0, lax.add, dims, strides, padding)
    return summed / math.prod(window)


def _attention(h, src, layer: Layer, width: int):
    """Tied query/key weights, logits scaled by 1 / (n/H) (rule ``attention``)."""
    n, heads, per_head, tokens = _heads(h, layer, width)
    n_in = tokens.shape[-1]
    W = src.take((n, n_in), math.sqrt(1 / n_in), math.sqrt(1 / n_in))
    shared = (tokens @ W.T).reshape(tokens.shape[:2] + (heads, per_head))
    scale = math.sqrt(layer.value("C_Q") * layer.value("C_K"))
    logits = scale * jnp.einsum("ashc,athc->ahst", shared, shared) / per_head
    return _attend_values(h, tokens, jax.nn.softmax(logits, axis=-1), src, layer, n, heads, per_head)


def _dot_product_attention(h, src, layer: Layer, width: int):
    """Independent query and key weights, logits scaled by 1 / sqrt(n/H) (rule ``dot_product_attention``)."""
    n, heads, per_head, tokens = _heads(h, layer, width)
    n_in = tokens.shape[-1]
    W_Q = src.take((n, n_in), math.sqrt(layer.value("C_Q") / n_in), math.sqrt(layer.value("lambda_Q") / n_in))
    W_K = src.take((n, n_in), math.sqrt(layer.value("C_K") / n_in), math.sqrt(layer.value("lambda_K") / n_in))
    q = (tokens @ W_Q.T).reshape(tokens.shape[:2] + (heads, per_head))
    k = (tokens @ W_K.T).reshape(tokens.shape[:2] + (heads, per_head))
    logits = jnp.einsum("ashc,athc->ahst", q, k) / math.sqrt(per_head)
    A = jax.nn.softmax(logits, axis=-1) if layer.option("mechanism") == "softmax" else logits
    return _attend_values(h, tokens, A, src, layer, n, heads, per_head)


def _heads(h, layer: Layer, width: int):
    heads = layer.option("heads")
    n = _width(layer, width)
    if n % heads:
        raise DeriveError(f"layer '{layer.type}': width {n} is not a multiple of heads {heads}")
    return n, heads, n // heads, h.reshape(h.shape[0], -1, h.shape[-1])  # tokens (N, T, n_in)


def _attend_values(h, tokens, A, src, layer: Layer, n: int, heads: int, per_head: int):
    """Values W_V x weighted by the attention weights A (N, H, T, T), heads concatenated, W_O^T + b."""
    n_in = tokens.shape[-1]
    W_V = src.take((n, n_in), math.sqrt(layer.value("C_V") / n_in), math.sqrt(layer.value("lambda_V") / n_in))
    W_O = src.take((n, n), math.sqrt(layer.value("C_O") / n), math.sqrt(layer.value("lambda_O") / n))
    b = src.take((n,), math.sqrt(layer.value("C_b")), math.sqrt(layer.value("lambda_b")))
    v = (tokens @ W_V.T).reshape(tokens.shape[:2] + (heads, per_head))
    out = jnp.einsum("ahst,athc->ashc", A, v).reshape(tokens.shape[:2] + (n,))
    out = out @ W_O.T + b
    return out.reshape(h.shape[:-1] + (n,))


def _forward(net: Serial, src, h, width: int, activations, record):
    """Apply ``net`` to h (N, *positions, channels), parameters from ``src``."""
    for item in net.items:
        if isinstance(item, Repeat):
            for _ in range(item.times):
                h = _forward(item.body, src, h, width, activations, None)
                if record is not None:
                    record.append(h)
            continue
        h = _forward_layer(item, src, h, width, activations)
        if record is not None:
            record.append(h)
    return h


def _weights(layer: Layer, src, shape, fan_in: int, n_out: int):
    W = src.take(shape, math.sqrt(layer.value("C_W") / fan_in), math.sqrt(layer.value("lambda_W") / fan_in))
    b = src.take((n_out,), math.sqrt(layer.value("C_b")), math.sqrt(layer.value("lambda_b")))
    return W, b


def _forward_layer(layer: Layer, src, h, width: int, activations):
    kind = layer.rule.sampler
    n_in = h.shape[-1]
    if kind == "dense":
        n_out = _width(layer, width)
        W, b = _weights(layer, src, (n_out, n_in), n_in, n_out)
        return h @ W.T + b
    if kind == "conv":
        f = layer.option("filter")
        if h.ndim - 2 != len(f):
            raise DeriveError(f"layer 'conv': filter {f} does not match inputs with {h.ndim - 2} spatial axes")
        n_out = _width(layer, width)
        W, b = _weights(layer, src, tuple(f) + (n_in, n_out), n_in * math.prod(f), n_out)
        return _conv(h, W, layer.option("stride"), layer.option("padding")) + b
    if kind == "activation":
        return activations[layer](h)
    if kind == "layernorm":
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean((h - mean) ** 2, axis=-1, keepdims=True)
        return (h - mean) / jnp.sqrt(var + layer.value("eps"))
    if kind == "residual":
        branch = _forward(layer.branch, src, h, width, activations, None)
        if branch.shape != h.shape:
            raise DeriveError(f"layer 'residual': the branch maps shape {h.shape[1:]} to {branch.shape[1:]}; "
                              "give its last layer the input's channels (width)")
        return layer.value("xi") * h + layer.value("gamma") * branch
    if kind == "avg_pool":
        return _avg_pool(h, layer.option("window"), layer.option("stride"), layer.option("padding"))
    if kind == "global_avg_pool":
        return jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
    if kind == "flatten":
        return h.reshape(h.shape[0], -1)
    if kind == "attention":
        return _attention(h, src, layer, width)
    if kind == "dot_product_attention":
        return _dot_product_attention(h, src, layer, width)
    raise DeriveError(f"layer '{layer.type}': no sampler '{kind}'")


def _flat_kernel(z):
    """(1/n) z_(a,p) . z_(b,q) over the n channels, as an (M, M) matrix."""
    flat = z.reshape(-1, z.shape[-1])
    return flat @ flat.T / z.shape[-1]


# ------------------------------------------------------------------------------------------------
# One network


def _activation_functions(net: Serial) -> dict:
    from derive.backends.codegen import jax_activation

    return {layer: jax_activation(layer.resolved_activation())
            for layer in net.distinct_layers() if layer.rule.sampler == "activation"}


def _network_statistics(key, inputs, *, net: Serial, width: int, ntk: bool, ntk_outputs: int, activations):
    dtype = inputs.dtype
    draw = _Draw(key, dtype)
    _forward(net, draw, inputs, width, activations, None)
    params, scales = draw.params, draw.scales
    record = []
    out = _forward(net, _Replay(params), inputs, width, activations, record)
    stats = {f"nngp{i}": _flat_kernel(z) for i, z in enumerate(record)}
    if ntk:
        k = min(ntk_outputs, out.shape[-1])

        def outputs(ps):
            return _forward(net, _Replay(ps), inputs, width, activations, None)[..., :k].reshape(-1)

        count = math.prod(out.shape[:-1]) * k
        grads = jax.jacrev(outputs)(params)  # one vector-Jacobian product per output entry
        flat = jnp.concatenate([(g * s).reshape(count, -1) for g, s in zip(grads, scales)], axis=1)
        gram = (flat @ flat.T).reshape(count // k, k, count // k, k)
        stats["ntk"] = jnp.einsum("aibi->ab", gram) / k
    return stats


@partial(jax.jit, static_argnames=("net", "width", "ntk", "ntk_outputs", "chunk", "mesh"))
def _chunk_samples(start, key_data, inputs, *, net, width, ntk, ntk_outputs, chunk, mesh):
    activations = _activation_functions(net)

    def block(indices, key_data, inputs):
        root = jax.random.wrap_key_data(key_data)
        # lax.map, not vmap: every network runs the same single-network program whatever the chunk
        # size or device count, so XLA's choice of kernels (and their rounding) cannot depend on them
        return lax.map(lambda k: _network_statistics(jax.random.fold_in(root, k), inputs, net=net, width=width,
                                                     ntk=ntk, ntk_outputs=ntk_outputs,
                                                     activations=activations), indices)

    indices = start + jnp.arange(chunk)
    samples = jax.shard_map(block, mesh=mesh, in_specs=(P(NETWORK_AXIS), P(), P()),
                            out_specs=P(NETWORK_AXIS))(indices, key_data, inputs)
    return jax.lax.with_sharding_constraint(samples, NamedSharding(mesh, P()))


@dataclass(frozen=True, repr=False)
class ArchMonteCarlo:
    """Per-entry moments over sampled networks of every recorded kernel and of the output NTK.

    ``nngp[i]`` and ``ntk`` are :class:`derive.sampling.estimators.Moments` of (M_i, M_i) matrices (mean,
    standard error ``mean_stderr``); ``labels`` and ``spatial`` as in
    :class:`derive.kernels.arch.ArchKernels`.
    """

    labels: list[str]
    nngp: list[Moments]
    ntk: Moments | None
    n_networks: int
    width: int
    seed: int
    n_devices: int = 1

    def nngp_z(self, theory) -> list[np.ndarray]:
        """z-scores of every recorded kernel against ``theory`` (an ArchKernels)."""
        return [z_scores(m.mean, m.mean_stderr, np.asarray(t).reshape(m.mean.shape))
                for m, t in zip(self.nngp, theory.nngp)]

    def ntk_z(self, theory) -> np.ndarray:
        t = np.asarray(theory.ntk[-1]).reshape(self.ntk.mean.shape)
        return z_scores(self.ntk.mean, self.ntk.mean_stderr, t)

    def __repr__(self) -> str:
        ntk = "" if self.ntk is None else " and the output NTK"
        return (f"ArchMonteCarlo({self.n_networks} networks of width {self.width}: kernels of {len(self.labels)} "
                f"outputs{ntk})")

    def _repr_markdown_(self) -> str:
        rows = []
        moments = list(zip(self.labels, ["$\\hat K$"] * len(self.labels), self.nngp))
        if self.ntk is not None:
            moments.append((self.labels[-1] if self.labels else "output", "$\\hat\\Theta$", self.ntk))
        for label, what, m in moments:
            mean, se = _square(m.mean), _square(m.mean_stderr)
            rows += [[markdown_text(label), what, s, t, mean[s, t], rounded(se[s, t])]
                     for s, t in upper_entries(mean.shape[0])]
        return "\n".join([
            f"**Sampled networks** of an architecture: {self.n_networks} networks of width {self.width} (seed "
            f"{self.seed}); per entry $(s, t)$ over the sites (input, position), the mean over networks and its "
            "standard error", "", markdown_table(["output", "", "$s$", "$t$", "mean", "±"], rows)])


def _square(a) -> np.ndarray:
    """An (M, M) view of a kernel of M sites, whatever its stored shape."""
    a = np.asarray(a)
    M = int(round(np.sqrt(a.size)))
    return a.reshape(M, M)


def work_estimate(net: Serial, shape: tuple[int, ...], width: int, n_networks: int, *, ntk: bool = True,
                  ntk_outputs: int = 1, itemsize: int = 8) -> budget.Estimate:
    """The cost of :func:`sample_arch` (:func:`derive.core.budget.arch_monte_carlo`): every weighted layer's
    weights drawn and applied at every site, attention's scores, the NTK's vector-Jacobian products."""
    N, positions = shape[0], math.prod(shape[1:-1])
    counts = net.layer_counts()
    weighted = sum(times for layer, times in counts.items() if layer.rule.fresh_weights)
    n = max([width] + [layer.width for layer in counts if layer.width is not None])
    filters = max(math.prod(dict(layer.options).get("filter", (1,))) for layer in counts)
    attention = sum(times * 4.0 * N * positions**2 * n for layer, times in counts.items()
                    if "heads" in {p for p, _ in layer.params} or "attention" in layer.type)
    recorded = sum(item.times if isinstance(item, Repeat) else 1 for item in net.items)
    return budget.arch_monte_carlo(n_networks, n, N * positions, weighted, filter_size=filters, ntk=ntk,
                                   ntk_outputs=ntk_outputs, attention_ops_per_network=attention,
                                   itemsize=itemsize, recorded=recorded,
                                   what=f"{n_networks} sampled networks of width {n} with {weighted} "
                                        f"weighted layers on {N} inputs x {positions} positions")


@float64
def sample_arch(net: Serial, inputs, width: int, *, n_networks: int = 200, seed: int = 0, ntk: bool = True,
                ntk_outputs: int = 1, chunk: int | None = None, devices=None, dtype=jnp.float64,
                progress: bool | Callable[[int], None] | None = None) -> ArchMonteCarlo:
    """Sample ``n_networks`` networks of architecture ``net`` at ``width`` channels (module docstring).

    Args:
        net: the description; the same object the theory evaluates.
        inputs: (N, d) or (N, *positions, d).
        width: channels of every weighted layer that does not set its own ``width``.
        n_networks: S >= 2 independent networks.
        seed: results depend only on the seed (not on ``chunk`` or the devices).
        ntk: also the output NTK (one vector-Jacobian product per output entry used).
        ntk_outputs: k, the output channels averaged in the NTK estimate.
        chunk: networks computed at once (default: what fits in about 32 MiB per device).
        devices: devices to shard networks over (default all).
        progress: True for progress on stderr (:mod:`derive.core.progress`), or a callable called with
            the number of networks done after each chunk.
    """
    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    check_derivable(net)
    inputs = check_arch_inputs(inputs).astype(dtype)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise DeriveError(f"width must be a positive integer, got {width!r}")
    if n_networks < 2:
        raise DeriveError(f"n_networks must be at least 2 for a standard error, got {n_networks}")
    if ntk_outputs < 1:
        raise DeriveError("ntk_outputs must be at least 1")
    from derive.kernels.arch import serial_spatial

    serial_spatial(net, tuple(inputs.shape[1:-1]))  # shape errors before sampling
    budget.check(work_estimate(net, inputs.shape, width, n_networks, ntk=ntk, ntk_outputs=ntk_outputs,
                               itemsize=inputs.dtype.itemsize))
    mesh = network_mesh(devices)
    n_devices = mesh.size
    M = math.prod(inputs.shape[:-1])
    if chunk is None:
        layers = sum(net.layer_counts().values())
        per_network = 8 * (layers * M * width * 4 + (M * ntk_outputs * layers * width * width if ntk else 0))
        per_device = max(1, min(-(-n_networks // n_devices), DEFAULT_CHUNK_BYTES // max(per_network, 1)))
    else:
        per_device = -(-int(max(1, min(chunk, n_networks))) // n_devices)
    chunk = max(per_device, MIN_NETWORKS_PER_DEVICE) * n_devices
    static = dict(net=net, width=int(width), ntk=ntk, ntk_outputs=int(ntk_outputs), chunk=chunk, mesh=mesh)
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    shapes = jax.eval_shape(lambda: _chunk_samples(np.int64(0), key_data, inputs, **static))
    home = mesh.local_devices[0]
    state = jax.device_put(zero_moments({k: v.shape[1:] for k, v in shapes.items()}, inputs.dtype), home)
    report, close = stage(progress, f"sampling {n_networks} networks of width {width}", n_networks)
    for start in range(0, n_networks, chunk):
        samples = _chunk_samples(np.int64(start), key_data, inputs, **static)
        samples = jax.device_put(jax.tree.map(lambda a: a.addressable_data(0), samples), home)
        state = _accumulate(state, samples, np.int64(start), np.int64(n_networks))
        if report is not None:
            jax.block_until_ready(state)
            report(min(start + chunk, n_networks))
    close()
    _, mean, m2, m3, m4 = state

    def moments(key: str) -> Moments:
        return Moments(n_networks, *(np.asarray(a[key]) for a in (mean, m2, m3, m4)))

    count = sum(1 for k in shapes if k.startswith("nngp"))
    labels = [label for label, _ in net.top_level()]
    return ArchMonteCarlo(labels, [moments(f"nngp{i}") for i in range(count)],
                          moments("ntk") if ntk else None, n_networks, int(width), seed, n_devices)





# ------------------------------------------------------------------------------------------------
# Theory against sampled networks


@dataclass(repr=False)
class ArchValidation:
    """Theory against Monte Carlo for every kernel entry of every recorded output and the output NTK.

    ``results`` rows: quantity ("K" or "Theta"), layer (label), index (its position in the
    recorded outputs, from 1), entry ((input a, position p), (input b, position q)) with positions as
    flat indices, width, theory, estimate, stderr, z. ``passed``: every |z| < z_max.
    """

    name: str
    widths: list[int]
    samples: int
    seed: int
    z_max: float
    results: list[dict]
    theory: object
    mc: ArchMonteCarlo

    @property
    def worst(self) -> dict | None:
        finite = [r for r in self.results if r["z"] is not None]
        return max(finite, key=lambda r: abs(r["z"]), default=None)

    @property
    def passed(self) -> bool:
        worst = self.worst
        return worst is None or abs(worst["z"]) < self.z_max

    def as_dict(self) -> dict:
        return {"architecture": self.name, "widths": self.widths, "samples": self.samples, "seed": self.seed,
                "z_max": self.z_max, "passed": self.passed, "results": self.results}

    def __repr__(self) -> str:
        name = f"{self.name}: " if self.name else ""
        quantities = ", ".join(dict.fromkeys(r["quantity"] for r in self.results))
        return (f"ArchValidation({name}{verdict(self.passed)}; {len(self.results)} entries of {quantities}, "
                f"{self.samples} networks of width {self.widths[0]}{worst_z(self.worst)})")

    def _repr_markdown_(self) -> str:
        w = self.worst
        worst = "" if w is None else f"; worst $z$ = {rounded(w['z'], 3)} ({markdown_text(w['quantity'])}, {markdown_text(w['layer'])})"
        rows = [[quantity_cell(r["quantity"]), markdown_text(r["layer"]), _entry_text(r["entry"]), r["theory"], r["estimate"], rounded(r["stderr"]),
                 rounded(r["z"], 3)] for r in self.results]
        return "\n".join([
            f"**Validation of {markdown_text(self.name) or 'an architecture'}** against {self.samples} sampled networks of width "
            f"{self.widths[0]} (seed {self.seed}): {verdict(self.passed, markdown=True)}, every $\\lvert z\\rvert < {self.z_max:g}$ with "
            f"$z = (\\text{{estimate}} - \\text{{theory}})/\\text{{stderr}}${worst}. The theory is infinite width: "
            "the estimates carry an O(1/n) bias.", "",
            "An entry is ((input $a$, position $p$), (input $b$, position $q$)), positions as flat indices.", "",
            markdown_table(["quantity", "output", "entry", "theory", "estimate", "±", "z"], rows)])

    def plot(self, path=None) -> Figure:
        """Mean diagonal kernel K[(a,p),(a,p)] of every recorded output. Left: theory (infinite width)
        and Monte Carlo with +-1 standard-error bars; right: Monte Carlo minus theory, zero being the
        theory. Returns the matplotlib Figure (made without pyplot), saved to ``path`` (.png, .pdf,
        .svg) when given."""
        from matplotlib.ticker import MaxNLocator

        from derive.core.figures import (
            InlineFigure,
            error_bars,
            reference_line,
            save_figure,
            series_style,
            style_axis,
        )

        x = np.arange(1, len(self.theory.nngp) + 1)
        theory = np.array([float(np.mean(np.diagonal(np.asarray(k).reshape(m.mean.shape))))
                           for k, m in zip(self.theory.nngp, self.mc.nngp)])
        est = np.array([float(np.mean(np.diagonal(m.mean))) for m in self.mc.nngp])
        err = np.array([float(np.sqrt(np.sum(np.diagonal(m.mean_stderr) ** 2)) / len(np.diagonal(m.mean)))
                        for m in self.mc.nngp])
        fig = InlineFigure(figsize=(11.5, 4.6), layout="constrained")
        left, right = fig.subplots(1, 2)
        width = self.widths[0]
        left.plot(x, theory, label="theory (infinite width)", zorder=2, **series_style(0, marker=False))
        error_bars(left, x, est, err, 1, label=f"Monte Carlo, width $n = {width}$ ($\\pm 1$ s.e.)")
        error_bars(right, x, est - theory, err, 1, label=f"Monte Carlo $-$ theory, width $n = {width}$ "
                                                          f"($\\pm 1$ s.e.)")
        reference_line(right, y=0.0, label="theory")
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_xlim(x[0] - 0.6, x[-1] + 0.6)
        xlabel = "recorded output (top-level layer or repeated block)"
        style_axis(left, xlabel, r"mean diagonal kernel $\bar{K} = \mathrm{mean}_a\, K_{aa}$",
                   "kernel: theory and Monte Carlo", legend=True)
        style_axis(right, xlabel, r"$\bar{K}_{\mathrm{MC}} - \bar{K}_{\mathrm{theory}}$",
                   "kernel: Monte Carlo $-$ theory", legend=True)
        fig.suptitle(f"{self.name or 'architecture'}: {self.samples} sampled networks of width $n = {width}$ "
                     f"against the infinite-width theory\n(estimates at one width include the $O(1/n)$ "
                     f"correction; the outputs share their networks, so their errors are correlated)",
                     fontsize=10)
        if path is not None:
            save_figure(fig, path, dpi=120)
        return fig


def _entry_text(entry) -> str:
    return ", ".join("(" + ", ".join(map(str, e)) + ")" if isinstance(e, (list, tuple)) else str(e) for e in entry)


@float64
def validate_arch(net: Serial, inputs, width: int, *, samples: int = 200, seed: int = 0, z_max: float = 5.0,
                  ntk: bool = True, progress: bool | Callable[[int], None] | None = None) -> ArchValidation:
    """Sample ``samples`` networks of ``net`` at ``width`` and score every derived entry (z-scores)."""
    from derive.kernels.arch import arch_kernels

    theory = arch_kernels(net, inputs)
    mc = sample_arch(net, inputs, width, n_networks=samples, seed=seed, ntk=ntk, progress=progress)
    rows = []
    positions = [max(1, math.prod(s)) for s in theory.spatial]

    def add(quantity, index, label, moments, value, per_input):
        z = z_scores(moments.mean, moments.mean_stderr, value)
        M = moments.mean.shape[0]
        for i in range(M):
            for j in range(i, M):
                zij = float(z[i, j])
                rows.append({"quantity": quantity, "layer": label, "index": index,
                             "entry": [[i // per_input, i % per_input], [j // per_input, j % per_input]],
                             "width": int(width),
                             "theory": float(value[i, j]), "estimate": float(moments.mean[i, j]),
                             "stderr": float(moments.mean_stderr[i, j]),
                             "z": zij if np.isfinite(zij) else None})

    for index, (label, k, m, per_input) in enumerate(zip(theory.labels, theory.nngp, mc.nngp, positions), 1):
        add("K", index, label, m, np.asarray(k).reshape(m.mean.shape), per_input)
    if ntk:
        add("Theta", len(theory.labels), theory.labels[-1], mc.ntk,
            np.asarray(theory.ntk[-1]).reshape(mc.ntk.mean.shape), positions[-1])
    return ArchValidation(net.name, [int(width)], samples, seed, z_max, rows, theory, mc)

__all__ = ["ArchMonteCarlo", "ArchValidation", "sample_arch", "validate_arch"]
