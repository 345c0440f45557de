"""The one safe parser: text -> SymPy, through Python's ``ast`` and a whitelist.

Every piece of text that reaches SymPy (rule files, ``--activation "z*erf(z)"``, parameters,
claims) comes through :func:`parse_expression`. The text is parsed by :func:`ast.parse` (which
only builds a syntax tree, it runs nothing) and the tree is walked node by node: numbers,
whitelisted names, whitelisted function calls and arithmetic are turned into SymPy objects; every
other node type (attributes, subscripts, lambdas, comprehensions, strings, keywords, ...) is
refused with a one-line :class:`~derive.core.errors.ParseError` naming the token and its column.
``eval``, ``exec``, ``sympify`` and ``parse_expr`` are never called.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import sympy as sp

from derive.core.errors import ParseError

#: Longest accepted input, in characters.
MAX_LENGTH = 2000
#: Deepest accepted nesting of operations and calls.
MAX_DEPTH = 60
#: Largest accepted |exponent| in a power with a numeric exponent.
MAX_EXPONENT = 64
#: Largest accepted size, in bits, of an exact number produced while parsing.
MAX_BITS = 4096


def _sigmoid(x: sp.Expr) -> sp.Expr:
    return 1 / (1 + sp.exp(-x))


def _softplus(x: sp.Expr) -> sp.Expr:
    return sp.log(1 + sp.exp(x))


def _step(x: sp.Expr) -> sp.Expr:
    return sp.Heaviside(x)


def _hermite(degree: sp.Expr, x: sp.Expr) -> sp.Expr:
    """Probabilists' Hermite polynomial He_degree(x), normalised to unit norm under N(0, 1)."""
    if degree.is_Number and not (degree.is_Integer and 0 <= degree <= MAX_EXPONENT):
        raise ValueError(f"hermite degree must be an integer in [0, {MAX_EXPONENT}], got {degree}")
    if not degree.is_Number and not (degree.is_Symbol and degree.is_integer):
        raise ValueError("hermite degree must be an integer or an integer parameter")
    return sp.hermite_prob(degree, x) / sp.sqrt(sp.factorial(degree))


#: name -> (callable building the SymPy object, min arity, max arity or None for any)
FUNCTIONS: dict[str, tuple[Callable[..., sp.Expr], int, int | None]] = {
    "exp": (sp.exp, 1, 1),
    "log": (sp.log, 1, 1),
    "sqrt": (sp.sqrt, 1, 1),
    "sin": (sp.sin, 1, 1),
    "cos": (sp.cos, 1, 1),
    "tan": (sp.tan, 1, 1),
    "sinh": (sp.sinh, 1, 1),
    "cosh": (sp.cosh, 1, 1),
    "tanh": (sp.tanh, 1, 1),
    "asin": (sp.asin, 1, 1),
    "acos": (sp.acos, 1, 1),
    "atan": (sp.atan, 1, 1),
    "arcsin": (sp.asin, 1, 1),
    "arccos": (sp.acos, 1, 1),
    "arctan": (sp.atan, 1, 1),
    "erf": (sp.erf, 1, 1),
    "erfc": (sp.erfc, 1, 1),
    "Abs": (sp.Abs, 1, 1),
    "abs": (sp.Abs, 1, 1),
    "sign": (sp.sign, 1, 1),
    "Heaviside": (_step, 1, 1),
    "step": (_step, 1, 1),
    "Max": (sp.Max, 2, None),
    "Min": (sp.Min, 2, None),
    "max": (sp.Max, 2, None),
    "min": (sp.Min, 2, None),
    "sigmoid": (_sigmoid, 1, 1),
    "softplus": (_softplus, 1, 1),
    "hermite": (_hermite, 2, 2),
}

#: Named constants every expression may use.
CONSTANTS: dict[str, sp.Expr] = {"pi": sp.pi, "E": sp.E}

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}


def _describe(node: ast.AST) -> str:
    """A short human name for a refused syntax node."""
    names = {
        ast.Attribute: "attribute access", ast.Subscript: "subscript", ast.Lambda: "lambda",
        ast.ListComp: "comprehension", ast.SetComp: "comprehension", ast.DictComp: "comprehension",
        ast.GeneratorExp: "comprehension", ast.List: "list", ast.Tuple: "tuple", ast.Dict: "dict",
        ast.Set: "set", ast.Compare: "comparison", ast.BoolOp: "boolean operator",
        ast.IfExp: "conditional expression", ast.JoinedStr: "f-string", ast.NamedExpr: "assignment",
        ast.Starred: "starred argument", ast.Await: "await", ast.Yield: "yield",
        ast.YieldFrom: "yield", ast.Slice: "slice",
    }
    for cls, label in names.items():
        if isinstance(node, cls):
            return label
    return type(node).__name__


