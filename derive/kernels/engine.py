"""One entry point for the infinite-width kernel and NTK of any architecture, with its fast paths.

The dense network is one architecture (:func:`derive.arch.dense_network`: dense, then activation
and dense repeated). :func:`network_gram` takes any description and picks how to evaluate it:

- a dense network with one activation and the same C_W, C_b, lambda_W, lambda_b in every layer, on
  inputs without positions: the Gram evaluation of :mod:`derive.kernels.gram` (tiles carried through
  every layer in cache, NNGP and NTK fused, the homogeneous and Mehler forms, device sharding; or its
  direct method), on the activation layer's maps derived from the rules
  (:func:`derive.symbolic.recursions.derive_kernel`);
- anything else: the generated architecture kernels of :mod:`derive.kernels.arch`, which apply each
  layer rule's maps in turn.

Both evaluate the same composed maps; the tests compare them to rounding.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from derive.arch.description import DenseNetwork, Serial, as_dense_network
from derive.backends.precision import float64
from derive.core.errors import DeriveError
from derive.core.inputs import check_arch_inputs
from derive.rules.activations import resolve
from derive.symbolic.recursions import derive_kernel, numeric_kernel_expressions

#: ``method`` values of the dense-network fast path (:func:`derive.kernels.gram.gram_matrices`).
METHODS = ("auto", "tiled", "direct")


@lru_cache(maxsize=128)
def dense_plan(net: Serial) -> tuple | None:
    """(expectation, derivative expectation, depth, (C_W, C_b, lambda_W, lambda_b)) when ``net`` is a
    dense network with uniform hyperparameters (the Gram fast path applies), else None."""
    dense = as_dense_network(net)
    if not isinstance(dense, DenseNetwork):
        return None
    hyper = tuple(dense.hyperparameter(k) for k in ("C_W", "C_b", "lambda_W", "lambda_b"))
    if any(isinstance(h, list) for h in hyper):
        return None
    activation = resolve(dense.activation, dict(dense.activation_params) or None)
    expectation, derivative = numeric_kernel_expressions(derive_kernel(activation))
    return expectation, derivative, dense.depth, hyper


@float64


def network_gram(net: Serial, inputs, inputs2=None, *, dtype: str = "float64", method: str = "auto",
                 devices=None) -> tuple[np.ndarray, np.ndarray]:
    """The NNGP kernel and NTK of ``net``'s output for ``inputs`` (N, d) or (N, *positions, d).

    Returns arrays of shape (N, N), or (N, *positions, N, *positions) for outputs with positions.
    With ``inputs2`` (M, ...) the blocks between the two sets, K(inputs[a], inputs2[b]) of shape
    (N, M) (:func:`network_cross_gram`). ``method`` and ``devices`` choose the evaluation of dense
    networks (module docstring); other architectures take the default only.
    """
    if inputs2 is not None:
        K, Theta, _, _ = network_cross_gram(net, inputs, inputs2, dtype=dtype, method=method, devices=devices)
        return K, Theta
    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    if dtype not in ("float64", "float32"):
        raise DeriveError(f"dtype must be float64 or float32, got {dtype}")
    if method not in METHODS:
        raise DeriveError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    x = check_arch_inputs(inputs)
    plan = dense_plan(net) if x.ndim == 2 else None
    import jax.numpy as jnp

    if plan is not None:
        from derive.kernels.gram import gram_matrices

        expectation, derivative, depth, (C_W, C_b, lambda_W, lambda_b) = plan
        nngp, ntk = gram_matrices(expectation, derivative, x, depth, C_W, C_b, lambda_W, lambda_b,
                                  dtype=getattr(jnp, dtype), method=method, devices=devices)
        return check_finite(np.asarray(nngp), np.asarray(ntk), dtype)
    if method != "auto" or devices is not None:
        raise DeriveError("method and devices choose the evaluation of dense networks (dense, then activation "
                          "and dense repeated, uniform variances, inputs without positions); this architecture "
                          "is evaluated layer by layer")
    from derive.kernels.arch import arch_kernels

    return check_finite(*arch_kernels(net, x, dtype=getattr(jnp, dtype)).output, dtype)


#: Largest number of rows of the first set evaluated together with the second set by
#: :func:`network_cross_gram` (its default chunk is the size of the second set, within [64, this]).
CROSS_CHUNK = 4096


@float64


def network_cross_gram(net: Serial, rows, columns, *, chunk: int | None = None, dtype: str = "float64",
                       method: str = "auto", devices=None):
    """Kernel blocks between two sets of inputs, and the first set's own diagonal.

    Returns (K, Theta, K_diagonal, Theta_diagonal): K[a, b] = K^(L)(rows[a], columns[b]) (shape
    (N, M), with positions (N, *P, M, *P)) and likewise Theta, and K^(L)(rows[a], rows[a]),
    Theta^(L)(rows[a], rows[a]) (shape (N,), with positions (N, *P, *P)). An entry depends only on
    its two inputs, so each chunk of rows is evaluated together with ``columns`` as one batch
    (:func:`network_gram` of the stacked inputs) and the blocks are read off: about twice the work
    of the (N, M) block alone at the default chunk (M rows), and memory for (M + chunk)^2 entries,
    not (N + M)^2. Entries equal those of one Gram matrix of all inputs to rounding.
    """
    rows, columns = check_arch_inputs(rows), check_arch_inputs(columns)
    if rows.shape[1:] != columns.shape[1:]:
        raise DeriveError(f"the two input sets must have the same shape after their first axis, "
                          f"got {rows.shape} and {columns.shape}")
    n, m = rows.shape[0], columns.shape[0]
    if chunk is None:
        chunk = min(max(m, 64), CROSS_CHUNK)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise DeriveError(f"chunk must be a positive integer, got {chunk!r}")
    positions = rows.ndim - 2
    blocks: list = [[], [], [], []]
    chunk = min(int(chunk), n)
    for start in range(0, n, chunk):
        part = rows[start:start + chunk]
        p = part.shape[0]
        # Every chunk has the same shape (the last one padded with copies of its last row, whose
        # entries are dropped), so the evaluation compiles once for all chunks.
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - p, axis=0)]) if p < chunk else part
        K, Theta = network_gram(net, np.concatenate([columns, padded]), dtype=dtype, method=method,
                                devices=devices)
        for i, full in enumerate((K, Theta)):
            blocks[i].append(_block(full, slice(m, m + p), slice(0, m), positions))
            blocks[2 + i].append(_diagonal(_block(full, slice(m, m + p), slice(m, m + p), positions), positions))
    K, Theta, K_diag, Theta_diag = (np.concatenate(b) for b in blocks)
    return K, Theta, K_diag, Theta_diag


def _block(full: np.ndarray, a: slice, b: slice, positions: int) -> np.ndarray:
    """Rows ``a`` and columns ``b`` of a Gram array (N, *P, N, *P)."""
    index = (a,) + (slice(None),) * positions + (b,)
    return full[index]


def _diagonal(square: np.ndarray, positions: int) -> np.ndarray:
    """Entries (a, ..., a, ...) of a square block (p, *P, p, *P): shape (p, *P, *P)."""
    p = square.shape[0]
    index = np.arange(p)
    moved = np.moveaxis(square, 1 + positions, 1)  # (p, p, *P, *P)
    return moved[index, index]


def check_finite(nngp: np.ndarray, ntk: np.ndarray, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """The kernel and NTK, or a DeriveError when an entry is inf or NaN: the recursion overflowed, or
    it left the variances where the activation's Gaussian expectations exist (``exp(z**2)``: K < 1/4)."""
    for name, value in (("NNGP kernel", nngp), ("NTK", ntk)):
        bad = ~np.isfinite(value)
        if bad.any():
            raise DeriveError(f"the {name} is not finite ({int(bad.sum())} of {value.size} entries are inf "
                              f"or NaN): the recursion overflows {dtype} or leaves the variances where the "
                              "activation's Gaussian expectations exist; a smaller C_W, C_b, depth or input "
                              "scale keeps it finite")
    return nngp, ntk


__all__ = ["CROSS_CHUNK", "METHODS", "check_finite", "dense_plan", "network_cross_gram", "network_gram"]
