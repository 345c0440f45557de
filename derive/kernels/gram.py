"""Infinite-width NNGP and NTK Gram matrices of a batch of inputs through L dense layers.

Given the two Gaussian expectations of an activation sigma,

    E(K11, K12, K22)  = <sigma(z1) sigma(z2)>_K,      Ed(K11, K12, K22) = <sigma'(z1) sigma'(z2)>_K,

as SymPy expressions (closed forms or quadrature nodes), this module code-generates them with
:func:`derive.backends.codegen.to_jax` and runs the infinite-width recursions (PDLT = Roberts, Yaida &
Hanin, *The Principles of Deep Learning Theory*: the kernel in ch. 4, the NTK in ch. 8; also
Jacot et al. 2018, Lee et al. 2019, and Neural Tangents' ``stax``):

    K^(1)_ab       = C_b + C_W x_a . x_b / d
    Theta^(1)_ab   = lambda_b + lambda_W x_a . x_b / d
    K^(l+1)_ab     = C_b + C_W E(K^(l)_aa, K^(l)_ab, K^(l)_bb)
    Theta^(l+1)_ab = lambda_b + lambda_W E(...) + C_W Ed(...) Theta^(l)_ab

Depth L counts dense layers (design.md): the result is K^(L), Theta^(L), and depth 1 is the input
layer alone. lambda_W = C_W and lambda_b = C_b unless given (Neural Tangents' NTK
parametrisation: ``stax.Dense(W_std, b_std)`` has C_W = W_std^2, C_b = b_std^2).

Two evaluations of the same recursion are provided (``method=``):

``"direct"``
    Whole matrices, layer after layer (one ``lax.scan``), each entry evaluated on the covariance
    clamped by :func:`derive.backends.safe.clamp_covariance`. Entries with rho = +-1 (the diagonal,
    identical and antipodal inputs) use the closed forms specialised symbolically at
    K12 = +-sqrt(K11 K22), where SymPy's own evaluation removes the singular parts (arccos(1) = 0,
    sqrt(K11 K22 - K12^2) = 0): evaluating the general formula there is not enough once compiled,
    because XLA rewrites a / sqrt(b) as a * rsqrt(b) and contracts a b - c^2 into a fused
    multiply-add, so rho comes out as 1 - 2**-53 and arccos(1 - 2**-53) = 1.5e-8. Quadrature
    nodes are evaluated on their own grid, in row blocks of at most :data:`MAX_GRID_ELEMENTS`.
    This is the reference the fast path is tested against.

``"tiled"`` (what ``"auto"`` picks whenever the derivation allows it)
    The recursion has more structure than the direct evaluation uses, and every piece of it is
    read off the SymPy derivation, not off the activation's name:

    1. *Each entry evolves on its own.* (K_ab, Theta_ab) at layer l + 1 is a function of
       (K_ab, Theta_ab) at layer l and of the diagonal entries K_aa, K_bb, and the diagonal itself
       evolves on its own, K^(l+1)_aa = C_b + C_W E(K, K, K) at K = K^(l)_aa. So the Gram
       matrices are cut into tiles of the upper triangle (entry (b, a), a < b, is entry (a, b)),
       and each tile, with the diagonals of its rows and columns, runs through all L layers while
       it sits in cache: one matrix product for its first layer, then the NNGP and NTK updates of
       every layer. The tiles are written into the result in place (peak memory: the two N x N
       results plus a few tiles), several at a time (vmapped), and can be sharded over devices
       (``devices=``: each device owns a stripe of rows and computes its tiles below the
       diagonal as transposes of tiles above it, so the result does not depend on the devices).
       Tiles on the diagonal and the others are separate loops: only the former floor their
       diagonal entries and are symmetrised, only the latter are also written transposed.
    2. *One pass per layer.* K and Theta travel through the layers as one complex array
       K + i Theta, so that each layer is a single compiled loop over the tile that evaluates E
       and Ed once and stores both results (XLA on CPU compiles one loop per output array, and
       with two arrays it evaluated E twice, once for each).
    3. *Per-row quantities are hoisted.* 1 / sqrt(K_aa), and every subexpression of E and Ed
       that depends on K11 alone (found by walking the tree, e.g. (1 + 2 K11)^(-1/2) of the erf
       kernel), are computed once per row and layer instead of once per entry. Arguments are
       passed in a canonical order (smaller variance first), so that entries (a, b) and (b, a)
       are the same computation.
    4. *Homogeneous maps* (detected symbolically: E(t K) = t^p E(K) for t > 0, and likewise Ed):
       then E = (K11 K22)^(p/2) e(rho) with e(rho) = E(1, rho, 1), derived by substitution and
       checked numerically. This is the scale-invariant class, sigma(z) = z sigma'(z) (relu,
       leaky relu, abs, linear), and also the step function (p = 0) and rectified monomials
       (p = k). Per entry only rho = K_ab (K_aa K_bb)^(-1/2), from per-row factors, and the
       arc-cosine form e(rho) are evaluated; the diagonal map is K -> C_b + C_W e(1) K^p.
    5. *Stable, cheap elementary functions.* arccos, arcsin and sqrt(1 - rho^2) are polynomials
       around one shared square root (:mod:`derive.backends.safe`: ``fast_arccos`` within 1 ulp; libm's
       acos does not vectorise). Where a form has a branch point at rho = +-1 (arccos(rho),
       sqrt(1 - rho^2): found by substituting rho = +-1 into the arguments), a correlation within
       :data:`SNAP_ULPS` units of roundoff of +-1 is evaluated exactly there, for the reason
       given under ``"direct"``; rho itself carries a few ulps of rounding, so this changes
       nothing beyond rounding.
    6. *Quadrature nodes by Mehler's expansion.* A two-input node <f(z1, z2)>_K whose integrand
       separates, f = sum_t c_t p_t(z1) q_t(z2) (found with ``sympy.separatevars``), is
       evaluated with Mehler's formula for the bivariate normal (Mehler 1866; e.g. O'Donnell,
       *Analysis of Boolean Functions*, sec. 11.2): with z1 = sqrt(K11) u, z2 = sqrt(K22) v,
       corr(u, v) = rho,

           <p(z1) q(z2)>_K = sum_k rho^k P_k(K11) Q_k(K22),    P_k(K) = <p(sqrt(K) u) h_k(u)>,

       h_k = He_k / sqrt(k!) the orthonormal Hermite polynomials. The coefficients are per-row
       quantities (an N x M table per layer, by Gauss-Hermite quadrature with 2M points), so an
       entry costs a Horner evaluation in rho (in rho^2 for even or odd factors, parity decided
       symbolically) instead of a two-dimensional grid. The truncation error is bounded by
       Cauchy-Schwarz, |sum_{k>=M} rho^k P_k Q_k| <= sqrt(T_P T_Q), with the tails
       T_P = <p^2> - sum_{k<M} P_k^2 (Parseval). Each layer gets the smallest order M in
       :data:`MEHLER_ORDERS` that meets T / <p^2> <= :data:`MEHLER_TOL` at its variances, and
       the run checks the bound on every row and layer before a result is returned (otherwise M
       grows; past the largest order, e.g. tanh with variances beyond ~16, the direct method is
       used). Activations analytic in a strip (tanh, swish, sigmoid, ...) converge; kinks do
       not, and are left to the direct method.

Exactness: both methods agree to rounding (tested to 1e-12 relative in float64); both are exactly
symmetric, and rows of identical inputs are identical.

The jitted functions are cached per pair of expressions; the hyperparameters are traced
arguments, so changing C_W, C_b, lambda_W or lambda_b does not recompile. Shapes, dtype, depth,
tile size and devices are static (a new one compiles once).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import sympy as sp

from derive.backends.precision import float64
from derive.core import budget
from derive.core.errors import DeriveError
from derive.kernels.direct import _is_traced, _prepare, _recursion
from derive.kernels.mehler import MEHLER_ORDERS, MEHLER_TOL, MEHLER_TOL_FLOAT32, _hermite_rule, _rule_points
from derive.kernels.plan import _plan, plan_summary
from derive.kernels.tiled import (
    TILE_BATCH,
    _diagonal_profile_function,
    _layer_order,
    _mesh,
    _runs,
    _tile_edge,
    _tiled_function,
)
from derive.symbolic.quadrature import GaussianExpectation


@float64


def gram_matrices(expectation: sp.Expr, derivative_expectation: sp.Expr, inputs, depth: int,
                  C_W: float, C_b: float, lambda_W: float | None = None, lambda_b: float | None = None,
                  dtype=jnp.float64, *, method: str = "auto", tile: int | None = None, devices=None):
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
        method: ``"auto"`` (the tiled method where the derivation allows it, else the direct one),
            ``"tiled"`` (an error where it does not apply) or ``"direct"`` (module docstring).
        tile: tile edge of the tiled method (default: at most :data:`TILE`, dividing N if possible).
        devices: a number of devices or a sequence of ``jax.Device``: the tiled method shards the
            rows of the result over them (one device by default).

    Returns:
        (nngp, ntk), two (N, N) arrays of ``dtype``: K^(L)_ab and Theta^(L)_ab (module docstring).
    """
    if method not in ("auto", "tiled", "direct"):
        raise DeriveError(f"method must be 'auto', 'tiled' or 'direct', got {method!r}")
    expectation, derivative_expectation, inputs, hyper, depth = _prepare(
        expectation, derivative_expectation, inputs, depth, C_W, C_b, lambda_W, lambda_b, dtype)
    key = (expectation, derivative_expectation)
    plan = None if method == "direct" else _plan(expectation, derivative_expectation)
    budget.check(work_estimate(expectation, derivative_expectation, inputs.shape[0], depth, plan=plan,
                               itemsize=inputs.dtype.itemsize))
    if plan is None and method == "tiled":
        raise DeriveError("the tiled method does not apply to this derivation (a two-input quadrature "
                          "node whose integrand does not separate); use method='direct'")
    traced = _is_traced(inputs, *hyper)
    if plan is not None and plan.nodes and traced:
        if method == "tiled":
            raise DeriveError("the Mehler expansion chooses its order from concrete values; "
                              "it cannot run under a JAX transformation (use method='direct')")
        plan = None
    if plan is None or depth == 1:  # depth 1 is the input layer alone: one matrix product
        return _recursion(expectation, derivative_expectation)(inputs, *hyper, depth=depth, profile=False)

    mesh = _mesh(devices)
    edge = _tile_edge(inputs.shape[0], tile, 1 if mesh is None else mesh.size)
    run = _tiled_function(plan, key, traced)
    if not plan.nodes:
        K, Theta, _ = run(inputs, *hyper, (), depth=depth, tile=edge, mesh=mesh, runs=(), batch=TILE_BATCH)
        return K, Theta

    # Mehler orders, one per layer, from the diagonal profiles; every row is checked by the run.
    tol = MEHLER_TOL if inputs.dtype == jnp.float64 else MEHLER_TOL_FLOAT32
    profile = np.asarray(_diagonal_profile_function(plan)(inputs, hyper[0], hyper[1], depth=depth))
    orders = [_layer_order(plan, layer, tol) for layer in profile[: depth - 1]]
    while all(order is not None for order in orders):
        runs = _runs(orders)
        rules = tuple(_hermite_rule(order, _rule_points(order)) for _, order in runs)
        K, Theta, tails = run(inputs, *hyper, rules, depth=depth, tile=edge, mesh=mesh, runs=runs,
                              batch=TILE_BATCH)
        tails = np.asarray(tails)
        if np.all(tails <= tol):
            return K, Theta
        first = 0
        for (length, order), tail in zip(runs, tails):
            if tail > tol:
                larger = [m for m in MEHLER_ORDERS if m > order]
                for i in range(first, first + length):
                    orders[i] = larger[0] if larger else None
            first += length
    if method == "tiled":
        raise DeriveError(f"the Mehler expansion does not reach its tolerance {tol:g} by order "
                          f"{MEHLER_ORDERS[-1]}; use method='direct'")
    return _recursion(expectation, derivative_expectation)(inputs, *hyper, depth=depth, profile=False)


