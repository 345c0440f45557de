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
    """Universality class and critical initialisations of ``spec`` (see :mod:`derive.critical`).

    Example:
        >>> import derive
        >>> derive.criticality("tanh").cls
        'K*=0'
    """
    from .critical import analyse

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
         params: Mapping[str, str] | Sequence[str] | None = None, dtype: str = "float64",
         method: str = "auto", devices=None) -> GramResult:
    """NNGP and NTK Gram matrices of ``inputs`` (N, d) at depth L (L dense layers).

    K^(1) = C_b + C_W x.x'/d, Theta^(1) = lambda_b + lambda_W x.x'/d, then the recursions of
    :func:`kernel`; lambda_W, lambda_b default to C_W, C_b (Neural Tangents' NTK parametrisation).
    ``method`` ("auto", "tiled" or "direct") and ``devices`` (a count or a list of devices to
    shard the rows over) are those of :func:`derive.evaluate.gram_matrices`.
    """
    C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    x = check_inputs(inputs)
    if dtype not in ("float64", "float32"):
        raise DeriveError(f"dtype must be float64 or float32, got {dtype}")
    e, d = numeric_kernel_expressions(kernel(spec, params))
    from .evaluate import gram_matrices
    import jax.numpy as jnp

    nngp, ntk = gram_matrices(e, d, x, int(depth), C_W, C_b, lw, lb, dtype=getattr(jnp, dtype), method=method,
                              devices=devices)
    return GramResult(np.asarray(nngp), np.asarray(ntk))


def emit_code(spec: ActivationLike, params: Mapping[str, str] | Sequence[str] | None = None) -> str:
    """Readable, standalone JAX source of the layer maps <sigma sigma>_K and <sigma' sigma'>_K."""
    e, d = numeric_kernel_expressions(kernel(spec, params))
    from .codegen import to_source

    return to_source({"sigma_sigma": e, "dsigma_dsigma": d}, [S.K11, S.K12, S.K22])


_JAX_ACTIVATIONS: dict = {}


def jax_activation(act: Activation):
    """sigma as a jnp function (generated once per expression, so jitted samplers compile once)."""
    sigma = act.sigma_numeric
    if sigma.free_symbols - {S.z}:
        raise DeriveError(f"parameters without a value: {', '.join(sorted(map(str, sigma.free_symbols - {S.z})))}")
    if sigma not in _JAX_ACTIVATIONS:
        from .codegen import to_jax

        _JAX_ACTIVATIONS[sigma] = to_jax(sigma, [S.z])
    return _JAX_ACTIVATIONS[sigma]


@dataclass(frozen=True)
class MonteCarloCheck:
    """Derived theory against sampled networks: per-layer NNGP and output NTK with z-scores.

    ``nngp_z`` is (L, N, N) for layers 1..L, ``ntk_z`` is (N, N); ``sampled`` is the
    :class:`derive.montecarlo.MonteCarloResult` with means and standard errors.
    """

    theory_nngp: np.ndarray
    theory_ntk: np.ndarray
    sampled: object
    nngp_z: np.ndarray
    ntk_z: np.ndarray

    @property
    def max_abs_z(self) -> float:
        return float(max(np.max(np.abs(self.nngp_z)), np.max(np.abs(self.ntk_z))))

    def passed(self, z_max: float = 5.0) -> bool:
        return self.max_abs_z < z_max


def monte_carlo_check(spec: ActivationLike, inputs, depth: int, C_W: float, C_b: float = 0.0,
                      lambda_W: float | None = None, lambda_b: float | None = None, *, width: int = 512,
                      n_networks: int = 200, seed: int = 0,
                      params: Mapping[str, str] | Sequence[str] | None = None) -> MonteCarloCheck:
    """Compare the derived NNGP (every layer) and NTK (last layer) with sampled finite-width networks.

    Networks of hidden width ``width`` are drawn as the rules say (W ~ N(0, C_W/fan_in),
    b ~ N(0, C_b)); the mean over ``n_networks`` independent networks, with its standard error,
    is compared with the infinite-width theory. Finite width shifts the mean by O(depth/width)
    relative (PDLT ch. 4): choose ``width`` so that this bias is below the standard error, or
    compare with the 1/n-corrected theory.
    """
    C_W, C_b, lw, lb = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    x = check_inputs(inputs)
    d = kernel(spec, params)
    e, de = numeric_kernel_expressions(d)
    from .evaluate import gram_profile
    from .montecarlo import sample_kernels

    k_stack, t_stack = gram_profile(e, de, x, int(depth), C_W, C_b, lw, lb)
    sampled = sample_kernels(jax_activation(d.activation), x, int(depth), int(width), C_W, C_b, lw, lb,
                             n_networks=int(n_networks), seed=int(seed))
    theory_nngp, theory_ntk = np.asarray(k_stack), np.asarray(t_stack[-1])
    return MonteCarloCheck(theory_nngp, theory_ntk, sampled, sampled.nngp_z_scores(theory_nngp),
                           sampled.ntk_z_scores(theory_ntk))


def check(spec: ActivationLike | None = None, quantity: str | None = None, claim: str | None = None, *,
          latex: str | None = None, file: str | None = None, definitions=None,
          params: Mapping[str, str] | Sequence[str] | None = None, empirical: bool = False, seed: int = 0,
          time_budget: float = 10.0, rule_dirs: Sequence[str] = ()):
    """Check a hand derivation against the engine, high-precision numerics and (optionally) sampling.

    A claim is an expression for ``quantity`` (``expectation``, ``recursion``, ``chi_perp``, ``V``,
    ... see :data:`derive.claims.QUANTITIES`) in SymPy syntax (``claim``) or LaTeX (``latex``), with
    helper ``definitions`` such as ``["theta = \\arccos(\\rho)"]``; or a TOML claim ``file`` with
    several. Returns a :class:`derive.claims.CheckReport` (``.verdict`` is ``equal``, ``not-equal``
    or ``undecided``; ``.as_dict()``, ``.to_text()``), or a :class:`derive.claims.CheckSet` for a file.

    Example:
        >>> import derive
        >>> derive.check("relu", "single_input", "C_b + C_W*K/2").verdict
        'equal'
    """
    from .claims import check as check_claims

    return check_claims(spec, quantity, claim, latex=latex, file=file, definitions=definitions, params=params,
                        empirical=empirical, seed=seed, time_budget=time_budget, rule_dirs=rule_dirs)
