"""Criticality of an architecture: the single-input kernel and the susceptibilities, block by block.

For one input and no spatial structure every layer maps (K, Theta) by its rule's one-input forms
(:class:`derive.symbolic.maps.LayerMaps`): K -> f(K) and Theta -> g(K) + chi_perp(K) Theta (every rule
is affine in Theta). Composing them through an item of the architecture gives, along the trajectory
K^(0) = k0 (the input's x.x/d), ...:

    chi_par  = dK_out / dK_in               (PDLT eq. 5.9, the parallel susceptibility)
    chi_perp = dTheta_out / dTheta_in       (= dK12_out / dK12_in at K12 = K11 = K22: by Price's
                                             theorem <sigma' sigma'> is the K12-derivative of
                                             <sigma sigma>, so this is PDLT eq. 5.50's chi_perp)

chi_perp is exact (a product of derived coefficients); chi_par is a central difference of the
composed map (relative step 1e-5, error about 1e-10). A residual item gives
chi = xi^2 + gamma^2 chi_branch, so xi^2 + gamma^2 chi_perp,branch = 1 is its criticality
condition (PDLT ch. 9: the residual hyperparameters replace the tuning of C_W); at xi = 1 the
kernel instead grows with depth and gamma^2 ~ 1/L keeps the growth bounded.

Everything here is SymPy and NumPy: no JAX, so ``derive criticality --arch`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from derive.arch.description import Layer, Repeat, Serial, check_derivable
from derive.core import symbols as S
from derive.core.display import markdown_table, markdown_text, number
from derive.core.errors import DeriveError
from derive.symbolic.maps import BK, BTheta, layer_maps
from derive.symbolic.numeric import evaluate

#: Relative step of the central difference for chi_par.
STEP = 1e-5


def _layer_forward(layer: Layer, K: float) -> tuple[float, float]:
    """(K_out, chi_perp) of one layer at input K."""
    maps = layer_maps(layer)
    values = {S.K: K}
    chi_branch = 0.0
    if layer.branch is not None:
        BK_value, chi_branch = _serial_forward(layer.branch, K)
        values[BK] = BK_value
    K_out = float(evaluate(maps.single_kernel, values))
    coefficient = sp.diff(maps.single_ntk, S.Theta)
    chi = float(evaluate(coefficient, values)) if coefficient.free_symbols else float(coefficient)
    branch_coefficient = sp.diff(maps.single_ntk, BTheta)
    if branch_coefficient != 0:
        chi += float(evaluate(branch_coefficient, values)) * chi_branch
    return K_out, chi


def _serial_forward(net: Serial, K: float) -> tuple[float, float]:
    chi = 1.0
    for item in net.items:
        if isinstance(item, Repeat):
            for _ in range(item.times):
                K, c = _serial_forward(item.body, K)
                chi *= c
        else:
            K, c = _layer_forward(item, K)
            chi *= c
    return K, chi


def _item_map(item, K: float) -> tuple[float, float]:
    if isinstance(item, Repeat):
        return _serial_forward(item.body, K)  # one repetition
    return _layer_forward(item, K)


@dataclass(frozen=True, repr=False)
class ArchCriticality:
    """Per recorded output (``labels`` as in :mod:`derive.kernels.arch`): the kernel K after it,
    and chi_par, chi_perp of that item (one repetition of a repeat), evaluated at its input."""

    labels: list[str]
    K: list[float]
    chi_par: list[float]
    chi_perp: list[float]
    k0: float
    notes: list[str]

    def as_dict(self) -> dict:
        return {"k0": self.k0, "layers": [
            {"label": lab, "K": k, "chi_par": cp, "chi_perp": cq}
            for lab, k, cp, cq in zip(self.labels, self.K, self.chi_par, self.chi_perp)], "notes": self.notes}

    def __repr__(self) -> str:
        if not self.labels:
            return f"ArchCriticality(no recorded outputs, K0 = {number(self.k0)})"
        return (f"ArchCriticality({len(self.labels)} outputs from K0 = {number(self.k0)}; at the output K = "
                f"{self.K[-1]:.10g}, chi_perp = {self.chi_perp[-1]:.10g})")

    def _repr_markdown_(self) -> str:
        lines = [f"**Criticality of an architecture**: one input with $K^{{(0)}} = x\\cdot x/d = {number(self.k0)}$; "
                 "after each recorded output its kernel $K$, and the susceptibilities of that item (one repetition "
                 "of a repeat) at its input, $\\chi_\\parallel = \\partial K_\\mathrm{out}/\\partial K_\\mathrm{in}$ "
                 "and $\\chi_\\perp = \\partial \\Theta_\\mathrm{out}/\\partial \\Theta_\\mathrm{in}$", "",
                 markdown_table(["output", "$K$", "$\\chi_\\parallel$", "$\\chi_\\perp$"],
                                [[markdown_text(lab), k, cp, cq] for lab, k, cp, cq in
                                 zip(self.labels, self.K, self.chi_par, self.chi_perp)])]
        if self.notes:
            lines += ["", *(f"- {markdown_text(note)}" for note in self.notes)]
        return "\n".join(lines)


def _check_flat(net: Serial) -> None:
    for layer in net.distinct_layers():
        if layer.rule.structural:
            raise DeriveError(f"criticality --arch: layer '{layer.type}' acts on positions; the single-input "
                              "susceptibilities are defined for architectures without spatial layers")


def arch_criticality(net: Serial, k0: float = 1.0) -> ArchCriticality:
    """Single-input kernel and susceptibilities of every recorded output (module docstring)."""
    if not k0 > 0:
        raise DeriveError(f"k0 must be positive, got {k0}")
    _check_flat(net)
    check_derivable(net)
    labels, Ks, chi_par, chi_perp = [], [], [], []
    K = float(k0)
    for label, item in net.top_level():
        K_out, chi = _item_map(item, K)
        h = STEP * K
        up, _ = _item_map(item, K + h)
        down, _ = _item_map(item, K - h)
        labels.append(label)
        Ks.append(K_out)
        chi_par.append((up - down) / (2 * h))
        chi_perp.append(chi)
        K = K_out
    return ArchCriticality(labels, Ks, chi_par, chi_perp, float(k0), _notes(net, k0))


def _notes(net: Serial, k0: float) -> list[str]:
    """Residual criticality conditions for repeated residual blocks, at the block's input kernel."""
    notes = []
    K = float(k0)
    for label, item in net.top_level():
        layers = item.body.items if isinstance(item, Repeat) else (item,)
        if isinstance(item, Repeat) and label.endswith("[1]"):
            K_in = K
            for inner in layers:
                if isinstance(inner, Layer) and inner.type == "residual":
                    _, chi_b = _serial_forward(inner.branch, K_in)
                    xi, gamma = inner.value("xi"), inner.value("gamma")
                    chi = xi ** 2 + gamma ** 2 * chi_b
                    if xi < 1:
                        g2 = (1 - xi ** 2) / chi_b if chi_b > 0 else float("inf")
                        notes.append(f"{label}: residual block chi_perp = xi^2 + gamma^2 chi_branch = {chi:.6g} "
                                     f"(chi_branch = {chi_b:.6g}); gamma^2 = (1 - xi^2)/chi_branch = {g2:.6g} "
                                     "makes it 1 (critical)")
                    else:
                        notes.append(f"{label}: residual block with xi = {xi:g}: chi_perp = 1 + gamma^2 chi_branch "
                                     f"= {chi:.6g} > 1, the kernel grows with depth; gamma^2 of order 1/L keeps "
                                     "the total growth bounded")
                    K_in, _ = _layer_forward(inner, K_in) if isinstance(inner, Layer) else (K_in, 1.0)
                elif isinstance(inner, Layer):
                    K_in, _ = _layer_forward(inner, K_in)
        K, _ = _item_map(item, K)
    return notes


__all__ = ["ArchCriticality", "arch_criticality"]
