"""Infinite-width kernel (NNGP) and NTK of any architecture description, as generated JAX.

The state after each layer is the pair of Gram matrices over every (input, position) pair,

    K[(a, p), (b, q)] = lim (1/n) sum_i z_{i;a,p} z_{i;b,q},    Theta[(a, p), (b, q)] (the NTK),

stored as (M, M) arrays with M = N * P for N inputs of P positions (P = 1 without spatial axes;
positions in row-major order). The inputs x of shape (N, *spatial, d) start the recursion with
K = x_a(p) . x_b(q) / d and Theta = 0 (Neural Tangents' convention); each layer then applies its
rule's maps (:mod:`derive.rules.layers`):

- maps that act entry by entry (dense, activation, layernorm, residual) are compiled by
  :func:`derive.backends.codegen.to_jax` with K11 = K[(a,p),(a,p)], K12 = K[(a,p),(b,q)],
  K22 = K[(b,q),(b,q)]; maps with a Gaussian expectation are evaluated on the clamped covariance
  (:func:`derive.backends.safe.clamp_covariance`) with their forms specialised to rho = +-1 on the
  boundary, as the dense-network Gram matrices are (:mod:`derive.kernels.gram`);
- structural operators are linear maps of the whole matrix (Novak et al. 2019 for convolution and
  pooling; Hron et al. 2020 for attention; the same definitions as Neural Tangents' ``stax``):

      patch(X)[(a,p),(b,q)]        = (1/|f|) sum_d X[(a, s p + d - lo), (b, s q + d - lo)]
      pool(X)[(a,p),(b,q)]         = (1/|w|^2) sum_(d, d') X[(a, s p + d - lo), (b, s q + d' - lo)]
      spatial_mean(X)[a, b]        = mean over p, q of X[(a,p),(b,q)]
      diagonal_mean(X)[a, b]       = mean over p of X[(a,p),(b,p)]
      attend(X)[(a,s),(b,s')]      = sum_(t, t') A_a[s,t] X[(a,t),(b,t')] A_b[s',t'],
                                     A_a = softmax_t(logits(K[(a,s),(a,t)]))

  with entries outside the input (zero padding, ``lo`` positions before the first) equal to 0.
  Attention with Gaussian logits (``mean_attend``, ``logit_response``: the means over the logits
  of the attention weights and of their Jacobians) is computed by :mod:`derive.kernels.attention`; its maps
  may also multiply these terms by the entry's own K and Theta.

A repeated block whose output has the shape of its input runs as one ``lax.scan`` over its
repetitions, so depth 10^4 compiles once. The whole evaluation is one jitted function of the inputs
with the description as a static argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jax import lax

from derive.arch.description import Layer, Repeat, Serial, check_derivable
from derive.backends.codegen import to_jax
from derive.backends.precision import float64
from derive.backends.safe import clamp_covariance, covariance_floor
from derive.core import budget
from derive.core import symbols as S
from derive.core.display import markdown_table, markdown_text, matrix_table
from derive.core.errors import DeriveError, RuleError
from derive.core.inputs import check_arch_inputs
from derive.kernels.direct import _at_correlation
from derive.rules.layers import BK12, BTheta12, E, StructuralOperator
from derive.symbolic.maps import layer_maps

# ------------------------------------------------------------------------------------------------
# Entry-by-entry maps


class _Elementwise:
    """A map of (K11, K12, K22, Theta12, BK12, BTheta12) compiled to JAX, boundary-exact."""

    ARGS = (S.K11, S.K12, S.K22, S.Theta12, BK12, BTheta12)

    def __init__(self, expr: sp.Expr, expectation: bool):
        self.expectation = expectation
        self.general = to_jax(expr, self.ARGS)
        self.special = []
        if expectation:
            for sign in (1, -1):
                form = _at_correlation(expr, sign)
                if form is not None:
                    self.special.append((sign, to_jax(form, self.ARGS)))

    def __call__(self, K, Theta, BK, BTheta):
        diag = jnp.diagonal(K)
        if self.expectation:
            diag = jnp.maximum(diag, covariance_floor(K.dtype))
            n = K.shape[0]
            K = jnp.where(jnp.eye(n, dtype=bool), diag[:, None], K)
            K11, K12, K22 = clamp_covariance(diag[:, None], K, diag[None, :])
            bound = jnp.sqrt(K11 * K22)
        else:
            K11, K12, K22 = diag[:, None], K, diag[None, :]
        args = (K11, K12, K22, Theta, BK, BTheta)
        value = self.general(*args)
        for sign, form in self.special:
            value = jnp.where(K12 == sign * bound, form(*args), value)
        return value


# ------------------------------------------------------------------------------------------------
# Structural operators


def _padding(size: int, window: int, stride: int, padding: str, where: str) -> tuple[int, int, int]:
    """(output size, padding before, padding after) as lax.conv_general_dilated pads."""
    if padding == "SAME":
        out = -(-size // stride)
        total = max((out - 1) * stride + window - size, 0)
        return out, total // 2, total - total // 2
    out = (size - window) // stride + 1
    if out < 1:
        raise DeriveError(f"{where}: window {window} is larger than the spatial size {size} (VALID padding)")
    return out, 0, 0


def _window_sum(X, axes: tuple[int, ...], window, stride, padding, where):
    """Sum over a window on ``axes`` (one side of the Gram matrix), with zero padding."""
    pads = [(0, 0)] * X.ndim
    outs = []
    for axis, w, s in zip(axes, window, stride):
        out, lo, hi = _padding(X.shape[axis], w, s, padding, where)
        pads[axis] = (lo, hi)
        outs.append(out)
    X = jnp.pad(X, pads)
    total = 0
    for offset in product(*(range(w) for w in window)):
        index = [slice(None)] * X.ndim
        for axis, d, s, out in zip(axes, offset, stride, outs):
            index[axis] = slice(d, d + s * (out - 1) + 1, s)
        total = total + X[tuple(index)]
    return total


def _patch(X, N, spatial, layer: Layer):
    """Convolution: the filter's offsets shift both positions together (module docstring)."""
    where = f"layer '{layer.type}'"
    f, s, padding = layer.option("filter"), layer.option("stride"), layer.option("padding")
    if len(spatial) != len(f):
        raise DeriveError(f"{where}: filter {f} has {len(f)} axes, the inputs have {len(spatial)} spatial axes")
    k = len(spatial)
    pads = [(0, 0)] * X.ndim
    outs = []
    for i, (size, w, st) in enumerate(zip(spatial, f, s)):
        out, lo, hi = _padding(size, w, st, padding, where)
        pads[1 + i] = pads[2 + k + i] = (lo, hi)
        outs.append(out)
    X = jnp.pad(X, pads)
    total = 0
    for offset in product(*(range(w) for w in f)):
        index = [slice(None)] * X.ndim
        for i, (d, st, out) in enumerate(zip(offset, s, outs)):
            index[1 + i] = index[2 + k + i] = slice(d, d + st * (out - 1) + 1, st)
        total = total + X[tuple(index)]
    return total / math.prod(f), tuple(outs)


