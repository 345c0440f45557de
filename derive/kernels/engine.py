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


def network_gram(net: Serial, inputs, *, dtype: str = "float64", method: str = "auto",
                 devices=None) -> tuple[np.ndarray, np.ndarray]:
    """The NNGP kernel and NTK of ``net``'s output for ``inputs`` (N, d) or (N, *positions, d).

    Returns arrays of shape (N, N), or (N, *positions, N, *positions) for outputs with positions.
    ``method`` and ``devices`` choose the evaluation of dense networks (module docstring); other
    architectures take the default only.
    """
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
        return np.asarray(nngp), np.asarray(ntk)
    if method != "auto" or devices is not None:
        raise DeriveError("method and devices choose the evaluation of dense networks (dense, then activation "
                          "and dense repeated, uniform variances, inputs without positions); this architecture "
                          "is evaluated layer by layer")
    from derive.kernels.arch import arch_kernels

    return arch_kernels(net, x, dtype=getattr(jnp, dtype)).output


__all__ = ["METHODS", "dense_plan", "network_gram"]
