"""Work estimates: every request either finishes in sight or is refused up front.

Numeric work whose size a user chooses (inputs N, depth L, networks S, width n, grid points, quadrature
points) is estimated here before it starts, in *operations* (about one floating-point operation each)
and *bytes* of memory, by one function per kind of work. :func:`check` refuses an estimate over the
limits with a one-line :class:`~derive.core.errors.DeriveError` that gives the estimate, the limit
and how to raise it; the entry points that decide the work call it (:func:`derive.gram`,
:func:`derive.arch_gram` and every Gram evaluation through :func:`derive.kernels.engine.network_gram`,
the samplers :func:`derive.sampling.dense.sample_kernels` and :func:`derive.sampling.arch.sample_arch`,
:func:`derive.validate`, :func:`derive.finite_width`, the depth profile and the phase diagram), so
Python users get the same refusals as the command.

Limits (the defaults refuse what would not finish in about ten minutes on a laptop, or cannot fit in
its memory):

- work: :data:`DEFAULT_MAX_WORK` operations, ten minutes at :data:`OPS_PER_SECOND`; the environment
  variable ``DERIVE_MAX_WORK`` (a number of operations, e.g. ``1e15``) or ``max_work=`` raise it;
- memory: this machine's physical memory (:data:`FALLBACK_MAX_MEMORY` where it cannot be read);
  ``DERIVE_MAX_MEMORY`` (bytes, or with a suffix: ``64G``) or ``max_memory=`` change it.

``max_work=`` / ``max_memory=`` are keywords of the public API functions, and :func:`limits` sets
them for a block of code. A limit of ``inf`` turns the check off.

The cost model, measured on two shared CPU cores (x86-64, float64, JAX 0.10) and rounded up; a
laptop runs the same work in about the same time or faster:

==============================  ==================================================================
Gram matrices (dense network)   L (N(N+1)/2 entries x ops per entry + ops per layer); closed forms
                                20 ops an entry (2 ns per entry and layer measured for ReLU at
                                N = 1000), 1e4 a layer (0.5 us measured); Mehler-expanded
                                quadrature (tanh, ...) 1000 an entry (87 ns measured) and 1e8 a
                                layer (the orders are chosen on the host, 6 ms measured); direct
                                quadrature 100 ops per point per entry (N^2 entries, order^2 points
                                per node: 8 ns a point measured)
Gram matrices (architectures)   per layer (N P)^2 entries x 100 ops (P positions), x the filter size
                                for conv, and 1e7 ops a layer (0.4 ms measured for tanh at N = 4);
                                Gaussian-logit attention (N T)^2 / 2 pairs x points x T x 30 ops
Monte Carlo (dense networks)    per network and layer n_in n_out x (100 ops per normal drawn + 2 N
                                for the forward pass), with the NTK 2 N n_L n_in n_out more (the
                                Jacobians); measured 1e10 ops/s at width 512 with the NTK
Monte Carlo (architectures)     per network and weighted layer n^2 x (100 + 2 M x filter), M = N P
                                sites; with the NTK 2 M k n^2 more (k output channels)
finite width, one input         2e7 ops a layer (the walker: 1.8 ms a layer measured for tanh)
finite width, tensor form       per layer 2 S^6 ops (V' = J V J^T over S = N P sites) and S^4 x 8
                                bytes per recorded layer
training (dense networks)       per network weights x (100 + 6 N_train x steps + 2 N_test) ops, and
                                (3 weights + 2 N x units) x 8 bytes per network of a chunk
depth profile                   2e6 ops a layer (150 us measured for tanh)
phase diagram                   5e6 ops a grid point (400 layers of the fixed point; 0.4 ms measured)
==============================  ==================================================================

The README example sizes and the benchmarks' largest cases (N = 20000 inputs at depth 10 through
``benchmarks/kernels.py --large``: 2e9 entries x layers, about 4e10 operations and 6.7 GB) are far
inside the defaults. This module imports neither JAX nor SymPy.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from derive.core.errors import DeriveError

#: Operations per second the estimates assume (a laptop's sustained rate on this kind of work).
OPS_PER_SECOND = 1e10
#: Default work limit: ten minutes at :data:`OPS_PER_SECOND` (the Gram evaluation shows no progress).
DEFAULT_MAX_WORK = 600 * OPS_PER_SECOND
#: Memory limit used where the physical memory cannot be read.
FALLBACK_MAX_MEMORY = 16 * 2**30
#: Environment variables that override the limits.
WORK_VARIABLE = "DERIVE_MAX_WORK"
MEMORY_VARIABLE = "DERIVE_MAX_MEMORY"

#: Gram matrices of a dense network (see the module docstring for the measurements).
GRAM_ENTRY_OPS = 20.0
GRAM_LAYER_OPS = 1e4
MEHLER_ENTRY_OPS = 1000.0
MEHLER_LAYER_OPS = 1e8
QUADRATURE_POINT_OPS = 100.0
#: Gram matrices of architectures: operations per entry and layer, per layer (the fixed part:
#: 0.4 ms a layer measured for tanh at N = 4) and per attention point.
ARCH_ENTRY_OPS = 100.0
ARCH_LAYER_OPS = 1e7
ATTENTION_POINT_OPS = 30.0
#: Monte Carlo: operations per normal drawn.
DRAW_OPS = 100.0
#: Finite width (one input), depth profile, phase diagram: operations per layer or grid point.
FINITE_WIDTH_LAYER_OPS = 2e7
PROFILE_LAYER_OPS = 2e6
PHASE_POINT_OPS = 5e6

_work_limit: ContextVar[float | None] = ContextVar("derive_max_work", default=None)
_memory_limit: ContextVar[float | None] = ContextVar("derive_max_memory", default=None)


@dataclass(frozen=True)
class Estimate:
    """The estimated cost of one request: ``what`` it is (for messages), ``ops`` and ``bytes``."""

    what: str
    ops: float
    bytes: float = 0.0

    @property
    def seconds(self) -> float:
        """Estimated run time at :data:`OPS_PER_SECOND`."""
        return self.ops / OPS_PER_SECOND

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.what, self.ops + other.ops, max(self.bytes, other.bytes))


# ----------------------------------------------------------------------------------------------
# Limits


def _positive(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DeriveError(f"{name} must be a positive number, got {value!r}") from None
    if not out > 0:  # also NaN
        raise DeriveError(f"{name} must be a positive number, got {value!r}")
    return out


_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str, name: str = MEMORY_VARIABLE) -> float:
    """``"64G"``, ``"512M"``, ``"1.5e10"`` -> bytes (binary suffixes K, M, G, T; an optional B)."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+|inf)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise DeriveError(f"{name} must be a size in bytes such as 64G or 5e10, got {text!r}")
    return _positive(match.group(1), name) * _SUFFIXES[match.group(2).upper()]


