"""Networks built from the multiplication gate (:mod:`derive.gate`): counts, and JAX code.

Counting rules (documented here, used by ``derive gate --inputs N --polynomial P``):

- Product of n inputs as a binary tree of four-neuron gates: at each hidden layer adjacent values
  are paired left to right and an odd one out is carried to the next layer. n - 1 gates,
  4 (n - 1) hidden neurons, ceil(log2 n) hidden layers (a gate's linear output layer merges with
  the next gate's input layer). A carried value is wired past the layer (a skip connection, no
  neuron), as in the papers' counts; a strictly layered network without skip connections would
  add 2 neurons per carried value per layer, [s(c + lam t) - s(c - lam t)] / (2 lam s'(c)) = t +
  O(lam^2) (reported as ``layered_neurons``).
- One hidden layer (Lin, Tegmark & Rolnick 2017, no-flattening: n inputs cannot be multiplied with
  fewer than 2^n neurons): the construction sum over e in {-1, 1}^n of
  prod(e) s(c + lam e.x) / (2^n lam^n s^(n)(c)) = x1...xn + lam^2 s^(n+2)(c) / (6 s^(n)(c))
  (x1^2 + ... + xn^2) x1...xn + O(lam^4): 2^n neurons, needs s^(n)(c) != 0.
- A polynomial in x1..xk, monomial by monomial (no sharing between monomials): x_i^r by repeated
  squaring with the two-neuron square gate [s(c + lam t) + s(c - lam t) - 2 s(c)] / (lam^2 s''(c))
  = t^2 + O(lam^2) (floor(log2 r) squarings, x^(2^j) ready after j layers), then the factors
  x_i^(2^j), one per binary digit of each r_i, multiplied by four-neuron gates, always joining the
  two factors that are ready earliest (least depth). Constant and linear terms are wired to the
  output (no neurons). Also reported: the plain count with squares as general gates (a monomial of
  degree d as a product of d inputs: 4 (d - 1) neurons, ceil(log2 d) layers) and the one-hidden-
  layer count, the sum over monomials of degree >= 2 of prod(r_i + 1) (the mixed central
  difference of s(c + lam w.x) over w_i in {r_i/2 - j}, j = 0..r_i, which Rolnick & Tegmark 2018,
  "The power of deeper networks for expressing natural functions", state is needed for a monomial;
  for a sum of monomials it is an upper bound).

JAX is imported only by the network builders, never by the counts.
"""

from __future__ import annotations

import ast
import heapq
import math
import re
import textwrap
from dataclasses import dataclass

import numpy as np
import sympy as sp

from .errors import DeriveError

#: Largest number of monomials a polynomial may expand to.
MAX_MONOMIALS = 5000
#: Largest variable index (x1..x64).
MAX_VARIABLES = 64
#: Largest n for which s^(n)(c) of the shallow network is derived, and for which it is built.
MAX_SHALLOW_DERIVATIVE = 12
MAX_SHALLOW_NETWORK = 16
#: The scale used for generated code when none is given.
DEFAULT_LAM = 0.01


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False) or [""]


# --------------------------------------------------------------------------------------------------
# Product of n inputs


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
class ShallowProduct:
    """The one-hidden-layer product network: 2^n neurons s(c + lam e.x), e in {-1, 1}^n."""

    n: int
    neurons: int
    shift: sp.Expr | None
    derivative: sp.Expr | None
    leading_ratio: sp.Expr | None
    note: str

    @property
    def output_scale(self):
        """Output weight of neuron e is prod(e) times this: 1 / (2^n lam^n s^(n)(c))."""
        from .gate import LAM

        if self.derivative is None:
            return None
        return 1 / (2**self.n * LAM**self.n * self.derivative)

    def as_dict(self) -> dict:
        return {"n": self.n, "neurons": self.neurons,
                "shift": None if self.shift is None else str(self.shift),
                "derivative": None if self.derivative is None else str(self.derivative),
                "output_scale": None if self.output_scale is None else str(self.output_scale),
                "leading_error": (None if self.leading_ratio is None else
                                  f"lam**2*({self.leading_ratio})*(sum of x_i**2)*(x1*...*x{self.n})"),
                "note": self.note}

    def text_lines(self, width: int = 80) -> list[str]:
        if self.derivative is None:
            return _wrap(f"one hidden layer, built: {self.note}", width)
        n = self.n
        return _wrap(f"one hidden layer, built: {self.neurons} neurons s(c + lam e.x), e in {{-1,1}}^{n}, "
                     f"c = {self.shift}, output weights prod(e)/(2^{n} lam^{n} s^({n})(c)) with "
                     f"s^({n})(c) = {self.derivative}; error lam^2 ({self.leading_ratio}) "
                     f"(x1^2 + ... + x{self.n}^2) x1...x{self.n} + O(lam^4)", width)


