"""Checks of what a user passes in: hyperparameters, input batches and input kernels.

Every numeric entry point validates its arguments here, before any work, and raises
:class:`~derive.core.errors.DeriveError` with a one-line message that says what was wrong.
"""

from __future__ import annotations

import numpy as np

from derive.core.errors import DeriveError


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


def _real_array(value, what: str) -> np.ndarray:
    """``value`` as an array of real numbers (integer, unsigned or float dtype), else a DeriveError
    (complex, strings, objects, booleans)."""
    x = np.asarray(value)
    if x.dtype.kind not in "fiu":
        raise DeriveError(f"{what} must be real numbers, got dtype {x.dtype}")
    return x


def check_inputs(inputs) -> np.ndarray:
    """Inputs as a finite float array of shape (N, d)."""
    x = _real_array(inputs, "inputs")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise DeriveError(f"inputs must be a 2-D array (N inputs, d features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DeriveError("inputs contain NaN or infinity")
    return x.astype(np.float64)


def inputs_from_kernel(k1) -> np.ndarray:
    """Inputs x (N, N) with x_a . x_b / N equal to the given input covariance ``k1`` (checked PSD)."""
    k = _real_array(k1, "the input kernel").astype(float)
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


def check_arch_inputs(inputs) -> np.ndarray:
    inputs = _real_array(inputs, "inputs").astype(float)
    if inputs.ndim < 2 or 0 in inputs.shape:
        raise DeriveError(f"inputs must have shape (N, d) or (N, *positions, d) with no empty axis, "
                          f"got {inputs.shape}")
    if not np.all(np.isfinite(inputs)):
        raise DeriveError("inputs contain NaN or infinity")
    return inputs


__all__ = ["check_arch_inputs", "check_hyperparameters", "check_inputs", "inputs_from_kernel"]
