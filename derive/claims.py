"""Checking a hand derivation: is a claimed formula for a derived quantity right, and where is it not?

A *claim* is an expression for one named quantity of an activation (see :data:`QUANTITIES`), typed in
SymPy syntax (through the safe parser :func:`derive.parse.parse_expression`) or in LaTeX (through
SymPy's ANTLR LaTeX parser, then a whitelist walk, see :func:`parse_latex_claim`). It is judged three
independent ways:

- **symbolic**: claim - derivation is brought to a canonical form on the domain K11, K22 > 0,
  K12 = rho sqrt(K11 K22) with |rho| <= 1 (arcsin x = pi/2 - arccos x, theta = arccos(rho) and
  sqrt(1 - rho^2) = sin(theta) become independent symbols modulo sin^2 + cos^2 = 1) and tested for
  zero, then handed to ``simplify`` within a time budget; ``undecided`` when neither decides;
- **numeric**: both sides are evaluated with mpmath at 30 digits (50-digit SymPy Floats substituted,
  then ``evalf``; no code is generated) at random points of the domain and at its edges
  (rho -> +-1, K -> 0, large K); quadrature nodes of the derivation are evaluated with
  :func:`derive.numeric.evaluate`;
- **empirical** (optional, JAX): the claim alone is compared with sampled Gaussians or sampled
  two-layer networks, with standard errors and z-scores; the engine's derivation is not used, so a
  wrong claim is caught even if the derivation were wrong in the same way.

When the claim is wrong, the report gives the point of largest disagreement, both values, the
relative error and, where the numbers show one, a hint: a constant factor, a sign, a missing or
extra term, or a disagreement confined to rho -> +-1 or K -> 0.

The formulas the quantities stand for are those of :mod:`derive.recursions` (PDLT eqs. 4.118,
8.63), :mod:`derive.critical` (PDLT eqs. 5.9, 5.10) and :mod:`derive.finite_width` (PDLT ch. 4, 8).
"""

from __future__ import annotations

import math
import re
import signal
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mpmath
import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef

from . import symbols as S
from .activations import Activation
from .errors import DeriveError, ParseError
from .finite_width import A_, B_, D_, F_, r
from .parse import FUNCTIONS, MAX_BITS, MAX_DEPTH, MAX_EXPONENT, MAX_LENGTH, parse_expression
from .quadrature import GaussianExpectation

# ----------------------------------------------------------------------------------------------
# Quantities


_TWO = (S.K11, S.K12, S.K22)
_FW = (S.K, S.V, S.G1, S.Theta, A_, B_, D_, F_, S.C_W, S.C_b, S.lambda_W, S.lambda_b, r)


@dataclass(frozen=True)
class Quantity:
    """A quantity a claim can be about: its formula, its variables and where the engine derives it."""

    name: str
    formula: str
    variables: tuple[sp.Symbol, ...]
    source: str  # "kernel", "criticality" or "finite_width"
    attribute: str = ""
    empirical: str = ""  # "gauss2", "gauss1", "network2", "network1", "state"

    @property
    def two_input(self) -> bool:
        return S.K12 in self.variables


QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    Quantity("expectation", "<sigma(z1) sigma(z2)>_K", _TWO, "kernel", "expectation", "gauss2"),
    Quantity("derivative_expectation", "<sigma'(z1) sigma'(z2)>_K", _TWO, "kernel", "derivative_expectation",
             "gauss2"),
    Quantity("single_expectation", "<sigma(z)^2>_K", (S.K,), "kernel", "single_expectation", "gauss1"),
    Quantity("single_derivative_expectation", "<sigma'(z)^2>_K", (S.K,), "kernel",
             "single_derivative_expectation", "gauss1"),
    Quantity("recursion", "K12' = C_b + C_W <sigma(z1) sigma(z2)>_K  (PDLT 4.118)", _TWO + (S.C_W, S.C_b),
             "kernel", "recursion", "network2"),
    Quantity("ntk_recursion", "Theta12' = lambda_b + lambda_W <sigma sigma>_K + C_W <sigma' sigma'>_K Theta12"
             "  (PDLT 8.63)", _TWO + (S.C_W, S.lambda_W, S.lambda_b, S.Theta12), "kernel", "ntk_recursion",
             "network2"),
    Quantity("single_input", "K' = C_b + C_W <sigma^2>_K", (S.K, S.C_W, S.C_b), "kernel", "single_input",
             "network1"),
    Quantity("single_input_ntk", "Theta' = lambda_b + lambda_W <sigma^2>_K + C_W <sigma'^2>_K Theta",
             (S.K, S.C_W, S.lambda_W, S.lambda_b, S.Theta), "kernel", "single_input_ntk", "network1"),
    Quantity("chi_par", "chi_par = C_W d<sigma^2>_K/dK  (PDLT 5.9)", (S.K, S.C_W), "criticality", "chi_par",
             "gauss1"),
    Quantity("chi_perp", "chi_perp = C_W <sigma'^2>_K  (PDLT 5.10)", (S.K, S.C_W), "criticality", "chi_perp",
             "gauss1"),
    Quantity("K", "K' = C_b + C_W <sigma^2>_K (finite-width map)", _FW, "finite_width", "K", "network1"),
    Quantity("Theta", "Theta' = lambda_b + lambda_W <sigma^2>_K + chi_perp Theta  (PDLT 8.8)", _FW,
             "finite_width", "Theta", "network1"),
    Quantity("V", "V' = C_W^2 (<sigma^4>_K - <sigma^2>_K^2) + r chi_par^2 V  (PDLT 4.90)", _FW,
             "finite_width", "V", "state"),
    Quantity("G1", "G1' = r [chi_par G1 + C_W/(8 K^4) <sigma^2 (z^4 - 6 K z^2 + 3 K^2)>_K V]  (PDLT 4.115)",
             _FW, "finite_width", "G1", "state"),
    Quantity("A", "A' = Var_K(Omega) + r V/(4K^4) <(z^2-K) Omega>^2 + r chi_perp^2 A + r chi_perp <(z^2-K) "
             "Omega> D/K^2  (PDLT 8.89)", _FW, "finite_width", "A", "state"),
    Quantity("B", "B' = C_W^2 <sigma'^4>_K Theta^2 + r chi_perp^2 B", _FW, "finite_width", "B", "state"),
    Quantity("D", "D' = C_W Cov_K(sigma^2, Omega) + r C_W/(4K^4) V <(z^2-K) sigma^2> <(z^2-K) Omega> + "
             "r chi_par chi_perp D", _FW, "finite_width", "D", "state"),
    Quantity("F", "F' = C_W^2 <sigma^2 sigma'^2>_K Theta + r chi_par^2 F", _FW, "finite_width", "F", "state"),
)}


def quantity(name: str) -> Quantity:
    """The :class:`Quantity` called ``name`` (one-line error listing the known ones)."""
    if name not in QUANTITIES:
        raise DeriveError(f"unknown quantity '{name}' (known: {', '.join(QUANTITIES)})")
    return QUANTITIES[name]


