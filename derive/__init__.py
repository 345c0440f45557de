"""derive: a symbolic-numeric derivation engine for the statistics of deep networks at initialisation.

The public API (re-exported lazily, so that ``import derive`` stays light and symbolic work never
imports JAX):

- :func:`kernel` -- derive <sigma sigma>_K, <sigma' sigma'>_K and the NNGP/NTK recursions;
- :func:`activation` -- resolve a rule name or an expression in z;
- :func:`criticality` -- universality class and critical initialisations (or an architecture's
  susceptibilities);
- :func:`gram` -- NNGP and NTK Gram matrices of a batch through depth (jit-compiled JAX);
  :func:`arch_gram` the same for any architecture;
- :func:`finite_width` -- the order-1/n corrections (V, G1, the NTK fluctuations, the dNTK) of a dense
  network or of an architecture;
- :func:`predict` -- infinite-width predictions of trained networks: the GP posterior and gradient
  descent on the MSE at any time (``nt.predict``'s conventions), for an activation or an architecture;
- :func:`validate_trained` -- those predictions against ensembles of trained finite-width networks;
- :mod:`derive.arch` -- architecture descriptions (``derive.arch.serial(...)``, ``load_arch``);
- :func:`emit_code` -- the generated JAX as readable, standalone source;
- :func:`validate` -- theory against sampled finite-width networks (dense or any architecture);
  :func:`monte_carlo_check` the quick infinite-width comparison; :func:`sample` the sampled
  networks' empirical kernels themselves;
- :func:`gate` -- the four-neuron multiplication gate of Lin, Tegmark & Rolnick for any activation;
- :func:`parse_expression` -- the safe parser.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "kernel": "api",
    "activation": "api",
    "gram": "api",
    "arch_gram": "api",
    "finite_width": "api",
    "predict": "api",
    "validate_trained": "api",
    "validate": "api",
    "criticality": "api",
    "emit_code": "api",
    "monte_carlo_check": "api",
    "sample": "api",
    "check": "api",
    "GramResult": "api",
    "KernelDerivation": "symbolic.recursions",
    "gate": "gates.gate",
    "GateResult": "gates.gate",
    "parse_expression": "core.parse",
    "DeriveError": "core.errors",
    "ParseError": "core.errors",
}

#: Public submodules, imported on first use.
_MODULES = ("arch",)

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'derive' has no attribute '{name}'")


def __dir__():
    """The public API only (not the submodules imported on the way)."""
    return sorted([*_EXPORTS, *_MODULES, "__version__"])
