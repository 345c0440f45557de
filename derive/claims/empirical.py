"""The empirical verdict: the claim against sampled Gaussians or sampled two-layer networks (JAX), without
the engine's derivation."""

from __future__ import annotations

import math
from collections.abc import Mapping

import mpmath
import numpy as np
import sympy as sp

from derive.backends.precision import float64
from derive.claims.budget import Timeout, deadline
from derive.claims.numeric import DIGITS, EVAL_SECONDS, mp_value
from derive.claims.quantities import Quantity
from derive.core import symbols as S
from derive.finite.single import A_, B_, D_, F_, r
from derive.rules.activations import Activation

# ----------------------------------------------------------------------------------------------
# Empirical verdict: the claim against sampling, without the engine's derivation

#: |z| above which a sampled estimate is taken to contradict the claim.
Z_MAX = 5.0
#: Hyperparameters of the sampled networks (distinct values so that C and lambda cannot be confused).
NET = {"C_W": 1.5, "C_b": 0.1, "lambda_W": 0.7, "lambda_b": 0.3}
_INPUT_GRAM = np.array([[1.2, 0.5, -0.3], [0.5, 0.8, 0.1], [-0.3, 0.1, 0.5]])


def _claim_at(expr: sp.Expr, values: Mapping[sp.Symbol, float]) -> float:
    subs = {k: sp.Float(repr(float(v)), 50) for k, v in values.items()}
    try:
        with deadline(EVAL_SECONDS):
            v = mp_value(expr.xreplace(subs).evalf(DIGITS))
    except Timeout:
        v = None
    if isinstance(v, mpmath.mpc) and abs(v.imag) <= 1e-8 * max(abs(v.real), 1.0):
        v = v.real  # arccos(1 + 1e-31) on a diagonal: rounding, far below the error bars
    if v is None or isinstance(v, mpmath.mpc):
        return float("nan")
    return float(v)


def _record(at: dict, claim: float, mean: float, stderr: float) -> dict:
    diff = claim - mean
    if stderr > 0:
        z = diff / stderr
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    if not math.isfinite(claim):
        z = math.inf
    return {"at": at, "claim": claim, "sampled": mean, "stderr": stderr, "z": z}