def physical_memory() -> float:
    """This machine's physical memory in bytes (:data:`FALLBACK_MAX_MEMORY` if unknown)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return float(FALLBACK_MAX_MEMORY)


def work_limit(value=None) -> float:
    """The work limit in operations: ``value``, else :func:`limits`, else ``DERIVE_MAX_WORK``, else the
    default."""
    if value is not None:
        return _positive(value, "max_work")
    if _work_limit.get() is not None:
        return _work_limit.get()
    env = os.environ.get(WORK_VARIABLE)
    if env is not None and env.strip():
        return _positive(env.strip(), WORK_VARIABLE)
    return DEFAULT_MAX_WORK


def memory_limit(value=None) -> float:
    """The memory limit in bytes: ``value``, else :func:`limits`, else ``DERIVE_MAX_MEMORY``, else the
    physical memory."""
    if value is not None:
        return parse_bytes(value, "max_memory") if isinstance(value, str) else _positive(value, "max_memory")
    if _memory_limit.get() is not None:
        return _memory_limit.get()
    env = os.environ.get(MEMORY_VARIABLE)
    if env is not None and env.strip():
        return parse_bytes(env)
    return physical_memory()


@contextmanager
def limits(max_work: float | None = None, max_memory: float | str | None = None):
    """Within the block, use these limits (None keeps the current one). ``inf`` turns a check off.

    Example:
        >>> from derive.core import budget
        >>> with budget.limits(max_work=1e15):  # doctest: +SKIP
        ...     derive.gram("relu", x, 100000, 2.0)
    """
    work = None if max_work is None else work_limit(max_work)
    memory = None if max_memory is None else memory_limit(max_memory)
    tokens = (_work_limit.set(work if work is not None else _work_limit.get()),
              _memory_limit.set(memory if memory is not None else _memory_limit.get()))
    try:
        yield
    finally:
        _memory_limit.reset(tokens[1])
        _work_limit.reset(tokens[0])


# ----------------------------------------------------------------------------------------------
# Messages


def human_time(seconds: float) -> str:
    """A duration in words: '40 s', '9 min', '2.5 h', '41 days', '3e+07 years'."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 90:
        return f"{seconds:.2g} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.2g} h"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.2g} years"


