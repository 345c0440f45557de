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

from dataclasses import dataclass

import numpy as np
import sympy as sp

from derive.backends.precision import float64
from derive.core.errors import DeriveError
from derive.gates.counts import MAX_SHALLOW_NETWORK
from derive.gates.gate import HIDDEN_SIGNS, _lambda_value, pieces, shallow_product, z

#: The scale used for generated code when none is given.
DEFAULT_LAM = 0.01


def _numeric_lam(result, lam) -> float:

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

    @float64
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

    c = float(sp.N(result.shift, 20))
    mu = float(sp.N(1 / (4 * sp.Float(repr(lam), 30) ** 2 * result.taylor[2]), 20))
    W1 = np.array(HIDDEN_SIGNS, dtype=np.float64) * lam
    b1 = np.full(4, c, dtype=np.float64)
    w2 = mu * np.array([1.0, 1.0, -1.0, -1.0], dtype=np.float64)
    return W1, b1, w2, float(sp.N(result.output_bias.subs(result.lam, lam) if result.output_bias.free_symbols
                                  else result.output_bias, 20))


@float64
def gate_network(result, lam=None) -> GateNetwork:
    """The derived gate as a JAX-callable network with float64 weight arrays.

    ``lam`` defaults to the result's value, else 0.01. Example::

        net = gate_network(derive.gate("softplus"), lam=0.01)
        net(0.3, -1.2)   # ~ -0.36
    """
    import jax.numpy as jnp

    from derive.backends.codegen import to_jax

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

    @float64
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


@float64
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

    @float64
    def __call__(self, xs):
        import jax.numpy as jnp

        h = jnp.asarray(xs, jnp.float64) @ self.W.T + self.b
        return self.activation(h) @ self.w


@float64
def shallow_network(result, n: int | None = None, lam=None) -> ShallowNetwork:
    """The 2^n-neuron one-hidden-layer product network (n <= 16) as JAX arrays."""
    import itertools

    import jax.numpy as jnp

    from derive.backends.codegen import to_jax

    _require(result)
    n = result.product.n if n is None else int(n)
    if not 2 <= n <= MAX_SHALLOW_NETWORK:
        raise DeriveError(f"shallow network: n must be in [2, {MAX_SHALLOW_NETWORK}], got {n}")

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
    from derive.backends.codegen import to_source

    _require(result)
    lam_f = _numeric_lam(result, lam)
    W1, b1, w2, b2 = _weights(result, lam_f)
    base = to_source({"sigma": result.sigma}, [z])
    if "import numpy as np" not in base:
        base = base.replace("import jax.numpy as jnp\n", "import jax.numpy as jnp\nimport numpy as np\n", 1)

    def arr(a):
        return "np.array(" + np.array2string(np.asarray(a), separator=", ", precision=17,
                                             floatmode="unique", max_line_width=96) + ", dtype=np.float64)"

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
    with _float64():
        x = jnp.asarray(x, jnp.float64)
        y = jnp.asarray(y, jnp.float64)
        h = jnp.stack(jnp.broadcast_arrays(x, y), axis=-1) @ W1.T + B1
        return sigma(h) @ W2 + B2


def product(xs):
    """Product over the last axis of xs by a binary tree of gates (an odd value is carried)."""
    with _float64():
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
