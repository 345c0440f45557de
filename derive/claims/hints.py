"""Hints for a wrong claim, read off the numbers: a constant factor, a sign, a missing or extra term, or a
disagreement confined to an edge of the domain."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import sympy as sp

from derive.claims.numeric import FLOOR, evaluate_claim
from derive.claims.quantities import Quantity
from derive.core import symbols as S
from derive.symbolic.quadrature import GaussianExpectation

# ----------------------------------------------------------------------------------------------
# Hints

def _nice(x: float) -> str:
    """A short exact-looking form of a number: 2, 1/2, -1, pi/2, 1/(2*pi), else 6 digits."""
    if not math.isfinite(x):
        return str(x)
    for cand in (sp.nsimplify(x, rational=True, tolerance=1e-9), sp.nsimplify(x, [sp.pi], tolerance=1e-9)):
        if cand.is_number and abs(float(cand) - x) <= 1e-9 * max(1.0, abs(x)) and len(str(cand)) <= 12:
            return str(cand)
    return f"{x:.6g}"


def _constant(values: list[float], rtol: float = 1e-7) -> float | None:
    """The common value of ``values`` if they agree to ``rtol``, else None."""
    arr = np.asarray([v for v in values if math.isfinite(v)])
    if len(arr) < 3:
        return None
    mid = float(np.median(arr))
    if np.all(np.abs(arr - mid) <= rtol * max(abs(mid), 1e-300)):
        return mid
    return None


def _terms(engine: sp.Expr) -> list[sp.Expr]:
    e = sp.expand(engine, deep=False, power_base=False, power_exp=False, log=False, multinomial=False)
    return list(sp.Add.make_args(e))


def _real_part(v, scale) -> float | None:
    """A term's value as a float; an imaginary part from rounding (tiny against ``scale``) is dropped."""
    if v is None:
        return None
    if isinstance(v, mpmath.mpc):
        if abs(v.imag) > mpmath.mpf(10) ** -20 * (abs(scale) + mpmath.mpf(10) ** -300):
            return None
        v = v.real
    return float(v)


def _split(records: list[dict], tol: float, coordinate) -> tuple[float, float] | None:
    """(largest value where the claim agrees, smallest where it does not) if the coordinate separates
    agreement (below) from disagreement (above), and the claim agrees on part of the interior."""
    good = [rec for rec in records if rec["rel"] <= tol]
    bad = [coordinate(rec) for rec in records if rec["rel"] > tol]
    if len(good) < 3 or not bad or not any(rec["point"].region == "interior" for rec in good):
        return None
    top = max(coordinate(rec) for rec in good)
    return (top, min(bad)) if top < min(bad) else None


def _region_hint(records: list[dict], tol: float, q: Quantity) -> str | None:
    """Where the disagreement lives, when one coordinate separates it from agreement."""
    def ks(rec):
        vals = rec["point"].values
        return [float(vals[k]) for k in (S.K, S.K11, S.K22) if k in vals]

    cases = [(lambda rec: -min(ks(rec)), "as K -> 0", "K >= {a:.3g}", "K <= {b:.3g}", -1),
             (lambda rec: max(ks(rec)), "at large K", "K <= {a:.3g}", "K >= {b:.3g}", 1)]
    if q.two_input:
        cases = [(lambda rec: abs(rec["point"].rho), "near rho -> +-1", "|rho| <= {a:.6g}",
                  "|rho| >= {b:.6g}", 1),
                 (lambda rec: rec["point"].rho, "near rho -> 1", "rho <= {a:.6g}", "rho >= {b:.6g}", 1),
                 (lambda rec: -rec["point"].rho, "near rho -> -1", "rho >= {a:.6g}", "rho <= {b:.6g}", -1),
                 *cases]
    for coord, where, good, bad, sign in cases:
        cut = _split(records, tol, coord)
        if cut:
            a, b = sign * cut[0], sign * cut[1]
            return f"differs only {where}: agrees for {good.format(a=a)}, not for {bad.format(b=b)}"
    return None


def hint(numeric: dict, engine: sp.Expr, q: Quantity, symbolic: dict | None = None) -> str | None:
    """What the disagreement looks like, from the numbers: factor, sign, missing term, region; and the
    symbolic residual claim - derivation when it is short."""
    residual_note = None
    if symbolic and symbolic.get("residual") not in (None, "0") and len(symbolic["residual"]) <= 120:
        resid = symbolic["residual"]
        extra = (" (rho = K12/sqrt(K11*K22), theta = acos(rho))"
                 if q.two_input and ("rho" in resid or "theta" in resid) else "")
        residual_note = f"claim - derivation = {resid}{extra}"
    if numeric.get("result") != "not-equal":
        return residual_note
    records = []
    for rec in numeric.get("records", []):
        c = _real_part(rec["claim"], rec["engine"])
        if c is not None:
            records.append({**rec, "claim": mpmath.mpf(c) if not isinstance(rec["claim"], mpmath.mpf)
                            else rec["claim"]})
    if not records:
        return residual_note
    scale = FLOOR * float(sorted(abs(rec["engine"]) for rec in records)[len(records) // 2]) + 1e-300
    tol = numeric["tolerance"]
    notes: list[str] = []
    big = [rec for rec in records if abs(rec["engine"]) > 1e-8 * max(abs(x["engine"]) for x in records)]
    ratio = _constant([float(rec["claim"] / rec["engine"]) for rec in big])
    if ratio is not None and abs(ratio - 1) > 1e-6:
        if abs(ratio + 1) < 1e-9:
            notes.append("the claim has the wrong sign (claim = -derivation everywhere)")
        else:
            notes.append(f"off by a constant factor {_nice(ratio)} (claim = {_nice(ratio)} x derivation "
                         "at every point)")
    diffs = [float(rec["claim"] - rec["engine"]) for rec in records]
    if not notes:
        const = _constant(diffs)
        if const is not None:
            notes.append(f"claim - derivation = {_nice(const)} at every point: a constant term is wrong or "
                         "missing")
    if not notes and engine.is_Add and not engine.has(GaussianExpectation):
        terms = _terms(engine)
        if len(terms) > 1:
            for t in terms:
                tv = [_real_part(evaluate_claim(t, rec["point"]), rec["engine"]) for rec in records]
                if any(v is None for v in tv):
                    continue
                for factor, what in ((-1.0, "is missing from the claim"),
                                     (-2.0, "has the wrong sign in the claim"),
                                     (1.0, "appears twice in the claim")):
                    if all(abs(d - factor * v) <= 1e-9 * max(abs(d), abs(v), abs(float(rec["engine"])), scale)
                           for d, v, rec in zip(diffs, tv, records)):
                        notes.append(f"the derivation's term {t} {what}")
                        break
                if notes:
                    break
    if not notes:
        for v in q.variables:
            vals = [float(rec["point"].values[v]) for rec in records]
            pairs = [(d, x) for d, x in zip(diffs, vals) if abs(x) > 1e-12]
            c = _constant([d / x for d, x in pairs])
            if c is not None and c != 0:
                notes.append(f"claim - derivation = {_nice(c)}*{v} at every point: a term in {v} is wrong "
                             "or missing")
                break
    if not notes:
        region = _region_hint(records, tol, q)
        if region:
            notes.append(region)
    if not notes and numeric["max_rel_error"] < 1e-3:
        digits = int(-math.log10(max(numeric["max_rel_error"], 1e-30)))
        notes.append(f"agrees to about {digits} digits only: a rounded constant or an approximation?")
    if residual_note:
        notes.append(residual_note)
    return "; ".join(notes) if notes else None


