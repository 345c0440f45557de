"""Elementwise JAX helpers that stay finite, with defined gradients, at the edge of their domain.

Kernel recursions evaluate square roots and inverse cosines exactly where they are singular: on the
diagonal of a Gram matrix rho = K12 / sqrt(K11 K22) is 1, for antipodal inputs it is -1, and
sqrt(K11 K22 - K12^2) vanishes in both cases. Rounding can push the arguments a hair outside the
domain, which turns values into NaN, and the derivatives there are infinite, which turns gradients
into NaN (inf * 0) even where the derivative of the whole expression is finite. These helpers keep
each hazard in one named place instead of clips sprinkled through formulas; the idea and the
conventions follow Neural Tangents (``neural_tangents/_src/stax/elementwise.py``, ``_sqrt`` and
``_arccos``/``_arcsin`` there).

Convention: at and beyond the boundary the value is the boundary value and the derivative is 0.
Where a kernel formula pairs two singular terms whose infinite parts cancel (the arc-cosine kernel,
Cho & Saul 2009: sqrt(1 - rho^2) against rho * arccos(rho)), zeroing both gives the correct finite
limit of the whole derivative, e.g. d<relu relu>_K / dK12 -> 1/2 at rho = 1, which is
<step step>_K there (Price's theorem, R. Price 1958: d<f(z1) g(z2)> / dK12 = <f'(z1) g'(z2)>).

Every helper is self-contained (it uses only ``jax`` and ``jax.numpy``) so that
:func:`derive.backends.codegen.to_source` can copy its source into a standalone module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["safe_sqrt", "safe_arccos", "safe_arcsin", "fast_arccos", "fast_arcsin",
           "fast_sqrt_one_minus_square", "covariance_floor", "clamp_covariance"]


@jax.custom_jvp
def safe_sqrt(x):
    """sqrt(max(x, 0)); its derivative is 1 / (2 sqrt(x)) for x > 0 and 0 for x <= 0.

    The derivative at 0 is infinite; 0 is Neural Tangents' convention (``_sqrt``), which keeps
    gradients of expressions such as sqrt(K11 K22 - K12^2) finite at rho = +-1.
    """
    return jnp.sqrt(jnp.maximum(x, 0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = safe_sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, dx / (2 * jnp.where(positive, y, 1)), 0)


@jax.custom_jvp
def safe_arccos(x):
    """arccos(clip(x, -1, 1)); derivative -1 / sqrt(1 - x^2) on (-1, 1) and 0 elsewhere, +-1 included.

    Rounding can give |rho| = 1 + eps on a Gram diagonal, where plain arccos is NaN.
    """
    return jnp.arccos(jnp.clip(x, -1, 1))


@safe_arccos.defjvp
def _safe_arccos_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    inside = jnp.abs(x) < 1
    x_in = jnp.where(inside, x, 0)
    return safe_arccos(x), jnp.where(inside, -dx / jnp.sqrt(1 - x_in * x_in), 0)


@jax.custom_jvp
def safe_arcsin(x):
    """arcsin(clip(x, -1, 1)); derivative 1 / sqrt(1 - x^2) on (-1, 1) and 0 elsewhere, +-1 included.

    The erf kernel (Williams 1997) is (2/pi) arcsin(2 K12 / sqrt((1 + 2 K11)(1 + 2 K22))), whose
    argument reaches +-1 only in the limit K -> infinity but can round past it.
    """
    return jnp.arcsin(jnp.clip(x, -1, 1))


@safe_arcsin.defjvp
def _safe_arcsin_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    inside = jnp.abs(x) < 1
    x_in = jnp.where(inside, x, 0)
    return safe_arcsin(x), jnp.where(inside, dx / jnp.sqrt(1 - x_in * x_in), 0)


#: Coefficients c_0..c_12 of P(t) in asin(y) = y + y t P(t), t = y^2, on 0 <= y <= 1/2: the degree-12
#: polynomial interpolating (asin(sqrt t) / sqrt t - 1) / t at the 13 Chebyshev points of [0, 1/4],
#: computed with mpmath at 50 digits (tests/test_evaluate.py re-derives them). With the reduction
#: below it gives arccos within 1 ulp and arcsin within 2 ulp on [-1, 1] in float64.
ASIN_COEFFICIENTS = (
    0.16666666666666669, 0.07499999999998433, 0.04464285714635543, 0.030381944138531247,
    0.02237217294214989, 0.017352392720869973, 0.013971212973552933, 0.011479177415184906,
    0.01032281435018578, 0.005457506718640358, 0.01740087944269402, -0.014851887071247204,
    0.028757851367421566,
)


#: Coefficients of Q(t) ~ sqrt(1 - t) on 0 <= t <= 1/4, built like :data:`ASIN_COEFFICIENTS` (degree
#: 12, Chebyshev points); within 0.6 ulp.
SQRT_ONE_MINUS_COEFFICIENTS = (
    1.0, -0.4999999999999815, -0.1250000000041244, -0.06249999963931342, -0.0390625163329017,
    -0.02734331164089207, -0.020515325325567758, -0.016027596302914372, -0.01375441009387522,
    -0.007446828865423663, -0.021194963521473254, 0.017190548009281534, -0.034308838583332474,
)


def _reduce(x):
    """(y, t, |x| > 1/2) for |x| <= 1: y = |x|, t = x^2 if |x| <= 1/2, else y = sqrt((1 - |x|) / 2),
    t = y^2 (Cephes, fdlibm). 1 - |x| is exact there (Sterbenz), so values near |x| = 1 keep full
    relative accuracy."""
    a = jnp.minimum(jnp.abs(x), 1)
    large = a > 0.5
    t = jnp.where(large, (1 - a) * 0.5, a * a)
    y = jnp.where(large, jnp.sqrt(t), a)  # sqrt only of t >= 0; its derivative is never taken
    return y, t, large


def _horner(coefficients, t):
    p = coefficients[-1]
    for c in coefficients[-2::-1]:
        p = p * t + c
    return p


def _asin_reduced(x):
    """(asin(y), |x| > 1/2) with y from :func:`_reduce`: asin|x| = asin(y) or pi/2 - 2 asin(y)."""
    y, t, large = _reduce(x)
    return y + y * t * _horner(ASIN_COEFFICIENTS, t), large


@jax.custom_jvp
def fast_arccos(x):
    """arccos(clip(x, -1, 1)) by one polynomial and one square root (vectorises, unlike libm's acos).

    acos(x) = pi/2 - asin(x) for |x| <= 1/2; 2 asin(y) for x > 1/2 and pi - 2 asin(y) for x < -1/2,
    y = sqrt((1 - |x|) / 2). Accurate to 1 ulp in float64; derivative as :func:`safe_arccos`.
    """
    s, large = _asin_reduced(x)
    negative = x < 0
    near = jnp.where(negative, jnp.pi - 2 * s, 2 * s)
    middle = jnp.pi / 2 - jnp.where(negative, -s, s)
    return jnp.where(large, near, middle)


@fast_arccos.defjvp
def _fast_arccos_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    inside = jnp.abs(x) < 1
    x_in = jnp.where(inside, x, 0)
    return fast_arccos(x), jnp.where(inside, -dx / jnp.sqrt(1 - x_in * x_in), 0)


@jax.custom_jvp
def fast_arcsin(x):
    """arcsin(clip(x, -1, 1)) by the reduction of :func:`fast_arccos`; within 2 ulp in float64.
    Derivative as :func:`safe_arcsin`."""
    s, large = _asin_reduced(x)
    magnitude = jnp.where(large, jnp.pi / 2 - 2 * s, s)
    return jnp.where(x < 0, -magnitude, magnitude)


@fast_arcsin.defjvp
def _fast_arcsin_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    inside = jnp.abs(x) < 1
    x_in = jnp.where(inside, x, 0)
    return fast_arcsin(x), jnp.where(inside, dx / jnp.sqrt(1 - x_in * x_in), 0)


@jax.custom_jvp
def fast_sqrt_one_minus_square(x):
    """sqrt(1 - x^2) for |x| <= 1 (0 beyond) without a square root of its own: Q(x^2) for |x| <= 1/2
    and 2 y Q(y^2) for |x| > 1/2 (y of :func:`fast_arccos`, sqrt(1 - x^2) = 2 y sqrt(1 - y^2)), Q(t)
    ~ sqrt(1 - t). Next to :func:`fast_arccos` of the same x the reduction is shared once compiled
    (arc-cosine kernels use both). Within 2 ulp; derivative -x / sqrt(1 - x^2), 0 at |x| >= 1.
    """
    y, t, large = _reduce(x)
    q = _horner(SQRT_ONE_MINUS_COEFFICIENTS, t)
    return jnp.where(large, 2 * y * q, q)


@fast_sqrt_one_minus_square.defjvp
def _fast_sqrt_one_minus_square_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    inside = jnp.abs(x) < 1
    x_in = jnp.where(inside, x, 0)
    return fast_sqrt_one_minus_square(x), jnp.where(inside, -x_in * dx / jnp.sqrt(1 - x_in * x_in), 0)


def covariance_floor(dtype) -> float:
    """Smallest variance kept by :func:`clamp_covariance`: the fourth root of the smallest normal number.

    Products of up to four variances at the floor (K11 K22, K12^2, K11 K22 K12 ...) are still
    normal numbers; XLA flushes subnormals to zero on CPU and GPU, which would otherwise turn
    K11 K22 - K12^2 or rho = K12 / sqrt(K11 K22) into 0 / 0. About 1.2e-77 in float64 and
    3.3e-10 in float32.
    """
    return float(np.finfo(dtype).tiny ** 0.25)


def clamp_covariance(K11, K12, K22, floor: float | None = None):
    """Project a 2x2 covariance onto the valid set before a two-input kernel map is applied.

    Returns (max(K11, floor), clip(K12, -b, b), max(K22, floor)) with b = sqrt(K11' K22') computed
    from the floored variances, so that |rho| <= 1 and no variance is 0. The floor defaults to
    :func:`covariance_floor` of the inputs' dtype; a zero input with C_b = 0 (K -> 0) then gives
    finite values instead of 0 / 0. On a Gram diagonal (K12 = K11 = K22 = K) the result is
    exactly (K, K, K) because sqrt(K * K) == K in IEEE arithmetic.
    """
    dtype = jnp.result_type(K11, K12, K22)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)
    if floor is None:
        floor = covariance_floor(dtype)
    K11 = jnp.maximum(jnp.asarray(K11, dtype), floor)
    K22 = jnp.maximum(jnp.asarray(K22, dtype), floor)
    bound = jnp.sqrt(K11 * K22)
    K12 = jnp.clip(jnp.asarray(K12, dtype), -bound, bound)
    return K11, K12, K22
