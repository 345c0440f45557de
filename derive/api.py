"""The public API: thin, pure functions over the pipeline stages.

    rules -> parse -> expectations/recursions (SymPy) -> codegen (JAX) -> gram / Monte Carlo

Symbolic functions (:func:`kernel`) never import JAX; numeric ones import it on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp

from . import symbols as S
from .activations import Activation, resolve
from .errors import DeriveError
from .quadrature import DEFAULT_TOL
from .recursions import KernelDerivation, derive_kernel

ActivationLike = str | Activation


def activation(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None,
               rule_dirs: Sequence[str] = ()) -> Activation:
    """Resolve a rule name (``"relu"``), alias, or expression in z (``"z*erf(z)"``)."""
    if isinstance(spec, Activation):
        return spec
    return resolve(spec, params, tuple(rule_dirs))


def kernel(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None, *,
           tol: float = DEFAULT_TOL, rule_dirs: Sequence[str] = ()) -> KernelDerivation:
    """Derive the infinite-width kernel and NTK recursions of a dense network with activation ``spec``.

    Returns a :class:`~derive.recursions.KernelDerivation` with ``expectation`` = <sigma(z1)
    sigma(z2)>_K, ``derivative_expectation`` = <sigma'(z1) sigma'(z2)>_K (SymPy in K11, K12, K22),
    their single-input forms in K, and the recursions ``recursion``, ``ntk_recursion``,
    ``single_input``, ``single_input_ntk`` (PDLT eqs. 4.118 and 8.63).

    Example:
        >>> import derive
        >>> derive.kernel("relu").single_input
        C_W*K/2 + C_b
    """
    return derive_kernel(activation(spec, params, rule_dirs), tol=tol)


def criticality(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None, *,
                tol: float = DEFAULT_TOL, rule_dirs: Sequence[str] = ()):
    """Universality class and critical initialisations of ``spec`` (see :mod:`derive.criticality`).

    Example:
        >>> import derive
        >>> derive.criticality("tanh").cls
        'K*=0'
    """
    from .criticality import analyse

    return analyse(activation(spec, params, rule_dirs), tol=tol)


def check_hyperparameters(C_W: float, C_b: float, lambda_W: float | None, lambda_b: float | None,
                          depth: int) -> tuple[float, float, float, float]:
    """Validate (C_W, C_b, lambda_W, lambda_b, depth); NTK defaults lambda_W = C_W, lambda_b = C_b."""
    lw = C_W if lambda_W is None else lambda_W
    lb = C_b if lambda_b is None else lambda_b
    for name, v in (("C_W", C_W), ("C_b", C_b), ("lambda_W", lw), ("lambda_b", lb)):
        if not np.isfinite(v):
            raise DeriveError(f"{name} must be a finite number, got {v}")
        if v < 0:
            raise DeriveError(f"{name} is a variance and must be >= 0, got {v}")
    if C_W == 0:
        raise DeriveError("C_W must be > 0")
    if int(depth) != depth or depth < 1:
        raise DeriveError(f"depth must be an integer >= 1, got {depth}")
    return float(C_W), float(C_b), float(lw), float(lb)


def check_inputs(inputs) -> np.ndarray:
    """Inputs as a finite float array of shape (N, d)."""
    x = np.asarray(inputs)
    if x.dtype.kind not in "fiu":
        raise DeriveError(f"inputs must be numeric, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise DeriveError(f"inputs must be a 2-D array (N inputs, d features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DeriveError("inputs contain NaN or infinity")
    return x.astype(np.float64)


def inputs_from_kernel(k1) -> np.ndarray:
    """Inputs x (N, N) with x_a . x_b / N equal to the given input covariance ``k1`` (checked PSD)."""
    k = np.asarray(k1, dtype=float)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise DeriveError(f"input kernel must be a square matrix, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise DeriveError("input kernel contains NaN or infinity")
    if not np.allclose(k, k.T, rtol=1e-12, atol=1e-12 * np.max(np.abs(k), initial=1.0)):
        raise DeriveError("input kernel is not symmetric")
    w, v = np.linalg.eigh((k + k.T) / 2)
    if w.min() < -1e-10 * max(w.max(), 1.0):
        raise DeriveError(f"input kernel is not positive semi-definite (smallest eigenvalue {w.min():.3g})")
    return v * np.sqrt(np.clip(w, 0.0, None) * k.shape[0])


@dataclass(frozen=True)
class GramResult:
    """NNGP and NTK Gram matrices K^(L), Theta^(L) of a batch (numpy, float64 unless asked)."""

    nngp: np.ndarray
    ntk: np.ndarray


def numeric_kernel_expressions(derivation: KernelDerivation) -> tuple[sp.Expr, sp.Expr]:
    """<sigma sigma>_K and <sigma' sigma'>_K with parameters at their values, ready for codegen."""
    e = derivation.numeric(derivation.expectation)
    d = derivation.numeric(derivation.derivative_expectation)
    free = (e.free_symbols | d.free_symbols) - {S.K11, S.K12, S.K22}
    if free:
        raise DeriveError(f"parameters without a value: {', '.join(sorted(map(str, free)))}")
    return e, d


def gram(spec: ActivationLike, inputs, depth: int, C_W: float, C_b: float = 0.0,
         lambda_W: float | None = None, lambda_b: float | None = None, *,
         params: Mapping[str, str] | Sequence[str] | None = None, dtype: str = "float64") -> GramResult:
    """NNGP and NTK Gram matrices of ``inputs`` (N, d) at depth L (L dense layers).

    K^(1) = C_b + C_W x.x'/d, Theta^(1) = lambda_b + lambda_W x.x'/d, then the recursions of
    :func:`kernel`; lambda_W, lambda_b default to C_W, C_b (Neural Tangents' NTK parametrisation).
    """
    C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    x = check_inputs(inputs)
    if dtype not in ("float64", "float32"):
        raise DeriveError(f"dtype must be float64 or float32, got {dtype}")
    e, d = numeric_kernel_expressions(kernel(spec, params))
    from .evaluate import gram_matrices
    import jax.numpy as jnp

    nngp, ntk = gram_matrices(e, d, x, int(depth), C_W, C_b, lw, lb, dtype=getattr(jnp, dtype))
    return GramResult(np.asarray(nngp), np.asarray(ntk))


def emit_code(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """Readable, standalone JAX source of the layer maps <sigma sigma>_K and <sigma' sigma'>_K."""
    e, d = numeric_kernel_expressions(kernel(spec, params))
    from .codegen import to_source

    return to_source({"sigma_sigma": e, "dsigma_dsigma": d}, [S.K11, S.K12, S.K22])
