"""Neurons and layers of product and polynomial networks built from multiplication gates.

A product of n inputs as a binary tree of four-neuron gates (Lin, Tegmark & Rolnick 2017): n - 1
gates, 4(n - 1) neurons in ceil(log2 n) hidden layers, against 2^n neurons in one hidden layer (their
no-flattening bound); polynomials in x1..xk monomial by monomial (the counting rule is in
:func:`polynomial_counts`). The gate itself is derived in :mod:`derive.gates.gate`.
"""

from __future__ import annotations

import ast
import heapq
import math
import re
import textwrap
from dataclasses import dataclass

import sympy as sp

from derive.core.errors import DeriveError

#: Largest number of monomials a polynomial may expand to.
MAX_MONOMIALS = 5000


#: Largest variable index (x1..x64).
MAX_VARIABLES = 64


#: Largest n for which s^(n)(c) of the shallow network is derived, and for which it is built.
MAX_SHALLOW_DERIVATIVE = 12


MAX_SHALLOW_NETWORK = 16


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False) or [""]


@dataclass(frozen=True)
class ProductCounts:
    """Neurons and layers for x1 x2 ... xn: binary tree of gates against one hidden layer."""

    n: int
    gates: int
    neurons: int
    layers: int
    gates_per_layer: tuple[int, ...]
    carried: int
    layered_neurons: int
    shallow_neurons: int

    def as_dict(self) -> dict:
        return {"n": self.n, "gates": self.gates, "tree_neurons": self.neurons, "tree_layers": self.layers,
                "gates_per_layer": list(self.gates_per_layer), "carried": self.carried,
                "layered_neurons": self.layered_neurons, "shallow_neurons": self.shallow_neurons}

    def text_lines(self, width: int = 80) -> list[str]:
        return _wrap(f"product of n = {self.n} inputs: binary tree of {_plural(self.gates, 'gate')} = "
                     f"{self.neurons} neurons in {_plural(self.layers, 'hidden layer')} (gates per layer "
                     f"{list(self.gates_per_layer)}; {_plural(self.carried, 'carried value')}, "
                     f"{self.layered_neurons} neurons without skip connections); one hidden layer: "
                     f"2^{self.n} = {self.shallow_neurons} neurons", width)


