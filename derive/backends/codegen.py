"""SymPy trees to JAX functions, by walking the tree against a table of heads; and to Python source.

:func:`to_jax` turns an expression into a pure ``jax.numpy`` function of positional array
arguments. It never produces or executes text: the tree is compiled, by recursion over
``expr.func``/``expr.args``, into a straight-line program of callables looked up in
:data:`JAX_TABLE`, a single mapping from SymPy classes to JAX callables (as in sympy2jax's
``sympy_module.py``). A head missing from the table raises ``NotImplementedError`` naming it;
callers add heads with ``to_jax(expr, args, table={head: callable})``, which layers their mapping
over the shipped one with ``ChainMap`` and leaves :data:`JAX_TABLE` (read-only) untouched.

Before the walk, :func:`stabilise` rewrites SymPy's canonical products into forms that evaluate
exactly where kernel formulas are singular (see its docstring): quotients are computed by one
division, and square roots of known non-negative factors are taken of their product, so that
rho = K12 / sqrt(K11 K22) is exactly +-1 on a Gram diagonal and for antipodal inputs. Square
roots, arccos and arcsin go through :mod:`derive.backends.safe`, whose gradients are defined at the boundary
(the Neural Tangents ``elementwise.py`` convention).

:class:`~derive.symbolic.quadrature.GaussianExpectation` nodes are compiled by the same walker: the
integrand is compiled to a function of z (or z1, z2) and summed on the node's quadrature grid,
exactly as :func:`derive.symbolic.quadrature.gaussian_quadrature` does in NumPy.

:func:`to_source` is a separate printer that emits a readable, standalone Python module computing
the same function (for export and inspection).

The compiled functions compute in float64 unless the caller passes float32 arrays (design.md,
"Contracts"): each runs inside :func:`derive.backends.precision.x64`, and JAX's global configuration
is left alone.
"""

from __future__ import annotations

import inspect
import keyword
import operator
import textwrap
from collections import ChainMap, Counter
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from types import MappingProxyType

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp_special
import numpy as np
import sympy as sp
from jax import lax
from sympy.functions.elementary.piecewise import ExprCondPair

from derive.backends import safe as _safe
from derive.backends.precision import x64
from derive.backends.safe import safe_arccos, safe_arcsin, safe_sqrt
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.symbolic.quadrature import GaussianExpectation, gaussian_rule, kinked_rule_1d, polar_rule

__all__ = ["JAX_TABLE", "SOURCE_TABLE", "SafeSqrt", "Quotient", "jax_activation", "stabilise", "to_jax", "to_source"]


# --------------------------------------------------------------------------------------------------
# Code-generation heads produced by `stabilise`


class SafeSqrt(sp.Function):
    """sqrt(max(x, 0)) with derivative 0 at x <= 0; compiled to :func:`derive.backends.safe.safe_sqrt`."""

    nargs = 1


class Quotient(sp.Function):
    """a / b computed by one division (SymPy itself stores a / b as a * b**-1)."""

    nargs = 2


def _half_integer_exponent(exponent: sp.Expr) -> sp.Rational | None:
    """The exponent as a Rational if it is a number that is a multiple of 1/2, else None."""
    if exponent.is_Rational:
        return exponent if exponent.q in (1, 2) else None
    if exponent.is_Float and exponent.is_finite:
        twice = float(exponent) * 2
        if twice == int(twice):
            return sp.Rational(int(twice), 2)
    return None


def stabilise(expr: sp.Expr) -> sp.Expr:
    """Rewrite ``expr`` into an equal tree that evaluates accurately at kernel singularities.

    - b**(k/2) becomes SafeSqrt(b)**k, and b**(-e) for a number e > 0 becomes Quotient(1, b**e);
    - a product becomes Quotient(numerator, denominator) with the factors of negative exponent
      (and the denominator of a rational coefficient) below the bar, and within each side the
      square roots of factors SymPy knows to be non-negative are merged into one SafeSqrt of their
      product: K12 * K11**(-1/2) * K22**(-1/2) becomes Quotient(K12, SafeSqrt(K11 * K22)).

    The merge matters at rho = +-1. In IEEE arithmetic sqrt(K * K) == K, so on a Gram diagonal
    the quotient is exactly 1 and sqrt(K11 K22 - K12^2) is exactly 0; SymPy's canonical form,
    K12 * (1/sqrt(K11)) * (1/sqrt(K22)), can round to 1 - 2**-53, where arccos is already 1.5e-8
    and its derivative -6.7e7. Merging square roots is exact for non-negative factors only, hence
    the ``is_nonnegative`` test. Integrands of :class:`GaussianExpectation` nodes are rewritten when
    they are compiled.

    This exactness is that of the operations as written, which is what eager evaluation performs.
    Under ``jax.jit`` XLA may rewrite a / sqrt(b) as a * rsqrt(b) and contract a b - c^2 into a
    fused multiply-add, which reintroduces last-bit errors at rho = +-1; :mod:`derive.kernels.gram`
    therefore evaluates entries on that boundary with forms specialised there.
    """
    memo: dict[sp.Basic, sp.Basic] = {}

    def go(e: sp.Basic) -> sp.Basic:
        if e not in memo:
            memo[e] = _stabilise_node(e, go)
        return memo[e]

    return go(expr)


