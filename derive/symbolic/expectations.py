"""The Gaussian expectation engine: <f(z)>_K and <f(z1, z2)>_K in closed form where the rules allow.

An integrand is first put in a canonical form (``Abs``, ``sign``, ``Max``, ``Min`` and reflected
steps become ``Heaviside`` of a positive multiple of the variable; ``sin``, ``cos``, ``sinh``,
``cosh`` become exponentials; ``erfc`` becomes ``1 - erf``) and expanded, so that linearity applies.
Each additive term ``c * z1^p1 z2^p2 * exp(q(z)) * specials`` (specials: ``Heaviside(z_i + s)``,
``erf(c z_i + d)``, ``DiracDelta(z_i + s)``) is then reduced by exact rewrites, each a classical
identity:

* closed-form identities loaded from ``rules/identities`` (arc-cosine kernels of order 0 and 1,
  Cho & Saul 2009; erf-arcsin, Williams 1997; half-space and erf means, ...), tried first;
* exponential tilting / characteristic function: exp(l.z - z^T A z / 2) N(m, K) is proportional to
  N(m', K') with K' = (K^-1 + A)^-1, m' = K' (K^-1 m + l); with complex l this is the
  characteristic function, which closes sin and cos;
* Stein's lemma (Gaussian integration by parts): <z_i F(z)> = sum_j K_ij <d_j F(z)>, which with
  derivatives of steps (Dirac deltas) and of erf (Gaussians) reduces every polynomial factor;
* conditioning on a Dirac delta: <delta(z_i + s) G(z)> = p_i(-s) <G | z_i = -s>;
* Wick/Isserlis for pure polynomials.

A term no rule closes becomes a numeric-quadrature node (:mod:`derive.symbolic.quadrature`) instead of an
error. References: PDLT (Roberts, Yaida & Hanin 2022) ch. 1 and 4; Stein (1981); Price (1958).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import comb, factorial

import sympy as sp

from derive.core import symbols as S
from derive.core.forms import canonical, chunks, linear_in_one
from derive.rules.files import load_identities
from derive.symbolic.quadrature import DEFAULT_TOL, GaussianExpectation, numeric_expectation


class NotClosed(Exception):
    """Raised internally when no rule closes a term; the term goes to quadrature."""


# --------------------------------------------------------------------------------------------
# Terms


@dataclass(frozen=True)
class Special:
    """A non-polynomial factor on one variable: 'step' Heaviside(v + s), 'erf' erf(c (v + s)),
    'delta' DiracDelta(v + s)."""

    kind: str
    var: sp.Symbol
    c: sp.Expr
    s: sp.Expr


@dataclass
class Term:
    coeff: sp.Expr
    powers: dict
    exponent: sp.Expr
    specials: list
    factors: list  # the special factors as SymPy objects, in the order of ``specials``


def classify(term: sp.Expr, variables) -> Term:
    """Split one product term into coefficient, monomial, exponential and special factors."""
    coeff = sp.Integer(1)
    powers = {v: 0 for v in variables}
    exponent = sp.Integer(0)
    specials: list[Special] = []
    factors: list[sp.Expr] = []
    for f in sp.Mul.make_args(term):
        if not any(f.has(v) for v in variables):
            coeff *= f
            continue
        base, e = (f.base, f.exp) if f.is_Pow else (f, sp.Integer(1))
        if base in powers and e.is_Integer and e > 0:
            powers[base] += int(e)
            continue
        if isinstance(base, sp.exp) or base is sp.E:
            arg = base.args[0] if isinstance(base, sp.exp) else sp.Integer(1)
            exponent += (e * arg) if base is not sp.E else e
            continue
        if not (e.is_Integer and e > 0) or (e > 1 and not isinstance(base, (sp.Heaviside, sp.erf))):
            raise NotClosed(f)
        lin = linear_in_one(base.args[0], variables)
        if lin is None:
            raise NotClosed(f)
        v, c, d = lin
        if isinstance(base, sp.Heaviside):  # idempotent: Heaviside**k == Heaviside
            if c not in (1, -1):
                raise NotClosed(f)
            # Heaviside(c (v + s)) with c = +-1 (reflected steps are undone in _expect_term).
            specials.append(Special("step", v, sp.Integer(c), d / c))
        elif isinstance(base, sp.erf):
            specials.extend([Special("erf", v, c, d / c)] * int(e))
            factors.extend([base] * (int(e) - 1))
        elif isinstance(base, sp.DiracDelta) and len(base.args) == 1:
            coeff /= sp.Abs(c)
            specials.append(Special("delta", v, sp.Integer(1), d / c))
            base = sp.DiracDelta(v + d / c)
        else:
            raise NotClosed(f)
        factors.append(base)
    return Term(coeff, powers, exponent, specials, factors)


# --------------------------------------------------------------------------------------------
# Identities (closed-form base cases, loaded from rules/identities)


@dataclass(frozen=True)
class Identity:
    name: str
    variables: tuple
    wild: tuple
    powers: tuple
    specials: tuple
    result: sp.Expr
    source: str


def _cov_symbols(dim: int):
    return (S.K,) if dim == 1 else (S.K11, S.K12, S.K22)


@lru_cache(maxsize=None)
def identities() -> tuple[Identity, ...]:
    """The closed-form identities shipped in ``rules/identities`` (parsed safely, cached)."""
    return tuple(make_identity(r.name, r.variables, r.wild, r.integrand, r.result, r.source)
                 for r in load_identities())


def make_identity(name, variables, wild, integrand, result, source="") -> Identity:
    t = classify(canonical(integrand, variables), variables)
    if t.coeff != 1 or t.exponent != 0:
        raise ValueError(f"identity '{name}': integrand must be a bare product of powers and specials")
    return Identity(name, tuple(variables), tuple(wild), tuple(t.powers[v] for v in variables),
                    tuple(t.specials), result, source)


def _unify(pattern: sp.Expr, actual: sp.Expr, wild: tuple, binding: dict) -> bool:
    pattern = pattern.xreplace(binding)
    if pattern in wild:
        binding[pattern] = actual
        return True
    return sp.simplify(pattern - actual) == 0 if pattern != actual else True


def _match(identity: Identity, powers: tuple, specials: list, order: tuple) -> dict | None:
    """Bind the identity's wild symbols so that it equals the term (variables in ``order``)."""
    if len(identity.specials) != len(specials) or powers != identity.powers:
        return None
    ivars = identity.variables
    remaining = list(specials)
    binding: dict = {}
    for sp_ in identity.specials:
        target_var = order[ivars.index(sp_.var)]
        for k, cand in enumerate(remaining):
            if cand.kind == sp_.kind and cand.var == target_var:
                trial = dict(binding)
                if _unify(sp_.c, cand.c, identity.wild, trial) and _unify(sp_.s, cand.s, identity.wild, trial):
                    binding = trial
                    remaining.pop(k)
                    break
        else:
            return None
    return binding


