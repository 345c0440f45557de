"""Cheap learning: the statements of Lin, Tegmark & Rolnick (2017), derived for several activations.

1. Four neurons multiply two numbers, with an error that shrinks like lambda^2 (the derived
   coefficient a = s''''(c) / (6 s''(c)) against the generated JAX network's measured error).
2. A product of n inputs needs 4(n - 1) neurons as a binary tree of gates, but 2^n in one hidden
   layer (n = 2..10), and the tree really computes the product.
3. ReLU has no such gate (and why).

Run: python examples/cheap_learning.py   (a few seconds; writes nothing)
"""

import textwrap

import numpy as np

import derive
from derive.gates.counts import product_counts
from derive.gates.networks import gate_network, product_network

x, y = 0.8, -0.6
print("1. gate(x, y) - xy at x = 0.8, y = -0.6: measured (JAX, float64) / derived a lam^2 (x^3 y + x y^3)")
lams = (0.1, 0.05, 0.025)
print(f"{'activation':>10} {'shift c':>17} {'a':>8}  " + " ".join(f"lam={lam:<6g}" for lam in lams)
      + "  err(0.1)/err(0.05)")
for name in ("softplus", "tanh", "exp", "gelu", "swish"):
    res = derive.gate(name)
    a = float(res.leading_coefficient)
    errors = [float(gate_network(res, lam=lam)(x, y)) - x * y for lam in lams]
    ratios = [e / (a * lam**2 * (x**3 * y + x * y**3)) for e, lam in zip(errors, lams)]
    print(f"{name:>10} {str(res.shift):>17} {a:>8.4f}  " + " ".join(f"{r:<10.6f}" for r in ratios)
          + f"  {errors[0] / errors[1]:.4f}")
print("   (ratios -> 1 as lam -> 0 and the error shrinks 4-fold per halving: it is")
print("    a lam^2 (x^3 y + x y^3) + O(lam^4), a = s''''(c) / (6 s''(c)))")

print("\n2. product of n inputs: neurons (hidden layers)")
print(f"{'n':>3} {'binary tree of gates':>22} {'one hidden layer':>17}")
for n in range(2, 11):
    p = product_counts(n)
    print(f"{n:>3} {p.neurons:>15} ({p.layers}) {p.shallow_neurons:>17}")
res = derive.gate("tanh")
xs = np.random.default_rng(0).uniform(-1, 1, (1000, 8))
err = np.asarray(product_network(res, 8, lam=0.01)(xs)) - xs.prod(axis=1)
print(f"   tanh tree for n = 8 (28 neurons, 3 layers, lam = 0.01): max |error| = {np.max(np.abs(err)):.2e}")
print("   over 1000 random inputs in [-1, 1]^8")

relu = derive.gate("relu")
print("\n" + textwrap.fill(f"3. relu: {relu.reason}", 100, subsequent_indent="   "))
print(textwrap.fill(f"   instead: {relu.alternative}", 100, subsequent_indent="   "))