def _pool(X, N, spatial, layer: Layer):
    where = f"layer '{layer.type}'"
    w, s, padding = layer.option("window"), layer.option("stride"), layer.option("padding")
    if len(spatial) != len(w):
        raise DeriveError(f"{where}: window {w} has {len(w)} axes, the inputs have {len(spatial)} spatial axes")
    k = len(spatial)
    X = _window_sum(X, tuple(range(1, 1 + k)), w, s, padding, where)
    X = _window_sum(X, tuple(range(2 + k, 2 + 2 * k)), w, s, padding, where)
    return X / math.prod(w) ** 2, tuple(X.shape[1:1 + k])


def _spatial_mean(X, N, spatial, layer: Layer):
    k = len(spatial)
    axes = tuple(range(1, 1 + k)) + tuple(range(2 + k, 2 + 2 * k))
    return (jnp.mean(X, axis=axes) if k else X), ()


def _diagonal_mean(X, N, spatial, layer: Layer):
    P = math.prod(spatial)
    X = X.reshape(N, P, N, P)
    return jnp.einsum("apbp->ab", X) / P, ()


def _attention_weights(K, N, spatial, layer: Layer):
    T = math.prod(spatial)
    K4 = K.reshape(N, T, N, T)
    own = K4[jnp.arange(N), :, jnp.arange(N), :]  # (N, T, T): K[(a,s),(a,t)]
    logits = _logits(layer)(own)
    return jax.nn.softmax(logits, axis=-1)