def _lookup(term: Term, variables, cov: sp.Matrix) -> sp.Expr | None:
    """Closed form of a zero-mean term from the identity table, or None."""
    dim = len(variables)
    pw = tuple(term.powers[v] for v in variables)
    for ident in identities():
        idim = len(ident.variables)
        if idim == dim:
            orders = [tuple(variables)] if dim == 1 else [tuple(variables), tuple(reversed(variables))]
            for order in orders:
                perm = tuple(term.powers[v] for v in order)
                b = _match(ident, perm, term.specials, order)
                if b is None:
                    continue
                if dim == 1:
                    covmap = {S.K: cov[0, 0]}
                elif order == tuple(variables):
                    covmap = {S.K11: cov[0, 0], S.K12: cov[0, 1], S.K22: cov[1, 1]}
                else:
                    covmap = {S.K11: cov[1, 1], S.K12: cov[0, 1], S.K22: cov[0, 0]}
                # One simultaneous substitution: bound values may themselves contain K.
                return ident.result.xreplace({**covmap, **b})
        elif idim == 2 and dim == 1 and len(term.specials) == 2 and pw == (0,):
            # A single-input product of two specials is the two-input identity at full correlation.
            v = variables[0]
            relabeled = [Special(s.kind, ident.variables[k], s.c, s.s) for k, s in enumerate(term.specials)]
            for order in (ident.variables, tuple(reversed(ident.variables))):
                b = _match(ident, ident.powers, relabeled, order)
                if b is None or ident.powers != (0, 0):
                    continue
                k = cov[0, 0]
                return ident.result.xreplace({S.K11: k, S.K12: k, S.K22: k, **b})
            del v
    return None


