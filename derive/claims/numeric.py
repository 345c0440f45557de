"""The numeric verdict: both sides at 30 digits with mpmath at random points of the domain and at its edges."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp

from derive.claims.budget import Timeout, deadline
from derive.claims.quantities import Quantity
from derive.core import symbols as S
from derive.finite.single import A_, B_, D_, F_, r
from derive.symbolic.quadrature import GaussianExpectation

# ----------------------------------------------------------------------------------------------
# Numeric verdict

#: Relative tolerance between two closed forms evaluated at 30 digits, and against quadrature nodes.
RTOL_EXACT = 1e-15
RTOL_QUADRATURE = 1e-8
#: Values below FLOOR x (median |derivation|) count as zero when forming relative errors: evalf's
#: absolute error after a cancellation (pi - arccos(-1)) is ~1e-26 of the terms, far below it.
FLOOR = 1e-9
DIGITS = 30

_RANGES = {
    S.C_W: (0.2, 3.0), S.C_b: (0.0, 1.0), S.lambda_W: (0.0, 2.0), S.lambda_b: (0.0, 2.0),
    S.Theta: (0.0, 3.0), S.Theta12: (-2.0, 2.0), S.V: (-1.0, 3.0), S.G1: (-2.0, 2.0), A_: (-2.0, 2.0),
    B_: (-2.0, 2.0), D_: (-2.0, 2.0), F_: (-2.0, 2.0), r: (0.25, 4.0),
}


@dataclass
class Point:
    """A point of the domain: its values (SymPy Floats of 40-50 digits) and a region tag."""

    values: dict
    region: str
    rho: float | None = None

    def as_dict(self) -> dict:
        out = {str(k): float(v) for k, v in self.values.items()}
        if self.rho is not None:
            out["rho"] = self.rho
        return out


def _region(ks: Sequence[float], rho: float | None) -> str:
    if rho is not None and rho >= 0.99:
        return "rho -> 1"
    if rho is not None and rho <= -0.99:
        return "rho -> -1"
    if min(ks) < 1e-3:
        return "K -> 0"
    if max(ks) > 1e2:
        return "large K"
    return "interior"


def sample_points(q: Quantity, seed: int = 0, closed_form: bool = True, n_random: int = 36) -> list[Point]:
    """Random points of the domain plus its edges (rho = +-1 and 1 - 1e-10, rho = 0, K -> 0, large K).

    When the derivation needs quadrature, variances stay in [0.05, 10] where its nodes are accurate.
    """
    rng = np.random.default_rng(seed)
    others = [v for v in q.variables if v not in (S.K, S.K11, S.K12, S.K22)]
    lo, hi = (-2.0, 2.0) if closed_form else (math.log10(0.05), 1.0)

    def extra() -> dict:
        out = {}
        for v in others:
            a, b = _RANGES[v]
            val = 0.0 if (v is S.C_b and rng.random() < 0.2) else rng.uniform(a, b)
            out[v] = sp.Float(repr(float(val)), 40)
        return out

    points: list[Point] = []
    if q.two_input:
        cases = []
        for _ in range(n_random):
            k11, k22 = 10 ** rng.uniform(lo, hi, size=2)
            if rng.random() < 0.25:
                rho = float(rng.choice([-1.0, 1.0]) * (1 - 10 ** rng.uniform(-12, -2)))
            else:
                rho = float(rng.uniform(-1, 1))
            cases.append((k11, k22, rho))
        # On the diagonal rho = +-1 the variances are squares of short binary numbers, so that
        # sqrt(K11 K22) = |K12| holds exactly in any precision.
        cases += [(0.25, 0.25, 1.0), (2.25, 2.25, 1.0), (1.0, 1.0, -1.0), (0.9, 2.2, 1 - 1e-10),
                  (2.2, 0.9, -(1 - 1e-10)), (1.3, 0.6, 0.0), (0.8, 0.8, 0.999)]
        if closed_form:
            cases += [(1e-6, 1e-6, 0.5), (1e-6, 1.0, 0.3), (1e4, 1e4, 0.7), (1e3, 1e-2, -0.4),
                      (2.0**-20, 2.0**-20, 1.0), (4096.0, 4096.0, -1.0)]
        for k11, k22, rho in cases:
            # Binary-exact K11, K22 and K12 rounded towards zero, so that K11 K22 - K12^2 >= 0 exactly.
            with mpmath.workdps(60):
                m11, m22 = mpmath.mpf(float(k11)), mpmath.mpf(float(k22))
                if abs(rho) == 1.0 and k11 == k22:
                    k12 = mpmath.mpf(rho) * m11
                else:
                    k12 = mpmath.mpf(rho) * mpmath.sqrt(m11 * m22) * (1 - mpmath.mpf(10) ** -45)
                vals = {S.K11: sp.Float(m11, 50), S.K22: sp.Float(m22, 50), S.K12: sp.Float(k12, 50)}
            points.append(Point({**vals, **extra()}, _region((k11, k22), rho), rho))
    else:
        ks = list(10 ** rng.uniform(lo, hi, size=n_random)) + [1.0, 0.05]
        if closed_form:
            ks += [1e-6, 1e-3, 1e3, 1e4]
        for k in ks:
            points.append(Point({S.K: sp.Float(repr(float(k)), 40), **extra()}, _region((k,), None)))
    return points


def mp_value(value: sp.Expr):
    """An evaluated SymPy number as an mpmath number, or None when it is not a finite number."""
    if not isinstance(value, sp.Basic) or not value.is_number or value.has(GaussianExpectation):
        return None
    try:
        out = value._to_mpmath(DIGITS * 4)
    except (TypeError, ValueError, AttributeError):
        return None
    if not mpmath.isfinite(out):
        return None
    if isinstance(out, mpmath.mpc) and abs(out.imag) <= mpmath.mpf(10) ** (2 - DIGITS) * abs(out.real):
        out = out.real  # rounding in a square root of a vanishing quantity, not a complex value
    return out


#: Seconds one high-precision evaluation may take before the point counts as undefined.
EVAL_SECONDS = 5.0


def evaluate_claim(expr: sp.Expr, point: Point):
    """``expr`` at ``point`` with mpmath: the values go in as 50-digit SymPy Floats (so every node is
    evaluated in 50-digit arithmetic, pure SymPy, no generated code), then ``evalf`` to 30 digits.
    Substituting first is 20x faster than ``evalf(subs=...)`` on large derivations, and as accurate
    here: cancellations such as pi - arccos(-1) leave ~1e-50 instead of ~1e-26."""
    try:
        with deadline(EVAL_SECONDS):
            return mp_value(expr.xreplace(point.values).evalf(DIGITS))
    except Timeout:
        return None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None


def _evaluate_engine(expr: sp.Expr, points: list[Point]) -> list:
    """The derivation at every point: evalf at 30 digits, or float64 quadrature for numeric nodes."""
    if not expr.has(GaussianExpectation):
        return [evaluate_claim(expr, p) for p in points]
    from derive.symbolic.numeric import evaluate
    from derive.symbolic.quadrature import refine_nodes

    variances = sorted({float(v) for p in points for s, v in p.values.items() if s in (S.K, S.K11, S.K22)})
    expr = refine_nodes(expr, (min(variances), 1.0, max(variances)))
    out = []
    for p in points:
        with np.errstate(all="ignore"):
            try:
                v = float(evaluate(expr, {s: float(x) for s, x in p.values.items()}))
            except (ValueError, ZeroDivisionError, OverflowError):
                v = float("nan")
        out.append(mpmath.mpf(v) if math.isfinite(v) else None)
    return out


def format_number(v) -> float | str | None:
    if v is None:
        return None
    if isinstance(v, mpmath.mpc):
        return str(complex(v)) if v.imag != 0 else format_number(v.real)
    f = float(v)
    return f if math.isfinite(f) else mpmath.nstr(v, 15)


def numeric_verdict(claim: sp.Expr, engine: sp.Expr, q: Quantity, seed: int = 0) -> dict:
    """Compare claim and derivation at :func:`sample_points`; relative error |c - e| / max(|c|, |e|, floor)
    with floor = FLOOR x the median |e|."""
    closed = not engine.has(GaussianExpectation)
    points = sample_points(q, seed, closed)
    evs = _evaluate_engine(engine, points)
    cvs = [evaluate_claim(claim, p) for p in points]
    used = [(p, c, e) for p, c, e in zip(points, cvs, evs) if e is not None]
    tol = RTOL_EXACT if closed else RTOL_QUADRATURE
    how = (f"mpmath at {DIGITS} digits" if closed else
           f"claim with mpmath at {DIGITS} digits, derivation by quadrature (float64)")
    if len(used) < 5:
        return {"result": "undecided", "points": len(used), "skipped": len(points) - len(used),
                "max_rel_error": None, "tolerance": tol, "records": [],
                "detail": "the derivation could not be evaluated at enough points of the domain"}
    floor = FLOOR * (sorted(abs(e) for _, _, e in used)[len(used) // 2] + mpmath.mpf(10) ** -300)
    # A claim undefined at a few points (a removable singularity, say 0/0 at rho = 0) is judged on the
    # others; undefined at most points, it is wrong.
    undefined = [p for p, c, _ in used if c is None]
    if len(undefined) <= len(used) // 2:
        used = [(p, c, e) for p, c, e in used if c is not None]
    records = []
    for p, c, e in used:
        if c is None:
            rel = math.inf
        else:
            rel = float(abs(c - e) / max(abs(c), abs(e), floor))
        records.append({"point": p, "claim": c, "engine": e, "rel": rel})
    top = max(rec["rel"] for rec in records)
    # Among the points of (nearly) largest error, show an interior one with a sizeable value.
    worst = max((rec for rec in records if rec["rel"] >= 0.99 * top),
                key=lambda rec: (rec["point"].region == "interior", abs(rec["engine"])))
    ok = top <= tol
    regions = sorted({rec["point"].region for rec in records})
    out = {
        "result": "equal" if ok else "not-equal",
        "points": len(records),
        "skipped": len(points) - len(used),
        "regions": regions,
        "max_rel_error": top,
        "tolerance": tol,
        "worst": {"at": worst["point"].as_dict(), "claim": format_number(worst["claim"]),
                  "derivation": format_number(worst["engine"]), "rel_error": worst["rel"]},
        "records": records,
        "detail": (f"{len(records)} points ({', '.join(regions)}), {how}: max relative error "
                   f"{top:.3g} {'<=' if ok else '>'} tolerance {tol:g}"),
    }
    if undefined and len(undefined) < len(records):
        at = undefined[0].as_dict()
        out["undefined_at"] = [p.as_dict() for p in undefined]
        out["detail"] += (f"; the claim is undefined at {len(undefined)} point(s), e.g. "
                          + ", ".join(f"{k} = {v:.6g}" for k, v in at.items()) + ", which were left out")
    return out