@lru_cache(maxsize=None)
def _logits(layer: Layer):
    weights = dict(layer.rule.weights)
    if "logits" not in weights:
        raise RuleError(f"layer '{layer.type}': attend(...) needs weights.logits in the rule")
    expr = weights["logits"].xreplace(layer.values())
    return to_jax(expr, (S.K12,))


def _attend(X, N, spatial, layer: Layer, A):
    if not spatial:
        raise DeriveError(f"layer '{layer.type}': attention needs inputs with positions (tokens), "
                          "shape (N, tokens, d)")
    T = math.prod(spatial)
    X = X.reshape(N, T, N, T)
    out = jnp.einsum("ast,atbu,bvu->asbv", A, X, A)
    return out, spatial


_OPERATORS = {"patch": _patch, "pool": _pool, "spatial_mean": _spatial_mean,
              "diagonal_mean": _diagonal_mean}


class _Structural:
    """A map whose operator terms are computed by the algorithms above (and, for attention with
    Gaussian logits, :mod:`derive.kernels.attention`), the rest by to_jax: parameters, and for operators
    that keep the positions also the entry's own K12 and Theta12."""

    def __init__(self, expr: sp.Expr, layer: Layer):
        self.layer = layer
        self.terms = []  # (dummy, operator name, argument symbols)
        replacements = {}
        for node in sorted(expr.atoms(StructuralOperator), key=sp.default_sort_key):
            dummy = sp.Dummy(type(node).__name__)
            replacements[node] = dummy
            self.terms.append((dummy, type(node).__name__, node.args))
        rest = expr.xreplace(replacements)
        entrywise = (S.K12, S.Theta12)
        stray = rest.free_symbols - {d for d, _, _ in self.terms} - set(entrywise)
        if stray:
            raise RuleError(f"layer '{layer.type}': outside its operators a structural map may use only "
                            f"parameters, K12 and Theta12, not {', '.join(sorted(s.name for s in stray))}")
        self.entrywise = tuple(s for s in entrywise if rest.has(s))
        self.rest = to_jax(rest, tuple(d for d, _, _ in self.terms) + self.entrywise)

    @property
    def gaussian_logit_terms(self) -> list[tuple[str, tuple]]:
        """The (operator, arguments) of the map's attention terms with Gaussian logits."""
        return [(name, args) for _, name, args in self.terms if name in _GAUSSIAN_LOGIT_OPERATORS]

    def __call__(self, K, Theta, N, spatial, shared=None):
        """The map at (K, Theta); ``shared`` holds attention terms already computed, by (operator,
        arguments), so that the kernel and NTK maps of a layer integrate over the logits once."""
        shared = dict(shared or {})
        missing = [term for term in self.gaussian_logit_terms if term not in shared]
        if missing:
            shared.update(zip(missing, _gaussian_logit_terms(missing, K, Theta, N, spatial, self.layer)))
        A = None
        values, out_spatial = [], spatial
        for dummy, name, args in self.terms:
            if (name, args) in shared:
                values.append(shared[name, args])
                continue
            X = (K if args[0] == S.K12 else Theta).reshape((N,) + spatial + (N,) + spatial)
            if name == "attend":
                if A is None:
                    A = _attention_weights(K, N, spatial, self.layer)
                value, out_spatial = _attend(X, N, spatial, self.layer, A)
            else:
                value, out_spatial = _OPERATORS[name](X, N, spatial, self.layer)
            M = N * math.prod(out_spatial)
            values.append(value.reshape(M, M))
        matrix = {S.K12: K, S.Theta12: Theta}
        return self.rest(*values, *(matrix[s] for s in self.entrywise)), out_spatial


_GAUSSIAN_LOGIT_OPERATORS = ("mean_attend", "logit_response")