def derivation(activation: Activation, name: str) -> sp.Expr:
    """The engine's derivation of quantity ``name`` with every activation parameter at its value."""
    q = quantity(name)
    if q.source == "kernel":
        from . import api

        d = api.kernel(activation)
        expr = d.numeric(getattr(d, q.attribute))
    elif q.source == "criticality":
        from . import critical

        expr = getattr(critical.single_input_maps(activation), q.attribute)
    else:
        from . import finite_width

        expr = finite_width.finite_width_maps(activation).recursions[q.attribute]
    return expr


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
# LaTeX: a lexical whitelist, SymPy's ANTLR parser, then a whitelist walk of the tree it built

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
    "kappa", "lambda", "mu", "nu", "xi", "pi", "rho", "varrho", "sigma", "varsigma", "tau", "upsilon", "phi",
    "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon",
    "Phi", "Psi", "Omega",
}
#: Functions the LaTeX grammar knows natively.
_LATEX_NATIVE = {"sin", "cos", "tan", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan", "exp", "log",
                 "ln"}


def _normal_cdf(x: sp.Expr) -> sp.Expr:
    return (1 + sp.erf(x / sp.sqrt(2))) / 2


#: Functions written as \name(...) or \operatorname{name}(...): name -> (builder, min arity, max arity).
LATEX_FUNCTIONS = {
    "erf": FUNCTIONS["erf"], "erfc": FUNCTIONS["erfc"], "max": FUNCTIONS["Max"], "min": FUNCTIONS["Min"],
    "sgn": FUNCTIONS["sign"], "sign": FUNCTIONS["sign"], "Phi": (_normal_cdf, 1, 1),
    "sigmoid": FUNCTIONS["sigmoid"], "softplus": FUNCTIONS["softplus"],
}
_LATEX_COMMANDS = (_GREEK | _LATEX_NATIVE | set(LATEX_FUNCTIONS)
                   | {"frac", "dfrac", "tfrac", "sqrt", "cdot", "times", "div"})
#: Commands that only set spacing or size: dropped before parsing.
_LATEX_NOISE = re.compile(r"\\(?:[,;:!]|q?quad(?![A-Za-z])|displaystyle(?![A-Za-z])|textstyle(?![A-Za-z])"
                          r"|[Bb]igg?[lr]?(?![A-Za-z])|left(?![A-Za-z])|right(?![A-Za-z]))")
_LATEX_WRAPPED = re.compile(r"\\(?:operatorname|mathrm|textrm|text|mathit|rm)\s*\{\s*([A-Za-z]*)\s*\}")
_LATEX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n\\{}()[]^_+-*/=.,|")
#: Deepest accepted nesting of braces, parentheses and brackets in LaTeX, and most '|' accepted (the
#: parser's prediction time grows quickly with nested function calls and absolute values).
LATEX_MAX_NESTING = 20
LATEX_MAX_BARS = 8
#: Seconds the LaTeX parser may take (a safety net behind the limits above).
LATEX_PARSE_SECONDS = 10.0
_CONSTRUCTS = {
    "Integral": "an integral", "Sum": "a sum", "Product": "a product", "Limit": "a limit",
    "Derivative": "a derivative", "factorial": "a factorial", "binomial": "a binomial coefficient",
    "floor": "a floor", "ceiling": "a ceiling", "conjugate": "a complex conjugate", "Infinity": "infinity",
    "NegativeInfinity": "infinity", "ComplexInfinity": "infinity", "ImaginaryUnit": "the imaginary unit",
}


def _latex_prepare(text: str, where: str) -> str:
    """Refuse anything outside a small LaTeX vocabulary, before any parser sees the text."""
    if not isinstance(text, str):
        raise ParseError(f"expected LaTeX text, got {type(text).__name__}", where=where)
    if len(text) > MAX_LENGTH:
        raise ParseError(f"LaTeX too long ({len(text)} characters, at most {MAX_LENGTH})", where=where)
    s = text
    core = text.strip()
    if len(core) >= 2 and core[0] == "$" and core[-1] == "$" and core.strip("$"):
        # $...$ or $$...$$ pasted from a paper: blank the dollars, keeping every column in place
        lead = len(text) - len(text.lstrip())
        left, right = len(core) - len(core.lstrip("$")), len(core) - len(core.rstrip("$"))
        s = (text[:lead] + " " * left + core[left:len(core) - right] + " " * right + text[lead + len(core):])
    for m in re.finditer(r"\\([A-Za-z]+|.?)", s):
        cmd = m.group(1)
        if cmd in (",", ";", ":", "!") or _LATEX_NOISE.match(s, m.start()):
            continue
        if re.fullmatch(r"operatorname|mathrm|textrm|text|mathit|rm", cmd):
            w = _LATEX_WRAPPED.match(s, m.start())
            if not w:
                raise ParseError(f"'\\{cmd}' must wrap a function name, e.g. \\operatorname{{erf}}", text,
                                 m.start() + 1, where)
            if w.group(1) not in LATEX_FUNCTIONS and w.group(1) not in _LATEX_NATIVE and w.group(1) != "e":
                allowed = ", ".join(sorted(set(LATEX_FUNCTIONS) | _LATEX_NATIVE))
                raise ParseError(f"unknown function '{w.group(0)}' (allowed: {allowed})", text, m.start() + 1,
                                 where)
            continue
        if cmd not in _LATEX_COMMANDS:
            shown = "\\" + cmd if cmd else "\\"
            raise ParseError(f"LaTeX command '{shown}' is not allowed (a claim is a closed-form expression: "
                             "\\frac, \\sqrt, \\sin, \\arccos, \\exp, \\log, Greek letters, ...)", text,
                             m.start() + 1, where)
    for i, ch in enumerate(s):
        if ch not in _LATEX_CHARS and not (ch in ",;:!" and i > 0 and s[i - 1] == "\\"):
            raise ParseError(f"character {ch!r} is not allowed in a LaTeX claim", text, i + 1, where)
    s = _LATEX_WRAPPED.sub(lambda w: " e " if w.group(1) == "e" else f"\\{w.group(1)} ", s)
    s = _LATEX_NOISE.sub(" ", s)
    depth = deepest = 0
    for i, ch in enumerate(s):
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > LATEX_MAX_NESTING:
                raise ParseError(f"LaTeX nested too deeply (more than {LATEX_MAX_NESTING} levels)",
                                 where=where)
        elif ch in "})]":
            depth -= 1
    if s.count("|") > LATEX_MAX_BARS:
        raise ParseError(f"too many '|' (at most {LATEX_MAX_BARS}, i.e. {LATEX_MAX_BARS // 2} absolute "
                         "values)", where=where)
    if not s.strip():
        raise ParseError("empty LaTeX expression", where=where)
    return s


