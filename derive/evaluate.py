"""Infinite-width NNGP and NTK Gram matrices of a batch of inputs through L dense layers.

Given the two Gaussian expectations of an activation sigma,

    E(K11, K12, K22)  = <sigma(z1) sigma(z2)>_K,      Ed(K11, K12, K22) = <sigma'(z1) sigma'(z2)>_K,

as SymPy expressions (closed forms or quadrature nodes), this module code-generates them with
:func:`derive.codegen.to_jax` and runs the infinite-width recursions (PDLT = Roberts, Yaida &
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
    clamped by :func:`derive.safe.clamp_covariance`. Entries with rho = +-1 (the diagonal,
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
       around one shared square root (:mod:`derive.safe`: ``fast_arccos`` within 1 ulp; libm's
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

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import sympy as sp

from . import symbols as S
from .codegen import to_jax  # importing codegen enables float64 in JAX
from .errors import DeriveError
from .numeric import evaluate as evaluate_numpy
from .quadrature import GaussianExpectation
from .safe import clamp_covariance, covariance_floor, fast_arccos, fast_arcsin, fast_sqrt_one_minus_square

__all__ = ["gram_matrices", "gram_profile", "plan_summary"]

#: Largest number of quadrature-grid values evaluated at once by the direct method (entries x grid
#: points); beyond it the rows of a Gram matrix are mapped over in blocks to bound memory.
MAX_GRID_ELEMENTS = 2**23

#: Largest tile edge of the tiled method; a tile edge dividing N is preferred (no padding).
TILE = 256
#: Tiles processed together (one device).
TILE_BATCH = 4

#: Correlations within this many units of roundoff of +-1 use the forms specialised at rho = +-1.
SNAP_ULPS = 8

#: Bound on the relative Mehler tail, T / <p^2>, certified for every row and layer (float64).
MEHLER_TOL = 1e-12
#: The same for float32 (its coefficients carry ~1e-7 roundoff).
MEHLER_TOL_FLOAT32 = 1e-6
#: Horner steps per compiled loop body of a Mehler sum.
_HORNER_BLOCK = 16
#: Expansion orders tried, in increasing cost.
MEHLER_ORDERS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)

#: Traces of the jitted recursions, by (expectation, derivative_expectation); compilation happens
#: once per trace, so tests can check that changing hyperparameters does not recompile.
TRACES: Counter = Counter()

_COVARIANCE = {"K11": S.K11, "K12": S.K12, "K22": S.K22}
_RHO = sp.Symbol("rho", real=True)


class _SqrtOneMinusSquare(sp.Function):
    """sqrt(1 - x^2), compiled to :func:`derive.safe.fast_sqrt_one_minus_square`."""

    nargs = 1


_FAST = {sp.acos: fast_arccos, sp.asin: fast_arcsin, _SqrtOneMinusSquare: fast_sqrt_one_minus_square}


def _sine_forms(expr: sp.Expr) -> sp.Expr:
    """Mark square roots of 1 - u^2 (any arrangement) as :class:`_SqrtOneMinusSquare`, so that with
    arccos(u) they share one square root once compiled."""
    def matches(e):
        if not (e.is_Pow and e.exp == sp.Rational(1, 2)):
            return False
        base = sp.expand(e.base)
        poly = sp.Poly(base, *base.free_symbols) if base.free_symbols else None
        if poly is None or len(base.free_symbols) != 1:
            return False
        (u,) = base.free_symbols
        return sp.expand(base - (1 - u**2)) == 0

    return expr.replace(matches, lambda e: _SqrtOneMinusSquare(next(iter(e.base.free_symbols))))


# --------------------------------------------------------------------------------------------------
# Arguments


def _canonical(expr, what: str) -> sp.Expr:
    """``expr`` with its covariance symbols replaced by those of :mod:`derive.symbols`, by name."""
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


# --------------------------------------------------------------------------------------------------
# The direct method


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


# --------------------------------------------------------------------------------------------------
# Reading structure off the derivation (SymPy; once per expression, cached)


def _probe_points(count: int = 4, seed: int = 7):
    """Random valid covariances (K11, K12, K22) for numeric checks of symbolic rewrites."""
    rng = np.random.default_rng(seed)
    k11 = rng.uniform(0.3, 3.0, count)
    k22 = rng.uniform(0.3, 3.0, count)
    rho = rng.uniform(-0.95, 0.95, count)
    return k11, rho * np.sqrt(k11 * k22), k22


def _same_values(a: sp.Expr, b: sp.Expr, values: dict, rtol: float = 1e-11) -> bool:
    """Whether two expressions agree numerically (NumPy evaluator) at the given points."""
    try:
        with np.errstate(all="ignore"):
            va = np.asarray(evaluate_numpy(a, values), dtype=float)
            vb = np.asarray(evaluate_numpy(b, values), dtype=float)
    except (NotImplementedError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return False
    va, vb = np.broadcast_arrays(va, vb)
    if not (np.all(np.isfinite(va)) and np.all(np.isfinite(vb))):
        return False
    return bool(np.all(np.abs(va - vb) <= rtol * np.maximum(np.abs(vb), 1.0)))


def _split_roots(expr: sp.Expr) -> sp.Expr:
    """Factor the bases of fractional powers, so that SymPy pulls positive factors out of roots:
    sqrt(a^2 b^2 - a^2 b^2 r^2) -> a b sqrt(-(r - 1)(r + 1))."""
    def split(e):
        return sp.Pow(sp.factor(e.base), e.exp)

    return expr.replace(lambda e: e.is_Pow and not e.exp.is_Integer and not e.base.is_Atom, split)


@dataclass(frozen=True)
class _Homogeneous:
    """expr(K11, K12, K22) = (K11 K22)^(degree/2) form(rho), rho = K12 / sqrt(K11 K22)."""

    degree: sp.Rational
    form: sp.Expr


def _homogeneous(expr: sp.Expr) -> _Homogeneous | None:
    """Detect E(t K) = t^p E(K) (t > 0) and derive e(rho) = E(1, rho, 1), or None.

    K11 = a^2, K22 = b^2, K12 = a b rho turns a homogeneous map into (a b)^p e(rho); the degree p
    (a multiple of 1/2) is read from one numeric rescaling, then the quotient by (a b)^p is
    simplified until a and b drop out, and the result is checked numerically against ``expr``.
    """
    if expr.has(GaussianExpectation):
        return None
    if expr == 0:
        return _Homogeneous(sp.Integer(0), sp.Integer(0))
    a, b = sp.Dummy("a", positive=True), sp.Dummy("b", positive=True)
    scaled = expr.xreplace({S.K11: a**2, S.K22: b**2, S.K12: a * b * _RHO})
    degree = None
    for rho in (0.37, -0.61, 0.05):
        try:
            with np.errstate(all="ignore"):
                v1 = float(evaluate_numpy(scaled, {a: 1.3, b: 0.8, _RHO: rho}))
                v2 = float(evaluate_numpy(scaled, {a: 2.6, b: 1.6, _RHO: rho}))
        except (NotImplementedError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        if np.isfinite(v1) and np.isfinite(v2) and v1 != 0 and v2 / v1 > 0:
            twice = 2 * math.log(v2 / v1) / math.log(4.0)
            if abs(twice - round(twice)) > 1e-9:
                return None
            degree = sp.Rational(round(twice), 2)
            break
    if degree is None:
        return None
    quotient = _split_roots(scaled) / (a * b) ** degree
    form = sp.expand(quotient, deep=False, mul=True, multinomial=False, power_exp=False,
                     power_base=False, log=False)
    if form.free_symbols & {a, b}:
        form = sp.simplify(form)
        if form.free_symbols & {a, b}:
            return None
    k11, k12, k22 = _probe_points()
    rebuilt = (S.K11 * S.K22) ** (degree / 2) * form.xreplace({_RHO: S.K12 / sp.sqrt(S.K11 * S.K22)})
    if not _same_values(rebuilt, expr, {S.K11: k11, S.K12: k12, S.K22: k22}):
        return None
    return _Homogeneous(degree, form)


def _branch_arguments(expr: sp.Expr):
    """Arguments that make ``expr`` singular where they reach a boundary: (arg, kind) with kind
    'unit' for arccos/arcsin (singular at +-1) and 'zero' for fractional or negative powers."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.acos, sp.asin)):
            yield node.args[0], "unit"
        elif node.is_Pow and node.exp.is_number and not (node.exp.is_Integer and node.exp >= 0):
            yield node.base, "zero"