def _gaussian_logit_terms(terms, K, Theta, N, spatial, layer: Layer):
    """Values of mean_attend / logit_response ``terms`` ((operator, arguments) pairs), computed together
    in one integration over the logits (:mod:`derive.kernels.attention`)."""
    from derive.kernels.attention import attention_statistics

    if not spatial:
        raise DeriveError(f"layer '{layer.type}': attention needs inputs with positions (tokens), "
                          "shape (N, tokens, d)")
    weights = dict(layer.rule.weights)
    if "logit_covariance" not in weights:
        raise RuleError(f"layer '{layer.type}': mean_attend/logit_response need weights.logit_covariance")
    c = float(weights["logit_covariance"].xreplace(layer.values()))
    matrix = {S.K12: K, S.Theta12: Theta}
    singles = [matrix[args[0]] for name, args in terms if name == "mean_attend"]
    pairs = [(matrix[args[0]], matrix[args[1]]) for name, args in terms if name == "logit_response"]
    out = attention_statistics(K, N, math.prod(spatial), c, mechanism=layer.option("mechanism"),
                               points=layer.option("points"), singles=singles, pairs=pairs)
    first, second = iter(out[:len(singles)]), iter(out[len(singles):])
    return [next(first) if name == "mean_attend" else next(second) for name, _ in terms]


@lru_cache(maxsize=None)
def _compiled(layer: Layer):
    maps = layer_maps(layer)
    if layer.rule.structural:
        return _Structural(maps.kernel, layer), _Structural(maps.ntk, layer)
    has_e = bool(layer.rule.kernel.atoms(E))
    return _Elementwise(maps.kernel, has_e), _Elementwise(maps.ntk, has_e)


# ------------------------------------------------------------------------------------------------
# Running a description


def _apply_layer(layer: Layer, K, Theta, N, spatial):
    kernel_map, ntk_map = _compiled(layer)
    if layer.rule.structural:
        terms = list(dict.fromkeys(kernel_map.gaussian_logit_terms + ntk_map.gaussian_logit_terms))
        shared = dict(zip(terms, _gaussian_logit_terms(terms, K, Theta, N, spatial, layer))) if terms else None
        K_next, out = kernel_map(K, Theta, N, spatial, shared)
        Theta_next, _ = ntk_map(K, Theta, N, spatial, shared)
        return K_next, Theta_next, out
    BK = BTheta = jnp.zeros((), K.dtype)
    if layer.branch is not None:
        BK, BTheta, branch_spatial = _apply_serial(layer.branch, K, Theta, N, spatial, None)
        if branch_spatial != spatial:
            raise DeriveError(f"layer '{layer.type}': the branch changes the spatial shape {spatial} -> "
                              f"{branch_spatial}; the skip path cannot be added to it")
    return kernel_map(K, Theta, BK, BTheta), ntk_map(K, Theta, BK, BTheta), spatial


def _apply_repeat(item: Repeat, K, Theta, N, spatial, record):
    out_spatial = serial_spatial(item.body, spatial)
    if out_spatial == spatial:  # same shape: one scan over the repetitions
        def step(carry, _):
            K, Theta, _ = _apply_serial(item.body, *carry, N, spatial, None)
            return (K, Theta), ((K, Theta) if record is not None else None)

        (K, Theta), stacked = lax.scan(step, (K, Theta), None, length=item.times)
        if record is not None:
            record.append(("stack", stacked))
        return K, Theta, spatial
    for _ in range(item.times):
        K, Theta, spatial = _apply_serial(item.body, K, Theta, N, spatial, None)
        if record is not None:
            record.append(("one", (K, Theta)))
    return K, Theta, spatial


def _apply_serial(net: Serial, K, Theta, N, spatial, record):
    for item in net.items:
        if isinstance(item, Repeat):
            K, Theta, spatial = _apply_repeat(item, K, Theta, N, spatial, record)
        else:
            K, Theta, spatial = _apply_layer(item, K, Theta, N, spatial)
            if record is not None:
                record.append(("one", (K, Theta)))
    return K, Theta, spatial