def shallow_product(n: int, parts, gate_shift: sp.Expr) -> ShallowProduct:
    """The 2^n-neuron network for x1...xn with the shift rule: the first of 0, the gate's shift,
    1, -1, 1/2, -1/2 inside a smooth piece with s^(n)(c) != 0 (derived for n <= 12)."""
    from .gate import _is_zero, _tidy, z

    if n > MAX_SHALLOW_DERIVATIVE:
        return ShallowProduct(n, 2**n, None, None, None,
                              f"2^{n} neurons; s^({n})(c) is not derived for n > {MAX_SHALLOW_DERIVATIVE}")
    tried = []
    shifts = (sp.Integer(0), gate_shift, sp.Integer(1), sp.Integer(-1), sp.Rational(1, 2), sp.Rational(-1, 2))
    for c in shifts:
        if c in tried:
            continue
        tried.append(c)
        piece = next((p for p in parts if p.contains(c)), None)
        if piece is None:
            continue
        exact = not c.has(sp.Float)
        if exact:
            dn = _tidy(piece.d(n).subs(z, c))
        else:
            dn = sp.Float(piece.d(n).evalf(30, subs={z: c}), 30)
        if _is_zero(dn):
            continue
        if exact:
            dn2 = _tidy(piece.d(n + 2).subs(z, c))
        else:
            dn2 = sp.Float(piece.d(n + 2).evalf(30, subs={z: c}), 30)
        ratio = _tidy(dn2 / (6 * dn)) if exact else dn2 / (6 * dn)
        return ShallowProduct(n, 2**n, c, dn, ratio, "needs s^(n)(c) != 0")
    return ShallowProduct(n, 2**n, None, None, None,
                          f"2^{n} neurons by the paper's bound, but this construction needs "
                          f"s^({n})(c) != 0 and s^({n}) vanishes at 0, {gate_shift}, +-1, +-1/2")