def _stabilise_node(e: sp.Basic, go: Callable[[sp.Basic], sp.Basic]) -> sp.Basic:
    if e.is_Atom:
        return e
    if isinstance(e, GaussianExpectation):
        cov = [go(a) for a in e.covariance_args]
        return GaussianExpectation(e.integrand, *cov, e.args[-1], evaluate=False)
    if isinstance(e, sp.Pow):
        return _stable_power(go(e.base), e.exp, go)
    if isinstance(e, sp.Mul):
        return _stable_product(e, go)
    args = tuple(go(a) for a in e.args)
    if args == e.args:
        return e
    if isinstance(e, (sp.Add, sp.Function)):
        return e.func(*args, evaluate=False)
    return e.func(*args)


def _stable_power(base: sp.Basic, exponent: sp.Expr, go) -> sp.Basic:
    half = _half_integer_exponent(exponent)
    if half is not None and half.q == 2:
        root = SafeSqrt(base)
        power = root if abs(half.p) == 1 else sp.Pow(root, abs(half.p), evaluate=False)
        return power if half.p > 0 else Quotient(sp.Integer(1), power)
    if half is not None:
        exponent = half
    if exponent.is_Number and exponent.is_negative:
        magnitude = base if exponent == -1 else sp.Pow(base, -exponent, evaluate=False)
        return Quotient(sp.Integer(1), magnitude)
    return sp.Pow(base, go(exponent), evaluate=False)


def _stable_product(e: sp.Mul, go) -> sp.Basic:
    numerator: list[tuple[sp.Basic, sp.Expr]] = []
    denominator: list[tuple[sp.Basic, sp.Expr]] = []
    for factor in e.args:
        if factor.is_Rational and not factor.is_Integer:
            if factor.p != 1:
                numerator.append((sp.Integer(factor.p), sp.Integer(1)))
            denominator.append((sp.Integer(factor.q), sp.Integer(1)))
        elif isinstance(factor, sp.Pow) and factor.exp.is_Number:
            exponent = _half_integer_exponent(factor.exp) or factor.exp
            side = denominator if exponent.is_negative else numerator
            side.append((factor.base, abs(exponent)))
        else:
            numerator.append((factor, sp.Integer(1)))
    top = _stable_side(numerator, go)
    bottom = _stable_side(denominator, go)
    if bottom is None:
        return top if top is not None else sp.Integer(1)
    return Quotient(top if top is not None else sp.Integer(1), bottom)


def _stable_side(factors, go) -> sp.Basic | None:
    roots, rest = [], []
    for base, exponent in factors:
        if exponent == sp.Rational(1, 2) and base.is_nonnegative:
            roots.append(go(base))
        elif exponent == 1:
            rest.append(go(base))
        else:
            rest.append(_stable_power(go(base), exponent, go))
    if roots:
        rest.append(SafeSqrt(roots[0] if len(roots) == 1 else sp.Mul(*roots, evaluate=False)))
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else sp.Mul(*rest, evaluate=False)


# --------------------------------------------------------------------------------------------------
# The table


def _add(*terms):
    return reduce(operator.add, terms)


def _mul(*factors):
    return reduce(operator.mul, factors)


def _integer_pow(base, n: int):
    if isinstance(base, (int, float)):
        return base**n
    if n >= 0:
        return lax.integer_pow(base, n)
    return 1 / lax.integer_pow(base, -n)


def _pow(base, exponent):
    """x**e: integer e by repeated multiplication, e = +-1/2 by safe_sqrt, else jnp.power."""
    if isinstance(exponent, int) and not isinstance(exponent, bool):
        return _integer_pow(base, exponent)
    if isinstance(exponent, float) and exponent == int(exponent) and abs(exponent) < 2**31:
        return _integer_pow(base, int(exponent))
    if isinstance(exponent, float) and abs(exponent) == 0.5:
        root = safe_sqrt(base)
        return root if exponent > 0 else 1 / root
    return jnp.power(base, exponent)


def _heaviside(x, h0=0.5):
    return jnp.heaviside(x, h0)


def _dirac_delta(x, *order):
    """DiracDelta(x) -> 0: it has measure zero off x = 0, where integrands are evaluated."""
    return jnp.zeros_like(x)


def _max(*a):
    return reduce(jnp.maximum, a)


def _min(*a):
    return reduce(jnp.minimum, a)


def _piecewise(*pairs):
    """Piecewise((v1, c1), (v2, c2), ...): the first v whose c holds; NaN where none holds."""
    out = jnp.nan
    for value, condition in reversed(pairs):
        out = jnp.where(condition, value, out)
    return out


def _expr_cond_pair(value, condition):
    return (value, condition)


def _and(*a):
    return reduce(jnp.logical_and, a)


def _or(*a):
    return reduce(jnp.logical_or, a)