@float64


def gram_profile(expectation: sp.Expr, derivative_expectation: sp.Expr, inputs, depth: int,
                 C_W: float, C_b: float, lambda_W: float | None = None, lambda_b: float | None = None,
                 dtype=jnp.float64):
    """Per-layer NNGP and NTK Gram matrices, layers 1..L: two arrays of shape (L, N, N).

    Entry [l - 1] is K^(l) (respectively Theta^(l)); the last one equals :func:`gram_matrices`
    to rounding. Evaluated by the direct method (the per-layer stack is as large as L results).
    Arguments as for :func:`gram_matrices`.
    """
    expectation, derivative_expectation, inputs, hyper, depth = _prepare(
        expectation, derivative_expectation, inputs, depth, C_W, C_b, lambda_W, lambda_b, dtype)
    budget.check(work_estimate(expectation, derivative_expectation, inputs.shape[0], depth, plan=None,
                               itemsize=inputs.dtype.itemsize, stored_layers=depth,
                               what=f"per-layer Gram matrices of {inputs.shape[0]} inputs through {depth} "
                                    "layers"))
    return _recursion(expectation, derivative_expectation)(inputs, *hyper, depth=depth, profile=True)


def work_estimate(expectation: sp.Expr, derivative_expectation: sp.Expr, n_inputs: int, depth: int, *,
                  plan=None, itemsize: int = 8, stored_layers: int = 1,
                  what: str | None = None) -> budget.Estimate:
    """The cost of the Gram matrices of ``n_inputs`` through ``depth`` layers
    (:func:`derive.core.budget.gram`):
    the tiled method's for a ``plan`` (closed forms, or Mehler-expanded quadrature nodes), else the
    direct method's (every quadrature point of every node, per entry)."""
    nodes = list(expectation.atoms(GaussianExpectation) | derivative_expectation.atoms(GaussianExpectation))
    if plan is not None:
        costs = (budget.MEHLER_ENTRY_OPS, budget.MEHLER_LAYER_OPS) if nodes else \
            (budget.GRAM_ENTRY_OPS, budget.GRAM_LAYER_OPS)
        return budget.gram(n_inputs, depth, entry_ops=costs[0], layer_ops=costs[1], itemsize=itemsize,
                           stored_layers=stored_layers, what=what)
    return budget.gram(n_inputs, depth, entry_ops=budget.quadrature_entry_ops(nodes), whole_matrices=True,
                       itemsize=itemsize, stored_layers=stored_layers, what=what)


__all__ = ["gram_matrices", "gram_profile", "plan_summary", "work_estimate"]
