"""A claim: the names it may use, its definitions, and its text parsed (SymPy syntax through the safe
parser, or LaTeX) for one quantity."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import sympy as sp

from derive.claims.latex import parse_latex_claim
from derive.claims.quantities import Quantity
from derive.core import symbols as S
from derive.core.errors import DeriveError, ParseError
from derive.core.parse import FUNCTIONS, parse_expression
from derive.rules.activations import Activation

# ----------------------------------------------------------------------------------------------
# Names a claim may use

def _rho() -> sp.Expr:
    return S.K12 / sp.sqrt(S.K11 * S.K22)


def base_names(q: Quantity, activation: Activation) -> dict[str, sp.Expr]:
    """Names a claim for ``q`` may use: the quantity's variables, the activation's parameters (at
    their values), and the conveniences ``rho`` = K12/sqrt(K11 K22), ``theta`` = arccos(rho),
    ``sigma_w`` = sqrt(C_W), ``sigma_b`` = sqrt(C_b) where those variables exist."""
    names: dict[str, sp.Expr] = {s.name: s for s in q.variables}
    if q.two_input:
        names["rho"] = _rho()
        names["theta"] = sp.acos(_rho())
    if S.C_W in q.variables:
        names["sigma_w"] = names["sigma_W"] = sp.sqrt(S.C_W)
    if S.C_b in q.variables:
        names["sigma_b"] = sp.sqrt(S.C_b)
    values = activation.defaults
    for p in activation.params:
        if p.symbol.name in names:
            continue  # a documented variable wins over a parameter of the same name
        names[p.symbol.name] = values.get(p.symbol, p.default)
    return names


_RESERVED = {"pi", "E", "e", "I", "oo"}
_DEF_NAME = re.compile(r"^\\?([A-Za-z][A-Za-z0-9]*)(?:_\{?([A-Za-z0-9]+)\}?)?$")


def definition_name(text: str) -> str:
    """A definition's name as typed (``theta``, ``\\theta``, ``u_{1}``) -> its canonical form
    (``theta``, ``theta``, ``u_1``)."""
    m = _DEF_NAME.match(text.strip())
    if not m:
        raise DeriveError(f"definition name '{text.strip()}' is not a name (use e.g. theta, \\theta or u_1)")
    return m.group(1) + (f"_{m.group(2)}" if m.group(2) else "")


def split_definition(item: str) -> tuple[str, str]:
    """``"NAME = TEXT"`` -> (NAME, TEXT), split at the first '='."""
    if not isinstance(item, str) or "=" not in item:
        raise DeriveError(f"definition '{item}': expected NAME=EXPRESSION, e.g. theta=\\arccos(\\rho)")
    name, text = item.split("=", 1)
    return name.strip(), text.strip()


_LATEX_NAME = re.compile(r"\\?([A-Za-z]+)(?:_(?:\{([A-Za-z0-9]+)\}|([A-Za-z0-9])))?")
_SYMPY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def mentions(text: str, syntax: str) -> set[str]:
    """Names ``text`` may refer to (over-approximated): ``\\theta_{0}`` -> {theta_0, theta0}."""
    if syntax != "latex":
        return set(_SYMPY_NAME.findall(text))
    out = set()
    for m in _LATEX_NAME.finditer(text):
        base, sub = m.group(1), m.group(2) or m.group(3)
        out |= {base} if sub is None else {f"{base}_{sub}", base + sub}
        if not text[m.start()] == "\\":  # plain letters: each may be its own symbol (ab = a*b)
            out |= set(base)
    return out


def needed_definitions(text: str, syntax: str, items: Sequence[tuple[str, str, str]]) -> list:
    """The definitions a claim uses, directly or through other definitions (the others are not parsed:
    a claim file's helpers for two-input claims need not make sense for single-input ones)."""
    by_name = {definition_name(raw): (raw, t, syn) for raw, t, syn in items}
    need, todo = set(), mentions(text, syntax) & set(by_name)
    while todo:
        name = todo.pop()
        need.add(name)
        _, t, syn = by_name[name]
        todo |= (mentions(t, syn) & set(by_name)) - need
    return [item for item in items if definition_name(item[0]) in need]


def resolve_definitions(items: Sequence[tuple[str, str, str]], names: Mapping[str, sp.Expr],
                        protected: Iterable[str] = ()) -> dict[str, sp.Expr]:
    """Parse definitions ``(name, text, syntax)`` (syntax ``"sympy"`` or ``"latex"``) in any order.

    A definition may use the base names and any other definition; each is substituted as an
    expression, so claims never see the defined name. Cycles and unknown names are one-line errors.
    """
    protected = set(protected) | _RESERVED
    pending: dict[str, tuple[str, str]] = {}
    for raw, text, syntax in items:
        name = definition_name(raw)
        if name in protected or name in FUNCTIONS:
            raise DeriveError(f"definition '{raw}': '{name}' is a documented symbol or function and "
                              "cannot be redefined")
        if name in pending:
            raise DeriveError(f"definition '{raw}' is given twice")
        pending[name] = (text, syntax)
    known = dict(names)
    defined: dict[str, sp.Expr] = {}
    while pending:
        progress, last_error = False, None
        for name, (text, syntax) in list(pending.items()):
            visible = {**known, **defined}
            visible.pop(name, None)
            try:
                expr = _parse(text, visible, syntax, where=f"definition {name}")
            except ParseError as exc:
                last_error = exc
                continue
            defined[name] = expr
            del pending[name]
            progress = True
        if not progress:
            raise last_error if last_error is not None else DeriveError("definitions could not be resolved")
    return defined


def _parse(text: str, names: Mapping[str, sp.Expr], syntax: str, where: str) -> sp.Expr:
    if syntax == "latex":
        return parse_latex_claim(text, names, where=where)
    return parse_expression(text, names, where=where)


# ----------------------------------------------------------------------------------------------
# Claims

@dataclass(frozen=True)
class Claim:
    """One claim: the quantity, the text as typed, its syntax and the parsed expression."""

    quantity: Quantity
    text: str
    syntax: str
    expr: sp.Expr


#: Deepest accepted nesting of exponential growth (exp, sinh, cosh, powers with a variable exponent):
#: exp(exp(exp(K))) at K = 1e4 has no representable value.
MAX_EXP_NESTING = 2
_GROWTH = (sp.exp, sp.sinh, sp.cosh)


def _growth_depth(expr: sp.Basic) -> int:
    """How deeply exponential growth nests in ``expr``."""
    if not expr.args:
        return 0
    inner = max(_growth_depth(a) for a in expr.args)
    grows = isinstance(expr, _GROWTH) or (isinstance(expr, sp.Pow) and not expr.exp.is_number)
    return inner + 1 if grows else inner


def parse_claim(text: str, q: Quantity, activation: Activation, *, syntax: str = "sympy",
                definitions: Sequence[tuple[str, str, str]] = (), where: str = "claim") -> Claim:
    """Parse a claim for quantity ``q``; ``definitions`` are ``(name, text, syntax)`` helpers."""
    if syntax not in ("sympy", "latex"):
        raise DeriveError(f"unknown claim syntax '{syntax}' (sympy or latex)")
    names = base_names(q, activation)
    protected = {s.name for s in q.variables} | set(S.BY_NAME) | {"A", "B", "D", "F", "r"}
    for raw, _, _ in definitions:  # refuse bad names even when unused
        name = definition_name(raw)
        if name in protected or name in FUNCTIONS or name in _RESERVED:
            raise DeriveError(f"definition '{raw}': '{name}' is a documented symbol or function and "
                              "cannot be redefined")
    defined = resolve_definitions(needed_definitions(text, syntax, definitions), names, protected)
    expr = _parse(text, {**names, **defined}, syntax, where)
    if _growth_depth(expr) > MAX_EXP_NESTING:
        raise ParseError(f"exponentials nested more than {MAX_EXP_NESTING} deep (a claim's values must stay "
                         "computable)", where=where)
    extra = expr.free_symbols - set(q.variables)
    if extra:
        names_ = ", ".join(sorted(map(str, extra)))
        raise DeriveError(f"{where}: symbols {names_} are not variables of {q.name}")
    return Claim(q, text, syntax, expr)