#: SymPy head -> JAX callable, applied to the compiled arguments (arrays or Python scalars).
#: Read-only; extend with ``to_jax(..., table=extra)``, which uses ``ChainMap(extra, JAX_TABLE)``.
JAX_TABLE: Mapping[type, Callable] = MappingProxyType({
    sp.Add: _add,
    sp.Mul: _mul,
    sp.Pow: _pow,
    Quotient: operator.truediv,
    SafeSqrt: safe_sqrt,
    sp.exp: jnp.exp,
    sp.log: jnp.log,
    sp.sin: jnp.sin,
    sp.cos: jnp.cos,
    sp.tan: jnp.tan,
    sp.sinh: jnp.sinh,
    sp.cosh: jnp.cosh,
    sp.tanh: jnp.tanh,
    sp.asin: safe_arcsin,
    sp.acos: safe_arccos,
    sp.atan: jnp.arctan,
    sp.atan2: jnp.arctan2,
    sp.asinh: jnp.arcsinh,
    sp.acosh: jnp.arccosh,
    sp.atanh: jnp.arctanh,
    sp.erf: jsp_special.erf,
    sp.erfc: jsp_special.erfc,
    sp.Abs: jnp.abs,
    sp.sign: jnp.sign,
    sp.Heaviside: _heaviside,
    sp.DiracDelta: _dirac_delta,
    sp.Max: _max,
    sp.Min: _min,
    sp.Piecewise: _piecewise,
    ExprCondPair: _expr_cond_pair,
    sp.StrictGreaterThan: jnp.greater,
    sp.GreaterThan: jnp.greater_equal,
    sp.StrictLessThan: jnp.less,
    sp.LessThan: jnp.less_equal,
    sp.Equality: jnp.equal,
    sp.Unequality: jnp.not_equal,
    sp.And: _and,
    sp.Or: _or,
    sp.Not: jnp.logical_not,
    type(sp.true): lambda: True,
    type(sp.false): lambda: False,
})


# --------------------------------------------------------------------------------------------------
# Quadrature (self-contained: `to_source` copies these into generated modules)


def _working_dtype(*values):
    """The floating dtype of a call: the arguments' promoted dtype, float64 for integer arguments."""
    dtype = jnp.result_type(*values) if values else jnp.result_type(float)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)
    return dtype


def _gauss_1d(f, k, x, w, dtype):
    """<f(z)>_k = sum_i w_i f(sqrt(k) x_i) on a rule (x, w) for N(0, 1); k may be an array."""
    x = jnp.asarray(x, dtype)
    w = jnp.asarray(w, dtype)
    z = safe_sqrt(jnp.asarray(k, dtype)[..., None]) * x
    values = jnp.broadcast_to(jnp.asarray(f(z), dtype), z.shape)
    return jnp.sum(w * values, axis=-1)


def _gauss_2d(f, k11, k12, k22, x, w, dtype):
    """<f(z1, z2)>_K = sum_ij w_i w_j f(z1_i, z2_ij) with z1 = sqrt(K11) x_i and
    z2 = sqrt(K22) (rho x_i + sqrt(1 - rho^2) x_j), rho = K12 / sqrt(K11 K22) clipped to [-1, 1].

    rho is set to exactly +-1 where |K12| >= sqrt(K11 K22) (a Gram diagonal, identical or antipodal
    inputs after clamping): the quotient itself can round to 1 - 2**-52 (compilers turn a / sqrt(b)
    into a * rsqrt(b)), and sqrt(1 - rho^2) would then be 1.5e-8 instead of 0."""
    x = jnp.asarray(x, dtype)
    w = jnp.asarray(w, dtype)
    k11, k12, k22 = (jnp.asarray(c, dtype)[..., None, None] for c in (k11, k12, k22))
    s1, s2 = safe_sqrt(k11), safe_sqrt(k22)
    bound = jnp.sqrt(jnp.maximum(k11 * k22, 0))
    quotient = jnp.clip(k12 / jnp.maximum(s1 * s2, jnp.finfo(dtype).tiny), -1, 1)
    rho = jnp.where(k12 >= bound, 1, jnp.where(k12 <= -bound, -1, quotient)).astype(dtype)
    z1 = s1 * x[:, None]
    z2 = s2 * (rho * x[:, None] + safe_sqrt(1 - rho * rho) * x[None, :])
    values = jnp.broadcast_to(jnp.asarray(f(z1, z2), dtype), jnp.broadcast_shapes(z1.shape, z2.shape))
    return jnp.sum((w[:, None] * w[None, :]) * values, axis=(-2, -1))