def product_counts(n: int) -> ProductCounts:
    """Counts for the product of ``n`` inputs (see the module docstring for the rules)."""
    if not 2 <= n:
        raise DeriveError(f"inputs must be >= 2, got {n}")
    per_layer, carried, m = [], 0, n
    while m > 1:
        per_layer.append(m // 2)
        carried += m % 2
        m = m // 2 + m % 2
    gates = sum(per_layer)
    return ProductCounts(n=n, gates=gates, neurons=4 * gates, layers=len(per_layer),
                         gates_per_layer=tuple(per_layer), carried=carried,
                         layered_neurons=4 * gates + 2 * carried, shallow_neurons=2**n)


@dataclass(frozen=True)
class PolynomialCounts:
    """Neurons and layers for a polynomial in x1..xk built from gates."""

    text: str
    expression: sp.Expr
    variables: tuple[sp.Symbol, ...]
    monomials: tuple[tuple[tuple[int, ...], sp.Expr], ...]
    squarings: int
    multiplications: int
    neurons: int
    layers: int
    plain_neurons: int
    plain_layers: int
    shallow_neurons: int

    def as_dict(self) -> dict:
        return {"polynomial": str(self.expression), "variables": [str(v) for v in self.variables],
                "monomials": len(self.monomials),
                "degree": max((sum(e) for e, _ in self.monomials), default=0),
                "squarings": self.squarings, "multiplications": self.multiplications,
                "neurons": self.neurons, "layers": self.layers, "plain_neurons": self.plain_neurons,
                "plain_layers": self.plain_layers, "shallow_neurons": self.shallow_neurons}

    def text_lines(self, width: int = 80) -> list[str]:
        d = self.as_dict()
        return _wrap(f"polynomial {self.expression}: {_plural(d['monomials'], 'monomial')}, degree "
                     f"{d['degree']}; {_plural(self.squarings, 'square gate')} (2 neurons) + "
                     f"{_plural(self.multiplications, 'product gate')} (4 neurons) = {self.neurons} neurons "
                     f"in {_plural(self.layers, 'hidden layer')} (squares as products: {self.plain_neurons} "
                     f"neurons, {_plural(self.plain_layers, 'layer')}); one hidden layer: "
                     f"{self.shallow_neurons} neurons",
                     width)


def _term_bound(e: sp.Expr) -> int:
    """An upper bound on the number of monomials of expand(e)."""
    if e.is_Add:
        return sum(_term_bound(a) for a in e.args)
    if e.is_Mul:
        return math.prod(_term_bound(a) for a in e.args)
    if e.is_Pow and e.exp.is_Integer and e.exp > 0:
        m = _term_bound(e.base)
        return math.comb(m + int(e.exp) - 1, int(e.exp)) if m > 1 else 1
    return 1


def _locate(text: str) -> dict[str, int]:
    """Columns (1-based, in the text as typed) of names, calls, divisions and powers: for messages only.

    The text is parsed by :func:`ast.parse` (nothing is evaluated); the SymPy expression itself
    always comes from :func:`derive.core.parse.parse_expression`.
    """
    from derive.core.parse import _caret_to_power

    source, cols = _caret_to_power(text.strip())
    offset = len(text) - len(text.lstrip())
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    out: dict[str, int] = {}

    def col(node):
        return cols[min(node.col_offset, len(cols) - 1)] + 1 + offset

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            out.setdefault(f"call:{node.func.id}", col(node))
        elif isinstance(node, ast.Name):
            out.setdefault(f"name:{node.id}", col(node))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            out.setdefault("div", col(node.right))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            out.setdefault("pow", col(node.right))
    return out


def _variables(text: str) -> dict[str, sp.Symbol]:
    """The variables x1..xk the text uses; a one-line error for any other name."""
    where = _locate(text)
    used = {k[5:] for k in where if k.startswith("name:")}
    called = {k[5:] for k in where if k.startswith("call:")}
    names = sorted(used - called - {"pi", "E"})
    out = {}
    for name in names:
        m = re.fullmatch(r"x([1-9][0-9]*)", name)
        if not m or int(m.group(1)) > MAX_VARIABLES:
            raise DeriveError(f"polynomial: unknown name '{name}' at column {where['name:' + name]} "
                              f"(use the variables x1, x2, ..., x{MAX_VARIABLES})")
        out[name] = sp.Symbol(name, real=True)
    return out


def _why_not_polynomial(expr: sp.Expr, gens, text: str) -> str | None:
    where = _locate(text)
    for sub in sp.preorder_traversal(expr):
        if isinstance(sub, sp.Function) and sub.has(*gens):
            name = sub.func.__name__
            col = next((v for k, v in where.items()
                        if k.startswith("call:") and k[5:].lower() == name.lower()), None)
            at = f" at column {col}" if col else ""
            return f"{sub} is a function ({name}) of the variables{at}"
        if sub.is_Pow and sub.exp.has(*gens):
            at = f" at column {where['pow']}" if "pow" in where else ""
            return f"{sub} has a variable in an exponent{at}"
        if sub.is_Pow and sub.base.has(*gens) and not (sub.exp.is_Integer and sub.exp >= 0):
            kind = "negative" if sub.exp.is_negative else "non-integer"
            key = "div" if sub.exp.is_negative and "div" in where else "pow"
            at = f" at column {where[key]}" if key in where else ""
            return f"{sub} is a {kind} power of a variable{at}"
    return None


def _monomial_depth(exps: tuple[int, ...]) -> tuple[int, int, int]:
    """(squarings, multiplications, hidden layers) for one monomial under the module's rule."""
    squarings, ready = 0, []
    for r in exps:
        if r == 0:
            continue
        squarings += r.bit_length() - 1
        ready += [j for j in range(r.bit_length()) if r >> j & 1]
    if sum(exps) <= 1:
        return 0, 0, 0
    heap = list(ready)
    heapq.heapify(heap)
    mults = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, max(a, b) + 1)
        mults += 1
    return squarings, mults, heap[0]


def polynomial_counts(text: str) -> PolynomialCounts:
    """Parse ``text`` (a polynomial in x1..xk, through the safe parser) and count its gate network."""
    from derive.core.parse import parse_expression

    if not isinstance(text, str):
        raise DeriveError(f"polynomial: expected text, got {type(text).__name__}")
    names = _variables(text)
    expr = parse_expression(text, names, where="polynomial")
    gens = tuple(sorted(names.values(), key=lambda s: int(s.name[1:])))
    why = _why_not_polynomial(expr, gens, text)
    if why is not None:
        vs = f"{gens[0]}..{gens[-1]}" if len(gens) > 1 else (str(gens[0]) if gens else "x1..xk")
        raise DeriveError(f"polynomial: '{text.strip()}' is not a polynomial in {vs}: {why}")
    if _term_bound(expr) > MAX_MONOMIALS:
        raise DeriveError(f"polynomial: '{text.strip()}' expands to more than {MAX_MONOMIALS} monomials")
    expr = sp.expand(expr)
    if not gens:
        monomials: tuple = ()
    else:
        poly = sp.Poly(expr, *gens)
        if not all(c.is_number for c in poly.coeffs()):  # pragma: no cover - parser allows no other names
            raise DeriveError(f"polynomial: '{text.strip()}' has non-numeric coefficients")
        monomials = tuple((tuple(int(e) for e in m), c) for m, c in poly.terms())
    sq = mu = layers = plain = plain_layers = shallow = 0
    for exps, _ in monomials:
        s_, m_, l_ = _monomial_depth(exps)
        sq, mu, layers = sq + s_, mu + m_, max(layers, l_)
        d = sum(exps)
        if d >= 2:
            plain += 4 * (d - 1)
            plain_layers = max(plain_layers, (d - 1).bit_length())
            shallow += math.prod(r + 1 for r in exps)
    return PolynomialCounts(text=text, expression=expr, variables=gens, monomials=monomials, squarings=sq,
                            multiplications=mu, neurons=2 * sq + 4 * mu, layers=layers, plain_neurons=plain,
                            plain_layers=plain_layers, shallow_neurons=shallow)