class _Builder:
    def __init__(self, text: str, names: Mapping[str, sp.Expr],
                 functions: Mapping[str, tuple[Callable[..., sp.Expr], int, int | None]], where: str):
        self.text = text
        self.names = names
        self.functions = functions
        self.where = where

    def fail(self, message: str, node: ast.AST | None = None) -> ParseError:
        col = getattr(node, "col_offset", None)
        return ParseError(message, self.text, None if col is None else col + 1, self.where)

    def token(self, node: ast.AST) -> str:
        seg = ast.get_source_segment(self.text, node) or ""
        seg = seg.splitlines()[0] if seg else ""
        return seg if len(seg) <= 40 else seg[:37] + "..."

    def build(self, node: ast.AST, depth: int = 0) -> sp.Expr:
        if depth > MAX_DEPTH:
            raise self.fail(f"expression nested too deeply (more than {MAX_DEPTH} levels)", node)
        if isinstance(node, ast.Expression):
            return self.build(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in self.functions:
                raise self.fail(f"function '{node.id}' used without arguments", node)
            allowed = ", ".join(sorted(self.names)) or "none"
            raise self.fail(f"unknown name '{node.id}' (allowed names: {allowed})", node)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return -self.build(node.operand, depth + 1)
            if isinstance(node.op, ast.UAdd):
                return self.build(node.operand, depth + 1)
            raise self.fail(f"operator '{self.token(node)}' is not allowed", node)
        if isinstance(node, ast.BinOp):
            return self.binop(node, depth)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        raise self.fail(f"{_describe(node)} is not allowed ('{self.token(node)}')", node)

    def constant(self, node: ast.Constant) -> sp.Expr:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "string" if isinstance(value, (str, bytes)) else type(value).__name__
            raise self.fail(f"{kind} literal is not allowed ('{self.token(node)}')", node)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(f"number '{self.token(node)}' is not finite", node)
            # Keep the digits the user typed: 0.1 stays exactly 1/10.
            return sp.Rational(self.token(node).replace("_", "")) if self._plain(node) else sp.Float(value)
        if value.bit_length() > MAX_BITS:
            raise self.fail("integer literal too large", node)
        return sp.Integer(value)

    def _plain(self, node: ast.Constant) -> bool:
        tok = self.token(node)
        return bool(tok) and all(c in "0123456789._eE+-" for c in tok)

    def binop(self, node: ast.BinOp, depth: int) -> sp.Expr:
        op = type(node.op)
        if op not in _BINOPS:
            raise self.fail(f"operator '{type(node.op).__name__}' is not allowed", node)
        left = self.build(node.left, depth + 1)
        right = self.build(node.right, depth + 1)
        if op is ast.Add:
            return self.checked(left + right, node)
        if op is ast.Sub:
            return self.checked(left - right, node)
        if op is ast.Mult:
            return self.checked(left * right, node)
        if op is ast.Div:
            if right == 0:
                raise self.fail("division by zero", node)
            return self.checked(left / right, node)
        # Power (the caret was already turned into **).
        if right.is_Number:
            if abs(right) > MAX_EXPONENT:
                raise self.fail(f"exponent {right} too large (at most {MAX_EXPONENT} in absolute value)", node.right)
            if left.is_Number and left != 0:
                bits = abs(float(right)) * max(math.log2(abs(float(sp.Abs(left).evalf(30)))) + 1, 1)
                if bits > MAX_BITS:
                    raise self.fail("power produces a number that is too large", node)
            if left == 0 and right.is_negative:
                raise self.fail("division by zero", node)
        return self.checked(sp.Pow(left, right), node)

    def checked(self, expr: sp.Expr, node: ast.AST) -> sp.Expr:
        if expr.is_Rational and (abs(expr.p).bit_length() > MAX_BITS or expr.q.bit_length() > MAX_BITS):
            raise self.fail("number too large", node)
        if expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
            raise self.fail("expression is undefined (division by zero or infinity)", node)
        return expr

    def call(self, node: ast.Call, depth: int) -> sp.Expr:
        if isinstance(node.func, ast.Attribute):
            raise self.fail(f"attribute access is not allowed ('{self.token(node.func)}')", node.func)
        if not isinstance(node.func, ast.Name):
            raise self.fail(f"only calls of named functions are allowed ('{self.token(node.func)}')", node.func)
        name = node.func.id
        if name not in self.functions:
            allowed = ", ".join(sorted(set(FUNCTIONS) & set(self.functions)))
            if set(self.functions) - set(FUNCTIONS):
                allowed += "; and activation names"
            raise self.fail(f"unknown function '{name}' (allowed: {allowed})", node.func)
        if node.keywords:
            kw = node.keywords[0]
            raise self.fail(f"keyword arguments are not allowed ('{kw.arg or '**'}')", kw)
        fn, lo, hi = self.functions[name]
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self.fail("starred argument is not allowed", a)
        if len(node.args) < lo or (hi is not None and len(node.args) > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise self.fail(f"function '{name}' takes {want} argument(s), got {len(node.args)}", node)
        args = [self.build(a, depth + 1) for a in node.args]
        try:
            return self.checked(fn(*args), node)
        except ValueError as exc:
            raise self.fail(str(exc), node) from None


def parse_expression(
    text: str,
    variables: Mapping[str, sp.Expr] | Iterable[str] = (),
    *,
    functions: Mapping[str, tuple[Callable[..., sp.Expr], int, int | None]] | None = None,
    where: str = "",
) -> sp.Expr:
    """Parse ``text`` into a SymPy expression without evaluating any Python.

    Args:
        text: the expression, in Python/SymPy syntax (``**`` or ``^`` for powers).
        variables: the names the expression may use, either a mapping name -> SymPy object or an
            iterable of names (documented symbols from :mod:`derive.core.symbols` are used when the name
            is one of them, plain real symbols otherwise). ``pi`` and ``E`` are always allowed.
        functions: extra callable names (name -> (builder, min arity, max arity)), merged over
            :data:`FUNCTIONS`.
        where: a label for error messages (``"--activation"``, a rule file name, ...).

    Raises:
        ParseError: with the offending token and its 1-based column.
    """
    from derive.core import symbols

    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}", where=where)
    if len(text) > MAX_LENGTH:
        raise ParseError(f"expression too long ({len(text)} characters, at most {MAX_LENGTH})", where=where)
    for i, ch in enumerate(text):
        if ch not in "\n\t" and (ord(ch) < 32 or ord(ch) == 127):
            raise ParseError(f"control character {ch!r} is not allowed", text, i + 1, where)
    if not text.strip():
        raise ParseError("empty expression", where=where)
    if isinstance(variables, Mapping):
        names: dict[str, sp.Expr] = dict(variables)
    else:
        names = {v: symbols.BY_NAME.get(v, sp.Symbol(v, real=True)) for v in variables}
    names = {**CONSTANTS, **names}
    table = dict(FUNCTIONS)
    if functions:
        table.update(functions)
    source, columns = _caret_to_power(text.strip())
    try:
        with warnings.catch_warnings():  # Python's own warnings on odd text ("1if") are not the user's
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        col = columns[min(exc.offset, len(columns)) - 1] + 1 if exc.offset else None
        raise ParseError(f"invalid syntax ({exc.msg})", text, col, where) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ParseError(f"cannot parse ({type(exc).__name__})", text, None, where) from None
    try:
        return _Builder(source, names, table, where).build(tree)
    except ParseError as exc:
        if exc.column is not None:  # report the column in the text as typed
            exc = ParseError(str(exc).rsplit(" at column", 1)[0].removeprefix(f"{where}: " if where else ""),
                             text, columns[min(exc.column, len(columns)) - 1] + 1, where)
        raise exc from None
    except RecursionError:
        raise ParseError("expression nested too deeply", text, None, where) from None


def _caret_to_power(text: str) -> tuple[str, list[int]]:
    """Replace ``^`` by ``**`` (power, with Python's precedence) and map new columns to old ones."""
    out, cols = [], []
    for i, ch in enumerate(text):
        if ch == "^":
            out.append("**")
            cols.extend([i, i])
        else:
            out.append(ch)
            cols.append(i)
    cols.append(len(text))
    return "".join(out), cols