def _gauss_2d_polar(f, k11, k12, k22, t, v, r, u, dtype):
    """<f(z1, z2)>_K for a piecewise-smooth f with kinks on z1 = 0 and z2 = 0: polar coordinates
    z1 = sqrt(K11) r cos(phi), z2 = sqrt(K22) r cos(phi - theta), theta = atan2(sqrt(K11 K22 - K12^2),
    K12); Gauss-Legendre (t, v) on each of the four arcs between the kink angles pi/2, 3 pi/2,
    theta + pi/2, theta + 3 pi/2, and the radial rule (r, u) (derive.symbolic.quadrature.polar_rule)."""
    t, v, r, u = (jnp.asarray(a, dtype) for a in (t, v, r, u))
    k11, k12, k22 = (jnp.asarray(c, dtype)[..., None] for c in (k11, k12, k22))
    s1, s2 = safe_sqrt(k11), safe_sqrt(k22)
    theta = jnp.arctan2(safe_sqrt(k11 * k22 - k12 * k12), k12)
    quarter = jnp.asarray([0.5, 1.5], dtype) * jnp.pi
    fixed = jnp.broadcast_to(quarter, theta.shape[:-1] + (2,))
    cuts = jnp.sort(jnp.concatenate([fixed, jnp.mod(theta + quarter, 2 * jnp.pi)], axis=-1), axis=-1)
    hi = jnp.concatenate([cuts[..., 1:], cuts[..., :1] + 2 * jnp.pi], axis=-1)
    half = (hi - cuts) / 2
    phi = ((cuts + half)[..., :, None] + half[..., :, None] * t).reshape(half.shape[:-1] + (-1,))[..., :, None]
    wphi = (half[..., :, None] * v).reshape(half.shape[:-1] + (-1,))[..., :, None]
    z1 = s1[..., None] * r * jnp.cos(phi)
    z2 = s2[..., None] * r * jnp.cos(phi - theta[..., None])
    values = jnp.broadcast_to(jnp.asarray(f(z1, z2), dtype), jnp.broadcast_shapes(z1.shape, z2.shape))
    return jnp.sum(wphi * u * values, axis=(-2, -1))


def _rule_arrays(order: int, kind: str) -> tuple[np.ndarray, ...]:
    """The quadrature arrays of a node: ``grid`` (x, w), ``kinked1`` (x, w) or ``polar`` (t, v, r, u)."""
    if kind == "polar":
        return polar_rule(order)
    if kind == "kinked1":
        return kinked_rule_1d(order)
    return gaussian_rule(order)


def _rule_kind(node: GaussianExpectation) -> str:
    if not node.kinked:
        return "grid"
    return "kinked1" if node.dimension == 1 else "polar"


def _expand_trailing(value, count: int):
    """Append ``count`` unit axes to an array argument, so it broadcasts against a quadrature grid."""
    if isinstance(value, (bool, int, float)):
        return value
    return jnp.asarray(value)[(Ellipsis,) + (None,) * count]


# --------------------------------------------------------------------------------------------------
# The walker


class _Program:
    """A straight-line program: slot ``i`` of ``steps`` is filled by ``fn(*slots[ins])``.

    Shared subtrees of the SymPy DAG get one slot, so they are computed once per call.
    """

    def __init__(self, n_args: int):
        self.n_args = n_args
        self.constants: dict[int, object] = {}
        self.steps: list[tuple[int, Callable, tuple[int, ...], bool]] = []
        self.n_slots = n_args
        self.result = 0

    def new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def __call__(self, values: Sequence, dtype):
        slots: list[object] = [None] * self.n_slots
        slots[: self.n_args] = values
        for i, c in self.constants.items():
            slots[i] = c
        for out, fn, ins, wants_dtype in self.steps:
            inputs = [slots[i] for i in ins]
            slots[out] = fn(*inputs, dtype=dtype) if wants_dtype else fn(*inputs)
        return slots[self.result]


def _python_constant(value):
    """A concrete scalar as a Python number (weakly typed in JAX, so it adopts the inputs' dtype)."""
    if isinstance(value, (bool, int, float, tuple)):
        return value
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else value


def _number(e: sp.Basic):
    if e.is_Integer:
        return int(e) if abs(int(e)) < 2**31 else float(e)
    if e is sp.zoo:
        raise NotImplementedError("no JAX value for the SymPy number 'zoo' (complex infinity)")
    return float(e)


def _compile(expr: sp.Basic, args: Sequence[sp.Symbol], table: Mapping[type, Callable]) -> _Program:
    program = _Program(len(args))
    slot_of: dict[sp.Basic, int] = {a: i for i, a in enumerate(args)}

    def visit(e: sp.Basic) -> int:
        if e in slot_of:
            return slot_of[e]
        if e.is_Symbol:
            raise ValueError(f"symbol '{e}' is not among the arguments")
        wants_dtype = False
        if e.is_Number or e.is_NumberSymbol:
            slot = program.new_slot()
            program.constants[slot] = _number(e)
            slot_of[e] = slot
            return slot
        if isinstance(e, GaussianExpectation):
            fn, operands = _quadrature_step(e, table)
            wants_dtype = True
        else:
            fn = table.get(type(e))
            if fn is None:
                raise NotImplementedError(
                    f"no JAX rule for SymPy head '{type(e).__name__}' (in {e}); "
                    "pass table={head: callable} to add one")
            operands = e.args
        ins = tuple(visit(a) for a in operands)
        slot = program.new_slot()
        if all(i in program.constants for i in ins):
            constants = [program.constants[i] for i in ins]
            with jax.ensure_compile_time_eval():
                value = fn(*constants, dtype=jnp.float64) if wants_dtype else fn(*constants)
            program.constants[slot] = _python_constant(value)
        else:
            program.steps.append((slot, fn, ins, wants_dtype))
        slot_of[e] = slot
        return slot

    program.result = visit(expr)
    return program


def _integrand_parameters(node: GaussianExpectation) -> list[sp.Symbol]:
    lam = node.integrand
    return sorted(lam.expr.free_symbols - set(lam.variables), key=lambda s: (s.name, str(s.assumptions0)))


