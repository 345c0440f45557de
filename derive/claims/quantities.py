"""The quantities a claim may be about, and the engine's derivation of each."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.finite.single import A_, B_, D_, F_, r
from derive.rules.activations import Activation

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
        from derive.symbolic.recursions import derive_kernel

        d = derive_kernel(activation)
        expr = d.numeric(getattr(d, q.attribute))
    elif q.source == "criticality":
        from derive.symbolic import critical

        expr = getattr(critical.single_input_maps(activation), q.attribute)
    else:
        from derive.finite import single as finite_width

        expr = finite_width.finite_width_maps(activation).recursions[q.attribute]
    return expr