def human_bytes(size: float) -> str:
    """A size in words: '512 MB', '6.4 GB', '2e+03 TB' (powers of 1024)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.2g} {unit}"
    return f"{size:.0f} bytes"


def check(estimate: Estimate, max_work: float | None = None, max_memory: float | None = None) -> Estimate:
    """Refuse ``estimate`` with a one-line DeriveError when it is over a limit; else return it."""
    most_work = work_limit(max_work)
    most_memory = memory_limit(max_memory)
    if not estimate.ops <= most_work:
        raise DeriveError(
            f"{estimate.what}: about {_sci(estimate.ops)} operations (~{human_time(estimate.seconds)} at "
            f"{_sci(OPS_PER_SECOND)} a second), over the limit of {_sci(most_work)} "
            f"(~{human_time(most_work / OPS_PER_SECOND)}); make it smaller, or raise the limit with "
            f"{WORK_VARIABLE}={_round_up(estimate.ops)} (max_work= in Python)")
    if not estimate.bytes <= most_memory:
        raise DeriveError(
            f"{estimate.what}: needs about {human_bytes(estimate.bytes)} of memory, over the limit of "
            f"{human_bytes(most_memory)}; make it smaller, or change the limit with "
            f"{MEMORY_VARIABLE}={_round_up_bytes(estimate.bytes)} (max_memory= in Python)")
    return estimate


def _sci(x: float) -> str:
    """3.6e13 rather than 3.6e+13; small numbers as they are."""
    if not math.isfinite(x):
        return "inf"
    text = f"{x:.2g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _round_up(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    exponent = math.floor(math.log10(max(x, 1.0)))
    mantissa = math.ceil(x / 10**exponent * 1.0001)
    if mantissa >= 10:
        mantissa, exponent = 1, exponent + 1
    return f"{mantissa}e{exponent}"


def _round_up_bytes(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{math.ceil(x / 2**30)}G"


# ----------------------------------------------------------------------------------------------
# Estimates, one per kind of work


def _count(x) -> float:
    """A size as a float (huge integers stay representable; negative sizes count as zero)."""
    try:
        return max(float(x), 0.0)
    except OverflowError:
        return math.inf


def gram(n_inputs, depth, *, entry_ops: float = GRAM_ENTRY_OPS, layer_ops: float = GRAM_LAYER_OPS,
         whole_matrices: bool = False, itemsize: int = 8, stored_layers=1,
         what: str | None = None) -> Estimate:
    """NNGP and NTK Gram matrices of ``n_inputs`` through ``depth`` dense layers.

    ``entry_ops`` and ``layer_ops`` are the costs of one entry and of one layer's fixed part (module
    docstring); ``whole_matrices`` for the direct method (N^2 entries, six N x N matrices at once)
    rather than the tiled one (the upper triangle, the two results and a few tiles);
    ``stored_layers`` matrices of each kind are kept (the per-layer profile keeps L).
    """
    N, L = _count(n_inputs), _count(depth)
    entries = N * N if whole_matrices else N * (N + 1) / 2
    ops = L * (entries * entry_ops + layer_ops)
    stored = _count(stored_layers)
    matrices = 2 * stored + (4 if whole_matrices else 0.1)
    label = what or f"Gram matrices of {n_inputs} inputs through {depth} layers"
    return Estimate(label, ops, matrices * N * N * itemsize)


def quadrature_entry_ops(nodes) -> float:
    """Operations per entry of the direct method for quadrature ``nodes`` (objects with ``order`` and
    ``dimension``): order^dimension points each."""
    return GRAM_ENTRY_OPS + sum(QUADRATURE_POINT_OPS * float(n.order) ** n.dimension for n in nodes)


def arch_gram(sites, layers, *, entry_ops: float = ARCH_ENTRY_OPS, extra_ops: float = 0.0,
              recorded=1, itemsize: int = 8, what: str | None = None) -> Estimate:
    """Kernel and NTK of an architecture over ``sites`` = N x positions through ``layers`` layers;
    ``extra_ops`` for attention's point integrals; ``recorded`` outputs are kept (K and Theta each)."""
    M = _count(sites)
    ops = _count(layers) * (M * M * entry_ops + ARCH_LAYER_OPS) + extra_ops
    label = what or f"kernels of {sites} sites (inputs x positions) through {layers} layers"
    return Estimate(label, ops, (2 * _count(recorded) + 4) * M * M * itemsize)