def _quadrature_step(node: GaussianExpectation, table) -> tuple[Callable, tuple[sp.Basic, ...]]:
    """Compile a quadrature node: its integrand becomes a sub-program of (z..., parameters...)."""
    lam = node.integrand
    dim = node.dimension
    params = _integrand_parameters(node)
    integrand = _compile(stabilise(lam.expr), tuple(lam.variables) + tuple(params), table)
    kind = _rule_kind(node)
    arrays = _rule_arrays(node.order, kind)
    n_cov = len(node.covariance_args)

    def step(*operands, dtype):
        cov, values = operands[:n_cov], operands[n_cov:]
        expanded = [_expand_trailing(v, dim) for v in values]

        def f(*zs):
            return integrand(list(zs) + expanded, dtype)

        if dim == 1:
            return _gauss_1d(f, cov[0], *arrays, dtype)
        if kind == "polar":
            return _gauss_2d_polar(f, *cov, *arrays, dtype)
        return _gauss_2d(f, *cov, *arrays, dtype)

    return step, tuple(node.covariance_args) + tuple(params)


def _as_expr(expr) -> sp.Basic:
    if isinstance(expr, sp.Basic):
        return expr
    if isinstance(expr, bool):
        raise TypeError("expected a SymPy expression, got a bool")
    if isinstance(expr, int):
        return sp.Integer(expr)
    if isinstance(expr, float):
        return sp.Float(expr)
    raise TypeError(f"expected a SymPy expression, got {type(expr).__name__}")


def _check_arguments(expr: sp.Basic, args: Sequence[sp.Symbol]) -> tuple[sp.Symbol, ...]:
    args = tuple(args)
    for a in args:
        if not isinstance(a, sp.Symbol):
            raise TypeError(f"arguments must be SymPy symbols, got {a!r}")
    if len(set(args)) != len(args):
        raise ValueError(f"repeated argument in {args}")
    missing = expr.free_symbols - set(args)
    if missing:
        names = ", ".join(sorted(str(s) for s in missing))
        hint = ""
        if {str(s) for s in missing} & {str(a) for a in args}:
            hint = " (a symbol with the same name but other assumptions is a different symbol)"
        raise ValueError(f"expression depends on {names}, which are not among the arguments{hint}")
    return args


def to_jax(expr: sp.Expr, args: Sequence[sp.Symbol], *, table: Mapping[type, Callable] | None = None
           ) -> Callable:
    """Compile ``expr`` into a pure JAX function of the positional arrays ``args``.

    The returned function broadcasts its arguments against each other and returns an array of
    their broadcast shape. Its dtype is the arguments' promoted floating dtype (float64 by default,
    float32 if every argument is float32); numeric constants are weakly typed so they never
    promote float32 to float64. It can be wrapped in ``jax.jit``, ``jax.vmap`` and ``jax.grad``.

    Values and gradients are exact at rho = +-1 (K12 = +-sqrt(K11 K22) in floating point) when the
    function runs eagerly (see :func:`stabilise`); compiled by ``jax.jit``, XLA's algebraic
    rewrites can leave last-bit errors there, which the square-root singularities amplify (to about
    1e-8 in values, and without bound in gradients taken exactly on the boundary). Gram matrices
    (:mod:`derive.kernels.gram`) evaluate that boundary with forms specialised to it.

    Args:
        expr: a SymPy expression whose free symbols are all in ``args``; it may contain
            :class:`~derive.symbolic.quadrature.GaussianExpectation` nodes.
        args: the symbols bound to the positional arguments, in order.
        table: extra or overriding heads, ``{SymPy class: callable}``; the callable receives the
            compiled arguments of the node (arrays or Python scalars).

    Raises:
        NotImplementedError: naming the first head with no rule (at compile time, not call time).
        ValueError: if ``expr`` depends on a symbol not in ``args``.
    """
    expr = _as_expr(expr)
    args = _check_arguments(expr, args)
    tab = JAX_TABLE if table is None else ChainMap(dict(table), JAX_TABLE)
    program = _compile(stabilise(expr), args, tab)
    names = ", ".join(a.name for a in args)

    def compiled(*values):
        if len(values) != len(args):
            raise TypeError(f"expected {len(args)} arguments ({names}), got {len(values)}")
        with x64():
            dtype = _working_dtype(*values)
            arrays = [jnp.asarray(v, dtype) for v in values]
            out = program(arrays, dtype)
            shape = jnp.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
            return jnp.broadcast_to(jnp.asarray(out, dtype), shape)

    compiled.__name__ = "derived"
    compiled.__qualname__ = "derived"
    compiled.__doc__ = f"derived({names}) = {_summary(expr)}"
    return compiled


def _summary(expr: sp.Basic, limit: int = 2000) -> str:
    text = str(expr)
    return text if len(text) <= limit else text[: limit - 5] + " ..."


# --------------------------------------------------------------------------------------------------
# The source printer

