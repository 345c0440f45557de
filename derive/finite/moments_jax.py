"""Many mixed four-point functions of a smooth activation at once, compiled with JAX.

The NTK's fluctuations over M sites (:func:`derive.finite.tensor_ntk.activation_tables`) need
E[prod_k sigma(z_k)^i_k sigma'(z_k)^j_k], z ~ N(0, K[S, S]), for thousands of site sets S of two to
four distinct sites: about M^4/24 sets of four. :func:`derive.finite.moments.product_moment` computes
one at a time in NumPy, and for the trapezoid rule nearly all of its time goes to interpolating the
tabulated last factor at order^(d-1) grid points. :func:`trapezoid_product_moments` runs the same
arithmetic (:func:`derive.finite.moments._trapezoid_moment`, one code path against ``jax.numpy``) on a
whole batch of covariances and powers, as one compiled program per number of sites and order: the
powers are data, so one compilation serves every pattern of sigma and sigma'. The lower-triangular
roots are NumPy's (:func:`derive.finite.moments._root`), so both evaluate the same quadrature; they
agree to rounding (tests/test_tensor_ntk.py).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

from derive.finite.moments import _root, _trapezoid_moment

#: Largest power of sigma or sigma' in one factor (four factors of one site).
MAX_POWER = 4
#: Covariances per compiled call (the last call is padded but computes only its steps), and grid
#: points per step.
CHUNK, STEP_POINTS = 64, 2**21
#: Grid points (moments times order^(d-1)) from which compiling pays: measured on CPU, NumPy takes
#: about 70 ns a point, the compiled program about a third of that after 0.5 to 1.3 s of compilation
#: per number of sites and order.
COMPILE_POINTS = 2e7


def worth_compiling(d: int, order: int, count: int) -> bool:
    """Whether ``count`` moments of d sites at trapezoid ``order`` run faster compiled (COMPILE_POINTS)."""
    return d > 1 and count * order ** (d - 1) >= COMPILE_POINTS


def _power(jnp, base, k):
    """base^k for an integer k in 0 .. MAX_POWER given as data."""
    out = jnp.ones_like(base)
    for e in range(1, MAX_POWER + 1):
        out = jnp.where(k >= e, out * base, out)
    return out


@lru_cache(maxsize=32)
def _program(sigma: sp.Expr, derivative: sp.Expr, d: int, order: int):
    """The jitted (roots (CHUNK, d, d), powers (CHUNK, d, 2), count) -> moments (CHUNK,): the first
    ``count`` rows in steps of ``step`` at once (a loop of traced length, so that a short last call
    computes no padding beyond its last step; a step past the end is shifted back to end at CHUNK,
    recomputing rows it rewrites with the same values)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from derive.backends.codegen import to_jax
    from derive.core import symbols as S

    s, ds = to_jax(sigma, (S.z,)), to_jax(derivative, (S.z,))

    def one(args):
        L, p = args
        factors = [lambda z, k=k: _power(jnp, s(z), p[k, 0]) * _power(jnp, ds(z), p[k, 1]) for k in range(d)]
        return _trapezoid_moment(jnp, factors, None, L, order)

    step = max(1, min(CHUNK, STEP_POINTS // order ** (d - 1)))

    def moments(roots, powers, count):
        def body(b, out):
            rows = (lax.dynamic_slice_in_dim(roots, b * step, step), lax.dynamic_slice_in_dim(powers, b * step, step))
            return lax.dynamic_update_slice_in_dim(out, jax.vmap(one)(rows), b * step, 0)

        return lax.fori_loop(0, (count + step - 1) // step, body, jnp.zeros(CHUNK, dtype=roots.dtype))

    return jax.jit(moments)


def trapezoid_product_moments(sigma: sp.Expr, derivative: sp.Expr, order: int, covs: list, powers: list
                              ) -> np.ndarray:
    """E[prod_k sigma(z_k)^i_k sigma'(z_k)^j_k], z ~ N(0, covs[b]), for every b: ``covs`` (d, d)
    matrices of d >= 2 distinct sites, ``powers`` their (i_k, j_k), by the trapezoid rule of ``order``
    points per whitened coordinate with the last factor tabulated (as :func:`product_moment`)."""
    import jax.numpy as jnp

    from derive.backends.precision import x64

    out = np.empty(len(covs))
    by_size: dict = {}
    for b, cov in enumerate(covs):
        by_size.setdefault(len(cov), []).append(b)
    with x64():
        for d, items in by_size.items():
            program = _program(sigma, derivative, d, order)
            for start in range(0, len(items), CHUNK):
                part = items[start:start + CHUNK]
                roots = np.tile(np.eye(d), (CHUNK, 1, 1))
                pw = np.zeros((CHUNK, d, 2), dtype=np.int32)
                for row, b in enumerate(part):
                    roots[row] = _root(np.asarray(covs[b], dtype=float))
                    pw[row] = powers[b]
                out[part] = np.asarray(program(jnp.asarray(roots), jnp.asarray(pw), len(part)))[:len(part)]
    return out


__all__ = ["trapezoid_product_moments", "worth_compiling"]
