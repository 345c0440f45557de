"""The documented symbol names shared by every stage of the pipeline.

Expressions in JSON output and claims use exactly these names (design.md, "Contracts"):
``K11, K12, K22`` for a two-input covariance, ``K`` for a single input, ``C_W, C_b,
lambda_W, lambda_b`` for the initialisation and learning-rate hyperparameters,
``Theta11, Theta12, Theta22``/``Theta`` for the NTK, and ``z`` (``z1, z2``) for
preactivations inside Gaussian expectations.
"""

from __future__ import annotations

import sympy as sp

z = sp.Symbol("z", real=True)
z1 = sp.Symbol("z1", real=True)
z2 = sp.Symbol("z2", real=True)

K = sp.Symbol("K", positive=True)
K11 = sp.Symbol("K11", positive=True)
K22 = sp.Symbol("K22", positive=True)
K12 = sp.Symbol("K12", real=True)

C_W = sp.Symbol("C_W", positive=True)
C_b = sp.Symbol("C_b", nonnegative=True)
lambda_W = sp.Symbol("lambda_W", nonnegative=True)
lambda_b = sp.Symbol("lambda_b", nonnegative=True)

Theta = sp.Symbol("Theta", nonnegative=True)
Theta11 = sp.Symbol("Theta11", nonnegative=True)
Theta22 = sp.Symbol("Theta22", nonnegative=True)
Theta12 = sp.Symbol("Theta12", real=True)

V = sp.Symbol("V", real=True)
G1 = sp.Symbol("G1", real=True)
l = sp.Symbol("l", positive=True, integer=True)
n = sp.Symbol("n", positive=True)

#: Every documented symbol, by the name a user types.
BY_NAME: dict[str, sp.Symbol] = {
    s.name: s
    for s in (z, z1, z2, K, K11, K22, K12, C_W, C_b, lambda_W, lambda_b,
              Theta, Theta11, Theta22, Theta12, V, G1, l, n)
}


def rho() -> sp.Expr:
    """The input correlation rho = K12 / sqrt(K11 K22)."""
    return K12 / sp.sqrt(K11 * K22)