#: Heads printed as a call of one named function (everything else has a ``_print_<Class>`` method).
SOURCE_TABLE: Mapping[type, str] = MappingProxyType({
    SafeSqrt: "safe_sqrt",
    sp.exp: "jnp.exp",
    sp.log: "jnp.log",
    sp.sin: "jnp.sin",
    sp.cos: "jnp.cos",
    sp.tan: "jnp.tan",
    sp.sinh: "jnp.sinh",
    sp.cosh: "jnp.cosh",
    sp.tanh: "jnp.tanh",
    sp.asin: "safe_arcsin",
    sp.acos: "safe_arccos",
    sp.atan: "jnp.arctan",
    sp.atan2: "jnp.arctan2",
    sp.asinh: "jnp.arcsinh",
    sp.acosh: "jnp.arccosh",
    sp.atanh: "jnp.arctanh",
    sp.erf: "jsp_special.erf",
    sp.erfc: "jsp_special.erfc",
    sp.Abs: "jnp.abs",
    sp.sign: "jnp.sign",
    sp.Not: "jnp.logical_not",
})

#: Helper functions a generated module may need, each with the objects whose source defines it.
_HELPERS: dict[str, tuple[Callable, ...]] = {
    "_working_dtype": (_working_dtype,),
    "safe_sqrt": (_safe.safe_sqrt, _safe._safe_sqrt_jvp),
    "safe_arccos": (_safe.safe_arccos, _safe._safe_arccos_jvp),
    "safe_arcsin": (_safe.safe_arcsin, _safe._safe_arcsin_jvp),
    "_gauss_1d": (_gauss_1d,),
    "_gauss_2d": (_gauss_2d,),
    "_gauss_2d_polar": (_gauss_2d_polar,),
    "_expand_trailing": (_expand_trailing,),
}
_HELPER_DEPENDENCIES = {"_gauss_1d": ("safe_sqrt",), "_gauss_2d": ("safe_sqrt",),
                        "_gauss_2d_polar": ("safe_sqrt",)}
_RESERVED = {"jax", "jnp", "np", "math", "jsp_special", "dtype", "out", *keyword.kwlist, *_HELPERS}


class _Module:
    """What a generated module needs besides its function: helpers, quadrature rules, names."""

    def __init__(self):
        self.helpers: set[str] = {"_working_dtype"}
        self.rules: dict[int, tuple[str, str]] = {}
        self.uses_math = False
        self.uses_special = False
        self.functions: list[str] = []
        self.counter = 0

    def need(self, helper: str) -> str:
        self.helpers.add(helper)
        for dep in _HELPER_DEPENDENCIES.get(helper, ()):
            self.helpers.add(dep)
        return helper

    def rule(self, order: int, kind: str = "grid") -> tuple[str, ...]:
        key = (order, kind)
        if key not in self.rules:
            stems = {"grid": ("_X", "_W"), "kinked1": ("_XK", "_WK"), "polar": ("_T", "_V", "_R", "_U")}[kind]
            self.rules[key] = tuple(f"{stem}{order}" for stem in stems)
        return self.rules[key]

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"


def _identifier(name: str, taken: set[str]) -> str:
    candidate = name.lstrip("_")
    if not candidate.isidentifier():
        candidate = "x"
    if candidate in _RESERVED or candidate in taken:
        stem, k = candidate.rstrip("_") + "_", 1
        while f"{stem}{k}" in taken:
            k += 1
        candidate = f"{stem}{k}"
    taken.add(candidate)
    return candidate


def _shared_subtrees(expr: sp.Basic) -> set[sp.Basic]:
    """Composite nodes referenced more than once in the DAG (printed once, as a temporary)."""
    parents: Counter = Counter()
    seen: set[sp.Basic] = set()
    stack = [expr]
    while stack:
        e = stack.pop()
        children = e.covariance_args if isinstance(e, GaussianExpectation) else e.args
        for c in children:
            parents[c] += 1
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return {e for e, n in parents.items()
            if n > 1 and not e.is_Atom and not isinstance(e, ExprCondPair)}