def input_kernel(inputs):
    """K[(a,p),(b,q)] = x_a(p) . x_b(q) / d for inputs (N, *spatial, d), as an (M, M) matrix."""
    d = inputs.shape[-1]
    flat = inputs.reshape(-1, d)
    return jnp.matmul(flat, flat.T, precision=lax.Precision.HIGHEST) / d


@partial(jax.jit, static_argnames=("net", "profile"))
def _run(inputs, *, net: Serial, profile: bool):
    N, spatial = inputs.shape[0], tuple(inputs.shape[1:-1])
    K = input_kernel(inputs)
    Theta = jnp.zeros_like(K)
    record = [] if profile else None
    K, Theta, spatial = _apply_serial(net, K, Theta, N, spatial, record)
    if not profile:
        return K, Theta
    return [value for _, value in record]


@dataclass(frozen=True, repr=False)
class ArchKernels:
    """Kernel and NTK after every recorded output of an architecture (top-level layers and every
    repetition of a repeat, in order; ``labels`` names them).

    ``nngp[i]`` and ``ntk[i]`` have shape (N, *spatial_i, N, *spatial_i); ``nngp[-1]`` is the output.
    """

    labels: list[str]
    nngp: list[np.ndarray]
    ntk: list[np.ndarray]
    spatial: list[tuple[int, ...]]

    @property
    def output(self) -> tuple[np.ndarray, np.ndarray]:
        return self.nngp[-1], self.ntk[-1]

    def _inputs(self) -> int:
        return int(np.shape(self.nngp[-1])[0]) if self.nngp else 0

    def __repr__(self) -> str:
        positions = self.spatial[-1] if self.spatial else ()
        where = " x ".join(map(str, positions)) if positions else "none"
        return (f"ArchKernels(NNGP and NTK of {len(self.labels)} recorded outputs for {self._inputs()} inputs; "
                f"positions at the output: {where})")

    def _repr_markdown_(self) -> str:
        rows = []
        for label, K, T, sp_ in zip(self.labels, self.nngp, self.ntk, self.spatial):
            M = int(round(np.sqrt(np.size(K))))
            K2, T2 = np.reshape(K, (M, M)), np.reshape(T, (M, M))
            rows.append([markdown_text(label), " x ".join(map(str, sp_)) or "—", M, float(np.mean(np.diag(K2))),
                         float(np.mean(np.diag(T2)))])
        out = [f"**Infinite-width kernels of an architecture**: {self._inputs()} inputs; a site $s$ is an (input, "
               "position) pair, positions flattened. Per recorded output, the means over the sites of "
               "$K_{ss}$ and $\\Theta_{ss}$:", "",
               markdown_table(["output", "positions", "sites", "$K_{ss}$", "$\\Theta_{ss}$"], rows)]
        if self.nngp:
            M = int(round(np.sqrt(np.size(self.nngp[-1]))))
            K, T = np.reshape(self.nngp[-1], (M, M)), np.reshape(self.ntk[-1], (M, M))
            out += ["", "At the output, NNGP $K_{st}$:", "", matrix_table(K, corner="$s$"),
                    "", "NTK $\\Theta_{st}$:", "", matrix_table(T, corner="$s$")]
        return "\n".join(out)


@float64
def arch_kernels(net: Serial, inputs, *, dtype=jnp.float64) -> ArchKernels:
    """Infinite-width kernel and NTK of ``net`` for ``inputs`` (N, *spatial, d), every recorded layer.

    Raises:
        DeriveError: inputs of the wrong shape, a layer that does not fit the spatial shape (conv
            on unstructured inputs, a window larger than the input), a parameter without a value.
    """
    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    check_derivable(net)
    inputs = check_arch_inputs(inputs).astype(dtype)
    budget.check(work_estimate(net, inputs.shape, itemsize=inputs.dtype.itemsize))
    N = inputs.shape[0]
    for layer in net.distinct_layers():
        _compiled(layer)  # derive (and report errors) outside the trace
    record = _run(inputs, net=net, profile=True)
    labels = [label for label, _ in net.top_level()]
    nngp, ntk = [], []
    for K, Theta in record:
        parts = [(K, Theta)] if K.ndim == 2 else zip(np.asarray(K), np.asarray(Theta))
        for K_i, T_i in parts:
            nngp.append(np.asarray(K_i))
            ntk.append(np.asarray(T_i))
    shapes = _spatial_shapes(net, tuple(inputs.shape[1:-1]), N)
    out_k = [k.reshape((N,) + s + (N,) + s) for k, s in zip(nngp, shapes)]
    out_t = [t.reshape((N,) + s + (N,) + s) for t, s in zip(ntk, shapes)]
    return ArchKernels(labels, out_k, out_t, shapes)


