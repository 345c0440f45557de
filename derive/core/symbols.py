"""The documented symbol names shared by every stage of the pipeline.

Expressions in JSON output and claims use exactly these names (design.md, "Contracts"):
``K11, K12, K22`` for a two-input covariance, ``K`` for a single input, ``C_W, C_b,
lambda_W, lambda_b`` for the initialisation and learning-rate hyperparameters,
``Theta11, Theta12, Theta22``/``Theta`` for the NTK, ``z`` (``z1, z2``) for
preactivations inside Gaussian expectations, and ``V, G1, A, B, D, F, P, Q, r`` for the
finite-width statistics and the width ratio.
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
#: Width ratio n_l / n_{l-1} in the finite-width maps.
r = sp.Symbol("r", positive=True)
#: NTK fluctuations (A, B), their correlations with the preactivations (D, F) and the dNTK's (P, Q):
#: PDLT ch. 8 and 11, in the documented normalisation (derive.finite.single).
A = sp.Symbol("A", real=True)
B = sp.Symbol("B", real=True)
D = sp.Symbol("D", real=True)
F = sp.Symbol("F", real=True)
P = sp.Symbol("P", real=True)
Q = sp.Symbol("Q", real=True)

#: Every documented symbol, by the name a user types.
BY_NAME: dict[str, sp.Symbol] = {
    s.name: s
    for s in (z, z1, z2, K, K11, K22, K12, C_W, C_b, lambda_W, lambda_b,
              Theta, Theta11, Theta22, Theta12, V, G1, l, n, r, A, B, D, F, P, Q)
}


def rho() -> sp.Expr:
    """The input correlation rho = K12 / sqrt(K11 K22)."""
    return K12 / sp.sqrt(K11 * K22)
