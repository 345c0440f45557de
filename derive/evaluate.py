"""Infinite-width NNGP and NTK Gram matrices of a batch of inputs through L dense layers.

Given the two Gaussian expectations of an activation sigma,

    E(K11, K12, K22)  = <sigma(z1) sigma(z2)>_K,      Ed(K11, K12, K22) = <sigma'(z1) sigma'(z2)>_K,

as SymPy expressions (closed forms or quadrature nodes), this module code-generates them with
:func:`derive.codegen.to_jax` and runs the infinite-width recursions over the whole batch at once
(PDLT = Roberts, Yaida & Hanin, *The Principles of Deep Learning Theory*: the kernel in ch. 4, the
NTK in ch. 8; also Jacot et al. 2018, Lee et al. 2019, and Neural Tangents' ``stax``):

    K^(1)_ab       = C_b + C_W x_a . x_b / d
    Theta^(1)_ab   = lambda_b + lambda_W x_a . x_b / d
    K^(l+1)_ab     = C_b + C_W E(K^(l)_aa, K^(l)_ab, K^(l)_bb)
    Theta^(l+1)_ab = lambda_b + lambda_W E(...) + C_W Ed(...) Theta^(l)_ab

Depth L counts dense layers (design.md): the result is K^(L), Theta^(L), and depth 1 is the input
layer alone. lambda_W = C_W and lambda_b = C_b unless given (Neural Tangents' NTK
parametrisation: ``stax.Dense(W_std, b_std)`` has C_W = W_std^2, C_b = b_std^2).

Each entry is evaluated on the covariance clamped by :func:`derive.safe.clamp_covariance`, so
diagonal entries come from the same map at K11 = K12 = K22 (floored), identical and antipodal
inputs have K12 = +-sqrt(K11 K22) exactly, and a zero input with C_b = 0 (K = 0) gives finite
values. Each layer's matrices are made exactly symmetric: entry (b, a) with a < b is the map evaluated at
(K_aa, K_ab, K_bb), like entry (a, b) (the two can differ by rounding, or by the quadrature error
of a node, which is not symmetric in z1 and z2).

Entries with rho = +-1 (the diagonal, identical and antipodal inputs) use the closed forms
specialised symbolically at K12 = +-sqrt(K11 K22), where SymPy's own evaluation removes the
singular parts (arccos(1) = 0, sqrt(K11 K22 - K12^2) = 0). Evaluating the general formula there is
not enough once compiled: XLA rewrites a / sqrt(b) as a * rsqrt(b) and contracts a b - c^2 into a
fused multiply-add, so rho comes out as 1 - 2**-53 and K11 K22 - K12^2 as +-1e-17, and the square
roots turn those into relative errors of 1e-8 (arccos(1 - 2**-53) = 1.5e-8). Gradients there
are those of the specialised forms (exact along the boundary, e.g. in the hyperparameters; the
one-sided derivative across it, in K12, is not represented). Expressions with quadrature nodes are
not specialised: the node itself sets rho to exactly +-1 at the boundary.

The layers run in one ``jax.lax.scan`` inside one jitted function, cached per pair of
expressions; the hyperparameters are traced arguments, so changing C_W, C_b, lambda_W or
lambda_b does not recompile. Shapes, dtype and depth are static (a new one compiles once).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import sympy as sp

from . import symbols as S
from .codegen import to_jax  # importing codegen enables float64 in JAX
from .errors import DeriveError
from .quadrature import GaussianExpectation
from .safe import clamp_covariance, covariance_floor

__all__ = ["gram_matrices", "gram_profile"]

#: Largest number of quadrature-grid values evaluated at once (entries x grid points); beyond it
#: the rows of a Gram matrix are mapped over in blocks to bound memory.
MAX_GRID_ELEMENTS = 2**23

#: Traces of the jitted recursion, by (expectation, derivative_expectation); compilation happens
#: once per trace, so tests can check that changing hyperparameters does not recompile.
TRACES: Counter = Counter()

_COVARIANCE = {"K11": S.K11, "K12": S.K12, "K22": S.K22}


def _canonical(expr, what: str) -> sp.Expr:
    """``expr`` with its covariance symbols replaced by those of :mod:`derive.symbols`, by name."""
    if isinstance(expr, (int, float)) and not isinstance(expr, bool):
        expr = sp.Float(expr)
    if not isinstance(expr, sp.Basic):
        raise TypeError(f"{what} must be a SymPy expression, got {type(expr).__name__}")
    stray = sorted(s.name for s in expr.free_symbols if s.name not in _COVARIANCE)
    if stray:
        raise DeriveError(f"{what} must depend on K11, K12, K22 only (parameters substituted), "
                          f"but contains {', '.join(stray)}")
    return expr.xreplace({s: _COVARIANCE[s.name] for s in expr.free_symbols})


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
    """The jitted layer recursion for one activation (one pair of expressions)."""
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


def _prepare(expectation, derivative_expectation, inputs, depth, C_W, C_b, lambda_W, lambda_b, dtype):
    expectation = _canonical(expectation, "expectation")
    derivative_expectation = _canonical(derivative_expectation, "derivative_expectation")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1 (the number of dense layers), got {depth!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise DeriveError(f"dtype must be a floating type, got {dtype}")
    inputs = jnp.asarray(inputs, dtype)
    if inputs.ndim != 2 or inputs.shape[1] == 0:
        raise DeriveError(f"inputs must have shape (N, d) with d >= 1, got {inputs.shape}")
    lambda_W = C_W if lambda_W is None else lambda_W
    lambda_b = C_b if lambda_b is None else lambda_b
    hyper = tuple(jnp.asarray(h, dtype) for h in (C_W, C_b, lambda_W, lambda_b))
    return _recursion(expectation, derivative_expectation), inputs, hyper, int(depth)


def gram_matrices(expectation: sp.Expr, derivative_expectation: sp.Expr, inputs, depth: int,
                  C_W: float, C_b: float, lambda_W: float | None = None, lambda_b: float | None = None,
                  dtype=jnp.float64):
    """NNGP kernel K^(L) and NTK Theta^(L) of ``inputs`` after ``depth`` = L dense layers.

    Args:
        expectation: <sigma(z1) sigma(z2)>_K as a SymPy expression in K11, K12, K22 (activation
            parameters already substituted; may contain quadrature nodes).
        derivative_expectation: <sigma'(z1) sigma'(z2)>_K, likewise.
        inputs: array of shape (N, d); row a is x_a.
        depth: number of dense layers L >= 1 (1 = the input layer alone).
        C_W, C_b: weight and bias variances (E[W W] = C_W / n, E[b b] = C_b).
        lambda_W, lambda_b: NTK learning-rate factors; default C_W and C_b.
        dtype: float64 (default) or float32.

    Returns:
        (nngp, ntk), two (N, N) arrays of ``dtype``: K^(L)_ab and Theta^(L)_ab (module docstring).
    """
    run, inputs, hyper, depth = _prepare(expectation, derivative_expectation, inputs, depth,
                                         C_W, C_b, lambda_W, lambda_b, dtype)
    return run(inputs, *hyper, depth=depth, profile=False)


def gram_profile(expectation: sp.Expr, derivative_expectation: sp.Expr, inputs, depth: int,
                 C_W: float, C_b: float, lambda_W: float | None = None, lambda_b: float | None = None,
                 dtype=jnp.float64):
    """Per-layer NNGP and NTK Gram matrices, layers 1..L: two arrays of shape (L, N, N).

    Entry [l - 1] is K^(l) (respectively Theta^(l)); the last one equals :func:`gram_matrices`.
    Arguments as for :func:`gram_matrices`.
    """
    run, inputs, hyper, depth = _prepare(expectation, derivative_expectation, inputs, depth,
                                         C_W, C_b, lambda_W, lambda_b, dtype)
    return run(inputs, *hyper, depth=depth, profile=True)