def work_estimate(net: Serial, shape: tuple[int, ...], itemsize: int = 8) -> budget.Estimate:
    """The cost of :func:`arch_kernels` on inputs of ``shape`` (N, *positions, d)
    (:func:`derive.core.budget.arch_gram`): every layer over the (N P)^2 entries, conv filters, the point
    integrals of Gaussian-logit attention, and every recorded output kept."""
    N, positions = shape[0], math.prod(shape[1:-1])
    counts = net.layer_counts()
    filters = [math.prod(dict(layer.options).get("filter", (1,))) for layer in counts]
    extra = sum(times * budget.attention_ops(N, positions, dict(layer.options)["points"])
                for layer, times in counts.items()
                if "points" in dict(layer.options) and dict(layer.options).get("mechanism") != "identity")
    recorded = sum(item.times if isinstance(item, Repeat) else 1 for item in net.items)
    layers = sum(counts.values())
    return budget.arch_gram(N * positions, layers, entry_ops=budget.ARCH_ENTRY_OPS * max(filters),
                            extra_ops=extra, recorded=recorded, itemsize=itemsize,
                            what=f"kernels of {N} inputs x {positions} positions through {layers} layers")


def serial_spatial(net: Serial, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial shape after ``net`` for inputs of spatial shape ``spatial`` (checks every layer)."""
    for item in net.items:
        if isinstance(item, Repeat):
            for _ in range(item.times):
                new = serial_spatial(item.body, spatial)
                if new == spatial:
                    break
                spatial = new
        else:
            spatial = _layer_spatial(item, spatial)
    return spatial


def _spatial_shapes(net: Serial, spatial: tuple[int, ...], N: int) -> list[tuple[int, ...]]:
    """The spatial shape after every recorded output."""
    shapes = []
    for item in net.items:
        if isinstance(item, Repeat):
            for k in range(item.times):
                new = serial_spatial(item.body, spatial)
                shapes.append(new)
                if new == spatial:
                    shapes.extend([new] * (item.times - k - 1))
                    break
                spatial = new
        else:
            spatial = _layer_spatial(item, spatial)
            shapes.append(spatial)
    return shapes


def _layer_spatial(layer: Layer, spatial: tuple[int, ...]) -> tuple[int, ...]:
    ops = layer.rule.operators()
    where = f"layer '{layer.type}'"
    if "patch" in ops:
        f, s, padding = layer.option("filter"), layer.option("stride"), layer.option("padding")
        if len(f) != len(spatial):
            raise DeriveError(f"{where}: filter {f} has {len(f)} axes, the inputs have {len(spatial)} "
                              "spatial axes")
        return tuple(_padding(n, w, st, padding, where)[0] for n, w, st in zip(spatial, f, s))
    if "pool" in ops:
        w, s, padding = layer.option("window"), layer.option("stride"), layer.option("padding")
        if len(w) != len(spatial):
            raise DeriveError(f"{where}: window {w} has {len(w)} axes, the inputs have {len(spatial)} "
                              "spatial axes")
        return tuple(_padding(n, k, st, padding, where)[0] for n, k, st in zip(spatial, w, s))
    if ops & {"spatial_mean", "diagonal_mean"}:
        return ()
    if ops & {"attend", "mean_attend", "logit_response"} and not spatial:
        raise DeriveError(f"{where}: attention needs inputs with positions (tokens), shape (N, tokens, d)")
    if layer.branch is not None:
        out = serial_spatial(layer.branch, spatial)
        if out != spatial:
            raise DeriveError(f"{where}: the branch changes the spatial shape {spatial} -> {out}; the skip "
                              "path cannot be added to it")
    return spatial


__all__ = ["ArchKernels", "arch_kernels", "input_kernel"]