def _singular_at(expr: sp.Expr, substitution: dict, values: dict) -> bool:
    """Whether ``expr`` has a branch point where ``substitution`` holds (checked at ``values``)."""
    for arg, kind in _branch_arguments(expr):
        if not arg.free_symbols & set(substitution):
            continue
        at = arg.xreplace(substitution)
        try:
            with np.errstate(all="ignore"):
                v = np.asarray(evaluate_numpy(at, values), dtype=float)
        except (NotImplementedError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return True
        target = 1.0 if kind == "unit" else 0.0
        magnitude = np.abs(v)
        close = np.abs(magnitude - target) <= 1e-12 * np.maximum(magnitude, 1.0)
        if np.any(~np.isfinite(v)) or np.any(close):
            return True
    return False


def _boundary_value(form: sp.Expr, sign: int) -> sp.Expr | None:
    """form(rho = sign) when finite, else None."""
    value = form.xreplace({_RHO: sp.Integer(sign)})
    if value.has(sp.zoo, sp.nan, sp.oo, sp.S.NegativeInfinity) or value.free_symbols:
        return None
    return value


# --- Mehler nodes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Factor:
    """One separable term c p(z1) q(z2) of a node's integrand; p, q index :attr:`_Plan.functions`
    (None for a constant factor)."""

    coefficient: float
    p: int | None
    q: int | None


@dataclass(frozen=True)
class _MehlerNode:
    """A two-input quadrature node evaluated by Mehler's expansion."""

    symbol: sp.Symbol
    terms: tuple[_Factor, ...]


def _parity(f: sp.Expr) -> int:
    """+1 if f(-z) = f(z), -1 if f(-z) = -f(z), 0 otherwise (decided symbolically)."""
    mirrored = f.xreplace({S.z: -S.z})
    for sign in (1, -1):
        difference = sp.simplify(mirrored - sign * f)
        if difference == 0:
            return sign
    return 0


def _separate(integrand: sp.Expr, z1: sp.Symbol, z2: sp.Symbol):
    """[(c, p(z), q(z))] with integrand = sum c p(z1) q(z2), or None if it does not separate."""
    pieces = sp.separatevars(integrand, [z1, z2], dict=True)
    terms = [integrand] if pieces is not None else sp.Add.make_args(sp.expand(integrand))
    out = []
    for term in terms:
        pieces = sp.separatevars(term, [z1, z2], dict=True)
        if pieces is None or not pieces["coeff"].is_number:
            return None
        out.append((float(pieces["coeff"]), pieces[z1].xreplace({z1: S.z}), pieces[z2].xreplace({z2: S.z})))
    return out


def _mehler_nodes(expr: sp.Expr, functions: list, nodes: dict) -> sp.Expr:
    """Replace every separable node <f(z1, z2)> taken at (K11, K12, K22) by a symbol (recorded in
    ``nodes``, with its factor functions added to ``functions``)."""
    def replace(node):
        if node in nodes:
            return nodes[node].symbol
        if node.dimension != 2 or tuple(node.covariance_args) != (S.K11, S.K12, S.K22):
            return node
        lam = node.integrand
        if lam.expr.free_symbols - set(lam.variables):
            return node
        separated = _separate(lam.expr, *lam.variables)
        if separated is None:
            return node
        terms = []
        for c, p, q in separated:
            ids = []
            for f in (p, q):
                if not f.has(S.z):
                    c *= float(f)
                    ids.append(None)
                    continue
                if f not in functions:
                    functions.append(f)
                ids.append(functions.index(f))
            terms.append(_Factor(c, *ids))
        symbol = sp.Dummy(f"node{len(nodes)}", real=True)
        nodes[node] = _MehlerNode(symbol, tuple(terms))
        return symbol

    return expr.replace(lambda e: isinstance(e, GaussianExpectation), replace)


# --- Hoisting per-row subexpressions ---------------------------------------------------------------


def _worth_hoisting(e: sp.Basic) -> bool:
    return any(isinstance(n, (sp.Function, GaussianExpectation))
               or (n.is_Pow and not (n.exp.is_Integer and n.exp >= 0))
               for n in sp.preorder_traversal(e))


def _hoist(expr: sp.Expr, hoisted: dict) -> sp.Expr:
    """Replace maximal subexpressions of K11 alone (or K22 alone) that cost more than arithmetic by
    symbols; ``hoisted`` maps each K11-expression to its (row symbol, column symbol). The K22
    version of a K11-expression h(K11) is h(K22), so both sides share one per-row table."""
    def walk(e):
        free = e.free_symbols
        for own in (S.K11, S.K22):
            if free == {own} and not e.is_Symbol and _worth_hoisting(e):
                as_row = e if own is S.K11 else e.xreplace({S.K22: S.K11})
                if as_row not in hoisted:
                    i = len(hoisted)
                    hoisted[as_row] = (sp.Dummy(f"row{i}", real=True), sp.Dummy(f"col{i}", real=True))
                return hoisted[as_row][0 if own is S.K11 else 1]
        if e.is_Atom or isinstance(e, GaussianExpectation) or not e.args:
            return e
        args = tuple(walk(a) for a in e.args)
        return e if args == e.args else e.func(*args)

    return walk(expr)


def _on_diagonal(expr: sp.Expr) -> sp.Expr:
    """``expr`` at K11 = K12 = K22 = K. Two-input nodes at (K11, K12, K22) become one-input nodes
    of f(z, z) (at rho = 1 the tensor rule collapses to the one-dimensional rule exactly)."""
    def collapse(node):
        if node.dimension == 2 and tuple(node.covariance_args) == (S.K11, S.K12, S.K22):
            z1, z2 = node.integrand.variables
            f = node.integrand.expr.xreplace({z1: S.z, z2: S.z})
            return GaussianExpectation(sp.Lambda(S.z, f), S.K, node.args[-1])
        return node

    collapsed = expr.replace(lambda e: isinstance(e, GaussianExpectation), collapse)
    special = _at_correlation(collapsed, 1) if not collapsed.has(GaussianExpectation) else None
    base = collapsed if special is None else special
    return base.xreplace({S.K11: S.K, S.K12: S.K, S.K22: S.K})


# --------------------------------------------------------------------------------------------------
# The plan: compiled maps of the tiled method for one pair of expressions


@dataclass(frozen=True)
class _Plan:
    """Everything the tiled method needs for one activation, derived once.

    ``row_stats(K)`` gives the per-row quantities of one layer (from the floored diagonal K);
    ``entry(K12, row, col, nodes)`` gives (E, Ed) for a tile, with ``row``/``col`` those quantities
    broadcast along the tile and ``nodes`` the Mehler sums; ``diagonal(K)`` gives (E, Ed) at
    K11 = K12 = K22 = K.
    """

    kind: str
    description: str
    diagonal: Callable
    row_stats: Callable
    entry: Callable
    functions: tuple = ()
    function_maps: tuple = ()
    parities: tuple = ()
    nodes: tuple = ()


def _exact_at_boundary(compiled: Callable, ends) -> bool:
    """Whether a compiled form of rho reproduces its exact values at rho = +-1 (to 4 ulp)."""
    with jax.ensure_compile_time_eval():
        got = np.asarray(compiled(jnp.asarray([1.0, -1.0], jnp.float64)))
    for value, exact in zip(got, ends):
        if exact is None:
            continue
        allowed = 4 * np.finfo(np.float64).eps * max(1.0, abs(float(exact)))
        if not np.isfinite(value) or abs(value - float(exact)) > allowed:
            return False
    return True


def _snap_masks(rho, dtype):
    eps = SNAP_ULPS * jnp.finfo(dtype).eps
    return rho >= 1 - eps, rho <= -1 + eps


def _power(x, p: sp.Rational):
    """x^p for x > 0 and a multiple p of 1/2, by multiplications and at most one square root."""
    if p == 0:
        return jnp.ones_like(x)
    if p.q == 1 and p > 0:
        return x if p == 1 else lax.integer_pow(x, int(p))
    if p.q == 2 and p > 0:
        root = jnp.sqrt(x)
        return root if p == sp.Rational(1, 2) else lax.integer_pow(root, int(2 * p))
    return jnp.power(x, float(p))


def _homogeneous_plan(h_e: _Homogeneous, h_d: _Homogeneous) -> _Plan:
    forms = (h_e.form, h_d.form)
    maps = [to_jax(_sine_forms(f), [_RHO], table=_FAST) for f in forms]
    values = {_RHO: np.linspace(-0.9, 0.9, 3)}
    singular = [tuple(_singular_at(f, {_RHO: sp.Integer(sign)}, values) for sign in (1, -1)) for f in forms]
    ends = [(_boundary_value(f, 1), _boundary_value(f, -1)) for f in forms]
    at_one = [float(v[0]) if v[0] is not None else None for v in ends]
    if any(v is None for v in at_one):
        raise _NotApplicable("the correlation form has no value at rho = 1")
    snap = any(any(s) for s in singular)
    # Where the compiled form is exact at rho = +-1 itself (fast_arccos(1) = 0, sqrt(0) = 0), a
    # correlation next to the boundary is simply rounded onto it; otherwise the boundary values
    # are selected.
    exact_ends = all(_exact_at_boundary(m, hi_lo) for m, hi_lo in zip(maps, ends))
    pe, pd = h_e.degree, h_d.degree

    def diagonal(K):
        return at_one[0] * _power(K, pe), at_one[1] * _power(K, pd)

    def row_stats(K):
        root = jnp.sqrt(K)
        return (1 / root, _power(root, pe), _power(root, pd))

    def correlation(K12, r_a, r_b):
        rho = jnp.clip(K12 * (r_a * r_b), -1, 1)  # (r_a r_b) first: exactly symmetric in a, b
        if not snap:
            return rho, None, None
        edge = 1 - SNAP_ULPS * jnp.finfo(rho.dtype).eps
        plus, minus = rho >= edge, rho <= -edge
        if exact_ends:
            return jnp.where(plus, 1.0, jnp.where(minus, -1.0, rho)), None, None
        return rho, plus, minus

    def correlation_map(i, rho, plus, minus):
        hi, lo = ends[i]
        if plus is None or not any(singular[i]):
            return maps[i](rho)
        # Next to a branch point the exact boundary value replaces the form (evaluated at 0 there,
        # so that its derivative stays finite); a side without a finite boundary value is left to
        # the form itself.
        near = jnp.zeros_like(plus)
        if hi is not None:
            near = near | plus
        if lo is not None:
            near = near | minus
        value = maps[i](jnp.where(near, 0.0, rho))
        if hi is not None:
            value = jnp.where(plus, float(hi), value)
        if lo is not None:
            value = jnp.where(minus, float(lo), value)
        return value

    def entry(K12, row, col, nodes):
        (r_a, q_a, qd_a), (r_b, q_b, qd_b) = row, col
        rho, plus, minus = correlation(K12, r_a, r_b)
        E = correlation_map(0, rho, plus, minus)
        Ed = correlation_map(1, rho, plus, minus)
        if pe != 0:
            E = (q_a * q_b) * E
        if pd != 0:
            Ed = (qd_a * qd_b) * Ed
        return E, Ed

    description = (f"homogeneous: E = (K11 K22)^({pe / 2}) e(rho), Ed = (K11 K22)^({pd / 2}) ed(rho); "
                   f"e = {h_e.form}; ed = {h_d.form}" + ("; forms specialised at rho = +-1" if snap else ""))
    return _Plan("homogeneous", description, diagonal, row_stats, entry)


class _NotApplicable(Exception):
    """The tiled method cannot evaluate this derivation (the direct one is used)."""


def _general_plan(expectation: sp.Expr, derivative_expectation: sp.Expr) -> _Plan:
    functions: list = []
    nodes: dict = {}
    exprs = [_mehler_nodes(e, functions, nodes) for e in (expectation, derivative_expectation)]
    if any(node.dimension == 2 for e in exprs for node in e.atoms(GaussianExpectation)):
        raise _NotApplicable("a two-input quadrature node does not separate into products")
    node_list = tuple(nodes.values())
    node_symbols = [n.symbol for n in node_list]

    k11, k12, k22 = _probe_points()
    values = {S.K11: k11, S.K22: k22}
    values.update({s: np.full_like(k11, 0.1) for s in node_symbols})
    specials = []
    for e in exprs:
        plus = {S.K12: sp.sqrt(S.K11 * S.K22)}
        minus = {S.K12: -sp.sqrt(S.K11 * S.K22)}
        sing = (_singular_at(e, plus, values), _singular_at(e, minus, values))
        forms = (_at_correlation(e, 1) if sing[0] else None, _at_correlation(e, -1) if sing[1] else None)
        specials.append(forms)
    snap = any(f is not None for pair in specials for f in pair)

    hoisted: dict = {}
    general = [_hoist(e, hoisted) for e in exprs]
    boundary = [[None if f is None else _hoist(f, hoisted) for f in pair] for pair in specials]
    row_syms = [v[0] for v in hoisted.values()]
    col_syms = [v[1] for v in hoisted.values()]
    args = [S.K11, S.K12, S.K22, *row_syms, *col_syms, *node_symbols]
    general_maps = [to_jax(e, args, table=_FAST) for e in general]
    boundary_maps = [[None if f is None else to_jax(f, args, table=_FAST) for f in pair] for pair in boundary]
    hoisted_maps = [to_jax(h, [S.K11], table=_FAST) for h in hoisted]
    diagonal_maps = [to_jax(_on_diagonal(e), [S.K], table=_FAST)
                     for e in (expectation, derivative_expectation)]

    def diagonal(K):
        return diagonal_maps[0](K), diagonal_maps[1](K)

    def row_stats(K):
        root = jnp.sqrt(K)
        return (K, 1 / root, root, *(h(K) for h in hoisted_maps))

    def entry(K12, row, col, node_values):
        # The arguments in a canonical order (smaller variance first), so that entries (a, b) and
        # (b, a) are the same computation: the result is exactly symmetric.
        swap = row[0] > col[0]
        row, col = ([jnp.where(swap, c, r) for r, c in zip(row, col)],
                    [jnp.where(swap, r, c) for r, c in zip(row, col)])
        (K_a, r_a, n_a, *h_a), (K_b, r_b, n_b, *h_b) = row, col
        bound = n_a * n_b
        clipped = jnp.clip(K12, -bound, bound)
        if snap:
            plus, minus = _snap_masks(K12 * (r_a * r_b), K12.dtype)
        out = []
        for general_map, (at_plus, at_minus) in zip(general_maps, boundary_maps):
            if at_plus is None and at_minus is None:
                out.append(general_map(K_a, clipped, K_b, *h_a, *h_b, *node_values))
                continue
            # Next to a branch point the form specialised there replaces the general one (which is
            # evaluated at K12 = 0 there, so that its derivative stays finite).
            near = jnp.zeros_like(plus)
            if at_plus is not None:
                near = near | plus
            if at_minus is not None:
                near = near | minus
            inner = jnp.where(near, jnp.zeros_like(K12), clipped)
            value = general_map(K_a, inner, K_b, *h_a, *h_b, *node_values)
            if at_plus is not None:
                value = jnp.where(plus, at_plus(K_a, bound, K_b, *h_a, *h_b, *node_values), value)
            if at_minus is not None:
                value = jnp.where(minus, at_minus(K_a, -bound, K_b, *h_a, *h_b, *node_values), value)
            out.append(value)
        return tuple(out)

    parts = []
    if hoisted:
        parts.append("per-row " + ", ".join(str(h) for h in hoisted))
    if node_list:
        parts.append(f"{len(node_list)} Mehler node(s) in {len(functions)} factor function(s): "
                     + ", ".join(str(f) for f in functions))
    if snap:
        parts.append("forms specialised at rho = +-1")
    kind = "mehler" if node_list else "general"
    return _Plan(kind, f"{kind}: " + ("; ".join(parts) or "no per-row subexpressions"), diagonal, row_stats,
                 entry, tuple(functions), tuple(to_jax(f, [S.z], table=_FAST) for f in functions),
                 tuple(_parity(f) for f in functions), node_list)


@lru_cache(maxsize=64)
def _plan(expectation: sp.Expr, derivative_expectation: sp.Expr) -> _Plan | None:
    """The tiled method's plan for a pair of expressions, or None where only the direct one applies."""
    try:
        h_e, h_d = _homogeneous(expectation), _homogeneous(derivative_expectation)
        if h_e is not None and h_d is not None:
            return _homogeneous_plan(h_e, h_d)
        return _general_plan(expectation, derivative_expectation)
    except _NotApplicable:
        return None


def plan_summary(expectation: sp.Expr, derivative_expectation: sp.Expr) -> str:
    """How the tiled method evaluates this pair of expressions (for reports and benchmarks)."""
    plan = _plan(_canonical(expectation, "expectation"), _canonical(derivative_expectation,
                                                                   "derivative_expectation"))
    return "direct (no tiled plan)" if plan is None else plan.description


# --------------------------------------------------------------------------------------------------
# Mehler coefficients


@lru_cache(maxsize=32)
def _hermite_rule(order: int, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes x_i, weights w_i (sum 1) for N(0, 1), and the table W_ki = w_i h_k(x_i),
    k < order, h_k = He_k / sqrt(k!). The h_k are evaluated as sqrt(w_i) h_k(x_i) (the normalised
    Hermite functions, bounded by 1) by their three-term recurrence, so nothing overflows."""
    from scipy.special import roots_hermitenorm

    x, w = roots_hermitenorm(points)
    w = w / w.sum()
    root_w = np.sqrt(w)
    table = np.empty((order, points))
    previous, current = np.zeros(points), root_w.copy()
    for k in range(order):
        table[k] = current * root_w
        previous, current = current, (x * current - math.sqrt(k) * previous) / math.sqrt(k + 1)
    return x, w, table


def _rule_points(order: int) -> int:
    return 2 * order


def _mehler_coefficients(functions: Sequence[Callable], K, rule):
    """Per-row Mehler coefficients P_k(K) (rows x order) of each factor function at variances K,
    with the relative tails (<p^2> - sum_k P_k^2) / <p^2> (rows)."""
    x, w, table = rule
    z = jnp.sqrt(K)[..., None] * x
    coefficients, tails = [], []
    for f in functions:
        values = f(z)
        c = jnp.matmul(values, table.T, precision=lax.Precision.HIGHEST)
        norm = jnp.sum(w * values * values, axis=-1)
        tail = norm - jnp.sum(c * c, axis=-1)
        tails.append(tail / jnp.maximum(norm, jnp.finfo(values.dtype).tiny))
        coefficients.append(c)
    return jnp.stack(coefficients, axis=-3), jnp.stack(tails, axis=-2)


def _mehler_sum(rho, node: _MehlerNode, row_coef, col_coef, parities, order: int):
    """sum_k rho^k sum_t c_t P_tk(a) Q_tk(b) over a tile, by Horner's rule in rho (or rho^2 when
    every term has a definite parity); constant factors contribute at k = 0 only.

    ``row_coef`` is (functions, rows, order); ``col_coef`` is (functions, order, columns), so that
    the values read along a tile row are contiguous (strided reads stop LLVM from vectorising).
    """
    total = jnp.zeros_like(rho)
    classes: dict[int, list[_Factor]] = {}
    for term in node.terms:
        if term.p is None or term.q is None:
            a = row_coef[term.p, :, 0][:, None] if term.p is not None else 1.0
            b = col_coef[term.q, 0, :][None, :] if term.q is not None else 1.0
            total = total + term.coefficient * a * b
            continue
        pp, pq = parities[term.p], parities[term.q]
        parity = pp * pq if pp and pq else 0
        if pp and pq and pp != pq:
            continue  # an even factor against an odd one: every coefficient product vanishes
        cls = 0 if parity == 0 else (2 if pp == 1 else 1)  # 2: even k, 1: odd k, 0: all k
        classes.setdefault(cls, []).append(term)
    for cls, terms in classes.items():
        start, step = {0: (0, 1), 1: (1, 2), 2: (0, 2)}[cls]
        ks = list(range(start, order, step))
        variable = rho if cls == 0 else rho * rho
        # Highest k first, in blocks of _HORNER_BLOCK steps (zero-padded in front): a scan over
        # the blocks keeps each compiled loop body small enough for LLVM to vectorise it.
        count = len(ks)
        pad = -count % _HORNER_BLOCK
        blocks = (count + pad) // _HORNER_BLOCK
        rows = jnp.stack([row_coef[t.p][:, start::step][:, ::-1] for t in terms])  # (terms, T, count)
        cols = jnp.stack([col_coef[t.q][start::step, :][::-1] for t in terms])  # (terms, count, T)
        rows = jnp.pad(rows, ((0, 0), (0, 0), (pad, 0))).reshape(len(terms), -1, blocks, _HORNER_BLOCK)
        cols = jnp.pad(cols, ((0, 0), (pad, 0), (0, 0))).reshape(len(terms), blocks, _HORNER_BLOCK, -1)
        weights = [t.coefficient for t in terms]

        def block(acc, coefficients):
            r, q = coefficients  # (terms, T, block), (terms, block, T)
            for j in range(_HORNER_BLOCK):
                c = 0
                for i, w in enumerate(weights):
                    c = c + w * r[i, :, j][:, None] * q[i, j, :][None, :]
                acc = acc * variable + c
            return acc, None

        acc, _ = lax.scan(block, jnp.zeros_like(rho), (jnp.moveaxis(rows, 2, 0), jnp.moveaxis(cols, 1, 0)))
        total = total + (rho * acc if cls == 1 else acc)
    return total


# --------------------------------------------------------------------------------------------------
# The tiled method


def _tile_edge(n: int, tile: int | None, devices: int) -> int:
    if tile is not None:
        return max(1, min(int(tile), n))
    if n <= TILE and devices == 1:
        return n
    for t in range(min(TILE, n), TILE // 2 - 1, -1):
        if n % (t * devices) == 0:
            return t
    return min(TILE, -(-n // devices))


def _profiles(plan: _Plan, inputs, C_W, C_b, depth: int):
    """Floored diagonals K^(l)_aa, l = 1..L-1 (what the nonlinearity sees), shape (max(L-1, 1), N)."""
    d = inputs.shape[1]
    floor = covariance_floor(inputs.dtype)
    K = C_b + C_W * (jnp.sum(inputs * inputs, axis=1) / d)

    def layer(K, _):
        K = jnp.maximum(K, floor)
        E, _ = plan.diagonal(K)
        return C_b + C_W * E, K

    _, stack = lax.scan(layer, K, None, length=max(depth - 1, 1))
    return stack


def _run_tiled(plan: _Plan, key, inputs, C_W, C_b, lambda_W, lambda_b, rules, *, depth: int, tile: int,
               mesh, runs: tuple, batch: int = 1):
    """(K^(L), Theta^(L), largest relative Mehler tail of each run) by the tiled method.

    ``runs`` splits the L - 1 nonlinear layers into consecutive runs ``(length, order)`` that share
    a Mehler order (empty without Mehler nodes); ``rules`` holds each run's Gauss-Hermite rule.
    """
    TRACES[key] += 1
    n, d = inputs.shape
    dtype = inputs.dtype
    devices = 1 if mesh is None else mesh.size
    padded = -(-n // (tile * devices)) * tile * devices
    x = jnp.zeros((padded, d), dtype).at[:n].set(inputs) if padded != n else inputs
    floor = covariance_floor(dtype)
    coefs, tails = [], []
    if plan.nodes:
        # Coefficients of the N real rows only (then padded): a matrix product's rounding can
        # depend on its shape, and results must not depend on the padding (devices, tiles).
        profile = jnp.maximum(_profiles(plan, inputs, C_W, C_b, depth), floor)
        start = 0
        for (length, _), rule in zip(runs, rules):
            rule = tuple(jnp.asarray(r, dtype) for r in rule)
            c, t = _mehler_coefficients(plan.function_maps, profile[start:start + length], rule)
            coefs.append(jnp.pad(c, ((0, 0), (0, 0), (0, padded - n), (0, 0))))  # (layers, F, N, order)
            tails.append(jnp.max(t))
            start += length
    segments = tuple(runs) if plan.nodes else ((depth - 1, 0),)
    one = (jnp.ones((), dtype) + jnp.zeros((), dtype) * C_W) if plan.nodes else None
    arrays = (x, tuple(coefs))
    worst_tails = jnp.stack(tails) if tails else jnp.zeros((0,), dtype)

    def tile_maps(i0, j0, arrays, diagonal: bool):
        """K, Theta of the tile with rows i0.. and columns j0.. after all layers (i0 <= j0).

        ``diagonal``: the tile lies on the diagonal of the Gram matrix (i0 == j0). Such tiles and
        the others are compiled separately, so that only the diagonal ones floor their diagonal
        entries and are symmetrised.
        """
        x, coefs = arrays
        xr = lax.dynamic_slice_in_dim(x, i0, tile)
        xc = xr if diagonal else lax.dynamic_slice_in_dim(x, j0, tile)
        overlap = jnp.matmul(xr, xc.T, precision=lax.Precision.HIGHEST) / d
        K = C_b + C_W * overlap
        Theta = lambda_b + lambda_W * overlap
        # The diagonals of the tile's rows and columns evolve on their own (as in _profiles); they
        # are carried through the layers, so each step reads its per-row quantities from the
        # carry. (Indexing stacked per-layer arrays by the step number instead makes XLA reload
        # the index inside the compiled element loops, which then do not vectorise.)
        diag_r = C_b + C_W * (jnp.sum(xr * xr, axis=1) / d)
        diag_c = diag_r if diagonal else C_b + C_W * (jnp.sum(xc * xc, axis=1) / d)
        # Diagonal entries are floored like the profiles, so that entry (a, a) is the map at
        # K11 = K12 = K22 = max(K_aa, floor) (rho = 1), also for a zero input with C_b = 0.
        on_diagonal = jnp.eye(tile, dtype=bool) if diagonal else None

        def floored(K):
            return K if on_diagonal is None else jnp.where(on_diagonal, jnp.maximum(K, floor), K)

        def segment(carry, coef, length, order):
            if coef is not None:
                coef_r = lax.dynamic_slice_in_dim(coef, i0, tile, axis=2)
                coef_c = lax.dynamic_slice_in_dim(coef, j0, tile, axis=2)

            def layer(carry, step):
                packed, diag_r, diag_c = carry
                K, Theta = jnp.real(packed), jnp.imag(packed)
                diag_r, diag_c = jnp.maximum(diag_r, floor), jnp.maximum(diag_c, floor)
                row = tuple(s[:, None] for s in plan.row_stats(diag_r))
                col = tuple(s[None, :] for s in plan.row_stats(diag_c))
                node_values = ()
                if coef is not None:
                    # This layer's coefficients, selected exactly by a product with a one-hot
                    # vector (a matrix product is not fused into the loops that use its result).
                    pick = (jnp.arange(length) == step).astype(dtype)
                    c_r = jnp.tensordot(pick, coef_r, axes=1, precision=lax.Precision.HIGHEST)
                    c_c = jnp.tensordot(pick, coef_c, axes=1, precision=lax.Precision.HIGHEST)
                    c_c = jnp.swapaxes(c_c, 1, 2)
                    rho = jnp.clip(K * (row[1] * col[1]), -1, 1)
                    # Divided by a traced 1 (exact): a division is an operation XLA will not
                    # duplicate, so each sum is computed once and stored, not recomputed inside
                    # the loop that uses it.
                    node_values = tuple(_mehler_sum(rho, node, c_r, c_c, plan.parities, order) / one
                                        for node in plan.nodes)
                E, Ed = plan.entry(K, row, col, node_values)
                K, Theta = C_b + C_W * E, lambda_b + lambda_W * E + C_W * Ed * Theta
                diag_r = C_b + C_W * plan.diagonal(diag_r)[0]
                diag_c = diag_r if diagonal else C_b + C_W * plan.diagonal(diag_c)[0]
                return (lax.complex(floored(K), Theta), diag_r, diag_c), None

            carry, _ = lax.scan(layer, carry, jnp.arange(length))
            return carry

        # K and Theta travel through the layers as one complex array K + i Theta. XLA on CPU
        # compiles one loop per output array and evaluates in each loop every subexpression it
        # needs (it has no multi-output loops): carried as two arrays, E and Ed (the arccos, the
        # square roots) would be evaluated once for the new K and again for the new Theta.
        # Packed, a layer is one loop that evaluates them once and stores both results.
        carry = (lax.complex(floored(K), Theta), diag_r, diag_c)
        for index, (length, order) in enumerate(segments):
            carry = segment(carry, coefs[index] if plan.nodes else None, length, order)
        K, Theta = jnp.real(carry[0]), jnp.imag(carry[0])
        if diagonal:
            return _symmetrise(K), _symmetrise(Theta)
        return K, Theta

    if mesh is None:
        K_out, T_out = _upper_triangle(tile_maps, padded, tile, dtype, arrays, batch)
    else:
        K_out, T_out = _sharded(tile_maps, mesh, padded, tile, dtype, arrays)
    if padded != n:
        K_out, T_out = K_out[:n, :n], T_out[:n, :n]
    return K_out, T_out, worst_tails


def _upper_triangle(tile_maps, padded: int, tile: int, dtype, arrays, batch: int):
    """The tiles of the upper triangle, each written into the result with its transpose.

    The diagonal tiles (symmetric: written once) and the others (written twice) are separate
    loops, so that neither carries run-time tests for the other's case. Each loop takes ``batch``
    tiles at a time (vmapped: one compiled loop per layer step runs over all of them, which
    amortises its launch and lets XLA split it over cores); a remainder is done one at a time.
    """
    blocks = padded // tile
    rows, cols = np.triu_indices(blocks, 1)
    diagonal = np.arange(blocks)

    def write(out, K, Theta, i0, j0, mirror):
        K_out, T_out = out
        if mirror:
            K_out = lax.dynamic_update_slice(K_out, K.T, (j0, i0))
            T_out = lax.dynamic_update_slice(T_out, Theta.T, (j0, i0))
        K_out = lax.dynamic_update_slice(K_out, K, (i0, j0))
        T_out = lax.dynamic_update_slice(T_out, Theta, (i0, j0))
        return K_out, T_out

    def sweep(out, rows, cols, size, on_diagonal):
        if len(rows) == 0:
            return out
        rows = jnp.asarray((rows * tile).reshape(-1, size))
        cols = jnp.asarray((cols * tile).reshape(-1, size))
        tiles = jax.vmap(lambda i0, j0: tile_maps(i0, j0, arrays, diagonal=on_diagonal))

        def body(t, out):
            K, Theta = tiles(rows[t], cols[t])
            for b in range(size):
                out = write(out, K[b], Theta[b], rows[t, b], cols[t, b], not on_diagonal)
            return out

        return lax.fori_loop(0, rows.shape[0], body, out)

    def sweeps(out, rows, cols, on_diagonal):
        size = min(batch, 2) if len(rows) < 2 * batch else batch
        whole = len(rows) - len(rows) % size
        out = sweep(out, rows[:whole], cols[:whole], size, on_diagonal)
        return sweep(out, rows[whole:], cols[whole:], 1, on_diagonal)

    out = (jnp.zeros((padded, padded), dtype), jnp.zeros((padded, padded), dtype))
    out = sweeps(out, diagonal, diagonal, True)
    return sweeps(out, rows, cols, False)


def _sharded(tile_maps, mesh, padded: int, tile: int, dtype, arrays):
    """The tiles of row stripes, one stripe per device of ``mesh`` (``jax.shard_map``).

    Each device computes every tile of its stripe; a tile below the diagonal is the transpose of
    the tile above it, computed the same way (the same compiled variants for diagonal and other
    tiles), so the result is identical to the one-device loop.
    """
    from jax.sharding import PartitionSpec as P

    devices = mesh.size
    stripe = padded // devices
    blocks = padded // tile
    local_blocks = stripe // tile

    def local(*arrays):
        first = lax.axis_index("rows") * stripe

        def diagonal_tile(i, out):
            K_out, T_out = out
            row = i * tile
            g = first + row
            row = row.astype(g.dtype)
            K, Theta = tile_maps(g, g, arrays, diagonal=True)
            K_out = lax.dynamic_update_slice(K_out, K, (row, g))
            T_out = lax.dynamic_update_slice(T_out, Theta, (row, g))
            return K_out, T_out

        def other_tile(t, out):
            # Tile (i, j) of the stripe for every column block j but the diagonal one.
            K_out, T_out = out
            i, j = t // (blocks - 1), t % (blocks - 1)
            gi = first + i * tile
            gj = (j + (j >= gi // tile)) * tile
            K, Theta = tile_maps(jnp.minimum(gi, gj), jnp.maximum(gi, gj), arrays, diagonal=False)
            flip = gi > gj
            K, Theta = jnp.where(flip, K.T, K), jnp.where(flip, Theta.T, Theta)
            K_out = lax.dynamic_update_slice(K_out, K, (i * tile, gj))
            T_out = lax.dynamic_update_slice(T_out, Theta, (i * tile, gj))
            return K_out, T_out

        zeros = jnp.zeros((stripe, padded), dtype)
        out = lax.fori_loop(0, local_blocks, diagonal_tile, (zeros, zeros))
        return lax.fori_loop(0, local_blocks * (blocks - 1), other_tile, out)

    replicated = tuple(P() for _ in arrays)
    return jax.shard_map(local, mesh=mesh, in_specs=replicated, out_specs=(P("rows"), P("rows")),
                         check_vma=False)(*arrays)


_TILED_CACHE: dict = {}


def _compiler_options() -> dict:
    """XLA options for the tiled loops: on CPU, let LLVM use the widest vectors the machine has
    (XLA defaults to 256-bit vectors; on AVX-512 machines 512-bit ones are ~20% faster here)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_prefer_vector_width": 512}


def _tiled_function(plan: _Plan, key, nested: bool = False):
    """The jitted tiled method; ``nested`` when called under a JAX transformation (jax.grad, an
    outer jit), where per-compilation options cannot be given."""
    if (key, nested) not in _TILED_CACHE:
        def run(inputs, C_W, C_b, lambda_W, lambda_b, rules, *, depth, tile, mesh, runs, batch):
            return _run_tiled(plan, key, inputs, C_W, C_b, lambda_W, lambda_b, rules, depth=depth, tile=tile,
                              mesh=mesh, runs=runs, batch=batch)

        options = {} if nested else {"compiler_options": _compiler_options()}
        _TILED_CACHE[key, nested] = jax.jit(run, static_argnames=("depth", "tile", "mesh", "runs", "batch"),
                                            **options)
    return _TILED_CACHE[key, nested]


@lru_cache(maxsize=64)
def _diagonal_profile_function(plan: _Plan):
    def run(inputs, C_W, C_b, *, depth):
        return jnp.maximum(_profiles(plan, inputs, C_W, C_b, depth), covariance_floor(inputs.dtype))

    return jax.jit(run, static_argnames=("depth",))


def _numpy_function(f: sp.Expr):
    return lambda z: np.asarray(evaluate_numpy(f, {S.z: z}), dtype=float)


def _layer_order(plan: _Plan, variances: np.ndarray, tol: float, at_least: int = 0) -> int | None:
    """Smallest order in :data:`MEHLER_ORDERS` (and >= ``at_least``) whose tails meet ``tol`` at
    representative variances of one layer (its extremes and quartiles; the run itself then checks
    every row)."""
    probes = np.unique(np.quantile(variances, [0.0, 0.25, 0.5, 0.75, 1.0]))
    functions = [_numpy_function(f) for f in plan.functions]
    for order in (m for m in MEHLER_ORDERS if m >= at_least):
        x, w, table = _hermite_rule(order, _rule_points(order))
        z = np.sqrt(probes)[:, None] * x
        worst = 0.0
        with np.errstate(all="ignore"):
            for f in functions:
                values = np.broadcast_to(f(z), z.shape)
                c = values @ table.T
                norm = np.sum(w * values * values, axis=-1)
                worst = max(worst, float(np.max((norm - np.sum(c * c, axis=-1)) / np.maximum(norm, 1e-300))))
        if worst <= tol:
            return order
    return None


def _runs(orders: Sequence[int]) -> tuple:
    """Consecutive equal orders as (length, order) pairs."""
    runs: list[list[int]] = []
    for order in orders:
        if runs and runs[-1][1] == order:
            runs[-1][0] += 1
        else:
            runs.append([1, order])
    return tuple((length, order) for length, order in runs)


def _mesh(devices):
    if devices is None:
        return None
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise DeriveError(f"devices must be between 1 and {len(available)}, got {devices}")
        devices = available[:devices]
    devices = tuple(devices)
    if len(devices) <= 1:
        return None
    from jax.sharding import Mesh

    return Mesh(np.array(devices), ("rows",))


def _is_traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


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
    return _recursion(expectation, derivative_expectation)(inputs, *hyper, depth=depth, profile=True)