def _gaussian_records(expr: sp.Expr, q: Quantity, activation: Activation, seed: int,
                      samples: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from derive.backends.codegen import jax_activation

    sigma = jax_activation(activation)

    def sd(z):
        return jax.jvp(sigma, (z,), (jnp.ones_like(z),))

    key = jax.random.key(seed)
    out = []
    if q.two_input:
        for i, (k11, k12, k22) in enumerate([(1.0, 0.3, 0.8), (2.0, -1.2, 1.5), (0.5, 0.4995, 0.5)]):
            x, y = jax.random.normal(jax.random.fold_in(key, i), (2, samples), jnp.float64)
            z1 = math.sqrt(k11) * x
            z2 = (k12 / math.sqrt(k11)) * x + math.sqrt(k22 - k12 * k12 / k11) * y
            (s1, d1), (s2, d2) = sd(z1), sd(z2)
            f = s1 * s2 if q.name == "expectation" else d1 * d2
            at = {"K11": k11, "K12": k12, "K22": k22}
            claim = _claim_at(expr, {S.K11: k11, S.K12: k12, S.K22: k22})
            out.append(_record(at, claim, float(jnp.mean(f)), float(jnp.std(f, ddof=1)) / math.sqrt(samples)))
        return out
    for i, k in enumerate((0.25, 0.8, 1.6)):  # moderate K: sigma = exp(z) has lognormal tails
        x = jax.random.normal(jax.random.fold_in(key, i), (samples,), jnp.float64)
        z = math.sqrt(k) * x
        s, d = sd(z)
        cw = NET["C_W"]
        f = {"single_expectation": s * s, "single_derivative_expectation": d * d, "chi_perp": cw * d * d,
             "chi_par": (cw / k) * z * s * d}[q.name]
        values = {S.K: k, S.C_W: cw}
        at = {"K": k, "C_W": cw} if S.C_W in q.variables else {"K": k}
        claim = _claim_at(expr, {v: values[v] for v in q.variables})
        out.append(_record(at, claim, float(jnp.mean(f)), float(jnp.std(f, ddof=1)) / math.sqrt(samples)))
    return out


def _network_records(expr: sp.Expr, q: Quantity, activation: Activation, seed: int, width: int,
                     n_networks: int) -> list[dict]:
    """Two dense layers on three inputs with Gram matrix S: K^(1) = C_b + C_W S and
    Theta^(1) = lambda_b + lambda_W S exactly; the second layer's sampled kernel and NTK are compared
    with the claim evaluated at the first layer's K^(1), Theta^(1). Their means are exactly the
    infinite-width maps at any width, because the first layer's preactivations are exactly Gaussian
    given the inputs (no 1/n correction before layer 3)."""
    from derive.backends.codegen import jax_activation
    from derive.core.inputs import inputs_from_kernel
    from derive.sampling.dense import sample_kernels

    cw, cb, lw, lb = NET["C_W"], NET["C_b"], NET["lambda_W"], NET["lambda_b"]
    x = inputs_from_kernel(_INPUT_GRAM)
    res = sample_kernels(jax_activation(activation), x, 2, width, cw, cb, lw, lb, n_networks=n_networks,
                         seed=seed)
    k1 = cb + cw * _INPUT_GRAM
    t1 = lb + lw * _INPUT_GRAM
    ntk = q.name in ("ntk_recursion", "single_input_ntk", "Theta")
    mean = res.ntk_mean if ntk else res.nngp_mean[1]
    err = res.ntk_stderr if ntk else res.nngp_stderr[1]
    hyper = {S.C_W: cw, S.C_b: cb, S.lambda_W: lw, S.lambda_b: lb, S.V: 0.0, S.G1: 0.0, A_: 0.0, B_: 0.0,
             D_: 0.0, F_: 0.0, r: 1.0}
    pairs = [(a, b) for a in range(3) for b in range(a, 3)] if q.two_input else [(a, a) for a in range(3)]
    out = []
    for a, b in pairs:
        if q.two_input:
            values = {S.K11: k1[a, a], S.K12: k1[a, b], S.K22: k1[b, b], S.Theta12: t1[a, b], **hyper}
        else:
            values = {S.K: k1[a, a], S.Theta: t1[a, a], **hyper}
        values = {v: values[v] for v in q.variables}
        claim = _claim_at(expr, values)
        at = {str(k): float(v) for k, v in values.items()}
        out.append(_record(at, claim, float(mean[a, b]), float(err[a, b])))
    return out


def _state_records(expr: sp.Expr, q: Quantity, activation: Activation, seed: int, width: int = 2,
                   batches: int = 64, per_batch: int = 8192) -> list[dict]:
    """The one-step finite-width maps at the first layer's state (V = G1 = A = B = D = F = 0), from a
    two-layer network of hidden width n: z^(1)_j ~ N(0, K) i.i.d., W ~ N(0, C_W/n), b ~ N(0, C_b),
    first-layer NTK Theta. Exactly (at every n): n Cov(z_1^2, z_2^2) = V', n E[H_12^2] = B',
    n Var(H_11) = A' + 2 B', n Cov(H_11, z_2^2) = D', n E[H_12 z_1 z_2] = F' and
    E[z_1^2] = C_b + (C_W/n) E[sum_j sigma_j^2] (so G1' = 0); H is the second layer's NTK
    (PDLT ch. 8 definitions of A, B, D, F). Standard errors by batch means."""
    import jax
    import jax.numpy as jnp

    from derive.backends.codegen import jax_activation

    sigma = jax_activation(activation)
    cw, cb, lw, lb = NET["C_W"], NET["C_b"], NET["lambda_W"], NET["lambda_b"]
    rr = 2.0  # the maps do not involve r at this state; a claim that does is caught
    n = width

    def batch(key, k, theta):
        kz, kw, kb = jax.random.split(key, 3)
        z = jnp.sqrt(k) * jax.random.normal(kz, (per_batch, n), jnp.float64)
        s, ds = jax.jvp(sigma, (z,), (jnp.ones_like(z),))
        W = jnp.sqrt(cw / n) * jax.random.normal(kw, (per_batch, 2, n), jnp.float64)
        b = jnp.sqrt(cb) * jax.random.normal(kb, (per_batch, 2), jnp.float64)
        out = b + jnp.einsum("mij,mj->mi", W, s)
        h11 = lb + (lw / n) * jnp.sum(s * s, -1) + theta * jnp.sum(W[:, 0] ** 2 * ds * ds, -1)
        h12 = theta * jnp.sum(W[:, 0] * W[:, 1] * ds * ds, -1)
        q1, q2 = out[:, 0] ** 2, out[:, 1] ** 2

        def cov(u, v):
            return jnp.mean((u - u.mean()) * (v - v.mean())) * per_batch / (per_batch - 1)

        return {
            "K": jnp.mean((q1 + q2) / 2), "Theta": jnp.mean(h11),
            "V": n * cov(q1, q2), "G1": n * jnp.mean(q1 - cb - (cw / n) * jnp.sum(s * s, -1)),
            "B": n * jnp.mean(h12 * h12), "A": n * (cov(h11, h11) - 2 * jnp.mean(h12 * h12)),
            "D": n * cov(h11, q2), "F": n * jnp.mean(h12 * out[:, 0] * out[:, 1]),
        }

    key = jax.random.key(seed)
    out = []
    for i, (k, theta) in enumerate(((0.6, 1.3), (1.7, 0.8))):
        keys = jax.random.split(jax.random.fold_in(key, i), batches)
        est = jax.vmap(lambda kk: batch(kk, k, theta))(keys)[q.name]
        mean = float(jnp.mean(est))
        stderr = float(jnp.std(est, ddof=1)) / math.sqrt(batches)
        values = {S.K: k, S.Theta: theta, S.V: 0.0, S.G1: 0.0, A_: 0.0, B_: 0.0, D_: 0.0, F_: 0.0,
                  S.C_W: cw, S.C_b: cb, S.lambda_W: lw, S.lambda_b: lb, r: rr}
        claim = _claim_at(expr, values)
        out.append(_record({"K": k, "Theta": theta, "V": 0.0, "C_W": cw, "C_b": cb, "lambda_W": lw,
                            "lambda_b": lb, "r": rr}, claim, mean, stderr))
    return out


@float64


def empirical_verdict(claim: sp.Expr, q: Quantity, activation: Activation, seed: int = 0, *,
                      samples: int = 2**19, width: int = 64, n_networks: int = 400) -> dict:
    """The claim against sampled Gaussians or sampled two-layer networks, with z-scores.

    - expectations, chi_par, chi_perp: z ~ N(0, K) drawn with ``jax.random``; chi_par through
      Stein's lemma, chi_par = (C_W/K) <z sigma sigma'>_K;
    - recursions and single-input maps: :func:`derive.sampling.dense.sample_kernels` on two dense layers
      of width ``width`` (``n_networks`` networks);
    - finite-width maps V, G1, A, B, D, F: a two-layer network at the first layer's state, see
      :func:`_state_records`.

    ``not-equal`` when some |z| > :data:`Z_MAX`; ``equal`` means consistent within the error bars.
    """
    if q.empirical in ("gauss1", "gauss2"):
        records = _gaussian_records(claim, q, activation, seed, samples)
        method = f"{samples} Gaussian samples z ~ N(0, K) per point (jax.random)"
    elif q.empirical in ("network1", "network2"):
        records = _network_records(claim, q, activation, seed, width, n_networks)
        method = (f"{n_networks} sampled two-layer networks of width {width} on 3 inputs "
                  f"(C_W = {NET['C_W']}, C_b = {NET['C_b']}, lambda_W = {NET['lambda_W']}, "
                  f"lambda_b = {NET['lambda_b']}): layer 2's kernel/NTK against the claim at layer 1's "
                  "K and Theta")
    else:
        records = _state_records(claim, q, activation, seed)
        method = ("two-layer networks (hidden width 2) at the first layer's state "
                  f"V = G1 = A = B = D = F = 0, {64 * 8192} draws per point, batch-means error bars; the "
                  "map's terms in the previous layer's V, G1, A, B, D, F vanish there and are not exercised")
    if not all(math.isfinite(rec["sampled"]) and math.isfinite(rec["stderr"]) for rec in records):
        return {"result": "undecided", "method": method, "points": records,
                "detail": f"sampling produced non-finite values (overflow?); {method}"}
    zmax = max(abs(rec["z"]) for rec in records)
    ok = zmax <= Z_MAX
    worst = max(records, key=lambda rec: abs(rec["z"]))
    rel = abs(worst["claim"] - worst["sampled"]) / max(abs(worst["sampled"]), 1e-300)
    return {
        "result": "equal" if ok else "not-equal",
        "max_abs_z": zmax if math.isfinite(zmax) else "inf",
        "threshold": Z_MAX,
        "method": method,
        "points": records,
        "worst": worst,
        "rel_error": rel if math.isfinite(rel) else None,
        "detail": (f"{'consistent with' if ok else 'contradicted by'} sampling: max |z| = {zmax:.3g} "
                   f"({'<=' if ok else '>'} {Z_MAX:g}) over {len(records)} points; {method}"),
    }