def attention_ops(n_inputs, tokens, points) -> float:
    """Gaussian-logit attention: (N T)^2 / 2 pairs of token pairs x ``points`` x T softmax entries."""
    M = _count(n_inputs) * _count(tokens)
    return M * M / 2 * _count(points) * _count(tokens) * ATTENTION_POINT_OPS


def monte_carlo(n_networks, widths, n_inputs, *, ntk: bool = True, conditional: bool = False,
                itemsize: int = 8, what: str | None = None) -> Estimate:
    """``n_networks`` dense networks with layer widths ``widths`` = (n_0, n_1, ..., n_L) on ``n_inputs``."""
    ws = [_count(w) for w in widths]
    return dense_monte_carlo(n_networks, ws[0], ws[1:], n_inputs, ntk=ntk, conditional=conditional,
                             itemsize=itemsize, what=what)


def dense_monte_carlo(n_networks, n_in, hidden, n_inputs, *, depth=None, ntk: bool = True,
                      conditional: bool = False, itemsize: int = 8, what: str | None = None) -> Estimate:
    """:func:`monte_carlo` with input dimension ``n_in`` and ``hidden`` the widths n_1, ..., n_L, or with
    ``depth`` L and one width ``hidden`` for every layer (no per-layer list, so any depth is estimated)."""
    S, N, d = _count(n_networks), _count(n_inputs), _count(n_in)
    if depth is not None:
        L, n = _count(depth), _count(hidden)
        pairs = d * n + max(L - 1, 0) * n * n
        outs, ins, last = L * n, d + max(L - 1, 0) * n, n
    else:
        ws = [d] + [_count(w) for w in hidden]
        L = len(ws) - 1
        pairs = sum(a * b for a, b in zip(ws, ws[1:]))
        outs, ins, last = sum(ws[1:]), sum(ws[:-1]), ws[-1]
    if conditional:
        per_network = N * outs * DRAW_OPS + 2 * N * N * ins + L * N**3
    else:
        per_network = pairs * (DRAW_OPS + 2 * N)
    if ntk:
        per_network += 2 * N * last * pairs
    moments = 5 * L * N * N * itemsize
    label = what or (f"{n_networks} sampled networks of width {last:.0f} and depth {L:.0f} on {n_inputs} "
                     "inputs")
    return Estimate(label, S * per_network, moments)