class _Scope:
    """One function body of the generated module: its symbol names, lines and temporaries."""

    def __init__(self, module: _Module, names: Mapping[sp.Symbol, str], expr: sp.Basic, indent: str,
                 table: Mapping[type, str]):
        self.module = module
        self.names = dict(names)
        self.shared = _shared_subtrees(expr)
        self.temps: dict[sp.Basic, str] = {}
        self.lines: list[str] = []
        self.indent = indent
        self.table = table

    # dispatch -------------------------------------------------------------------------------------

    def render(self, e: sp.Basic) -> str:
        if e in self.temps:
            return self.temps[e]
        text = self._print(e)
        if e in self.shared:
            name = self.module.fresh("_t")
            self.lines.append(f"{self.indent}{name} = {text}")
            self.temps[e] = name
            return name
        return text

    def _print(self, e: sp.Basic) -> str:
        name = self.table.get(type(e))
        if name is not None:
            if name.startswith("safe_"):
                self.module.need(name)
            if name.startswith("jsp_special."):
                self.module.uses_special = True
            return f"{name}({', '.join(self.render(a) for a in e.args)})"
        for cls in type(e).__mro__:
            method = getattr(self, f"_print_{cls.__name__}", None)
            if method is not None:
                return method(e)
        raise NotImplementedError(f"no source rule for SymPy head '{type(e).__name__}' (in {e})")

    # atoms ----------------------------------------------------------------------------------------

    def _print_Symbol(self, e):
        if e not in self.names:
            raise ValueError(f"symbol '{e}' is not among the arguments")
        return self.names[e]

    def _print_Integer(self, e):
        return str(int(e)) if e >= 0 else f"({int(e)})"

    def _print_Rational(self, e):
        return f"({e.p} / {e.q})"

    def _print_Float(self, e):
        return repr(float(e)) if e >= 0 else f"({float(e)!r})"

    def _print_Pi(self, e):
        self.module.uses_math = True
        return "math.pi"

    def _print_Exp1(self, e):
        self.module.uses_math = True
        return "math.e"

    def _print_NumberSymbol(self, e):
        return repr(float(e))

    def _print_Infinity(self, e):
        self.module.uses_math = True
        return "math.inf"

    def _print_NegativeInfinity(self, e):
        self.module.uses_math = True
        return "(-math.inf)"

    def _print_NaN(self, e):
        self.module.uses_math = True
        return "math.nan"

    def _print_BooleanTrue(self, e):
        return "True"

    def _print_BooleanFalse(self, e):
        return "False"

    # arithmetic -----------------------------------------------------------------------------------

    def _print_Add(self, e):
        terms = sorted(e.args, key=lambda t: _negated_term(t) is not None)  # stable: a positive term first
        text = self.render(terms[0])
        for term in terms[1:]:
            negated = _negated_term(term)
            if negated is not None and term not in self.shared:
                text += f" - {self.render(negated)}"
            else:
                text += f" + {self.render(term)}"
        return f"({text})"

    def _print_Mul(self, e):
        args = list(e.args)
        if args[0] == -1 and len(args) > 1:
            rest = args[1] if len(args) == 2 else sp.Mul(*args[1:], evaluate=False)
            return f"(-{self.render(rest)})"
        return f"({' * '.join(self.render(a) for a in args)})"

    def _print_Quotient(self, e):
        return f"({self.render(e.args[0])} / {self.render(e.args[1])})"

    def _print_Pow(self, e):
        base, exponent = e.args
        if exponent.is_Integer:
            return f"({self.render(base)} ** {int(exponent)})"
        return f"jnp.power({self.render(base)}, {self.render(exponent)})"

    # piecewise and logic --------------------------------------------------------------------------

    def _print_Max(self, e):
        return self._nested("jnp.maximum", e.args)

    def _print_Min(self, e):
        return self._nested("jnp.minimum", e.args)

    def _print_And(self, e):
        return self._nested("jnp.logical_and", e.args)

    def _print_Or(self, e):
        return self._nested("jnp.logical_or", e.args)

    def _nested(self, fn: str, args) -> str:
        text = self.render(args[-1])
        for a in reversed(args[:-1]):
            text = f"{fn}({self.render(a)}, {text})"
        return text

    def _print_Relational(self, e):
        return f"({self.render(e.lhs)} {e.rel_op} {self.render(e.rhs)})"

    def _print_Heaviside(self, e):
        h0 = self.render(e.args[1]) if len(e.args) > 1 else "0.5"
        return f"jnp.heaviside({self.render(e.args[0])}, {h0})"

    def _print_DiracDelta(self, e):
        return f"jnp.zeros_like({self.render(e.args[0])})"

    def _print_Piecewise(self, e):
        self.module.uses_math = True
        text = "math.nan"
        for value, condition in reversed(e.args):
            text = f"jnp.where({self.render(condition)}, {self.render(value)}, {text})"
        return text

    # quadrature -----------------------------------------------------------------------------------

    def _print_GaussianExpectation(self, e):
        lam = e.integrand
        dim = e.dimension
        params = _integrand_parameters(e)
        fname = self.module.fresh("_integrand")
        taken: set[str] = set()  # the integrand's own scope: only its arguments are visible
        inner_names = {v: _identifier(v.name, taken) for v in lam.variables}
        inner_names.update({p: _identifier(p.name, taken) for p in params})
        body = stabilise(lam.expr)
        inner = _Scope(self.module, inner_names, body, self.indent + "    ", self.table)
        result = inner.render(body)
        signature = ", ".join(inner_names[s] for s in (*lam.variables, *params))
        self.lines.append(f"{self.indent}def {fname}({signature}):")
        self.lines.extend(inner.lines)
        self.lines.append(f"{self.indent}    return {result}")
        if params:
            self.module.need("_expand_trailing")
            zs = ", ".join(inner_names[v] for v in lam.variables)
            passed = ", ".join(f"_expand_trailing({self.render(p)}, {dim})" for p in params)
            integrand = f"lambda {zs}: {fname}({zs}, {passed})"
        else:
            integrand = fname
        kind = _rule_kind(e)
        names = ", ".join(self.module.rule(e.order, kind))
        cov = ", ".join(self.render(c) for c in e.covariance_args)
        helper = self.module.need("_gauss_1d" if dim == 1 else ("_gauss_2d_polar" if kind == "polar" else "_gauss_2d"))
        return f"{helper}({integrand}, {cov}, {names}, dtype)"


def _negated_term(term: sp.Basic) -> sp.Basic | None:
    """``t`` if ``term`` is the product -1 * t (printed as a subtraction), else None."""
    if isinstance(term, sp.Mul) and len(term.args) > 1 and term.args[0] == -1:
        rest = term.args[1:]
        return rest[0] if len(rest) == 1 else sp.Mul(*rest, evaluate=False)
    return None