# --------------------------------------------------------------------------------------------------
# Polynomials


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
    always comes from :func:`derive.parse.parse_expression`.
    """
    from .parse import _caret_to_power

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
    from .parse import parse_expression

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


# --------------------------------------------------------------------------------------------------
# JAX networks (JAX imported here only)


def _numeric_lam(result, lam) -> float:
    from .gate import _lambda_value

    if lam is not None:
        return float(_lambda_value(lam))
    if result.lam.is_number:
        return float(result.lam)
    return DEFAULT_LAM


def _require(result):
    if not result.exists:
        raise DeriveError(f"gate: no four-neuron gate for {result.activation}: {result.reason}")


@dataclass(frozen=True)
class GateNetwork:
    """The four-neuron gate as arrays: gate(x, y) = sigma(stack(x, y) @ W1.T + b1) @ w2 + b2."""

    W1: object
    b1: object
    w2: object
    b2: object
    lam: float
    activation: object

    def __call__(self, x, y):
        import jax.numpy as jnp

        x = jnp.asarray(x, jnp.float64)
        y = jnp.asarray(y, jnp.float64)
        h = jnp.stack(jnp.broadcast_arrays(x, y), axis=-1) @ self.W1.T + self.b1
        return self.activation(h) @ self.w2 + self.b2

    def pairs(self, v):
        """The gate applied to the last axis of ``v`` of size 2 (used by the product tree)."""
        h = v @ self.W1.T + self.b1
        return self.activation(h) @ self.w2 + self.b2


def _weights(result, lam: float):
    from .gate import HIDDEN_SIGNS

    c = float(sp.N(result.shift, 20))
    mu = float(sp.N(1 / (4 * sp.Float(repr(lam), 30) ** 2 * result.taylor[2]), 20))
    W1 = np.array(HIDDEN_SIGNS, dtype=np.float64) * lam
    b1 = np.full(4, c, dtype=np.float64)
    w2 = mu * np.array([1.0, 1.0, -1.0, -1.0], dtype=np.float64)
    return W1, b1, w2, float(sp.N(result.output_bias.subs(result.lam, lam) if result.output_bias.free_symbols
                                  else result.output_bias, 20))


def gate_network(result, lam=None) -> GateNetwork:
    """The derived gate as a JAX-callable network with float64 weight arrays.

    ``lam`` defaults to the result's value, else 0.01. Example::

        net = gate_network(derive.gate("softplus"), lam=0.01)
        net(0.3, -1.2)   # ~ -0.36
    """
    import jax.numpy as jnp

    from .codegen import to_jax
    from .gate import z

    _require(result)
    lam_f = _numeric_lam(result, lam)
    W1, b1, w2, b2 = _weights(result, lam_f)
    act = to_jax(result.sigma, [z])
    f64 = jnp.float64
    return GateNetwork(jnp.asarray(W1, f64), jnp.asarray(b1, f64), jnp.asarray(w2, f64), jnp.asarray(b2, f64),
                       lam_f, act)


@dataclass(frozen=True)
class ProductTreeNetwork:
    """x1 ... xn by a binary tree of gates over the last axis of the input (pairs adjacent values,
    carries an odd one out), ceil(log2 n) gate layers."""

    gate: GateNetwork
    n: int

    def __call__(self, xs):
        import jax.numpy as jnp

        v = jnp.asarray(xs, jnp.float64)
        if v.shape[-1] != self.n:
            raise ValueError(f"expected inputs with last axis {self.n}, got shape {v.shape}")
        while v.shape[-1] > 1:
            m = v.shape[-1]
            k = m // 2
            pairs = v[..., : 2 * k].reshape(*v.shape[:-1], k, 2)
            out = self.gate.pairs(pairs)
            v = jnp.concatenate([out, v[..., 2 * k:]], axis=-1) if m % 2 else out
        return v[..., 0]


def product_network(result, n: int, lam=None) -> ProductTreeNetwork:
    """The product of ``n`` inputs as a JAX-callable tree of derived gates."""
    if not 2 <= int(n) <= 64:
        raise DeriveError(f"inputs must be an integer in [2, 64], got {n}")
    return ProductTreeNetwork(gate_network(result, lam), int(n))


@dataclass(frozen=True)
class ShallowNetwork:
    """x1 ... xn with one hidden layer of 2^n neurons: sigma(xs @ W.T + c) @ w."""

    W: object
    b: object
    w: object
    activation: object

    def __call__(self, xs):
        import jax.numpy as jnp

        h = jnp.asarray(xs, jnp.float64) @ self.W.T + self.b
        return self.activation(h) @ self.w


def shallow_network(result, n: int | None = None, lam=None) -> ShallowNetwork:
    """The 2^n-neuron one-hidden-layer product network (n <= 16) as JAX arrays."""
    import itertools

    import jax.numpy as jnp

    from .codegen import to_jax
    from .gate import z

    _require(result)
    n = result.product.n if n is None else int(n)
    if not 2 <= n <= MAX_SHALLOW_NETWORK:
        raise DeriveError(f"shallow network: n must be in [2, {MAX_SHALLOW_NETWORK}], got {n}")
    from .gate import pieces

    _, parts = pieces(result.sigma)
    sh = result.shallow if (result.shallow is not None and result.shallow.n == n) else shallow_product(
        n, parts, result.shift)
    if sh.derivative is None:
        raise DeriveError(f"shallow network: {sh.note}")
    lam_f = _numeric_lam(result, lam)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)), dtype=np.float64)
    scale = float(sp.N(1 / (2**n * sp.Float(repr(lam_f), 30) ** n * sh.derivative), 20))
    f64 = jnp.float64
    return ShallowNetwork(jnp.asarray(lam_f * signs, f64), jnp.asarray(np.full(2**n, float(sh.shift)), f64),
                          jnp.asarray(np.prod(signs, axis=1) * scale, f64), to_jax(result.sigma, [z]))


def gate_source(result, lam=None) -> str:
    """A standalone Python module (JAX) defining ``sigma``, ``gate(x, y)`` and ``product(xs)``."""
    from .codegen import to_source
    from .gate import z

    _require(result)
    lam_f = _numeric_lam(result, lam)
    W1, b1, w2, b2 = _weights(result, lam_f)
    base = to_source({"sigma": result.sigma}, [z])

    def arr(a):
        return "jnp.array(" + np.array2string(np.asarray(a), separator=", ", precision=17,
                                               floatmode="unique", max_line_width=96) + ", dtype=jnp.float64)"

    lead = result.leading_coefficient
    body = f'''

# Four-neuron multiplication gate (Lin, Tegmark & Rolnick 2017) derived by derive.gate for
# {result.activation}: s(z) = {result.sigma}
# lam = {lam_f!r}, hidden bias c = {result.shift}, mu = 1/(4 lam^2 s''(c)).
# gate(x, y) - x*y = {lead} * lam^2 * (x^3 y + x y^3) + O(lam^4)
LAM = {lam_f!r}
W1 = {arr(W1)}
B1 = {arr(b1)}
W2 = {arr(w2)}
B2 = {b2!r}


def gate(x, y):
    """x*y from four neurons: sigma(stack(x, y) @ W1.T + B1) @ W2 + B2."""
    x = jnp.asarray(x, jnp.float64)
    y = jnp.asarray(y, jnp.float64)
    h = jnp.stack(jnp.broadcast_arrays(x, y), axis=-1) @ W1.T + B1
    return sigma(h) @ W2 + B2


def product(xs):
    """Product over the last axis of xs by a binary tree of gates (an odd value is carried)."""
    v = jnp.asarray(xs, jnp.float64)
    while v.shape[-1] > 1:
        m = v.shape[-1]
        k = m // 2
        pairs = v[..., : 2 * k].reshape(*v.shape[:-1], k, 2)
        out = sigma(pairs @ W1.T + B1) @ W2 + B2
        v = jnp.concatenate([out, v[..., 2 * k:]], axis=-1) if m % 2 else out
    return v[..., 0]


if __name__ == "__main__":
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (2, 5))
    print("gate(x, y) - x*y:", np.asarray(gate(x, y)) - x * y)
'''
    return base.rstrip() + "\n" + body