def arch_monte_carlo(n_networks, width, sites, weighted_layers, *, filter_size=1, ntk: bool = True,
                     ntk_outputs=1, attention_ops_per_network: float = 0.0, itemsize: int = 8,
                     recorded=1, what: str | None = None) -> Estimate:
    """``n_networks`` sampled architectures: ``weighted_layers`` layers of ``width`` channels over
    ``sites`` = N x positions (``filter_size`` the largest conv filter)."""
    S, n, M = _count(n_networks), _count(width), _count(sites)
    per_network = _count(weighted_layers) * n * n * (DRAW_OPS + 2 * M * _count(filter_size))
    per_network += attention_ops_per_network
    if ntk:
        per_network += 2 * M * _count(ntk_outputs) * _count(weighted_layers) * n * n
    label = what or f"{n_networks} sampled networks of width {width} with {weighted_layers} weighted layers"
    return Estimate(label, S * per_network, 5 * (_count(recorded) + 1) * M * M * itemsize)


def training(n_networks, widths, n_train, n_test, steps, *, chunk=64, what: str | None = None) -> Estimate:
    """``n_networks`` dense networks of layer widths ``widths`` = (n_0, ..., n_L) trained by full-batch
    gradient descent for ``steps`` steps on ``n_train`` inputs (a forward and a backward pass, about 6 N
    operations per weight and step) and read out on ``n_test``; ``chunk`` networks in memory at once
    (weights, gradients and the activations of the batch)."""
    ws = [_count(w) for w in widths]
    pairs = sum(a * b for a, b in zip(ws, ws[1:]))
    N, M, T = _count(n_train), _count(n_test), _count(steps)
    per_network = pairs * (DRAW_OPS + 6 * N * T + 2 * M)
    per_chunk = _count(chunk) * (3 * pairs + 2 * (N + M) * sum(ws)) * 8
    width = max(ws[1:-1], default=0)
    label = what or f"training {n_networks} networks of width {width:.0f} for {steps} steps"
    return Estimate(label, _count(n_networks) * per_network, per_chunk)


def finite_width(depth, *, layer_ops: float = FINITE_WIDTH_LAYER_OPS, what: str | None = None) -> Estimate:
    """The single-input finite-width walker through ``depth`` layers."""
    L = _count(depth)
    return Estimate(what or f"finite-width maps through {depth} layers", L * layer_ops, 40 * 8 * L)


def finite_width_tensor(sites, layers, recorded, *, what: str | None = None) -> Estimate:
    """The tensor form of V and G1 over ``sites`` through ``layers`` layers, ``recorded`` outputs kept."""
    S, L = _count(sites), _count(layers)
    label = what or f"the finite-width tensor form over {sites} sites through {layers} layers"
    return Estimate(label, L * 2 * S**6, (_count(recorded) + 6) * S**4 * 8)


def depth_profile(depth, *, what: str | None = None) -> Estimate:
    """Two inputs iterated through ``depth`` layers (``derive profile``)."""
    L = _count(depth)
    return Estimate(what or f"the depth profile through {depth} layers", L * PROFILE_LAYER_OPS, 6 * 8 * L)


def phase_diagram(grid, *, what: str | None = None) -> Estimate:
    """chi_perp at the fixed point on a ``grid`` x ``grid`` plane (``derive phase``)."""
    G = _count(grid)
    return Estimate(what or f"the phase diagram on a {grid} x {grid} grid", G * G * PHASE_POINT_OPS,
                    20 * G * G * 8)


__all__ = ["DEFAULT_MAX_WORK", "Estimate", "MEMORY_VARIABLE", "OPS_PER_SECOND", "WORK_VARIABLE", "arch_gram",
           "arch_monte_carlo", "attention_ops", "check", "dense_monte_carlo", "depth_profile", "finite_width",
           "finite_width_tensor", "gram", "human_bytes", "human_time", "limits", "memory_limit",
           "monte_carlo",
           "parse_bytes", "phase_diagram", "physical_memory", "quadrature_entry_ops", "training",
           "work_limit"]
