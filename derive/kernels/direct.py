"""The direct method of the Gram recursions: whole matrices layer after layer, each entry on the clamped
covariance, the rho = +-1 forms where they apply (the reference the tiled method is tested against;
:mod:`derive.kernels.gram`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jax import lax

from derive.backends.codegen import to_jax
from derive.backends.safe import clamp_covariance, covariance_floor
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.symbolic.quadrature import GaussianExpectation

#: Largest number of quadrature-grid values evaluated at once by the direct method (entries x grid
#: points); beyond it the rows of a Gram matrix are mapped over in blocks to bound memory.
MAX_GRID_ELEMENTS = 2**23


#: Traces of the jitted recursions, by (expectation, derivative_expectation); compilation happens
#: once per trace, so tests can check that changing hyperparameters does not recompile.
TRACES: Counter = Counter()


_COVARIANCE = {"K11": S.K11, "K12": S.K12, "K22": S.K22}


def _canonical(expr, what: str) -> sp.Expr:
    """``expr`` with its covariance symbols replaced by those of :mod:`derive.core.symbols`, by name."""
    if isinstance(expr, (int, float)) and not isinstance(expr, bool):
        expr = sp.Float(expr)
    if not isinstance(expr, sp.Basic):
        raise TypeError(f"{what} must be a SymPy expression, got {type(expr).__name__}")
    return _canonical_cached(expr, what)


@lru_cache(maxsize=256)
def _canonical_cached(expr: sp.Basic, what: str) -> sp.Expr:
    stray = sorted(s.name for s in expr.free_symbols if s.name not in _COVARIANCE)
    if stray:
        raise DeriveError(f"{what} must depend on K11, K12, K22 only (parameters substituted), "
                          f"but contains {', '.join(stray)}")
    return expr.xreplace({s: _COVARIANCE[s.name] for s in expr.free_symbols})


def _prepare(expectation, derivative_expectation, inputs, depth, C_W, C_b, lambda_W, lambda_b, dtype):
    expectation = _canonical(expectation, "expectation")
    derivative_expectation = _canonical(derivative_expectation, "derivative_expectation")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1 (the number of dense layers), got {depth!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise DeriveError(f"dtype must be a floating type, got {dtype}")
    # Concrete values stay NumPy arrays (the jitted call transfers them; jnp.asarray costs a
    # dispatch each), traced ones (under jax.grad, say) JAX arrays.
    convert = (lambda v: jnp.asarray(v, dtype)) if _is_traced(inputs) else (lambda v: np.asarray(v, dtype))
    inputs = convert(inputs)
    if inputs.ndim != 2 or inputs.shape[1] == 0:
        raise DeriveError(f"inputs must have shape (N, d) with d >= 1, got {inputs.shape}")
    lambda_W = C_W if lambda_W is None else lambda_W
    lambda_b = C_b if lambda_b is None else lambda_b
    hyper = tuple(jnp.asarray(h, dtype) if _is_traced(h) else np.asarray(h, dtype)
                  for h in (C_W, C_b, lambda_W, lambda_b))
    return expectation, derivative_expectation, inputs, hyper, int(depth)


def _grid_size(expr: sp.Expr) -> int:
    """Largest quadrature grid (points) of the nodes in ``expr``; 1 without nodes."""
    sizes = [node.order ** node.dimension for node in expr.atoms(GaussianExpectation)]
    return max(sizes, default=1)


def _symmetrise(m):
    """The symmetric matrix with the upper triangle of ``m``."""
    return jnp.triu(m) + jnp.triu(m, 1).T


def _at_correlation(expr: sp.Expr, sign: int) -> sp.Expr | None:
    """``expr`` at K12 = sign sqrt(K11 K22) (rho = sign), or None where that is not a plain
    closed form (a quadrature node, or a value SymPy finds infinite or undefined)."""
    if expr.has(GaussianExpectation):
        return None
    special = expr.xreplace({S.K12: sign * sp.sqrt(S.K11 * S.K22)})
    if special.has(sp.zoo, sp.nan, sp.oo, sp.S.NegativeInfinity):
        return None
    return special


def _pair_map(expr: sp.Expr) -> Callable:
    """(K11, K12, K22) -> expr on a clamped covariance, with the rho = +-1 forms where they apply."""
    args = (S.K11, S.K12, S.K22)
    general = to_jax(expr, args)
    plus, minus = _at_correlation(expr, 1), _at_correlation(expr, -1)
    at_plus = general if plus is None else to_jax(plus, args)
    at_minus = general if minus is None else to_jax(minus, args)

    def evaluate(K11, K12, K22, bound):
        value = general(K11, K12, K22)
        if plus is not None:
            value = jnp.where(K12 == bound, at_plus(K11, K12, K22), value)
        if minus is not None:
            value = jnp.where(K12 == -bound, at_minus(K11, K12, K22), value)
        return value

    return evaluate


@lru_cache(maxsize=64)
def _recursion(expectation: sp.Expr, derivative_expectation: sp.Expr) -> Callable:
    """The jitted layer recursion of the direct method for one activation (one pair of expressions)."""
    expect = _pair_map(expectation)
    expect_derivative = _pair_map(derivative_expectation)
    grid = max(_grid_size(expectation), _grid_size(derivative_expectation))
    key = (expectation, derivative_expectation)

    def pair_maps(K11, K12, K22):
        K11, K12, K22 = clamp_covariance(K11, K12, K22)
        bound = jnp.sqrt(K11 * K22)  # as in clamp_covariance, so K12 == bound exactly at rho = 1
        return expect(K11, K12, K22, bound), expect_derivative(K11, K12, K22, bound)

    def pairwise(K):
        """E and Ed at every (K_aa, K_ab, K_bb), in row blocks when the quadrature grid is large.

        The diagonal is floored first, so that entry (a, a) is the map at K11 = K12 = K22 =
        max(K_aa, floor) (rho = 1) even when K_aa = 0.
        """
        n = K.shape[0]
        K = jnp.where(jnp.eye(n, dtype=bool), jnp.maximum(K, covariance_floor(K.dtype)), K)
        diag = jnp.diagonal(K)
        if grid == 1 or n * n * grid <= MAX_GRID_ELEMENTS:
            return pair_maps(diag[:, None], K, diag[None, :])
        rows = max(1, MAX_GRID_ELEMENTS // (n * grid))
        return lax.map(lambda row: pair_maps(row[0], row[1], diag), (diag, K), batch_size=rows)

    def run(inputs, C_W, C_b, lambda_W, lambda_b, *, depth: int, profile: bool):
        TRACES[key] += 1
        d = inputs.shape[1]
        overlap = _symmetrise(jnp.matmul(inputs, inputs.T, precision=lax.Precision.HIGHEST) / d)
        K = C_b + C_W * overlap
        Theta = lambda_b + lambda_W * overlap

        def layer(carry, _):
            K, Theta = carry
            E, Ed = pairwise(K)
            E, Ed = _symmetrise(E), _symmetrise(Ed)
            K_next = C_b + C_W * E
            Theta_next = lambda_b + lambda_W * E + C_W * Ed * Theta
            return (K_next, Theta_next), ((K_next, Theta_next) if profile else None)

        (K_last, Theta_last), stack = lax.scan(layer, (K, Theta), None, length=depth - 1)
        if not profile:
            return K_last, Theta_last
        if depth == 1:
            return K[None], Theta[None]
        return jnp.concatenate([K[None], stack[0]]), jnp.concatenate([Theta[None], stack[1]])

    return jax.jit(run, static_argnames=("depth", "profile"))


def _is_traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)
