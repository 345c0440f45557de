"""The plan of the tiled method: the compiled per-entry and per-row maps for one pair of expressions
(:mod:`derive.kernels.gram`, items 3 to 6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jax import lax

from derive.backends.codegen import to_jax
from derive.backends.safe import fast_arccos, fast_arcsin, fast_sqrt_one_minus_square
from derive.core import symbols as S
from derive.kernels.direct import _at_correlation, _canonical
from derive.kernels.structure import (
    _RHO,
    _boundary_value,
    _hoist,
    _Homogeneous,
    _homogeneous,
    _mehler_nodes,
    _on_diagonal,
    _parity,
    _probe_points,
    _sine_forms,
    _singular_at,
    _SqrtOneMinusSquare,
)
from derive.symbolic.quadrature import GaussianExpectation

#: Correlations within this many units of roundoff of +-1 use the forms specialised at rho = +-1.
SNAP_ULPS = 8


_FAST = {sp.acos: fast_arccos, sp.asin: fast_arcsin, _SqrtOneMinusSquare: fast_sqrt_one_minus_square}


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
