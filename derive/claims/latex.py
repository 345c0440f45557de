"""LaTeX claims: a lexical whitelist, SymPy's ANTLR LaTeX parser, then a whitelist walk of the tree it built."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import sympy as sp
from sympy.core.function import AppliedUndef

from derive.claims.budget import Timeout, deadline
from derive.core.errors import DeriveError, ParseError
from derive.core.parse import FUNCTIONS, MAX_BITS, MAX_DEPTH, MAX_EXPONENT, MAX_LENGTH

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
        with deadline(LATEX_PARSE_SECONDS):
            return parse_latex(text, strict=True)  # the ANTLR backend (the default in every SymPy)
    except Timeout:
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