def _latex_tree(text: str, where: str) -> sp.Basic:
    """SymPy's LaTeX parser (ANTLR backend): it builds unevaluated SymPy objects from the parse tree."""
    try:
        from sympy.parsing.latex import LaTeXParsingError, parse_latex
    except ImportError:  # pragma: no cover - depends on the environment
        raise DeriveError("LaTeX claims need SymPy's LaTeX parser "
                          "(pip install 'antlr4-python3-runtime==4.11.*')")
    try:
        with _deadline(LATEX_PARSE_SECONDS):
            return parse_latex(text, strict=True)  # the ANTLR backend (the default in every SymPy)
    except _Timeout:
        raise ParseError(f"LaTeX too complex to parse within {LATEX_PARSE_SECONDS:g} s",
                         where=where) from None
    except ImportError:
        raise DeriveError("LaTeX claims need the ANTLR runtime 4.11: "
                          "pip install 'antlr4-python3-runtime==4.11.*'")
    except LaTeXParsingError as exc:
        lines = str(exc).splitlines()
        col = len(lines[2]) if len(lines) >= 3 and lines[2].endswith("^") else None
        message = lines[0] if lines else "invalid LaTeX"
        raise ParseError(f"cannot parse LaTeX: {message}", text, col, where) from None
    except RecursionError:
        raise ParseError("LaTeX too long or nested too deeply to parse", where=where) from None
    except Exception as exc:  # the parser runs on untrusted text: any failure is bad input
        raise ParseError(f"cannot parse LaTeX ({type(exc).__name__})", where=where) from None


def _flatten(e: sp.Basic, cls: type) -> list[sp.Basic]:
    """Operands of nested unevaluated ``cls`` (Add or Mul) nodes, without recursion."""
    out, stack = [], [e]
    while stack:
        x = stack.pop()
        if isinstance(x, cls):
            stack.extend(reversed(x.args))
        else:
            out.append(x)
    return out


