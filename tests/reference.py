"""An independent high-precision reference for Gaussian expectations, in mpmath only.

    expect1(f, K)             = E[f(z)],        z ~ N(0, K)
    expect2(f, K11, K12, K22) = E[f(z1, z2)],   (z1, z2) ~ N(0, [[K11, K12], [K12, K22]])

``f`` is a plain Python callable on mpmath numbers (for instance ``sp.lambdify(..., "mpmath")``);
the caller names the points where it has kinks or jumps. Nothing here imports the engine, which
reduces integrands symbolically (Wick, Stein, tilting, arc-cosine kernels, ...) and falls back to a
double-precision trapezoidal grid; everything here is numerical quadrature at 25 digits with
adaptive error control, in coordinates chosen so that the integrand is smooth on every panel.

* One input: z = sqrt(K) x, x standard normal, over x in [-13, 13] (the window grows while the
  integrand at its ends still matters, for tilted integrands such as exp(b z)), in panels a few
  standard deviations wide split at the kinks, each by nested Fejer rules (below).
* Two inputs, smooth integrands: z1 = sqrt(K11) x, z2 = sqrt(K22) (rho x + sqrt(1 - rho^2) y) with
  x, y independent standard normals; nested trapezoidal rules in y (inner) and x (outer), which
  converge geometrically for Gaussian-weighted integrands analytic in a strip. As rho -> +-1 the
  inner integrand only gets smoother.
* Two inputs with kinks on the lines z1 = k or z2 = k (ReLU, step, sign, |z|, ...): polar
  coordinates x = r cos(phi), y = r sin(phi), theta = atan2(sqrt(K11 K22 - K12^2), K12),

      z1 = sqrt(K11) r cos(phi),   z2 = sqrt(K22) r cos(phi - theta),
      E[f] = (1/2pi) int_0^2pi dphi int_0^inf r exp(-r^2/2) f(z1, z2) dr.

  Kinks through the origin sit at the fixed angles phi = pi/2, 3pi/2, theta +- pi/2, which bound
  the angular panels, so every panel is smooth; along a ray a piecewise-polynomial integrand is a
  single polynomial, which the Gauss rule of the weight r exp(-r^2/2) integrates exactly (other
  rays go to Fejer panels in r). Shifted kinks z_i = k become radial breakpoints. Nothing
  degenerates as rho -> +-1: theta, computed from K11 K22 - K12^2 in exact arithmetic, only
  shrinks two panels. Exactly rho = +-1 is the 1-D integral E[f(z1, +-sqrt(K22/K11) z1)].
* Fejer rules of the second kind (7, 15, 31, ... interior Chebyshev points, nested) never sample a
  panel's endpoints, so a step sitting on a breakpoint is never evaluated there. Every rule is
  refined until :func:`_converged` says it is accurate to ``tol`` times E|f| (estimated on a coarse
  grid); a panel that does not converge is bisected, and the reference raises
  :class:`ReferenceError` rather than return a number it could not verify.

Accuracy: ``tol`` = 1e-14 of E|f| by default; against exact values (Wick moments, orthant
probabilities, arc-cosine kernels) and runs at tol = 1e-20 the errors seen are below 4e-15 of E|f|
(tests/test_expectations.py checks the reference itself). The engine is held to 1e-10.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import mpmath as mp

#: Working precision (decimal digits) of every reference computation.
DPS = 25
#: Default accuracy target, relative to a crude estimate of E|f|.
TOL = 1e-14
#: Nested Fejer levels per panel: 2^KMIN - 1 points first, at most 2^KMAX - 1 before bisecting.
KMIN, KMAX = 3, 7
#: Deepest bisection of a panel that does not converge; beyond it the reference refuses to answer.
MAX_DEPTH = 12

#: Panel boundaries in standard deviations (one input) and in the radius (two inputs).
X_POINTS = (-13, -9, -6, -3.5, -1.5, 0, 1.5, 3.5, 6, 9, 13)
R_POINTS = (0, 1.5, 3, 5, 8, 13)
CRUDE_R_POINTS = (0, 1.5, 3, 5, 8)
#: Half-width (standard deviations) of the Cartesian trapezoidal grid, and its finest step 2^-levels.
X_HALF_WIDTH, TRAPEZOID_LEVELS = 10, 8
#: Orders of the two Gauss rules tried first along each ray of the polar grid (see _maxwell).
MAXWELL_ORDERS = (8, 16)
#: How far the window may grow for integrands tilted towards large |z| (e.g. exp(b z)).
GROW_STEP, MAX_EXTENT = 6, 80


class ReferenceError(ArithmeticError):
    """The reference could not reach its accuracy target (the caller's integrand is too rough)."""


# ------------------------------------------------------------------------------------- 1-D rules


@lru_cache(maxsize=None)
def _fejer(k: int) -> tuple[tuple, tuple]:
    """Nodes and weights of the Fejer rule of the second kind, 2^k - 1 points on (-1, 1).

    x_j = cos(j pi / N), w_j = (4 / N) sin(t_j) sum_{m=1}^{N/2} sin((2m - 1) t_j) / (2m - 1),
    t_j = j pi / N, j = 1 .. N - 1 (Waldvogel 2006, BIT 46, eq. 2.6). Nested: the even j are the
    previous level's nodes.
    """
    with mp.workdps(DPS + 10):
        n = 2 ** k
        nodes, weights = [], []
        for j in range(1, n):
            t = j * mp.pi / n
            s = mp.fsum(mp.sin((2 * m - 1) * t) / (2 * m - 1) for m in range(1, n // 2 + 1))
            nodes.append(mp.cos(t))
            weights.append(4 * mp.sin(t) * s / n)
    return tuple(nodes), tuple(weights)


def _converged(diff, prev_diff, eps) -> bool:
    """Whether a level whose difference from the previous level is ``diff`` is accurate to ``eps``.

    Either the difference itself is below ``eps``, or the differences shrink and the next one,
    extrapolated as if they kept shrinking by the same ratio, d_k^2 / d_(k-1), is below ``eps``.
    The rules here converge faster than that once resolved (their errors about square with each
    level), so the estimate is conservative; extrapolating with the squaring itself,
    d_k^3 / d_(k-1)^2, was seen to be too optimistic before the asymptotic regime (1e-13 off).
    """
    if diff <= eps:
        return True
    return prev_diff is not None and diff < prev_diff / 4 and diff * diff <= eps * prev_diff / 4


def _panel(g: Callable, a, b, eps, depth: int = 0):
    """int_a^b g by nested Fejer rules, accepted by :func:`_converged`; bisects when 2^KMAX - 1
    points do not reach ``eps``."""
    c, h = (a + b) / 2, (b - a) / 2
    x, w = _fejer(KMIN)
    vals = [g(c + h * t) for t in x]
    q = h * mp.fsum(wi * vi for wi, vi in zip(w, vals))
    prev_diff = None
    for k in range(KMIN + 1, KMAX + 1):
        x, w = _fejer(k)
        new = [None] * len(x)
        new[1::2] = vals  # the previous level's nodes are the odd positions (even j)
        for i in range(0, len(x), 2):
            new[i] = g(c + h * x[i])
        vals = new
        q_next = h * mp.fsum(wi * vi for wi, vi in zip(w, vals))
        diff = abs(q_next - q)
        if _converged(diff, prev_diff, eps):
            return q_next
        q, prev_diff = q_next, diff
    if depth >= MAX_DEPTH:
        raise ReferenceError(f"panel [{mp.nstr(a, 8)}, {mp.nstr(b, 8)}] did not converge to "
                             f"{mp.nstr(eps, 3)}")
    return _panel(g, a, c, eps / 2, depth + 1) + _panel(g, c, b, eps / 2, depth + 1)


def _integrate(g: Callable, points: Sequence, eps, grow_left: bool = True, grow_right: bool = True):
    """int g over the panels between sorted ``points``, widening the window while its ends matter.

    The window grows by GROW_STEP on a side while g at that edge, times GROW_STEP, exceeds ``eps``
    (integrands tilted towards large |z|, such as exp(b z)).
    """
    panels = [(a, b) for a, b in zip(points, points[1:]) if b > a]
    eps = eps / len(panels)  # the panels' errors add up
    total = mp.fsum(_panel(g, a, b, eps) for a, b in panels)
    for grow, sign in ((grow_left, -1), (grow_right, 1)):
        edge = points[0] if sign < 0 else points[-1]
        while grow and abs(g(edge)) * GROW_STEP > eps:
            nxt = edge + sign * GROW_STEP
            if abs(nxt) > MAX_EXTENT:
                raise ReferenceError("integrand does not decay within the reference's window")
            total += _panel(g, min(edge, nxt), max(edge, nxt), eps)
            edge = nxt
    return total


def _breakpoints(base: Sequence, extra: Sequence = ()) -> list:
    """Sorted, de-duplicated panel boundaries: ``base`` plus the ``extra`` inside its span."""
    lo, hi = base[0], base[-1]
    pts = {mp.mpf(p) for p in base}
    pts.update(mp.mpf(p) for p in extra if lo < p < hi)
    return sorted(pts)


# ----------------------------------------------------------------------------------- one input


_GAUSS_WEIGHTS: dict = {}


def _gauss_weight(x):
    """exp(-x^2/2) / sqrt(2 pi), memoised: most panels and their nodes recur from call to call."""
    w = _GAUSS_WEIGHTS.get(x)
    if w is None:
        if len(_GAUSS_WEIGHTS) > 200_000:
            _GAUSS_WEIGHTS.clear()
        w = _GAUSS_WEIGHTS[x] = mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)
    return w


def _std_normal_integral(h: Callable, kinks_x: Sequence, tol: float):
    """E[h(x)], x ~ N(0, 1), with ``h`` possibly non-smooth at ``kinks_x``."""
    points = _breakpoints(X_POINTS, kinks_x)

    def g(x):
        return _gauss_weight(x) * h(x)

    scale = _crude_scale(lambda x: _gauss_weight(x) * abs(h(x)), points)
    eps = tol * scale if scale > 0 else mp.mpf(10) ** (-3 * DPS)
    return _integrate(g, points, eps)


def _crude_scale(g: Callable, points: Sequence):
    """A rough int |g| (three points per panel), only to set the absolute accuracy target."""
    x, w = _fejer(2)
    total = mp.mpf(0)
    for a, b in zip(points, points[1:]):
        c, h = (a + b) / 2, (b - a) / 2
        total += h * mp.fsum(wi * g(c + h * t) for wi, t in zip(w, x))
    return total


def expect1(f: Callable, K, *, kinks: Sequence = (0,), tol: float = TOL) -> mp.mpf:
    """E[f(z)] for z ~ N(0, K), K >= 0.

    Args:
        f: callable on mpmath numbers.
        K: the variance (a float is taken as the exact binary number it is).
        kinks: points z where f or its derivatives jump (steps, ReLU kinks); default 0.
        tol: accuracy target relative to a crude E|f(z)|.
    """
    with mp.workdps(DPS):
        K = mp.mpf(K)
        if K < 0:
            raise ValueError(f"variance must be non-negative, got {K}")
        if K == 0:
            return +f(mp.mpf(0))
        s = mp.sqrt(K)
        return _std_normal_integral(lambda x: f(s * x), [mp.mpf(k) / s for k in kinks], tol)


# ---------------------------------------------------------------------------------- two inputs


def expect2(f, K11, K12, K22, *, kinks1: Sequence = (0,), kinks2: Sequence = (0,), tol: float = TOL,
            method: str | None = None) -> mp.mpf:
    """E[f(z1, z2)] for (z1, z2) ~ N(0, [[K11, K12], [K12, K22]]), positive semi-definite.

    Args:
        f: callable of (z1, z2) on mpmath numbers, or a pair (f1, f2) for the product f1(z1) f2(z2)
            (cheaper: f1 is then evaluated once per outer node).
        K11, K12, K22: covariance entries (floats are taken as the exact binary numbers they are).
        kinks1, kinks2: values of z1 (resp. z2) on whose lines f is not smooth; default 0.
        tol: accuracy target relative to E|f|.
        method: "polar" or "cartesian" to force one; by default polar coordinates when there are
            kinks and the Cartesian trapezoidal rule for smooth integrands.
    """
    pair = None
    if isinstance(f, tuple):
        pair = f

        def f(a, b):
            return pair[0](a) * pair[1](b)

    with mp.workdps(DPS):
        K11, K12, K22 = mp.mpf(K11), mp.mpf(K12), mp.mpf(K22)
        if K11 <= 0 or K22 <= 0:
            raise ValueError("expect2 needs K11 > 0 and K22 > 0 (use expect1 for a single variable)")
        with mp.workprec(4 * mp.mp.prec):  # exact for covariance entries given as doubles
            det = K11 * K22 - K12 * K12
        if det < 0 and -det <= 8 * mp.eps * K11 * K22:  # |rho| = 1 up to the inputs' rounding
            det = mp.mpf(0)
        if det < 0:
            raise ValueError(f"covariance is not positive semi-definite: K11 K22 - K12^2 = {mp.nstr(det, 5)}")
        s1, s2 = mp.sqrt(K11), mp.sqrt(K22)
        if det == 0:  # |rho| = 1: z2 = +-sqrt(K22 / K11) z1
            ratio = mp.sign(K12) * s2 / s1
            kinks = [mp.mpf(k) / s1 for k in kinks1] + [mp.mpf(k) / (ratio * s1) for k in kinks2]
            return _std_normal_integral(lambda x: f(s1 * x, ratio * s1 * x), kinks, tol)
        theta = mp.atan2(mp.sqrt(det), K12)
        if method is None:
            method = "polar" if (kinks1 or kinks2) else "cartesian"
        if method == "cartesian":
            if kinks1 or kinks2:
                raise ValueError("the Cartesian trapezoidal rule is for smooth integrands (no kinks)")
            return _cartesian(f, pair, s1, s2, mp.cos(theta), mp.sin(theta), tol)
        if method != "polar":
            raise ValueError(f"unknown method {method!r}")
        return _polar(f, s1, s2, theta, [mp.mpf(k) for k in kinks1], [mp.mpf(k) for k in kinks2], tol)


# ----------------------------------------------------------- smooth integrands: Cartesian grid


def _trapezoid(F: Callable, tol: float, floor=0):
    """(E[v(x)], E[a(x)]) for x ~ N(0, 1), where F(x) returns (v(x), a(x)) and a >= |v| is a scale.

    Trapezoidal rule with the Gaussian weight on a window [-L, L] of step h = 2, 1, 1/2, ...
    (nested: each level adds the midpoints). For integrands analytic in a strip |Im x| < d the
    error falls like exp(-2 pi d / h) (Trefethen & Weideman 2014, SIAM Review 56, sec. 5), so each
    halving about squares it and :func:`_converged` applies. L starts at 10 standard deviations and
    grows while the integrand at the window's ends exceeds the accuracy target, which is ``tol``
    times E[a] (from the coarsest grid) or the absolute ``floor``, whichever is larger.
    """
    values: dict = {}

    def at(x):
        v = values.get(x)
        if v is None:
            v = values[x] = F(x)
        return v

    def weighted(x):
        v, a = at(x)
        w = _gauss_weight(x)
        return w * v, w * a

    half = X_HALF_WIDTH  # an even number: the coarsest grid has step 2
    scale = mp.fsum(weighted(mp.mpf(j))[1] for j in range(-half, half + 1, 2)) * 2
    eps = max(tol * scale, floor) if scale > 0 or floor > 0 else mp.mpf(10) ** (-3 * DPS)
    while max(abs(weighted(mp.mpf(x))[0]) for x in (-half, half)) > eps / 1000:
        half += 2  # widen the window while its ends still matter
        if half > MAX_EXTENT:
            raise ReferenceError("integrand does not decay within the reference's window")
    total = mp.fsum(weighted(mp.mpf(j))[0] for j in range(-half, half + 1, 2))
    q, prev_diff, n = total * 2, None, mp.mpf(1) / 2  # n: points per unit length
    for _ in range(TRAPEZOID_LEVELS):
        n *= 2  # halve the step: add the midpoints
        if n == 1:
            total += mp.fsum(weighted(mp.mpf(j))[0] for j in range(-half + 1, half, 2))
        else:
            m = int(n)
            total += mp.fsum(weighted(mp.mpf(j) / m)[0] for j in range(-half * m + 1, half * m, 2))
        q_next = total / n
        diff = abs(q_next - q)
        if _converged(diff, prev_diff, eps):
            return q_next, scale
        q, prev_diff = q_next, diff
    raise ReferenceError(f"trapezoidal rule did not converge to {mp.nstr(eps, 3)}")


def _cartesian(f: Callable, pair, s1, s2, rho, c, tol: float):
    """E[f(z1, z2)] with z1 = s1 x, z2 = s2 (rho x + c y): outer trapezoid in x, inner in y.

    Each inner integral is computed to ``tol`` times the larger of its own E_y|f| and a crude
    global E|f| (divided by |f1(z1)| for a product), so the outer sum's error stays about ``tol``
    E|f| even where the integrand is only known to working precision (1 + erf(z) in the far tail).
    """
    if pair is not None:
        f1, f2 = pair
    sd = s2 * c
    grid = [mp.mpf(j) for j in range(-X_HALF_WIDTH, X_HALF_WIDTH + 1, 2)]
    crude = 4 * mp.fsum(_gauss_weight(x) * _gauss_weight(y) * abs(f(s1 * x, s2 * rho * x + sd * y))
                        for x in grid for y in grid)
    tiny = mp.mpf(10) ** (-3 * DPS)

    def with_abs(v):
        return v, abs(v)

    def inner(x):
        z1, mean = s1 * x, s2 * rho * x
        if pair is None:
            return _trapezoid(lambda y: with_abs(f(z1, mean + sd * y)), tol, tol * crude)
        v1 = f1(z1)
        if v1 == 0:
            return mp.mpf(0), mp.mpf(0)
        g, a = _trapezoid(lambda y: with_abs(f2(mean + sd * y)), tol, tol * crude / max(abs(v1), tiny))
        return v1 * g, abs(v1) * a

    return _trapezoid(inner, tol, tol * crude)[0]


# ------------------------------------------------------------ kinked integrands: polar grid


def _polar(f: Callable, s1, s2, theta, kinks1: list, kinks2: list, tol: float):
    """E[f(z1, z2)] in polar coordinates (module docstring), kinks on the lines z_i = k."""
    two_pi = 2 * mp.pi
    # Rays along which z_i vanishes: kinks at z_i = 0 lie on them, and a kink line z_i = k != 0
    # recedes to infinity there (the radial integral then varies like exp(-c / cos^2), smooth but
    # not analytic), so any kink in z_i makes them panel boundaries.
    kink_angles = set()
    if kinks1:
        kink_angles |= {mp.pi / 2, 3 * mp.pi / 2}
    if kinks2:
        kink_angles |= {(theta + mp.pi / 2) % two_pi, (theta + 3 * mp.pi / 2) % two_pi}
    # The ray through the corner where two kink lines cross switches which one bounds the radial
    # interval: the angular integrand has a kink there.
    for k1 in kinks1:
        for k2 in kinks2:
            if k1 != 0 or k2 != 0:
                x = k1 / s1
                y = (k2 / s2 - mp.cos(theta) * x) / mp.sin(theta)
                kink_angles.add(mp.atan2(y, x) % two_pi)
    shifted1 = [k for k in kinks1 if k != 0]
    shifted2 = [k for k in kinks2 if k != 0]
    r_base = [mp.mpf(p) for p in R_POINTS]
    r_crude = [mp.mpf(p) for p in CRUDE_R_POINTS]

    def ray(phi):
        a1, a2 = s1 * mp.cos(phi), s2 * mp.cos(phi - theta)
        return a1, a2, (lambda r: _radial_weight(r) * f(a1 * r, a2 * r))

    def radial(phi, eps):
        a1, a2, g = ray(phi)
        extra = [k / a1 for k in shifted1 if a1 != 0 and k / a1 > 0]
        extra += [k / a2 for k in shifted2 if a2 != 0 and k / a2 > 0]
        if not extra:
            # Along a ray a piecewise-polynomial integrand is one polynomial: the Gauss rules of
            # the radial weight integrate it exactly. Anything they do not agree on goes to panels.
            coarse, fine = (_gauss_sum(lambda r: f(a1 * r, a2 * r), n) for n in MAXWELL_ORDERS)
            if abs(fine - coarse) <= eps:
                return fine
        return _integrate(g, _breakpoints(r_base, extra), eps, grow_left=False)

    def crude(phi):
        g = ray(phi)[2]
        return _crude_scale(lambda r: abs(g(r)), r_crude)

    if not kink_angles:
        # Smooth along every ray through the origin: the angular integrand is periodic and smooth,
        # and the trapezoidal rule over the full circle converges geometrically.
        scale = _periodic_mean(crude, two_pi, None, levels=1)
        eps = tol * scale if scale > 0 else mp.mpf(10) ** (-3 * DPS)
        return _periodic_mean(lambda phi: radial(phi, eps), two_pi, eps)
    start = min(kink_angles)
    angles = sorted(kink_angles) + [start + two_pi]
    for a, b in list(zip(angles, angles[1:])):
        if b - a > 2 * mp.pi / 3:  # long arcs converge faster in two pieces
            angles.append((a + b) / 2)
    angles.sort()
    scale = _crude_scale(crude, angles) / two_pi
    eps = tol * scale if scale > 0 else mp.mpf(10) ** (-3 * DPS)
    # An error e in every radial integral moves the average over phi by e: one eps for each.
    total = _integrate(lambda phi: radial(phi, eps), angles, eps * two_pi, grow_left=False, grow_right=False)
    return total / two_pi


def _periodic_mean(g: Callable, period, eps, levels: int = 8):
    """(1/period) int_0^period g by the trapezoidal rule, doubling 8 -> 16 -> ... points until
    :func:`_converged`; with ``eps=None``, just the 8-point mean (a crude estimate)."""
    n = 8
    vals = [g(period * j / n) for j in range(n)]
    q = mp.fsum(vals) / n
    if eps is None:
        return q
    prev_diff = None
    for _ in range(levels):
        new = [g(period * (2 * j + 1) / (2 * n)) for j in range(n)]
        vals = [v for pair in zip(vals, new) for v in pair]
        n *= 2
        q_next = mp.fsum(vals) / n
        diff = abs(q_next - q)
        if _converged(diff, prev_diff, eps):
            return q_next
        q, prev_diff = q_next, diff
    raise ReferenceError(f"angular integral did not converge to {mp.nstr(eps, 3)}")


@lru_cache(maxsize=None)
def _maxwell(n: int) -> tuple[tuple, tuple]:
    """Nodes and weights of the n-point Gauss rule for int_0^inf r exp(-r^2/2) g(r) dr.

    Recurrence coefficients from the moments m_k = 2^(k/2) Gamma(k/2 + 1) by Chebyshev's
    algorithm (Gautschi 2004, "Orthogonal Polynomials", sec. 2.1.7), which is ill-conditioned and
    therefore run at 3n + 40 digits; nodes and weights from the Jacobi matrix (Golub & Welsch 1969).
    Exact for g a polynomial of degree < 2n.
    """
    with mp.workdps(3 * n + 40):
        m = 2 * n
        moments = [mp.power(2, mp.mpf(k) / 2) * mp.gamma(mp.mpf(k) / 2 + 1) for k in range(m)]
        alpha, beta = [mp.mpf(0)] * n, [mp.mpf(0)] * n
        alpha[0], beta[0] = moments[1] / moments[0], moments[0]
        sig_prev, sig = [mp.mpf(0)] * m, moments
        for k in range(1, n):
            sig_new = [mp.mpf(0)] * m
            for j in range(k, m - k):
                sig_new[j] = sig[j + 1] - alpha[k - 1] * sig[j] - beta[k - 1] * sig_prev[j]
            alpha[k] = sig_new[k + 1] / sig_new[k] - sig[k] / sig[k - 1]
            beta[k] = sig_new[k] / sig[k - 1]
            sig_prev, sig = sig, sig_new
        jacobi = mp.zeros(n, n)
        for i in range(n):
            jacobi[i, i] = alpha[i]
            if i + 1 < n:
                jacobi[i, i + 1] = jacobi[i + 1, i] = mp.sqrt(beta[i + 1])
        eigenvalues, vectors = mp.eigsy(jacobi)
        nodes = [eigenvalues[i] for i in range(n)]
        weights = [beta[0] * vectors[0, i] ** 2 for i in range(n)]
    with mp.workdps(DPS + 10):
        return tuple(+x for x in nodes), tuple(+w for w in weights)


def _gauss_sum(h: Callable, n: int):
    """int_0^inf r exp(-r^2/2) h(r) dr by the n-point rule of :func:`_maxwell`."""
    nodes, weights = _maxwell(n)
    return mp.fsum(w * h(x) for x, w in zip(nodes, weights))


_RADIAL_WEIGHTS: dict = {}


def _radial_weight(r):
    """r exp(-r^2/2), memoised: the radial panels and their nodes are the same for every angle."""
    w = _RADIAL_WEIGHTS.get(r)
    if w is None:
        if len(_RADIAL_WEIGHTS) > 200_000:
            _RADIAL_WEIGHTS.clear()
        w = _RADIAL_WEIGHTS[r] = r * mp.exp(-r * r / 2)
    return w


__all__ = ["DPS", "TOL", "ReferenceError", "expect1", "expect2"]