# --------------------------------------------------------------------------------------------
# Reduction


def _double_factorial(n: int) -> int:
    return 1 if n <= 0 else n * _double_factorial(n - 2)


def wick(powers: tuple, cov: sp.Matrix) -> sp.Expr:
    """<z1^p1 (z2^p2)> under N(0, cov) by Isserlis' theorem (sum over pairings)."""
    if len(powers) == 1:
        (p,) = powers
        return sp.Integer(0) if p % 2 else _double_factorial(p - 1) * cov[0, 0] ** (p // 2)
    p, q = powers
    total = sp.Integer(0)
    for k in range(min(p, q) + 1):
        if (p - k) % 2 or (q - k) % 2:
            continue
        total += (comb(p, k) * comb(q, k) * factorial(k) * cov[0, 1] ** k
                  * _double_factorial(p - k - 1) * cov[0, 0] ** ((p - k) // 2)
                  * _double_factorial(q - k - 1) * cov[1, 1] ** ((q - k) // 2))
    return total


def _quadratic_form(exponent: sp.Expr, variables):
    """exponent == c0 + l.z - z^T A z / 2; returns (c0, l, A) or raises NotClosed."""
    if not exponent.is_polynomial(*variables):
        raise NotClosed(exponent)
    poly = sp.Poly(exponent, *variables)
    if poly.total_degree() > 2:
        raise NotClosed(exponent)
    n = len(variables)
    zero = (0,) * n
    c0 = poly.coeff_monomial(zero) if True else 0
    lin = []
    A = sp.zeros(n, n)
    for i in range(n):
        e = [0] * n
        e[i] = 1
        lin.append(poly.coeff_monomial(tuple(e)))
        e[i] = 2
        A[i, i] = -2 * poly.coeff_monomial(tuple(e))
    if n == 2:
        A[0, 1] = A[1, 0] = -poly.coeff_monomial((1, 1))
    return c0, sp.Matrix(lin), A


def _expect(expr: sp.Expr, variables: tuple, cov: sp.Matrix, mean: sp.Matrix) -> sp.Expr:
    total = sp.Integer(0)
    for term in sp.Add.make_args(canonical(expr, variables)):
        total += _expect_term(term, variables, cov, mean)
    return total


def _expect_term(term: sp.Expr, variables: tuple, cov: sp.Matrix, mean: sp.Matrix) -> sp.Expr:
    used = [i for i, v in enumerate(variables) if term.has(v)]
    if not used:
        return term
    if len(used) < len(variables):  # marginalise the unused variable
        return _expect_term(term, tuple(variables[i] for i in used), cov.extract(used, used), mean.extract(used, [0]))
    t = classify(term, variables)
    n = len(variables)

    # Reflected steps Heaviside(-(v + s)): z_v -> -z_v maps N(m, K) to N(m', K') with the v row and
    # column of K (off the diagonal) and m_v negated, and turns the step into Heaviside(v + s').
    for v in variables:
        signs = {sp_.c for sp_ in t.specials if sp_.kind == "step" and sp_.var == v}
        if -1 in signs:
            if 1 in signs:  # Heaviside(v + s1) Heaviside(-(v + s2)) = 1{-s1 < v < -s2}
                up = [x for x in t.specials if x.kind == "step" and x.var == v and x.c == 1]
                down = [x for x in t.specials if x.kind == "step" and x.var == v and x.c == -1]
                gap = sp.simplify(up[0].s - down[0].s)
                if not gap.is_number:
                    raise NotClosed(term)
                rest = term / (sp.Heaviside(v + up[0].s) * sp.Heaviside(-v - down[0].s))
                if gap <= 0:
                    return sp.Integer(0)
                return _expect(sp.expand(rest * (sp.Heaviside(v + up[0].s) - sp.Heaviside(v + down[0].s))),
                               variables, cov, mean)
            i = variables.index(v)
            flip = sp.eye(n)
            flip[i, i] = -1
            return _expect_term(sp.expand(term.xreplace({v: -v})), variables, flip * cov * flip, flip * mean)

    # Condition on a Dirac delta: <delta(v + s) G> = p_v(-s) <G | v = -s>.
    for k, sp_ in enumerate(t.specials):
        if sp_.kind != "delta":
            continue
        i = variables.index(sp_.var)
        at = -sp_.s
        var, m = cov[i, i], mean[i]
        density = sp.exp(-(at - m) ** 2 / (2 * var)) / sp.sqrt(2 * sp.pi * var)
        # A step or another delta at the same point as the delta has no unambiguous value.
        if any(o is not sp_ and o.var == sp_.var and o.kind in ("step", "delta") and sp.simplify(o.s - sp_.s) == 0
               for o in t.specials):
            raise NotClosed(term)
        rest = (term / t.factors[k]).xreplace({sp_.var: at})
        if n == 1:
            return density * rest
        j = 1 - i
        cvar = sp.factor(cov[j, j] * cov[i, i] - cov[i, j] ** 2) / cov[i, i]
        cmean = mean[j] + cov[i, j] / cov[i, i] * (at - m)
        if cvar == 0:
            return density * rest.xreplace({variables[j]: cmean})
        return density * _expect(rest, (variables[j],), sp.Matrix([[cvar]]), sp.Matrix([cmean]))

    # Exponential tilting (characteristic function for imaginary exponents).
    if t.exponent != 0:
        c0, lin, A = _quadratic_form(t.exponent, variables)
        if any(A[i, i].is_negative or A[i, i].is_real is False for i in range(n)):
            raise NotClosed(term)
        P = cov.inv()
        P2 = P + A
        cov2 = P2.inv().applyfunc(sp.factor)
        mean2 = (cov2 * (P * mean + lin)).applyfunc(sp.factor)
        exponent = c0 + ((mean2.T * P2 * mean2)[0, 0] - (mean.T * P * mean)[0, 0]) / 2
        # One exponential with a cancelled exponent: separate factors can overflow near rho = +-1.
        norm = sp.sqrt(sp.factor(cov2.det() / cov.det())) * sp.exp(sp.factor(sp.cancel(exponent)))
        rest = term * sp.exp(-t.exponent)
        return sp.expand(norm) * _expect(sp.expand(rest), variables, cov2, mean2)

    # Shift to zero mean.
    if any(m != 0 for m in mean):
        if t.specials and any(m.is_real is not True for m in mean):
            raise NotClosed(term)
        shifted = term.xreplace({v: v + mean[i] for i, v in enumerate(variables)})
        return _expect(shifted, variables, cov, sp.zeros(n, 1))

    # Identity table first, then Stein's lemma on a polynomial factor, then Wick.
    found = _lookup(t, variables, cov)
    if found is not None:
        return t.coeff * found
    if not t.specials:
        return t.coeff * wick(tuple(t.powers[v] for v in variables), cov)
    for i, v in enumerate(variables):
        if t.powers[v] > 0:
            F = term / v
            return sum(cov[i, j] * _expect(sp.diff(F, w), variables, cov, mean) for j, w in enumerate(variables))
    raise NotClosed(term)


def gaussian_expectation(integrand: sp.Expr, variables, cov=None, *, tol: float = DEFAULT_TOL,
                         numeric_subs: dict | None = None) -> sp.Expr:
    """<integrand>_K under a zero-mean Gaussian of one or two variables.

    Args:
        integrand: SymPy expression in ``variables`` (and parameters).
        variables: ``(z,)`` or ``(z1, z2)``.
        cov: the covariance entries, ``(K,)`` or ``(K11, K12, K22)``; the documented symbols by
            default.
        tol: accuracy requested of any quadrature node.
        numeric_subs: parameter values used only to choose the quadrature order.

    Returns:
        A closed form where the rules close every term; terms they do not close are summed into
        one :class:`~derive.symbolic.quadrature.GaussianExpectation` node.
    """
    variables = tuple(variables)
    n = len(variables)
    cov = tuple(cov) if cov is not None else _cov_symbols(n)
    covm = sp.Matrix([[cov[0]]]) if n == 1 else sp.Matrix([[cov[0], cov[1]], [cov[1], cov[2]]])
    closed = sp.Integer(0)
    rest: dict = {}
    # Linearity over the integrand's top-level sum; a chunk the rules do not close entirely goes,
    # as written, into a quadrature node (readable, and no cancellation between pieces). Factors
    # that depend on the covariance (K in z^4 - 6 K z^2 + 3 K^2) stay outside the node.
    cov_symbols = _free(cov)
    for chunk in chunks(integrand):
        try:
            closed += sum((_expect_term(t, variables, covm, sp.zeros(n, 1))
                           for t in sp.Add.make_args(canonical(chunk, variables))), sp.Integer(0))
        except NotClosed:
            coeff, dep = chunk.as_independent(*variables, as_Add=False)
            key = coeff if coeff.free_symbols & cov_symbols else sp.Integer(1)
            rest[key] = rest.get(key, sp.Integer(0)) + (dep if key != 1 else chunk)
    closed = real_part(closed) if integrand.is_real is not False else closed
    for key, part in rest.items():
        closed += key * numeric_expectation(part, variables, cov, tol, numeric_subs=numeric_subs)
    return closed


@lru_cache(maxsize=8192)
def expect(integrand: sp.Expr, variables: tuple, tol: float = DEFAULT_TOL, numeric_subs: tuple = ()) -> sp.Expr:
    """:func:`gaussian_expectation` over the documented covariance symbols, tidied, derived once for
    the whole engine (one cache: the kernel, criticality, layer and finite-width maps all ask here).
    ``numeric_subs`` is a tuple of (symbol, value) pairs (hashable)."""
    return tidy(gaussian_expectation(integrand, tuple(variables), tol=tol,
                                     numeric_subs=dict(numeric_subs) or None))


def _free(cov) -> set:
    out = set()
    for c in cov:
        out |= getattr(c, "free_symbols", set())
    return out


def real_part(expr: sp.Expr) -> sp.Expr:
    """The real form of a characteristic-function result: with every symbol real, the expectation
    of a real integrand is real, so I is eliminated (expand_complex, then re of what remains)."""
    if not expr.has(sp.I) or not all(s.is_real for s in expr.free_symbols):
        return expr
    out = sp.expand_complex(expr)
    if out.has(sp.I):
        out = sp.re(out)
    return out


def tidy(expr: sp.Expr) -> sp.Expr:
    """Cheap, safe simplification of a derived expectation for display and code generation.

    Combines exponentials and cancels their arguments (tilting leaves them as sums of rational
    functions), takes the real part when every symbol is real (characteristic-function results),
    and collects terms over the transcendental pieces (arccos, arcsin, square roots, exponentials).
    """
    # In a fixed order (not the set's, which follows the hash seed): the dummies' order decides how
    # the simplification groups terms, hence the rounding of the evaluated result.
    ordered = sorted(expr.atoms(GaussianExpectation), key=sp.default_sort_key)
    nodes = {node: sp.Dummy(f"node{k}") for k, node in enumerate(ordered)}
    if nodes:  # keep quadrature integrands exactly as built
        return _tidy(expr.xreplace(nodes)).xreplace({d: node for node, d in nodes.items()})
    return _tidy(expr)


def _tidy(expr: sp.Expr) -> sp.Expr:
    # acos(-x) = pi - acos(x): reflected steps give arc-cosines of -rho.
    expr = expr.replace(lambda e: isinstance(e, sp.acos) and e.args[0].could_extract_minus_sign(),
                        lambda e: sp.pi - sp.acos(-e.args[0]))
    expr = sp.powsimp(sp.expand(expr), combine="exp")
    expr = expr.replace(lambda e: isinstance(e, sp.exp), lambda e: sp.exp(sp.factor(sp.cancel(e.args[0]))))
    expr = sp.expand(real_part(expr))
    atoms = [a for a in sorted(expr.atoms(sp.acos, sp.asin, sp.exp, sp.erf, sp.Pow), key=sp.default_sort_key)
             if not a.is_Pow or (a.exp.is_Rational and not a.exp.is_Integer)]
    return sp.collect(sp.expand(expr), atoms, func=sp.factor)