class _LatexBuilder:
    """Rebuild an unevaluated SymPy tree from the LaTeX parser, allowing only whitelisted heads and names.

    Evaluation happens here, one node at a time, with the safe parser's limits on exponents and
    the size of numbers, so that ``10^{10^{10}}`` is refused instead of computed.
    """

    _HEADS = {sp.sin: sp.sin, sp.cos: sp.cos, sp.tan: sp.tan, sp.sinh: sp.sinh, sp.cosh: sp.cosh,
              sp.tanh: sp.tanh, sp.asin: sp.asin, sp.acos: sp.acos, sp.atan: sp.atan, sp.exp: sp.exp,
              sp.Abs: sp.Abs}

    def __init__(self, text: str, names: Mapping[str, sp.Expr], where: str):
        self.text = text
        self.names = names
        self.where = where

    def fail(self, message: str) -> ParseError:
        return ParseError(message, self.text, None, self.where)

    def build(self, e: sp.Basic, depth: int = 0) -> sp.Expr:
        if depth > MAX_DEPTH:
            raise self.fail(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(e, sp.Symbol):
            return self.symbol(e.name)
        if isinstance(e, (sp.Integer, sp.Rational)):
            return self.number(e)
        if isinstance(e, sp.Float):
            return self.number(sp.Rational(str(e)))
        if e is sp.pi or e is sp.E:
            return e
        if isinstance(e, sp.Add):
            return self.checked(sp.Add(*[self.build(a, depth + 1) for a in _flatten(e, sp.Add)]))
        if isinstance(e, sp.Mul):
            return self.checked(sp.Mul(*[self.build(a, depth + 1) for a in _flatten(e, sp.Mul)]))
        if isinstance(e, sp.Pow):
            return self.power(self.build(e.base, depth + 1), self.build(e.exp, depth + 1))
        if isinstance(e, sp.log):
            args = [self.build(a, depth + 1) for a in e.args]
            if len(args) == 2 and args[1] != sp.E:
                if not (args[1].is_number and args[1].is_positive and args[1] != 1):
                    raise self.fail("a logarithm's base must be a positive number other than 1")
                return self.checked(sp.log(args[0]) / sp.log(args[1]))
            return self.checked(sp.log(args[0]))
        if e.func in self._HEADS:
            return self.checked(self._HEADS[e.func](*[self.build(a, depth + 1) for a in e.args]))
        if isinstance(e, AppliedUndef):
            return self.function(e, depth)
        if isinstance(e, (sp.Eq, sp.Rel)):
            raise self.fail("a claim is an expression, not an equation (give helper definitions separately)")
        what = _CONSTRUCTS.get(type(e).__name__, f"'{type(e).__name__}'")
        raise self.fail(f"{what} is not allowed in a claim (closed-form expressions only)")

    def symbol(self, raw: str) -> sp.Expr:
        m = re.fullmatch(r"([A-Za-z]+)(?:_\{([A-Za-z0-9]+)\})?", raw)
        if m:
            base, sub = m.groups()
            for cand in ((base,) if sub is None else (base + sub, f"{base}_{sub}")):
                if cand in self.names:
                    return self.names[cand]
            if sub is None and base == "pi":
                return sp.pi
            if sub is None and base == "e":
                return sp.E
        allowed = ", ".join(sorted(self.names))
        raise self.fail(f"unknown symbol '{raw}' (allowed: {allowed})")

    def number(self, value: sp.Rational) -> sp.Expr:
        if abs(value.p).bit_length() > MAX_BITS or value.q.bit_length() > MAX_BITS:
            raise self.fail("number too large")
        return value

    def power(self, base: sp.Expr, exponent: sp.Expr) -> sp.Expr:
        if exponent.is_Number:
            if abs(exponent) > MAX_EXPONENT:
                raise self.fail(f"exponent {exponent} too large (at most {MAX_EXPONENT} in absolute value)")
            if base.is_Number and base != 0:
                bits = abs(float(exponent)) * max(math.log2(abs(float(sp.Abs(base).evalf(30)))) + 1, 1)
                if bits > MAX_BITS:
                    raise self.fail("power produces a number that is too large")
            if base == 0 and exponent.is_negative:
                raise self.fail("division by zero")
        return self.checked(sp.Pow(base, exponent))

    def function(self, e: AppliedUndef, depth: int) -> sp.Expr:
        name = e.func.__name__
        if name not in LATEX_FUNCTIONS:
            allowed = ", ".join(sorted(set(LATEX_FUNCTIONS) | _LATEX_NATIVE))
            raise self.fail(f"unknown function '{name}' (allowed: {allowed})")
        fn, lo, hi = LATEX_FUNCTIONS[name]
        if len(e.args) < lo or (hi is not None and len(e.args) > hi):
            raise self.fail(f"function '{name}' takes {lo if lo == hi else f'at least {lo}'} argument(s)")
        return self.checked(fn(*[self.build(a, depth + 1) for a in e.args]))

    def checked(self, expr: sp.Expr) -> sp.Expr:
        if expr.is_Rational and (abs(expr.p).bit_length() > MAX_BITS or expr.q.bit_length() > MAX_BITS):
            raise self.fail("number too large")
        if expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
            raise self.fail("expression is undefined (division by zero or infinity)")
        return expr


def parse_latex_claim(text: str, names: Mapping[str, sp.Expr], *, where: str = "LaTeX claim") -> sp.Expr:
    """Parse a LaTeX expression into SymPy without evaluating any Python.

    Three layers: (1) a lexical whitelist of characters and LaTeX commands (``\\input``, ``\\def``,
    ``\\newcommand``, ... are refused before any parser runs; ``\\left``, ``\\right``, spacing and
    ``\\operatorname{erf}`` are normalised); (2) SymPy's ANTLR LaTeX parser, which builds SymPy
    objects node by node from the grammar with ``evaluate=False``; (3) a walk of that tree that
    accepts only arithmetic, whitelisted functions and the given names (``K_{11}`` -> ``K11``,
    ``C_{W}`` -> ``C_W``, ``\\lambda_W`` -> ``lambda_W``, ``\\Theta_{12}`` -> ``Theta12``,
    ``\\pi``, ``e``), evaluating each node under the safe parser's size limits.

    Raises:
        ParseError: one line naming what was refused.
    """
    prepared = _latex_prepare(text, where)
    tree = _latex_tree(prepared, where)
    if isinstance(tree, (list, tuple)):
        raise ParseError("a derivative operator alone is not an expression", where=where)
    try:
        return _LatexBuilder(text, names, where).build(tree)
    except RecursionError:
        raise ParseError("LaTeX nested too deeply", where=where) from None


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


# ----------------------------------------------------------------------------------------------
# Symbolic verdict

class _Timeout(BaseException):
    """Raised inside SymPy when the symbolic time budget is spent (BaseException: not swallowed)."""


@contextmanager
def _deadline(seconds: float | None):
    """Interrupt the block after ``seconds`` (SIGALRM, main thread only; otherwise no limit)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_RHO = sp.Symbol("rho", real=True)
_THETA = sp.Symbol("theta", real=True)
_SIN = sp.Symbol("sin_theta", positive=True)  # sqrt(1 - rho^2) = sin(theta) >= 0


def _rationalise(expr: sp.Expr) -> sp.Expr:
    return sp.nsimplify(expr, rational=True) if expr.has(sp.Float) else expr


def _factor_radicals(expr: sp.Expr) -> sp.Expr:
    """Factor the base of every fractional power, so that positive factors leave the radical."""
    def fix(p):
        return sp.Pow(sp.factor(p.base), p.exp)

    return expr.replace(lambda e: e.is_Pow and e.exp.is_Rational and not e.exp.is_Integer, fix)


def canonical(expr: sp.Expr, two_input: bool, display: dict | None = None) -> sp.Expr:
    """``expr`` on the domain, in independent symbols where the domain allows.

    K12 = rho sqrt(K11 K22); arcsin(x) = pi/2 - arccos(x); trigonometric functions of sums and
    multiples expanded; radicals factored; each class of equal arccos arguments becomes one symbol
    (arccos(rho) -> theta), and (1 - rho^2)^(k/2) -> sin_theta^k with sin_theta = sqrt(1 - rho^2).
    """
    e = _rationalise(expr)
    if two_input:
        e = e.xreplace({S.K12: _RHO * sp.sqrt(S.K11 * S.K22)})
    e = e.replace(lambda x: isinstance(x, sp.asin), lambda x: sp.pi / 2 - sp.acos(x.args[0]))
    e = sp.expand_trig(e)
    e = _factor_radicals(e)
    classes: list[tuple[sp.Expr, sp.Symbol]] = []
    mapping = {}
    for atom in sorted(e.atoms(sp.acos), key=sp.default_sort_key):
        arg = sp.cancel(_factor_radicals(atom.args[0]))
        for other, sym in classes:
            if sp.cancel(arg - other) == 0:
                mapping[atom] = sym
                break
        else:
            sym = _THETA if arg == _RHO else sp.Dummy(f"theta_{len(classes) + 1}", real=True)
            classes.append((arg, sym))
            mapping[atom] = sym
    e = e.xreplace(mapping)
    if display is not None:
        display.update({sym: sp.acos(arg) for arg, sym in classes if sym is not _THETA})
    if two_input:
        one_minus = 1 - _RHO**2

        def is_sin_power(p):
            return (p.is_Pow and p.exp.is_Rational and p.exp.q == 2
                    and sp.expand(p.base - one_minus) == 0)

        e = e.replace(is_sin_power, lambda p: _SIN ** (2 * p.exp))
    return e


def _reduced_numerator(e: sp.Expr, two_input: bool) -> sp.Expr:
    """Numerator of ``e`` over a common denominator, expanded, reduced modulo sin_theta^2 = 1 - rho^2."""
    num = sp.expand(sp.numer(sp.together(e)))
    if two_input and num.has(_SIN):
        num = sp.expand(sp.rem(sp.Poly(num, _SIN), sp.Poly(_SIN**2 - (1 - _RHO**2), _SIN)).as_expr())
    return num


def _is_zero(e: sp.Expr, two_input: bool) -> bool:
    return _reduced_numerator(e, two_input) == 0


def _provably_nonzero(e: sp.Expr, two_input: bool) -> bool:
    """True when the reduced numerator is a non-zero polynomial in independent quantities.

    With K = c^2 (K11 = a^2, K22 = b^2) the square roots of variances disappear; what remains must be
    a polynomial in the variables, pi, theta = arccos(rho) and sin_theta (degree <= 1 after the
    reduction) with algebraic coefficients (no other function or constant), one of which is
    non-zero (to 50 digits). pi and theta are transcendental over the algebraic functions of the
    others and sqrt(1 - rho^2) is not a rational function of rho, so such a polynomial is a non-zero
    function on the domain (|rho| < 1 is an interval).
    """
    num = _reduced_numerator(e, two_input)
    if num == 0:
        return False
    roots = {k: sp.Dummy(f"sqrt_{k}", positive=True) for k in (S.K, S.K11, S.K22)}
    num = num.xreplace({k: v**2 for k, v in roots.items()}).xreplace({sp.pi: sp.Dummy("pi", positive=True)})
    if num.atoms(sp.Function) or num.atoms(sp.NumberSymbol):
        return False  # transcendental constants or functions: no independence argument
    symbols = sorted(num.free_symbols, key=sp.default_sort_key)
    if any(getattr(sym, "name", "").startswith("theta_") for sym in symbols):
        return False  # arccos of other arguments: possibly algebraically related
    if symbols and not num.is_polynomial(*symbols):
        return False
    coeffs = sp.Poly(num, *symbols).coeffs() if symbols else [num]
    return any(abs(sp.N(c, 50)) > 1e-30 for c in coeffs)


def _display(e: sp.Expr, angles: Mapping) -> sp.Expr:
    """A canonical residual with sin_theta shown as sin(theta) and other angles as arccos(...)."""
    return e.xreplace({_SIN: sp.sin(_THETA), **angles})


def symbolic_verdict(claim: sp.Expr, engine: sp.Expr, q: Quantity, budget: float = 10.0) -> dict:
    """Does claim - engine simplify to zero on the domain? ``equal``; ``not-equal`` when the residual is
    provably not identically zero (:func:`_provably_nonzero`); else ``undecided`` (no closed form, out
    of time, or a residual SymPy cannot decide)."""
    if engine.has(GaussianExpectation):
        return {"result": "undecided", "residual": None,
                "detail": "the derivation needs numerical quadrature (no closed form), so no symbolic "
                          "comparison"}
    how = ("canonical form (K12 = rho sqrt(K11 K22), theta = arccos(rho), sin(theta) = sqrt(1 - rho^2), "
           "|rho| <= 1, K11, K22 > 0)" if q.two_input else "canonical form (K > 0)")
    residual = None
    angles: dict = {}
    try:
        with _deadline(budget):
            diff = sp.expand(claim - engine)
            if diff == 0:
                return {"result": "equal", "residual": "0", "detail": "claim - derivation expands to 0"}
            canon = canonical(claim - engine, q.two_input, angles)
            if _is_zero(canon, q.two_input):
                return {"result": "equal", "residual": "0", "detail": f"claim - derivation is 0 in {how}"}
            residual = sp.factor_terms(sp.together(canon))
            if sp.count_ops(canon) < 400:
                residual = sp.simplify(canon)
                if residual == 0 or _is_zero(residual, q.two_input):
                    return {"result": "equal", "residual": "0",
                            "detail": f"claim - derivation simplifies to 0 ({how}, then simplify)"}
    except _Timeout:
        shown = None if residual is None else str(_display(residual, angles))
        return {"result": "undecided", "residual": shown,
                "detail": f"could not decide within the time budget of {budget:g} s"}
    except (TypeError, ValueError, NotImplementedError, AttributeError, sp.PolynomialError,
            RecursionError) as exc:
        return {"result": "undecided", "residual": None,
                "detail": f"SymPy could not simplify the difference ({type(exc).__name__})"}
    shown = str(_display(residual, angles))
    try:
        with _deadline(budget):
            nonzero = _provably_nonzero(canon, q.two_input)
    except (_Timeout, TypeError, ValueError, NotImplementedError, sp.PolynomialError):
        nonzero = False
    if nonzero:
        return {"result": "not-equal", "residual": shown,
                "detail": f"claim - derivation = {shown}, which is not identically zero"}
    return {"result": "undecided", "residual": shown,
            "detail": f"claim - derivation reduces to {shown}, which SymPy cannot show to vanish"}


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


def _mp(value: sp.Expr):
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


def _evaluate_claim(expr: sp.Expr, point: Point):
    """``expr`` at ``point`` with mpmath: the values go in as 50-digit SymPy Floats (so every node is
    evaluated in 50-digit arithmetic, pure SymPy, no generated code), then ``evalf`` to 30 digits.
    Substituting first is 20x faster than ``evalf(subs=...)`` on large derivations, and as accurate
    here: cancellations such as pi - arccos(-1) leave ~1e-50 instead of ~1e-26."""
    try:
        with _deadline(EVAL_SECONDS):
            return _mp(expr.xreplace(point.values).evalf(DIGITS))
    except _Timeout:
        return None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None


def _evaluate_engine(expr: sp.Expr, points: list[Point]) -> list:
    """The derivation at every point: evalf at 30 digits, or float64 quadrature for numeric nodes."""
    if not expr.has(GaussianExpectation):
        return [_evaluate_claim(expr, p) for p in points]
    from .numeric import evaluate
    from .quadrature import refine_nodes

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


def _fmt(v) -> float | str | None:
    if v is None:
        return None
    if isinstance(v, mpmath.mpc):
        return str(complex(v)) if v.imag != 0 else _fmt(v.real)
    f = float(v)
    return f if math.isfinite(f) else mpmath.nstr(v, 15)


def numeric_verdict(claim: sp.Expr, engine: sp.Expr, q: Quantity, seed: int = 0) -> dict:
    """Compare claim and derivation at :func:`sample_points`; relative error |c - e| / max(|c|, |e|, floor)
    with floor = FLOOR x the median |e|."""
    closed = not engine.has(GaussianExpectation)
    points = sample_points(q, seed, closed)
    evs = _evaluate_engine(engine, points)
    cvs = [_evaluate_claim(claim, p) for p in points]
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
        "worst": {"at": worst["point"].as_dict(), "claim": _fmt(worst["claim"]),
                  "derivation": _fmt(worst["engine"]), "rel_error": worst["rel"]},
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
                tv = [_real_part(_evaluate_claim(t, rec["point"]), rec["engine"]) for rec in records]
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


# ----------------------------------------------------------------------------------------------
# Empirical verdict: the claim against sampling, without the engine's derivation

#: |z| above which a sampled estimate is taken to contradict the claim.
Z_MAX = 5.0
#: Hyperparameters of the sampled networks (distinct values so that C and lambda cannot be confused).
NET = {"C_W": 1.5, "C_b": 0.1, "lambda_W": 0.7, "lambda_b": 0.3}
_INPUT_GRAM = np.array([[1.2, 0.5, -0.3], [0.5, 0.8, 0.1], [-0.3, 0.1, 0.5]])


def _claim_at(expr: sp.Expr, values: Mapping[sp.Symbol, float]) -> float:
    subs = {k: sp.Float(repr(float(v)), 50) for k, v in values.items()}
    try:
        with _deadline(EVAL_SECONDS):
            v = _mp(expr.xreplace(subs).evalf(DIGITS))
    except _Timeout:
        v = None
    if isinstance(v, mpmath.mpc) and abs(v.imag) <= 1e-8 * max(abs(v.real), 1.0):
        v = v.real  # arccos(1 + 1e-31) on a diagonal: rounding, far below the error bars
    if v is None or isinstance(v, mpmath.mpc):
        return float("nan")
    return float(v)


def _record(at: dict, claim: float, mean: float, stderr: float) -> dict:
    diff = claim - mean
    if stderr > 0:
        z = diff / stderr
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    if not math.isfinite(claim):
        z = math.inf
    return {"at": at, "claim": claim, "sampled": mean, "stderr": stderr, "z": z}


def _gaussian_records(expr: sp.Expr, q: Quantity, activation: Activation, seed: int,
                      samples: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from . import montecarlo  # noqa: F401  (float64 JAX)
    from .api import jax_activation

    sigma = jax_activation(activation)

    def sd(z):
        return jax.jvp(sigma, (z,), (jnp.ones_like(z),))

    key = jax.random.key(seed)
    out = []
    if q.two_input:
        for i, (k11, k12, k22) in enumerate([(1.0, 0.3, 0.8), (2.0, -1.2, 1.5), (0.5, 0.4995, 0.5)]):
            x, y = jax.random.normal(jax.random.fold_in(key, i), (2, samples), jnp.float64)
            z1 = math.sqrt(k11) * x
            z2 = (k12 / math.sqrt(k11)) * x + math.sqrt(k22 - k12 * k12 / k11) * y
            (s1, d1), (s2, d2) = sd(z1), sd(z2)
            f = s1 * s2 if q.name == "expectation" else d1 * d2
            at = {"K11": k11, "K12": k12, "K22": k22}
            claim = _claim_at(expr, {S.K11: k11, S.K12: k12, S.K22: k22})
            out.append(_record(at, claim, float(jnp.mean(f)), float(jnp.std(f, ddof=1)) / math.sqrt(samples)))
        return out
    for i, k in enumerate((0.25, 0.8, 1.6)):  # moderate K: sigma = exp(z) has lognormal tails
        x = jax.random.normal(jax.random.fold_in(key, i), (samples,), jnp.float64)
        z = math.sqrt(k) * x
        s, d = sd(z)
        cw = NET["C_W"]
        f = {"single_expectation": s * s, "single_derivative_expectation": d * d, "chi_perp": cw * d * d,
             "chi_par": (cw / k) * z * s * d}[q.name]
        values = {S.K: k, S.C_W: cw}
        at = {"K": k, "C_W": cw} if S.C_W in q.variables else {"K": k}
        claim = _claim_at(expr, {v: values[v] for v in q.variables})
        out.append(_record(at, claim, float(jnp.mean(f)), float(jnp.std(f, ddof=1)) / math.sqrt(samples)))
    return out


def _network_records(expr: sp.Expr, q: Quantity, activation: Activation, seed: int, width: int,
                     n_networks: int) -> list[dict]:
    """Two dense layers on three inputs with Gram matrix S: K^(1) = C_b + C_W S and
    Theta^(1) = lambda_b + lambda_W S exactly; the second layer's sampled kernel and NTK are compared
    with the claim evaluated at the first layer's K^(1), Theta^(1). Their means are exactly the
    infinite-width maps at any width, because the first layer's preactivations are exactly Gaussian
    given the inputs (no 1/n correction before layer 3)."""
    from .api import inputs_from_kernel, jax_activation
    from .montecarlo import sample_kernels

    cw, cb, lw, lb = NET["C_W"], NET["C_b"], NET["lambda_W"], NET["lambda_b"]
    x = inputs_from_kernel(_INPUT_GRAM)
    res = sample_kernels(jax_activation(activation), x, 2, width, cw, cb, lw, lb, n_networks=n_networks,
                         seed=seed)
    k1 = cb + cw * _INPUT_GRAM
    t1 = lb + lw * _INPUT_GRAM
    ntk = q.name in ("ntk_recursion", "single_input_ntk", "Theta")
    mean = res.ntk_mean if ntk else res.nngp_mean[1]
    err = res.ntk_stderr if ntk else res.nngp_stderr[1]
    hyper = {S.C_W: cw, S.C_b: cb, S.lambda_W: lw, S.lambda_b: lb, S.V: 0.0, S.G1: 0.0, A_: 0.0, B_: 0.0,
             D_: 0.0, F_: 0.0, r: 1.0}
    pairs = [(a, b) for a in range(3) for b in range(a, 3)] if q.two_input else [(a, a) for a in range(3)]
    out = []
    for a, b in pairs:
        if q.two_input:
            values = {S.K11: k1[a, a], S.K12: k1[a, b], S.K22: k1[b, b], S.Theta12: t1[a, b], **hyper}
        else:
            values = {S.K: k1[a, a], S.Theta: t1[a, a], **hyper}
        values = {v: values[v] for v in q.variables}
        claim = _claim_at(expr, values)
        at = {str(k): float(v) for k, v in values.items()}
        out.append(_record(at, claim, float(mean[a, b]), float(err[a, b])))
    return out


def _state_records(expr: sp.Expr, q: Quantity, activation: Activation, seed: int, width: int = 2,
                   batches: int = 64, per_batch: int = 8192) -> list[dict]:
    """The one-step finite-width maps at the first layer's state (V = G1 = A = B = D = F = 0), from a
    two-layer network of hidden width n: z^(1)_j ~ N(0, K) i.i.d., W ~ N(0, C_W/n), b ~ N(0, C_b),
    first-layer NTK Theta. Exactly (at every n): n Cov(z_1^2, z_2^2) = V', n E[H_12^2] = B',
    n Var(H_11) = A' + 2 B', n Cov(H_11, z_2^2) = D', n E[H_12 z_1 z_2] = F' and
    E[z_1^2] = C_b + (C_W/n) E[sum_j sigma_j^2] (so G1' = 0); H is the second layer's NTK
    (PDLT ch. 8 definitions of A, B, D, F). Standard errors by batch means."""
    import jax
    import jax.numpy as jnp

    from . import montecarlo  # noqa: F401  (float64 JAX)
    from .api import jax_activation

    sigma = jax_activation(activation)
    cw, cb, lw, lb = NET["C_W"], NET["C_b"], NET["lambda_W"], NET["lambda_b"]
    rr = 2.0  # the maps do not involve r at this state; a claim that does is caught
    n = width

    def batch(key, k, theta):
        kz, kw, kb = jax.random.split(key, 3)
        z = jnp.sqrt(k) * jax.random.normal(kz, (per_batch, n), jnp.float64)
        s, ds = jax.jvp(sigma, (z,), (jnp.ones_like(z),))
        W = jnp.sqrt(cw / n) * jax.random.normal(kw, (per_batch, 2, n), jnp.float64)
        b = jnp.sqrt(cb) * jax.random.normal(kb, (per_batch, 2), jnp.float64)
        out = b + jnp.einsum("mij,mj->mi", W, s)
        h11 = lb + (lw / n) * jnp.sum(s * s, -1) + theta * jnp.sum(W[:, 0] ** 2 * ds * ds, -1)
        h12 = theta * jnp.sum(W[:, 0] * W[:, 1] * ds * ds, -1)
        q1, q2 = out[:, 0] ** 2, out[:, 1] ** 2

        def cov(u, v):
            return jnp.mean((u - u.mean()) * (v - v.mean())) * per_batch / (per_batch - 1)

        return {
            "K": jnp.mean((q1 + q2) / 2), "Theta": jnp.mean(h11),
            "V": n * cov(q1, q2), "G1": n * jnp.mean(q1 - cb - (cw / n) * jnp.sum(s * s, -1)),
            "B": n * jnp.mean(h12 * h12), "A": n * (cov(h11, h11) - 2 * jnp.mean(h12 * h12)),
            "D": n * cov(h11, q2), "F": n * jnp.mean(h12 * out[:, 0] * out[:, 1]),
        }

    key = jax.random.key(seed)
    out = []
    for i, (k, theta) in enumerate(((0.6, 1.3), (1.7, 0.8))):
        keys = jax.random.split(jax.random.fold_in(key, i), batches)
        est = jax.vmap(lambda kk: batch(kk, k, theta))(keys)[q.name]
        mean = float(jnp.mean(est))
        stderr = float(jnp.std(est, ddof=1)) / math.sqrt(batches)
        values = {S.K: k, S.Theta: theta, S.V: 0.0, S.G1: 0.0, A_: 0.0, B_: 0.0, D_: 0.0, F_: 0.0,
                  S.C_W: cw, S.C_b: cb, S.lambda_W: lw, S.lambda_b: lb, r: rr}
        claim = _claim_at(expr, values)
        out.append(_record({"K": k, "Theta": theta, "V": 0.0, "C_W": cw, "C_b": cb, "lambda_W": lw,
                            "lambda_b": lb, "r": rr}, claim, mean, stderr))
    return out


def empirical_verdict(claim: sp.Expr, q: Quantity, activation: Activation, seed: int = 0, *,
                      samples: int = 2**19, width: int = 64, n_networks: int = 400) -> dict:
    """The claim against sampled Gaussians or sampled two-layer networks, with z-scores.

    - expectations, chi_par, chi_perp: z ~ N(0, K) drawn with ``jax.random``; chi_par through
      Stein's lemma, chi_par = (C_W/K) <z sigma sigma'>_K;
    - recursions and single-input maps: :func:`derive.montecarlo.sample_kernels` on two dense layers
      of width ``width`` (``n_networks`` networks);
    - finite-width maps V, G1, A, B, D, F: a two-layer network at the first layer's state, see
      :func:`_state_records`.

    ``not-equal`` when some |z| > :data:`Z_MAX`; ``equal`` means consistent within the error bars.
    """
    if q.empirical in ("gauss1", "gauss2"):
        records = _gaussian_records(claim, q, activation, seed, samples)
        method = f"{samples} Gaussian samples z ~ N(0, K) per point (jax.random)"
    elif q.empirical in ("network1", "network2"):
        records = _network_records(claim, q, activation, seed, width, n_networks)
        method = (f"{n_networks} sampled two-layer networks of width {width} on 3 inputs "
                  f"(C_W = {NET['C_W']}, C_b = {NET['C_b']}, lambda_W = {NET['lambda_W']}, "
                  f"lambda_b = {NET['lambda_b']}): layer 2's kernel/NTK against the claim at layer 1's "
                  "K and Theta")
    else:
        records = _state_records(claim, q, activation, seed)
        method = ("two-layer networks (hidden width 2) at the first layer's state "
                  f"V = G1 = A = B = D = F = 0, {64 * 8192} draws per point, batch-means error bars; the "
                  "map's terms in the previous layer's V, G1, A, B, D, F vanish there and are not exercised")
    if not all(math.isfinite(rec["sampled"]) and math.isfinite(rec["stderr"]) for rec in records):
        return {"result": "undecided", "method": method, "points": records,
                "detail": f"sampling produced non-finite values (overflow?); {method}"}
    zmax = max(abs(rec["z"]) for rec in records)
    ok = zmax <= Z_MAX
    worst = max(records, key=lambda rec: abs(rec["z"]))
    rel = abs(worst["claim"] - worst["sampled"]) / max(abs(worst["sampled"]), 1e-300)
    return {
        "result": "equal" if ok else "not-equal",
        "max_abs_z": zmax if math.isfinite(zmax) else "inf",
        "threshold": Z_MAX,
        "method": method,
        "points": records,
        "worst": worst,
        "rel_error": rel if math.isfinite(rel) else None,
        "detail": (f"{'consistent with' if ok else 'contradicted by'} sampling: max |z| = {zmax:.3g} "
                   f"({'<=' if ok else '>'} {Z_MAX:g}) over {len(records)} points; {method}"),
    }


# ----------------------------------------------------------------------------------------------
# Reports

_SKIPPED = {"result": "skipped", "detail": "not requested (use --empirical / empirical=True)"}


@dataclass
class CheckReport:
    """The verdict on one claim, and how each method reached its own."""

    quantity: str
    activation: str
    params: dict
    claim: str
    claim_expr: sp.Expr
    derivation: sp.Expr
    verdict: str
    methods: dict
    max_rel_error: float | None
    counterexample: dict | None
    values: dict | None
    hint: str | None
    formula: str = ""

    @property
    def equal(self) -> bool:
        return self.verdict == "equal"

    def as_dict(self) -> dict:
        """JSON-ready: expressions as SymPy-syntax strings in the documented symbols."""
        methods = {}
        for k, m in self.methods.items():
            methods[k] = {kk: _jsonable(vv) for kk, vv in m.items() if kk not in ("records", "worst")}
        return {
            "quantity": self.quantity, "activation": self.activation, "params": self.params,
            "formula": self.formula, "claim": self.claim, "claim_parsed": str(self.claim_expr),
            "derivation": str(self.derivation), "verdict": self.verdict, "methods": methods,
            "max_rel_error": _jsonable(self.max_rel_error), "counterexample": _jsonable(self.counterexample),
            "values": _jsonable(self.values), "hint": self.hint,
        }

    def to_text(self) -> str:
        """A short report for people."""
        lines = [f"{self.quantity} of {self.activation}"
                 + (f" ({', '.join(f'{k}={v}' for k, v in self.params.items())})" if self.params else "")
                 + f":  {self.formula}",
                 f"  claim:      {self.claim_expr}", f"  derivation: {self.derivation}",
                 f"verdict: {self.verdict.upper()}"]
        for name in ("symbolic", "numeric", "empirical"):
            m = self.methods[name]
            lines.append(f"  {name:<9} {m['result']}: {m['detail']}")
        if self.counterexample:
            at = ", ".join(f"{k} = {_short(v)}" for k, v in self.counterexample.items())
            lines.append(f"  largest disagreement at {at}")
            if self.values:
                lines.append("    " + ", ".join(f"{k} = {_short(v)}" for k, v in self.values.items()))
        if self.max_rel_error is not None and self.verdict != "equal":
            lines.append(f"  max relative error: {self.max_rel_error:.3g}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


@dataclass
class CheckSet:
    """Several claims (from a claim file) about one activation."""

    activation: str
    params: dict
    reports: list[CheckReport] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        verdicts = {rep.verdict for rep in self.reports}
        for v in ("not-equal", "undecided"):
            if v in verdicts:
                return v
        return "equal"

    def as_dict(self) -> dict:
        return {"activation": self.activation, "params": self.params, "verdict": self.verdict,
                "claims": [rep.as_dict() for rep in self.reports]}

    def to_text(self) -> str:
        body = "\n\n".join(rep.to_text() for rep in self.reports)
        return f"{body}\n\noverall: {self.verdict.upper()} ({len(self.reports)} claims)"


def _short(v) -> str:
    return f"{v:.10g}" if isinstance(v, float) else str(v)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else str(float(v))
    if isinstance(v, (mpmath.mpf, mpmath.mpc)):
        return _fmt(v)
    if isinstance(v, sp.Basic):
        return str(v)
    return v


def _decide(symbolic: dict, numeric: dict, empirical: dict) -> str:
    """not-equal if any method shows a difference; equal if symbolic or numeric shows equality; else
    undecided."""
    results = (symbolic["result"], numeric["result"], empirical["result"])
    if "not-equal" in results:
        return "not-equal"
    if symbolic["result"] == "equal" or numeric["result"] == "equal":
        return "equal"
    return "undecided"


def judge(claim: Claim, activation: Activation, *, empirical: bool = False, seed: int = 0,
          time_budget: float = 10.0) -> CheckReport:
    """Run the three verdicts on a parsed claim and assemble the report."""
    q = claim.quantity
    engine = derivation(activation, q.name)
    sym = symbolic_verdict(claim.expr, engine, q, time_budget)
    num = numeric_verdict(claim.expr, engine, q, seed)
    emp = dict(_SKIPPED)
    if empirical:
        try:
            emp = empirical_verdict(claim.expr, q, activation, seed)
        except (DeriveError, NotImplementedError, ValueError, TypeError) as exc:
            emp = {"result": "undecided", "detail": f"sampling was not possible ({str(exc).splitlines()[0]})"}
    verdict = _decide(sym, num, emp)
    counterexample = values = None
    max_rel = num.get("max_rel_error")
    if num["result"] == "not-equal" or (sym["result"] == "not-equal" and "worst" in num):
        w = num["worst"]
        counterexample, values = w["at"], {"claim": w["claim"], "derivation": w["derivation"]}
    elif emp["result"] == "not-equal":
        w = emp["worst"]
        counterexample = dict(w["at"])
        values = {"claim": w["claim"], "sampled": w["sampled"], "stderr": w["stderr"], "z": w["z"]}
        max_rel = emp.get("rel_error")
    the_hint = None
    if verdict == "not-equal":
        the_hint = hint(num, engine, q, sym)
        if emp["result"] == "not-equal" and num["result"] != "not-equal":
            w = emp["worst"]
            sampled = (f"sampling gives {w['sampled']:.6g} +- {w['stderr']:.2g} where the claim gives "
                       f"{w['claim']:.6g}")
            if num["result"] == "equal":
                sampled = "the engine's derivation agrees with the claim but sampling does not: " + sampled
            the_hint = sampled if the_hint is None else f"{sampled}; {the_hint}"
    return CheckReport(
        quantity=q.name, activation=activation.name, params=activation.describe_params(), claim=claim.text,
        claim_expr=claim.expr, derivation=engine, verdict=verdict,
        methods={"symbolic": sym, "numeric": num, "empirical": emp}, max_rel_error=max_rel,
        counterexample=counterexample, values=values, hint=the_hint, formula=q.formula)


# ----------------------------------------------------------------------------------------------
# Entry points

#: Largest accepted claim file, in bytes.
MAX_FILE_BYTES = 200_000


def _definition_items(definitions, syntax: str) -> list[tuple[str, str, str]]:
    if not definitions:
        return []
    if isinstance(definitions, Mapping):
        return [(str(k), v, syntax) for k, v in definitions.items()]
    if isinstance(definitions, str):
        definitions = [definitions]
    items = []
    for d in definitions:
        if isinstance(d, tuple) and len(d) in (2, 3):
            items.append((d[0], d[1], d[2] if len(d) == 3 else syntax))
        else:
            name, text = split_definition(d)
            items.append((name, text, syntax))
    for name, text, _ in items:
        if not isinstance(text, str):
            raise DeriveError(f"definition '{name}': expected text, got {type(text).__name__}")
    return items


def check_claim(activation: Activation, quantity_name: str, claim: str | None = None, *,
                latex: str | None = None, definitions=None, empirical: bool = False, seed: int = 0,
                time_budget: float = 10.0) -> CheckReport:
    """Check one claim (SymPy syntax ``claim`` or LaTeX ``latex``) about ``quantity_name``.

    ``definitions``: ``["theta = \\arccos(\\rho)", ...]`` or ``{"theta": "..."}``, in the claim's syntax.
    """
    q = quantity(quantity_name)
    if (claim is None) == (latex is None):
        raise DeriveError("give exactly one of a claim (SymPy syntax) and a LaTeX claim")
    syntax = "latex" if latex is not None else "sympy"
    text = latex if latex is not None else claim
    where = "--claim-latex" if syntax == "latex" else "--claim"
    defs = _definition_items(definitions, syntax)
    parsed = parse_claim(text, q, activation, syntax=syntax, definitions=defs, where=where)
    return judge(parsed, activation, empirical=empirical, seed=seed, time_budget=time_budget)


@dataclass(frozen=True)
class ClaimFile:
    """A claim file's content: activation, parameters, claims and definitions."""

    activation: str | None
    params: dict
    claims: list  # (quantity, text, syntax)
    definitions: list  # (name, text, syntax)


def load_claim_file(path: str | Path) -> ClaimFile:
    """Read a claim file (TOML)::

        activation = "relu"
        params = { a = "0.2" }                 # optional
        [claims]                               # SymPy syntax
        single_input = "C_b + C_W*K/2"
        [claims.latex]                         # LaTeX
        expectation = '\\frac{\\sqrt{K_{11}K_{22}}}{2\\pi}(\\sin\\theta + (\\pi-\\theta)\\cos\\theta)'
        [definitions]                          # SymPy syntax helpers
        [definitions.latex]                    # LaTeX helpers
        theta = '\\arccos(\\rho)'
    """
    import tomllib

    p = Path(path).expanduser()
    if not p.is_file():
        raise DeriveError(f"claim file '{path}' does not exist")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise DeriveError(f"claim file '{path}' is too large (at most {MAX_FILE_BYTES} bytes)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeriveError(f"claim file '{path}': {str(exc).splitlines()[0]}") from None
    unknown = set(data) - {"activation", "params", "claims", "definitions"}
    if unknown:
        raise DeriveError(f"claim file '{path}': unknown keys {', '.join(sorted(unknown))} "
                          "(allowed: activation, params, claims, definitions)")
    act = data.get("activation")
    if act is not None and not isinstance(act, str):
        raise DeriveError(f"claim file '{path}': activation must be a string")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise DeriveError(f"claim file '{path}': params must be a table, e.g. params = {{ a = \"0.2\" }}")
    params = {str(k): str(v) for k, v in params.items()}

    def entries(table_name: str) -> list:
        table = data.get(table_name, {})
        if not isinstance(table, dict):
            raise DeriveError(f"claim file '{path}': [{table_name}] must be a table")
        out = []
        for k, v in table.items():
            if k == "latex":
                if not isinstance(v, dict):
                    raise DeriveError(f"claim file '{path}': [{table_name}.latex] must be a table")
                for kk, vv in v.items():
                    if not isinstance(vv, str):
                        raise DeriveError(f"claim file '{path}': {table_name}.latex.{kk} must be a string")
                    out.append((kk, vv, "latex"))
            elif isinstance(v, str):
                out.append((k, v, "sympy"))
            else:
                raise DeriveError(f"claim file '{path}': {table_name}.{k} must be a string")
        return out

    claims = entries("claims")
    if not claims:
        raise DeriveError(f"claim file '{path}' holds no claims (add a [claims] or [claims.latex] table)")
    for qname, _, _ in claims:
        quantity(qname)
    return ClaimFile(act, params, claims, entries("definitions"))


def check(spec=None, quantity_name: str | None = None, claim: str | None = None, *,
          latex: str | None = None, file: str | Path | None = None, definitions=None, params=None,
          empirical: bool = False, seed: int = 0, time_budget: float = 10.0,
          rule_dirs: Sequence[str] = ()) -> CheckReport | CheckSet:
    """Check a hand derivation: one claim (``claim`` or ``latex`` about ``quantity_name``), or every
    claim of a claim ``file`` (then a :class:`CheckSet`). See the module docstring for the verdicts."""
    from .api import activation as resolve_activation

    if file is not None:
        if claim is not None or latex is not None:
            raise DeriveError("give a claim file or a single claim, not both")
        if definitions:
            raise DeriveError("with a claim file, put definitions in its [definitions] tables")
        cf = load_claim_file(file)
        spec = spec if spec is not None else cf.activation
        if spec is None:
            raise DeriveError("no activation: give one, or set activation = \"...\" in the claim file")
        act = resolve_activation(spec, params if params is not None else (cf.params or None), rule_dirs)
        defs = cf.definitions
        out = CheckSet(act.name, act.describe_params())
        for qname, text, syntax in cf.claims:
            where = f"claim file [claims{'.latex' if syntax == 'latex' else ''}] {qname}"
            parsed = parse_claim(text, quantity(qname), act, syntax=syntax, definitions=defs, where=where)
            out.reports.append(judge(parsed, act, empirical=empirical, seed=seed, time_budget=time_budget))
        return out
    if spec is None:
        raise DeriveError("give an activation (a rule name such as relu, or an expression in z)")
    if quantity_name is None:
        raise DeriveError(f"give the quantity the claim is about ({', '.join(QUANTITIES)})")
    act = resolve_activation(spec, params, rule_dirs)
    return check_claim(act, quantity_name, claim, latex=latex, definitions=definitions, empirical=empirical,
                       seed=seed, time_budget=time_budget)