def _array_literal(values: np.ndarray, indent: str = "    ") -> str:
    items = ", ".join(repr(float(v)) for v in values)
    wrapped = textwrap.fill(items, width=96, initial_indent=indent, subsequent_indent=indent)
    return f"np.array([\n{wrapped},\n])"


def _function_source(module: _Module, name: str, expr: sp.Basic, args: Sequence[sp.Symbol]) -> list[str]:
    """Lines of ``def name(*args)`` computing ``expr``; helpers and rules are recorded in ``module``."""
    args = _check_arguments(expr, args)
    taken = {name}
    names = {a: _identifier(a.name, taken) for a in args}
    stable = stabilise(expr)
    scope = _Scope(module, names, stable, "    ", SOURCE_TABLE)
    result = scope.render(stable)
    params = ", ".join(names[a] for a in args)
    inner = [f"dtype = _working_dtype({params})"]
    for a in args:
        inner.append(f"{names[a]} = jnp.asarray({names[a]}, dtype)")
    inner.extend(line[4:] for line in scope.lines)
    inner.append(f"out = {result}")
    shapes = ", ".join(f"{names[a]}.shape" for a in args)
    inner.append(f"return jnp.broadcast_to(jnp.asarray(out, dtype), jnp.broadcast_shapes({shapes}))")
    return [f"def {name}({params}):", f'    """{name}({params}) = {_summary(expr, 1000)}"""',
            "    with _float64():", *("        " + line for line in inner)]


def to_source(expr, args: Sequence[sp.Symbol], name: str = "f") -> str:
    """Python source of a standalone module defining ``name(*args)``, equal to ``to_jax(expr, args)``.

    ``expr`` may also be a mapping ``{function name: expression}``: one module then defines every
    function, sharing helpers and quadrature rules.

    The module imports only ``jax``, ``jax.numpy`` (as ``jnp``), ``numpy`` and ``math``; the safe
    helpers it calls (:mod:`derive.backends.safe`) are copied into it, and quadrature nodes become nested
    integrand functions summed on rules written out as literal arrays (bit-identical to
    :func:`derive.symbolic.quadrature.gaussian_rule`). Subexpressions used more than once are computed
    once, as temporaries ``_t1, _t2, ...``. Symbols whose names are not Python identifiers are
    renamed (``x``, ``x_1``, ...); the signature lists the names used.

    Raises:
        NotImplementedError: naming the first head the printer has no rule for.
        ValueError: if ``name`` is not an identifier or ``expr`` depends on a symbol not in ``args``.
    """
    functions = dict(expr) if isinstance(expr, Mapping) else {name: expr}
    module = _Module()
    body: list[str] = []
    for fname, fexpr in functions.items():
        if not fname.isidentifier() or keyword.iskeyword(fname) or fname in _RESERVED:
            raise ValueError(f"'{fname}' cannot name the generated function")
        if body:
            body += ["", ""]
        body += _function_source(module, fname, _as_expr(fexpr), args)
    title = ", ".join(functions)

    header = [f'"""{title}: generated by derive.backends.codegen.to_source; JAX, float64 by default."""',
              ""]
    if module.uses_math:
        header.append("import math")
        header.append("")
    header += ["import jax", "import jax.numpy as jnp"]
    if module.uses_special:
        header.append("import jax.scipy.special as jsp_special")
    if module.rules:
        header.append("import numpy as np")
    header += ["", "", "def _float64():",
               '    """JAX float64 for one call; the process\'s configuration is left as it is."""',
               '    enable = getattr(jax, "enable_x64", None)',
               "    if enable is None:  # JAX < 0.5",
               "        from jax.experimental import enable_x64 as enable",
               "    return enable(True)", ""]

    helpers = []
    for helper in sorted(module.helpers, key=list(_HELPERS).index):
        for obj in _HELPERS[helper]:
            helpers.append(textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n")
    rules = []
    source_of = {"grid": "gaussian_rule", "kinked1": "kinked_rule_1d", "polar": "polar_rule"}
    for (order, kind), names in sorted(module.rules.items()):
        rules.append(f"# Quadrature rule, order {order} (derive.symbolic.quadrature.{source_of[kind]}).")
        for name, values in zip(names, _rule_arrays(order, kind)):
            rules.append(f"{name} = {_array_literal(values)}")
        rules.append("")

    blocks = ["\n".join(header).rstrip(), *(h.rstrip() for h in helpers), "\n".join(rules).rstrip(),
              "\n".join(body)]
    return "\n\n\n".join(b for b in blocks if b) + "\n"


_JAX_ACTIVATIONS: dict = {}


def jax_activation(act):
    """sigma as a jnp function (generated once per expression, so jitted samplers compile once)."""
    sigma = act.sigma_numeric
    if sigma.free_symbols - {S.z}:
        raise DeriveError(f"parameters without a value: {', '.join(sorted(map(str, sigma.free_symbols - {S.z})))}")
    if sigma not in _JAX_ACTIVATIONS:
        _JAX_ACTIVATIONS[sigma] = to_jax(sigma, [S.z])
    return _JAX_ACTIVATIONS[sigma]
