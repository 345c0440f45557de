"""Infinite-width layer recursions of a deep dense network: the kernel (NNGP) and the NTK.

The dense network is the architecture ``dense, (activation, dense) x (L - 1)``; one step of it is the
dense rule after the activation rule (``rules/layers/dense.toml`` after ``activation.toml``), both
derived by :func:`derive.symbolic.maps.derive_maps`. For sigma from the rules, with <.>_K the
Gaussian expectation (:mod:`derive.symbolic.expectations`), the composition is

    K^(l+1)_12     = C_b + C_W <sigma(z1) sigma(z2)>_{K^(l)}                      (PDLT eq. 4.118)
    Theta^(l+1)_12 = lambda_b + lambda_W <sigma(z1) sigma(z2)>_{K^(l)}
                     + C_W <sigma'(z1) sigma'(z2)>_{K^(l)} Theta^(l)_12          (PDLT eq. 8.63)

and for a single input K^(l+1) = C_b + C_W <sigma(z)^2>_{K^(l)}, Theta^(l+1) = lambda_b +
lambda_W <sigma^2>_K + C_W <sigma'^2>_K Theta^(l). sigma' is the almost-everywhere derivative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from derive.core import symbols as S
from derive.core.display import aligned, latex_text
from derive.core.errors import DeriveError
from derive.rules.activations import Activation
from derive.symbolic.maps import activation_maps, after_dense, ntk_coefficient
from derive.symbolic.quadrature import DEFAULT_TOL, GaussianExpectation

#: The derived quantities in order, with their LaTeX (the left-hand sides of :meth:`KernelDerivation.to_latex`).
LATEX_LABELS = {
    "expectation": r"\langle \sigma(z_1)\sigma(z_2)\rangle_K",
    "derivative_expectation": r"\langle \sigma'(z_1)\sigma'(z_2)\rangle_K",
    "recursion": r"K^{(\ell+1)}_{12}",
    "ntk_recursion": r"\Theta^{(\ell+1)}_{12}",
    "single_input": r"K^{(\ell+1)}",
    "single_input_ntk": r"\Theta^{(\ell+1)}",
}


@dataclass(frozen=True, repr=False)
class KernelDerivation:
    """Everything derived for one activation at infinite width (see module docstring).

    ``expectation`` and ``derivative_expectation`` are the activation layer's kernel map and its NTK
    map's coefficient of Theta12; the recursions are the dense layer's maps after them."""

    activation: Activation
    expectation: sp.Expr
    derivative_expectation: sp.Expr
    single_expectation: sp.Expr
    single_derivative_expectation: sp.Expr
    tol: float = DEFAULT_TOL
    notes: list = field(default_factory=list)

    @property
    def recursion(self) -> sp.Expr:
        """K12 at layer l+1 in C_W, C_b, K11, K12, K22."""
        return after_dense(self.expectation, "kernel")

    @property
    def ntk_recursion(self) -> sp.Expr:
        """Theta12 at layer l+1 in lambda_W, lambda_b, C_W, K11, K12, K22, Theta12."""
        return after_dense(self.expectation, "ntk", self.derivative_expectation)

    @property
    def single_input(self) -> sp.Expr:
        """K at layer l+1 in C_W, C_b, K."""
        return after_dense(self.single_expectation, "single_kernel")

    @property
    def single_input_ntk(self) -> sp.Expr:
        """Theta at layer l+1 in lambda_W, lambda_b, C_W, K, Theta."""
        return after_dense(self.single_expectation, "single_ntk", self.single_derivative_expectation)

    def nodes(self) -> list[GaussianExpectation]:
        """The numeric-quadrature nodes left in the derivation (empty when fully closed)."""
        out = []
        for e in (self.expectation, self.derivative_expectation, self.single_expectation,
                  self.single_derivative_expectation):
            out.extend(e.atoms(GaussianExpectation))
        return out

    @property
    def closed_form(self) -> bool:
        return not self.nodes()

    @property
    def quadrature_order(self) -> int | None:
        """Largest quadrature order (points per dimension) among the nodes, or None."""
        nodes = self.nodes()
        return max(n.order for n in nodes) if nodes else None

    def numeric(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every activation parameter replaced by its value (given or default)."""
        return expr.xreplace(self.activation.defaults)

    def items(self) -> dict[str, sp.Expr]:
        """The two expectations and the four recursions, by name (the keys of :data:`LATEX_LABELS`)."""
        return {name: getattr(self, name) for name in LATEX_LABELS}

    def _how(self) -> str:
        if self.closed_form:
            return "closed form"
        orders = sorted({n.order for n in self.nodes()})
        which = f"order {orders[0]}" if len(orders) == 1 else f"orders {', '.join(map(str, orders))}"
        return f"quadrature {which}"

    def _latex_lines(self) -> list[str]:
        """``label &= formula``, one per quantity of :meth:`items`."""
        return [rf"{LATEX_LABELS[k]} &= {sp.latex(v)}" for k, v in self.items().items()]

    def to_latex(self) -> str:
        """Paste-ready LaTeX: a comment naming sigma, then an ``align`` block (amsmath) with one line per
        quantity of :meth:`items` (what ``derive kernel --format latex`` prints)."""
        return (rf"% {self.activation.name}: \sigma(z) = {sp.latex(self.activation.expression)}"
                + "\n\\begin{align}\n" + " \\\\\n".join(self._latex_lines()) + "\n\\end{align}")

    def __repr__(self) -> str:
        return f"KernelDerivation({self.activation.name}: NNGP and NTK recursions, {self._how()})"

    def _repr_latex_(self) -> str:
        params = "".join(rf",\ {latex_text(k)} = {latex_text(v)}" for k, v in self.activation.describe_params().items())
        how = self._how() if self.closed_form else f"{self._how()} points per dimension, tolerance {self.tol:g}"
        head = (rf"\sigma(z) &= {sp.latex(self.activation.expression)} \quad "
                rf"\left({latex_text(self.activation.name)}{params};\ \text{{{how}}}\right)")
        return aligned([head, *self._latex_lines()])


def derive_kernel(activation: Activation, tol: float = DEFAULT_TOL) -> KernelDerivation:
    """Derive <sigma sigma>_K, <sigma' sigma'>_K (two inputs and one) for ``activation`` from the
    activation layer rule.

    Parameters without a given value stay symbolic; their defaults are used only to choose the
    order of any quadrature node.
    """
    maps = activation_maps(activation, tol, numeric=False)
    return KernelDerivation(activation, maps.kernel, ntk_coefficient(maps.ntk, S.Theta12), maps.single_kernel,
                            ntk_coefficient(maps.single_ntk, S.Theta), tol)


def numeric_kernel_expressions(derivation: KernelDerivation) -> tuple[sp.Expr, sp.Expr]:
    """<sigma sigma>_K and <sigma' sigma'>_K with parameters at their values, ready for codegen."""
    e = derivation.numeric(derivation.expectation)
    d = derivation.numeric(derivation.derivative_expectation)
    free = (e.free_symbols | d.free_symbols) - {S.K11, S.K12, S.K22}
    if free:
        raise DeriveError(f"parameters without a value: {', '.join(sorted(map(str, free)))}")
    return e, d


__all__ = ["KernelDerivation", "derive_kernel", "numeric_kernel_expressions"]
