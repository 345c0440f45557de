"""The registry of quantities that :func:`derive.validation.validate.validate` compares with sampled networks.

Each entry of :data:`QUANTITIES` maps a name to a :class:`Quantity`: where its entries live (layers,
input pairs or single inputs), an estimator from a sampling result, and a theory function (or None,
in which case rows carry the estimate and its standard error with theory and z = None). "K" and
"Theta" take their infinite-width theory from the engine (:mod:`derive.kernels.gram`); "V", "G1" and
"Theta_var" the leading-order single-input recursions of :mod:`derive.finite.single`, run per input.
Another theory plugs in with :func:`register_theory`, or by passing a mapping of quantities to
:func:`derive.validation.validate.validate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from derive.core.errors import DeriveError
from derive.sampling.estimators import (
    four_point_vertex,
    kernel_mean,
    nlo_kernel,
    ntk_mean,
    ntk_variance,
    z_score,
)

__all__ = ["QUANTITIES", "Quantity", "Setup", "quantity_rows", "register_quantity", "register_theory"]


@dataclass(frozen=True)
class Setup:
    """What a theory function or an estimator may need about one sampled configuration.

    ``widths`` = (n_0, ..., n_L); ``kernel`` and ``ntk`` are the engine's infinite-width K^(l) and
    Theta^(l) of ``inputs`` for l = 1..L, shape (L, N, N); ``activation`` the resolved
    :class:`derive.rules.activations.Activation` (for finite-width theories to derive from).
    """

    widths: tuple[int, ...]
    C_W: float
    C_b: float
    lambda_W: float
    lambda_b: float
    inputs: np.ndarray
    kernel: np.ndarray | None = None
    ntk: np.ndarray | None = None
    activation: Any = None
    dntk: Any = None  # per input, a derive.sampling.dntk.DNTKSamples (quantities with needs_dntk)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1


Estimator = Callable[[Any, Setup], tuple[np.ndarray, np.ndarray]]
Theory = Callable[[Setup], np.ndarray]


@dataclass(frozen=True)
class Quantity:
    """A statistic checked against sampled networks.

    Arrays of a quantity are laid out per layer: (L, N, N) when ``pairs`` (input pairs a <= b are
    reported) and (L, N) otherwise (single inputs); axis 0 is layer l = 1..L. ``estimator(result,
    setup)`` returns (estimate, stderr) in that layout and ``theory(setup)`` the theory (or the
    quantity has none: ``theory`` = None). ``layers(L)`` lists the reported layers.
    """

    name: str
    description: str
    estimator: Estimator
    theory: Theory | None = None
    pairs: bool = True
    first_layer: int = 1
    output_only: bool = False
    needs_ntk: bool = False
    needs_dntk: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    def layers(self, depth: int) -> list[int]:
        if self.output_only:
            return [depth]
        return list(range(self.first_layer, depth + 1))

    def entries(self, n_inputs: int) -> list[tuple[int, ...]]:
        if self.pairs:
            return [(a, b) for a in range(n_inputs) for b in range(a, n_inputs)]
        return [(a,) for a in range(n_inputs)]


def _per_layer_output(values: np.ndarray, depth: int) -> np.ndarray:
    """Place an output-layer array at index L - 1 of a per-layer array filled with NaN."""
    out = np.full((depth,) + values.shape, np.nan)
    out[-1] = values
    return out


def _estimate_kernel(result, setup: Setup):
    return kernel_mean(result)


def _estimate_ntk(result, setup: Setup):
    est, se = ntk_mean(result)
    return _per_layer_output(est, setup.depth), _per_layer_output(se, setup.depth)


def _estimate_vertex(result, setup: Setup):
    return four_point_vertex(result)


def _estimate_nlo(result, setup: Setup):
    if setup.kernel is None:
        raise DeriveError("G1 needs the infinite-width kernel K^(l) of the inputs")
    return nlo_kernel(result, setup.kernel)


def _estimate_ntk_variance(result, setup: Setup):
    est, se = ntk_variance(result)
    return _per_layer_output(est, setup.depth), _per_layer_output(se, setup.depth)


def _dntk_estimator(name: str) -> Estimator:
    """n_{l-1} E[dH z] of each single input (its own sampled networks), NaN at layer 1, (L, N)."""
    def estimate(result, setup: Setup):
        if setup.dntk is None:
            raise DeriveError(f"{name} needs the sampled dNTK (derive.sampling.dntk.sample_dntk)")
        pairs = [d.estimate(name) for d in setup.dntk]
        pad = np.full((1, len(pairs)), np.nan)
        return (np.concatenate([pad, np.stack([p[0] for p in pairs], axis=1)]),
                np.concatenate([pad, np.stack([p[1] for p in pairs], axis=1)]))
    return estimate


def _dntk_theory(name: str) -> Theory:
    def theory(setup: Setup) -> np.ndarray:
        return np.stack([p.values[name] for p in _single_input_profiles(setup)], axis=1)
    return theory


def _kernel_theory(setup: Setup) -> np.ndarray:
    return setup.kernel


def _ntk_theory(setup: Setup) -> np.ndarray:
    return setup.ntk


def _single_input_profiles(setup: Setup) -> list:
    """The leading-order finite-width recursions of :mod:`derive.finite.single`, one run per input
    (its own x_a . x_a / n_0), at the sampled widths (only the ratios r = n_l / n_{l-1} enter)."""
    from derive.finite.single import finite_width_maps, iterate

    if setup.activation is None:
        raise DeriveError("a finite-width theory needs the activation in the setup")
    maps = finite_width_maps(setup.activation)
    x = np.asarray(setup.inputs, dtype=float)
    return [iterate(maps, setup.depth, setup.C_W, setup.C_b, setup.lambda_W, setup.lambda_b,
                    input_norm=float(xa @ xa) / x.shape[1], widths=list(setup.widths[1:]))
            for xa in x]


def _vertex_theory(setup: Setup) -> np.ndarray:
    """V^(l) of each single input, (L, N)."""
    return np.stack([p.values["V"] for p in _single_input_profiles(setup)], axis=1)


def _nlo_theory(setup: Setup) -> np.ndarray:
    """G1^(l) of each single input, (L, N)."""
    return np.stack([p.values["G1"] for p in _single_input_profiles(setup)], axis=1)


def _ntk_variance_theory(setup: Setup) -> np.ndarray:
    """A^(L) + 2 B^(L) / n_L of each single input at the output layer, NaN elsewhere, (L, N)."""
    profiles = _single_input_profiles(setup)
    last = np.array([p.values["A"][-1] + 2 * p.values["B"][-1] / setup.widths[-1] for p in profiles])
    return _per_layer_output(last, setup.depth)


#: The quantities known to :func:`derive.validation.validate.validate`, by name.
QUANTITIES: dict[str, Quantity] = {
    q.name: q
    for q in (
        Quantity("K", "kernel K^(l)_ab: mean of (1/n_l) z_a . z_b", _estimate_kernel, _kernel_theory),
        Quantity("Theta", "output NTK Theta^(L)_ab: mean empirical NTK", _estimate_ntk, _ntk_theory,
                 output_only=True, needs_ntk=True),
        Quantity("V", "four-point vertex V^(l)_(aa)(aa) = n_{l-1} Var(G_hat^(l)_aa)", _estimate_vertex,
                 _vertex_theory, pairs=False, first_layer=2),
        Quantity("G1", "NLO kernel G1^(l)_aa = n_{l-1} (E G_hat^(l)_aa - K^(l)_aa)", _estimate_nlo,
                 _nlo_theory, pairs=False, first_layer=2),
        Quantity("Theta_var", "NTK fluctuation n_{L-1} Var(Theta_hat_aa) = A + 2B/n_L",
                 _estimate_ntk_variance, _ntk_variance_theory, pairs=False, output_only=True, needs_ntk=True),
        Quantity("dNTK_P", "dNTK P^(l) = n_{l-1} E[dH_ijj z_i], i != j (PDLT ch. 11)", _dntk_estimator("P"),
                 _dntk_theory("P"), pairs=False, first_layer=2, needs_dntk=True),
        Quantity("dNTK_Q", "dNTK Q^(l) = n_{l-1} E[dH_iij z_j], i != j (PDLT ch. 11)", _dntk_estimator("Q"),
                 _dntk_theory("Q"), pairs=False, first_layer=2, needs_dntk=True),
    )
}


def register_quantity(quantity: Quantity) -> None:
    """Add (or replace) a quantity in :data:`QUANTITIES`."""
    QUANTITIES[quantity.name] = quantity


def register_theory(name: str, theory: Theory) -> None:
    """Attach a theory function to the registered quantity ``name`` (e.g. a finite-width V^(l))."""
    if name not in QUANTITIES:
        raise DeriveError(f"unknown quantity '{name}'; known: {', '.join(QUANTITIES)}")
    QUANTITIES[name] = replace(QUANTITIES[name], theory=theory)


def _number(x) -> float | None:
    return None if x is None else float(x)


def quantity_rows(quantity: Quantity, result, setup: Setup) -> list[dict]:
    """One row per reported layer and entry: quantity, layer, inputs, theory, estimate, stderr, z.

    ``inputs`` are 0-based input indices ([a, b] for pairs, [a] for single inputs); ``theory`` and
    ``z`` are None when the quantity has no theory.
    """
    estimate, stderr = quantity.estimator(result, setup)
    theory = None if quantity.theory is None else np.asarray(quantity.theory(setup), dtype=float)
    if theory is not None and theory.shape != np.shape(estimate):
        raise DeriveError(f"theory of {quantity.name} has shape {theory.shape}, "
                          f"the estimate {np.shape(estimate)}")
    rows = []
    for layer in quantity.layers(setup.depth):
        for entry in quantity.entries(setup.inputs.shape[0]):
            index = (layer - 1,) + entry
            t = None if theory is None else float(theory[index])
            e, s = float(estimate[index]), float(stderr[index])
            rows.append({"quantity": quantity.name, "layer": layer, "inputs": list(entry), "theory": t,
                         "estimate": e, "stderr": s, "z": _number(z_score(e, s, t))})
    return rows
