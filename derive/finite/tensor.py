"""Finite-width corrections with positions and batches: the tensor form of V and G1, from the rules.

The sites s = (input a, position p) of every channel, flattened (M = N P of them), carry at a
Gaussian point (the output of a dense, conv or attention layer, or of a residual block, width n) the
kernel K_st, the NLO kernel G1_st (E[z_is z_it] = K_st + G1_st / n) and the four-point vertex
V_(st)(uv) = n Cov(z_is z_it, z_ju z_jv) (i != j; PDLT ch. 4 with inputs and positions alike).

The next weighted layer reads the run of layers since that point through channel means m: for a run
of an activation sigma (the identity without one), P_st = mean_i sigma(z_is) sigma(z_it); for a
LayerNorm (``rules/layers/layernorm.toml``), a_st = mean_i z_is z_it and mu_s = mean_i z_is, from
which each site's normalised products are (a_st - mu_s mu_t) / sqrt((a_ss - mu_s^2 + eps)(a_tt -
mu_t^2 + eps)). Pooling and flattening after it (``means`` statements) map these linearly. To order
1/n the means have

    P:  n Cov(P_st, P_uv) = <s_s s_t s_u s_v> - <s_s s_t><s_u s_v>
                            + (r/4) sum V_(c1c2)(c3c4) <d_c1 d_c2 (s_s s_t)> <d_c3 d_c4 (s_u s_v)>
        n (E P_st - <s_s s_t>) = r [1/2 sum G1_cd <d_c d_d (s_s s_t)> + 1/8 sum V <d^4 (s_s s_t)>]
    a:  n Cov(a_st, a_uv) = K_su K_tv + K_sv K_tu + r V_(st)(uv),  n (E a - K) = G1
    mu: n Cov(mu_s, mu_t) = K_st,  E mu = 0,  Cov(mu, a) = 0

(the multi-input form of PDLT eqs. 4.90 and 4.115, the K^-1-raised indices contracted by Gaussian
integration by parts; :mod:`derive.finite.batch` has the four-point functions and derivative
tables). The weighted layer's rule states its output's conditional covariance G as a function of the
means it reads, ``variance = "C_b + C_W*patch(mean(h1*h2))"`` (dense: no operator), so with F the
composition (run, pooling, the layer's statement), J and H its first and second derivatives in the
means (JAX autodiff), the delta method gives the next Gaussian point

    K' = F(m),  V' = J (n Cov m) J^T,  G1' = J n (E m - <m>) + 1/2 H : (n Cov m).

Self-attention with tied query/key weights (``rules/layers/attention.toml``) reads
f(U, S) = A(U) S A(U)^T per head, A = softmax of the logits sqrt(C_Q C_K) U within each input, where
a head of n_h = n/H channels forms its own means U = mean_c u_c u_c^T (u = W h) and
S = mean_c v_c v_c^T (v = W_V h) of fresh weights: given the layer input they fluctuate around M and
C_V M (M = mean_i h_i h_i^T) with the Wishart covariance n_h Cov(U_st, U_uv) = M_su M_tv + M_sv M_tu
(C_V^2 times that for S), independently across heads. The output covariance is
G = C_b + C_O mean_h f(U_h, S_h), so besides the delta method through M the layer adds its own

    n Cov(G | M) = C_O^2 [J_U W J_U^T + C_V^2 J_S W J_S^T],   n (E[G | M] - g(M)) = C_O (H/2) H_UU : W

(the first independent of the number of heads, the second proportional to it: the logits of each
head average over n/H channels only).

A residual block z' = xi z + gamma b (``combine``) whose branch ends in a weighted layer adds
X_(st)(uv) = n Cov(z_is z_it, G_b,uv), the skip's products against the branch output's conditional
covariance: V' = xi^4 V + xi^2 gamma^2 (X + X^T) + gamma^4 V_b, K' = xi^2 K + gamma^2 K_b,
G1' = xi^2 G1 + gamma^2 G1_b. At the branch's first weighted layer X = C J^T with
C = n Cov(z z, m) (for a and P: K_su K_tv + K_sv K_tu + r V and sum_cd (K_sc K_td + r V_(st)(cd)/2)
<d_c d_d (s_u s_v)>); at a later one the branch reads the skip only through the point before, so X
goes through the infinite-width Jacobian of the expected means, d<s_u s_v>/dK_cd = <d_c d_d (s_u s_v)>/2.

A pooling layer on a Gaussian point (before an activation) is a linear map of each channel, so the
point stays one: K' = L K, V' = (L x L) V, G1' = L G1. All widths are one n (the sampler's), so
r = 1. One input without positions is the single-input form (:mod:`derive.finite.arch`), which the
tests check, as they check a batch through a dense network against ``iterate_batch``. The NTK's
fluctuations A, B, D, F are carried beside (:mod:`derive.finite.tensor_ntk`) through dense, conv,
activation and pooling layers, LayerNorm followed by a weighted layer, and residual blocks (a branch
carries the Jacobians of its infinite-width maps in the skip's kernel and NTK,
:class:`~derive.finite.tensor_ntk.BranchJacobians`), and tied attention
(:func:`~derive.finite.tensor_ntk.attention_state`); where a layer's NTK map is not derived the point
holds the reason. Identical sites (duplicate inputs, positions whose receptive fields are all padding) are
one random variable: an activation's expectations are taken over the distinct sites and expanded
(:class:`~derive.finite.tensor_ntk.Sites`), where a kink's K-derivatives would diverge between the
copies. Not derived here: an activation after LayerNorm (its channel statistics inside
a nonlinear mean), and a branch that reads the skip through an activation first (a self-interaction,
as in the single-input form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp

from derive.arch.description import Layer, Repeat, Serial, check_derivable
from derive.backends.precision import float64
from derive.core import budget
from derive.core.display import MISSING, markdown_table, markdown_text, matrix_table
from derive.core.errors import DeriveError
from derive.core.inputs import check_arch_inputs
from derive.finite.batch import batch_terms, channel_means
from derive.finite.moments import NumpyMoments, moment_rule
from derive.finite.tensor_ntk import (
    BranchJacobians,
    NTKState,
    Sites,
    activation_tables,
    attention_state,
    first_state,
    identity_tables,
    layernorm_covariances,
    layernorm_state,
    layernorm_tables,
    ntk_constants,
    ntk_variance,
    residual_state,
    run_covariances,
    weighted_state,
)
from derive.kernels.arch import _attend, _logits, _patch, _pool, _spatial_mean, arch_kernels
from derive.rules.layers import FW_INPUT, StructuralOperator, act, combine_weights, mean

#: Structural operators a ``variance`` or ``means`` statement may apply to the channel means.
LINEAR_OPERATORS = ("patch", "pool", "spatial_mean", "diagonal_mean")


def _statement(layer: Layer) -> tuple[str, str, sp.Expr]:
    """(kind, operator name or '', the statement) of the layer's [finite_width] table, for sites."""
    fw = layer.rule.finite_width
    if not fw:
        raise DeriveError(f"layer '{layer.type}': {layer.rule.no_finite_width()}")
    kind, expr = next(iter(fw.items()))
    ops = expr.atoms(StructuralOperator)
    if len(ops) > 1:
        raise DeriveError(f"layer '{layer.type}': one structural operator per finite_width statement")
    return kind, (type(next(iter(ops))).__name__ if ops else ""), expr.xreplace(layer.values())


def _constants(expr: sp.Expr) -> tuple[float, float]:
    """(c0, c1) of a statement c0 + c1 * op(mean(h1*h2))."""
    core = [a for a in expr.atoms(StructuralOperator)] or [m for m in expr.atoms(mean)]
    x = sp.Dummy("x")
    linear = expr.xreplace({core[0]: x})
    if linear.free_symbols - {x} or sp.diff(linear, x, 2) != 0:
        raise DeriveError(f"finite_width statement {expr} is not affine in the channel means")
    return float(linear.xreplace({x: 0})), float(sp.diff(linear, x))


# ------------------------------------------------------------------------------------------------
# Structural operators on site matrices (jnp; composed and differentiated by JAX)


def _op(name: str, layer: Layer, X, N: int, spatial: tuple):
    """The operator on an (M, M) matrix of sites; returns the (M', M') matrix and the new positions."""
    if name == "":
        return X, spatial
    Y = X.reshape((N, *spatial, N, *spatial))
    if name == "patch":
        out, sp_ = _patch(Y, N, spatial, layer)
    elif name == "pool":
        out, sp_ = _pool(Y, N, spatial, layer)
    elif name == "spatial_mean":
        out, sp_ = _spatial_mean(Y, N, spatial, layer)
    elif name == "diagonal_mean":
        P = math.prod(spatial)
        out, sp_ = jnp.einsum("apbp->ab", Y.reshape(N, P, N, P)) / P, ()
    else:
        raise DeriveError(f"layer '{layer.type}': no tensor finite-width rule for the operator {name}")
    M2 = N * math.prod(tuple(sp_))
    return out.reshape(M2, M2), tuple(sp_)


def _positions_after(name: str, layer: Layer, N: int, spatial: tuple) -> tuple:
    return _op(name, layer, jnp.zeros((N * math.prod(spatial),) * 2), N, spatial)[1]


def _run_ops(ops, X, N: int, spatial: tuple):
    """X through the operators ``ops`` ((name, layer) pairs) in turn; returns it and the positions."""
    for name, lay in ops:
        X, spatial = _op(name, lay, X, N, spatial)
    return X, spatial


@lru_cache(maxsize=64)
def _linear_map(ops: tuple, N: int, spatial: tuple) -> np.ndarray:
    """The linear map L (M'^2, M^2) of an (M, M) matrix of sites through the operators ``ops`` (pooling,
    a weighted layer's patches), by one Jacobian compiled once per operators and shape."""
    M = N * math.prod(spatial)
    L = np.asarray(jax.jacfwd(lambda X: _run_ops(ops, X, N, spatial)[0])(jnp.zeros((M, M))))
    return L.reshape(-1, M * M)


# ------------------------------------------------------------------------------------------------
# Gaussian points and the means a layer reads


@dataclass
class _Point:
    """A Gaussian point over M sites and the run applied to it since (activation / layernorm first,
    then linear ``means`` operators)."""

    K: np.ndarray
    V: np.ndarray
    G: np.ndarray
    spatial: tuple
    activation: object = None
    layernorm: Layer | None = None
    after: list = field(default_factory=list)  # (operator name, layer) in order
    ntk: NTKState | None = None  # the NTK's statistics (derive.finite.tensor_ntk), where derived
    ntk_reason: str = ""  # why not, where not
    branch: BranchJacobians | None = None  # inside a residual branch: what it carries of the skip

    def run(self, **changes) -> _Point:
        """The same point with a longer run (``changes``), carrying the NTK statistics."""
        fields = dict(K=self.K, V=self.V, G=self.G, spatial=self.spatial, activation=self.activation,
                      layernorm=self.layernorm, after=list(self.after), ntk=self.ntk, ntk_reason=self.ntk_reason,
                      branch=self.branch)
        return _Point(**{**fields, **changes})

    @cached_property
    def sites(self) -> Sites:
        """The point's identical sites (:class:`~derive.finite.tensor_ntk.Sites`), found once."""
        return Sites.of(self.K, self.V, self.G)

    @property
    def gaussian(self) -> bool:
        return self.activation is None and self.layernorm is None and not self.after


@dataclass
class _Means:
    """The channel means a weighted layer reads, flattened into one vector m: its infinite-width value,
    n (E m - <m>), n Cov(m, m), n Cov(z_s z_t, m) against the point's own products (``cross``) and
    ``kind``, which names the map (:func:`_to_matrix`) from m to the matrix of products the layer's
    statement uses (before pooling)."""

    value: np.ndarray
    bias: np.ndarray
    cov: np.ndarray
    cross: np.ndarray
    kind: tuple  # ("products", M) or ("layernorm", M, eps)
    linear: bool
    jacobian_in_K: np.ndarray | None = None  # d<m>/dK, shape (dim m, M^2), for X through a branch


def _to_matrix(kind: tuple):
    """The matrix of products a weighted layer's statement reads, from the flattened means m."""
    M = kind[1]
    if kind[0] == "products":
        return lambda m: m.reshape(M, M)
    eps = kind[2]

    def normalised(m):
        a, mu = m[:M * M].reshape(M, M), m[M * M:]
        var = jnp.diagonal(a) - mu * mu + eps
        return (a - mu[:, None] * mu[None, :]) / jnp.sqrt(var[:, None] * var[None, :])

    return normalised


def _pair_means(p: _Point, r: float) -> _Means:
    """a_st = mean_i z_is z_it: Gaussian four-point statistics of the point itself."""
    K, V, G = p.K, p.V, p.G
    M = K.shape[0]
    wick = np.einsum("su,tv->stuv", K, K) + np.einsum("sv,tu->stuv", K, K)
    cov = (wick + r * V).reshape(M * M, M * M)
    return _Means(K.reshape(-1), G.reshape(-1), cov, cov.copy(), ("products", M), True, np.eye(M * M))


def _layernorm_means(p: _Point, r: float) -> _Means:
    """(a, mu) and the normalised products (a_st - mu_s mu_t)/sqrt((a_ss - mu_s^2 + eps)(a_tt - mu_t^2 + eps))."""
    K, G = p.K, p.G
    M = K.shape[0]
    eps = float(p.layernorm.value("eps"))
    pair = _pair_means(p, r)
    cov = np.zeros((M * M + M,) * 2)
    cov[:M * M, :M * M] = pair.cov
    cov[M * M:, M * M:] = K
    cross = np.zeros((M * M, M * M + M))
    cross[:, :M * M] = pair.cov
    jac = np.zeros((M * M + M, M * M))  # d<m>/dK: a follows K, mu stays 0
    jac[:M * M] = np.eye(M * M)
    return _Means(np.concatenate([K.reshape(-1), np.zeros(M)]), np.concatenate([G.reshape(-1), np.zeros(M)]),
                  cov, cross, ("layernorm", M, eps), False, jac)


def _activation_means(p: _Point, activation, r: float, tol: float, need_cross: bool) -> _Means:
    """P_st = mean_i sigma(z_is) sigma(z_it) (module docstring; :func:`derive.finite.batch.channel_means`),
    over the point's distinct sites and expanded (:class:`~derive.finite.tensor_ntk.Sites`)."""
    K, V = p.K, p.V
    M = K.shape[0]
    sites = p.sites
    rule = moment_rule(activation, "auto", float(np.max(np.diag(K))), tol)
    quartic = None
    if rule.kind != "exact":  # many sets of sites: compiled where it pays (JAX, imported only here)
        from derive.finite.batch_jax import four_point_table

        quartic = four_point_table(activation.sigma_numeric, rule, sites.reduce(K))
    means = channel_means(batch_terms(activation, tol), sites.reduce(K), sites.reduce(V), sites.reduce(p.G), r,
                          rule, NumpyMoments(activation.sigma_numeric, rule.smoothed), second=True, quartic=quartic)
    # <d_c d_d (s_u s_v)>, the Jacobian 2 d<s_u s_v>/dK_cd
    D = sites.pairs(means.second.reshape((means.value.size,) * 2), 1)
    cross = None
    if need_cross:  # n Cov(z_s z_t, P_uv) = sum_cd (K_sc K_td + r V_(st)(cd) / 2) <d_c d_d (s_u s_v)>
        KK = np.einsum("sc,td->stcd", K, K).reshape(M * M, M * M)
        cross = (KK + r / 2 * V.reshape(M * M, M * M)) @ D.T
    value, bias = (sites.pairs(x.reshape(-1)) for x in (means.value, means.bias))
    cov = sites.pairs(means.cov.reshape((means.value.size,) * 2))
    return _Means(value, bias, cov, cross, ("products", M), True, D / 2)


# ------------------------------------------------------------------------------------------------
# Weighted layers: the statement's map of the means, and attention's own fluctuations


def _attention_parts(layer: Layer, N: int, spatial: tuple):
    """f(U, S) = A(U) S A(U)^T within each input, A = softmax of the rule's logits of U."""
    if not spatial:
        raise DeriveError(f"layer '{layer.type}': attention needs inputs with positions (tokens)")
    logits = _logits(layer)
    T = math.prod(spatial)

    def f(U, Sm):
        own = U.reshape(N, T, N, T)[jnp.arange(N), :, jnp.arange(N), :]
        A = jax.nn.softmax(logits(own), axis=-1)
        out, _ = _attend(Sm.reshape((N,) + spatial + (N,) + spatial), N, spatial, layer, A)
        return out.reshape(N * T, N * T)

    return f


@lru_cache(maxsize=64)
def _statement_map(layer: Layer, after: tuple, kind: tuple, N: int, spatial: tuple) -> tuple:
    """The weighted layer's output covariance F(m) as a function of the means it reads (through the
    run's pooling ``after`` and the layer's statement), with its Jacobian and Hessian, compiled once
    per layer, run and shape (a stack of equal blocks compiles each once)."""
    _, op, expr = _statement(layer)
    c0, c1 = _constants(expr)
    to_matrix = _to_matrix(kind)
    is_attention = op == "attend"
    if is_attention:
        values = {s.name: float(v) for s, v in layer.values().items()}
        C_O, C_V = values["C_O"], values["C_V"]
        f = _attention_parts(layer, N, _spatial_after(after, N, spatial))

    def pooled(m):
        return _run_ops(after, to_matrix(m), N, spatial)[0]

    def F(m):
        X = pooled(m)
        if is_attention:
            return c0 + C_O * f(X, C_V * X)
        return c0 + c1 * _op(op, layer, X, N, _spatial_after(after, N, spatial))[0]

    return jax.jit(F), jax.jit(jax.jacfwd(F)), jax.jit(jax.hessian(F)), jax.jit(pooled)


def _weighted(layer: Layer, p: _Point, means: _Means, N: int):
    """The next Gaussian point (K, V, G1, positions) and the Jacobian J of its kernel in the means."""
    kind, op, expr = _statement(layer)
    if kind != "variance":
        raise DeriveError(f"layer '{layer.type}': no tensor finite-width map for a '{kind}' statement here")
    spatial = p.spatial
    after = list(p.after)
    c0, c1 = _constants(expr)
    is_attention = op == "attend"
    if is_attention:
        values = {s.name: float(v) for s, v in layer.values().items()}
        C_O, C_V = values["C_O"], values["C_V"]
        if not math.isclose(c1, C_O * C_V, rel_tol=1e-12):
            raise DeriveError(f"layer '{layer.type}': attend(...) is scaled by C_O*C_V in its finite_width "
                              "statement (values by C_V, the output by C_O)")
        heads = int(layer.option("heads"))
    F, jacobian, hessian, pooled = _statement_map(layer, tuple(after), means.kind, N, spatial)
    m0 = jnp.asarray(means.value)
    K1 = np.asarray(F(m0))
    J = np.asarray(jacobian(m0)).reshape(K1.size, -1)
    V1 = J @ means.cov @ J.T
    G1 = J @ means.bias
    if not (means.linear and not is_attention):
        Hs = np.asarray(hessian(m0)).reshape(K1.size, m0.size, m0.size)
        G1 = G1 + 0.5 * np.einsum("kab,ab->k", Hs, means.cov)
    if is_attention:
        dV, dG = _attention_fluctuations(layer, N, _spatial_after(after, N, spatial),
                                         np.asarray(pooled(m0)), C_O, C_V, heads)
        V1, G1 = V1 + dV, G1 + dG
        out_spatial = _spatial_after(after, N, spatial)
    else:
        out_spatial = _spatial_after(after + ([(op, layer)] if op else []), N, spatial)
    M1 = int(round(math.sqrt(K1.size)))
    return (K1.reshape(M1, M1), V1.reshape(M1, M1, M1, M1), G1.reshape(M1, M1), out_spatial, J)


@lru_cache(maxsize=32)
def _attention_derivatives(layer: Layer, N: int, spatial: tuple) -> tuple:
    """d f/dU, d f/dS and d^2 f/dU^2 of one head's f(U, S), compiled once per layer and shape."""
    f = _attention_parts(layer, N, spatial)
    return (jax.jit(jax.jacfwd(f, argnums=0)), jax.jit(jax.jacfwd(f, argnums=1)),
            jax.jit(jax.hessian(f, argnums=0)))


def _attention_fluctuations(layer: Layer, N: int, spatial: tuple, Min: np.ndarray, C_O: float, C_V: float,
                            heads: int):
    """Attention's own order-1/n terms (module docstring): each head's logit and value means over its
    n/H channels fluctuate with the Wishart covariance W around M and C_V M. Returns (n Cov(G | M),
    n (E[G | M] - g(M))), flattened."""
    Mm = Min.shape[0]
    W = (np.einsum("su,tv->stuv", Min, Min) + np.einsum("sv,tu->stuv", Min, Min)).reshape(Mm * Mm, Mm * Mm)
    U0, S0 = jnp.asarray(Min), C_V * jnp.asarray(Min)
    dU, dS, dUU = _attention_derivatives(layer, N, spatial)
    JU = np.asarray(dU(U0, S0)).reshape(Mm * Mm, -1)
    JS = np.asarray(dS(U0, S0)).reshape(Mm * Mm, -1)
    HU = np.asarray(dUU(U0, S0)).reshape(Mm * Mm, Mm * Mm, Mm * Mm)
    dV = C_O**2 * (JU @ W @ JU.T + C_V**2 * JS @ W @ JS.T)
    dG = C_O * heads / 2 * np.einsum("kab,ab->k", HU, W)
    return dV, dG


def _spatial_after(ops, N: int, spatial: tuple) -> tuple:
    for name, lay in ops:
        spatial = _positions_after(name, lay, N, spatial)
    return spatial


# ------------------------------------------------------------------------------------------------
# Walking an architecture


@dataclass(repr=False)
class TensorFiniteWidth:
    """Per recorded output (as :func:`derive.kernels.arch.arch_kernels`): K and G1 of shape (M, M) and
    V of shape (M, M, M, M) over the M sites (input, position) flattened, at Gaussian points (None
    elsewhere); ``spatial`` the positions of each output; Theta the infinite-width NTK (M, M)."""

    name: str
    labels: list[str]
    N: int
    spatial: list[tuple]
    values: dict
    ntk_reasons: list = field(default_factory=list)  # why an output has no A, B, D, F

    def as_dict(self) -> dict:
        def listed(x):
            return None if x is None else np.asarray(x).tolist()

        return {"architecture": self.name, "labels": self.labels, "inputs": self.N,
                "spatial": [list(s) for s in self.spatial],
                **{q: [listed(x) for x in v] for q, v in self.values.items()},
                "Theta_var": [listed(x) for x in self.theta_var()], "ntk_reasons": list(self.ntk_reasons)}

    def theta_var(self) -> list:
        """n Var(H_ii(s, t)) of one channel's NTK per output, (M, M), None where A, B are not derived
        (:func:`derive.finite.tensor_ntk.ntk_variance`)."""
        return [None if A is None else ntk_variance(np.asarray(A), np.asarray(B))
                for A, B in zip(self.values.get("A", []), self.values.get("B", []))]

    def _sites(self, i: int) -> int:
        return self.N * math.prod(self.spatial[i])

    def __repr__(self) -> str:
        name = f"{self.name}: " if self.name else ""
        positions = self.spatial[-1] if self.spatial else ()
        shape = f" x {' x '.join(map(str, positions))} positions" if positions else ""
        M = self._sites(-1) if self.labels else 0
        ntk = "".join(f", {q}" for q in "ABDF" if self.values.get(q) and self.values[q][-1] is not None)
        return (f"TensorFiniteWidth({name}{len(self.labels)} outputs, {self.N} inputs{shape}: K, G1 "
                f"({M}, {M}) and V{ntk} ({M}, {M}, {M}, {M}) at the output)")

    def _repr_markdown_(self) -> str:
        rows = []
        variances = self.theta_var()
        for i, label in enumerate(self.labels):
            K, V, G = (self.values[q][i] for q in ("K", "V", "G1"))
            Th = np.asarray(self.values["Theta"][i])
            theta = float(np.mean(np.diag(Th)))
            var = MISSING if i >= len(variances) or variances[i] is None else float(np.mean(np.diag(variances[i])))
            if K is None:
                rows.append([markdown_text(label), self._sites(i), MISSING, MISSING, MISSING, theta, MISSING])
                continue
            rows.append([markdown_text(label), self._sites(i), float(np.mean(np.diag(K))),
                         float(np.mean(np.einsum("ssss->s", np.asarray(V)))), float(np.mean(np.diag(G))), theta,
                         var])
        positions = self.spatial[-1] if self.spatial else ()
        where = f"positions {' x '.join(map(str, positions))}" if positions else "no positions"
        lines = [f"**Finite-width corrections over sites** of {markdown_text(self.name) or 'an architecture'}: {self.N} inputs, "
                 f"{where} at the output; a site $s$ is an (input, position) pair. Means over the sites of $K_{{ss}}$, "
                 "$V_{(ss)(ss)}$, $G^{\\{1\\}}_{ss}$ (coefficients of 1/n), the infinite-width $\\Theta_{ss}$ and "
                 "the NTK's fluctuation $n\\,\\mathrm{Var}\\,\\hat\\Theta_{ss} = A_{(ss)(ss)} + 2B_{(ss)(ss)}$:", "",
                 markdown_table(["output", "sites", "$K_{ss}$", "$V_{(ss)(ss)}$", "$G^{\\{1\\}}_{ss}$",
                                 "$\\Theta_{ss}$", "$n\\,\\mathrm{Var}\\,\\hat\\Theta_{ss}$"], rows),
                 "", f"{MISSING}: the output of an activation or a pooling of one is not a Gaussian point, or the "
                 "NTK's fluctuations are not derived there (``ntk_reasons`` says why)."]
        if self.labels and self.values["K"][-1] is not None:
            lines += ["", "At the output, $K_{st}$:", "", matrix_table(self.values["K"][-1], corner="$s$"), "",
                      "$G^{\\{1\\}}_{st}$:", "", matrix_table(self.values["G1"][-1], corner="$s$")]
            if variances and variances[-1] is not None:
                lines += ["", "$n\\,\\mathrm{Var}\\,\\hat\\Theta_{st}$ of one output channel:", "",
                          matrix_table(variances[-1], corner="$s$")]
        return "\n".join(lines)


def _flat(net: Serial):
    for item in net.items:
        if isinstance(item, Repeat):
            for _ in range(item.times):
                yield from _flat(item.body)
        else:
            yield item


class _Walker:
    """Carries a Gaussian point over sites through layers (module docstring)."""

    def __init__(self, N: int, tol: float, ntk: bool = True):
        self.N, self.tol, self.r, self.with_ntk = N, tol, 1.0, ntk

    def means(self, p: _Point, need_cross: bool) -> _Means:
        if p.layernorm is not None:
            return _layernorm_means(p, self.r)
        if p.activation is None:
            return _pair_means(p, self.r)
        return _activation_means(p, p.activation, self.r, self.tol, need_cross)

    def step(self, p: _Point, layer: Layer, here: str, X=None):
        """The point after ``layer``; with X (a residual branch's n Cov(skip products, point)), X too."""
        if layer.rule.combinator:
            return self.residual(p, layer, here), None
        if layer.width is not None:
            raise DeriveError(f"{here}: the tensor form takes one width for every layer")
        kind, op, expr = _statement(layer)
        if kind == "elementwise":
            if expr == act(0, 0, FW_INPUT):
                if p.layernorm is not None:
                    raise DeriveError(f"{here}: an activation after LayerNorm with positions or several inputs "
                                      "has no finite-width maps yet (LayerNorm followed by a weighted layer is "
                                      "derived; one input without positions is derived in any order)")
                if not p.gaussian:
                    raise DeriveError(f"{here}: an activation of non-Gaussian features")
                return p.run(activation=layer.resolved_activation()), X
            if layer.rule.sampler != "layernorm" or not p.gaussian:
                raise DeriveError(f"{here}: no tensor finite-width map for this elementwise layer here")
            return p.run(layernorm=layer), X
        if kind == "means":
            if p.gaussian and op != "diagonal_mean":  # pooling a Gaussian point: linear in each channel
                M = p.K.shape[0]
                L = _linear_map(((op, layer),), self.N, p.spatial)
                M2 = int(round(math.sqrt(L.shape[0])))
                K1 = (L @ p.K.reshape(-1)).reshape(M2, M2)
                G1 = (L @ p.G.reshape(-1)).reshape(M2, M2)
                V1 = (L @ p.V.reshape(M * M, M * M) @ L.T).reshape((M2,) * 4)
                if isinstance(X, str):
                    raise DeriveError(f"{here}: a residual branch that pools the skip before its first weighted "
                                      "layer has no finite-width maps")
                X1 = None if X is None else X @ L.T
                ntk = None if p.ntk is None else p.ntk.mapped(L)
                branch = None if p.branch is None else p.branch.mapped(L)
                return _Point(K1, V1, G1, _positions_after(op, layer, self.N, p.spatial), ntk=ntk,
                              ntk_reason=p.ntk_reason, branch=branch), X1
            return p.run(after=[*p.after, (op, layer)]), X
        first = isinstance(X, str)
        means = self.means(p, first)
        K1, V1, G1, spatial, J = _weighted(layer, p, means, self.N)
        ntk, reason, branch = self.ntk(p, layer, means, J)
        q = _Point(K1, V1, G1, spatial, ntk=ntk, ntk_reason=reason, branch=branch)
        if X is None:
            return q, None
        if first:
            if means.cross is None:
                raise DeriveError(f"{here}: a residual branch that reads the skip through an activation first "
                                  "has a per-channel self-interaction at O(1/n) that K, V, G1 do not carry")
            return q, means.cross @ J.T
        return q, X @ means.jacobian_in_K.T @ J.T

    def residual(self, p: _Point, layer: Layer, where: str) -> _Point:
        if not p.gaussian:
            raise DeriveError(f"{where}: the skip carries the output of an activation or layernorm; finite-width "
                              "maps are derived for a residual block whose input is a Gaussian point")
        b, X = p.run(branch=None if p.ntk is None else BranchJacobians.start(p.K.shape[0])), "start"
        items = list(_flat(layer.branch))
        if items and items[0].type == "activation":
            raise DeriveError(f"{where}: a residual branch that reads the skip through an activation first has a "
                              "per-channel self-interaction at O(1/n) that K, V, G1 do not carry")
        for i, item in enumerate(items, 1):
            if item.rule.combinator:
                raise DeriveError(f"{where}, branch layer {i}: a residual block inside a residual branch has no "
                                  "finite-width maps yet")
            b, X = self.step(b, item, f"{where}, branch layer {i}", X)
        if not b.gaussian or X is None or isinstance(X, str):
            raise DeriveError(f"{where}: the branch must end in a weighted layer")
        if b.spatial != p.spatial:
            raise DeriveError(f"{where}: the branch changes the positions {p.spatial} -> {b.spatial}")
        a2, c2 = combine_weights(layer.rule.finite_width["combine"].xreplace(layer.values()))
        M = p.K.shape[0]
        V1 = _residual_vertex(a2, c2, p.V, np.asarray(X).reshape(M, M, M, M), b.V)
        if b.ntk is None:
            ntk, reason = None, b.ntk_reason
        else:
            ntk, reason = residual_state(a2, c2, p.ntk, p.K, p.V, b.ntk, b.branch), ""
        return _Point(a2 * p.K + c2 * b.K, V1, a2 * p.G + c2 * b.G, p.spatial, ntk=ntk, ntk_reason=reason)

    def ntk(self, p: _Point, layer: Layer, means: _Means, J: np.ndarray) -> tuple:
        """The NTK's statistics after a weighted layer (:mod:`derive.finite.tensor_ntk`), or None and why;
        inside a residual branch also its :class:`BranchJacobians`."""
        if p.ntk is None:
            return None, p.ntk_reason, None
        _, op, expr = _statement(layer)
        if op == "attend":
            try:
                state, branch = self.attention_ntk(p, layer, means)
            except DeriveError as e:
                return None, str(e), None
            return state, "", branch
        try:
            constants = ntk_constants(layer, op)
        except DeriveError as e:
            return None, str(e), None
        c1 = _constants(expr)[1]
        if c1 == 0 or not math.isclose(constants[2], c1, rel_tol=1e-12):
            return None, (f"layer '{layer.type}': its NTK map's Theta coefficient {constants[2]} is not its "
                          f"weight variance {c1}"), None
        if p.layernorm is not None:
            tables = layernorm_tables(p.K, float(p.layernorm.value("eps")))
            L = _linear_map((*p.after, (_statement(layer)[1], layer)), self.N, p.spatial)
            state = layernorm_state(p.ntk, p.K, p.V, tables, L, constants, c1, self.r)
            branch = None if p.branch is None else p.branch.weighted(p.ntk.Theta, tables.JX, tables.run, L,
                                                                     constants, c1)
            return state, "", branch
        run, Es, JP = self.run_tables(p, means)
        L = J / c1
        state = weighted_state(p.ntk, p.K, p.V, Es, JP, means.cov, run, L, constants, c1, self.r)
        branch = None if p.branch is None else p.branch.weighted(p.ntk.Theta, JP, run, L, constants, c1)
        return state, "", branch


    def run_tables(self, p: _Point, means: _Means) -> tuple:
        """The run's NTK tables, its <ss> and d<ss>/dK at a point read through an activation or none."""
        if p.activation is None:
            return identity_tables(p.K), p.K, np.eye(p.K.size)
        return (activation_tables(p.activation, p.K, self.tol, p.sites), means.value.reshape(p.K.shape),
                means.jacobian_in_K)

    def attention_ntk(self, p: _Point, layer: Layer, means: _Means) -> tuple:
        """The NTK's statistics after attention (:func:`~derive.finite.tensor_ntk.attention_state`), and
        inside a residual branch its :class:`BranchJacobians` (:meth:`BranchJacobians.attention`)."""
        weights = {s.name: float(v) for s, v in layer.values().items()}
        t0, t1, t2 = ntk_constants(layer, "attend")
        C_O, C_V, lO, lV = (weights[k] for k in ("C_O", "C_V", "lambda_O", "lambda_V"))
        if not all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in
                   ((t0, weights["lambda_b"]), (t1, lO * C_V + C_O * lV), (t2, C_O * C_V))):
            raise DeriveError(f"layer '{layer.type}': its NTK map {layer.rule.ntk} is not lambda_b + C_O*C_V*"
                              "attend(Theta12) + (lambda_O*C_V + C_O*lambda_V)*attend(K12)")
        if p.layernorm is not None:
            tables = layernorm_tables(p.K, float(p.layernorm.value("eps")))
            Es, run, JP = tables.X, tables.run, tables.JX
            CPP, CNP, CNN = layernorm_covariances(p.ntk, p.K, p.V, tables, self.r)
        else:
            run, Es, JP = self.run_tables(p, means)
            CPP = means.cov
            CNP, CNN = run_covariances(p.ntk, p.K, p.V, Es, JP, run, self.r)
        L = _linear_map(tuple(p.after), self.N, p.spatial)
        spatial = _spatial_after(p.after, self.N, p.spatial)
        M1 = int(round(math.sqrt(L.shape[0])))
        Min = (L @ Es.reshape(-1)).reshape(M1, M1)
        U0 = jnp.asarray(Min)
        dU, dS, _ = _attention_derivatives(layer, self.N, spatial)
        JS = np.asarray(dS(U0, C_V * U0)).reshape(M1 * M1, -1)

        def JU(X):
            return np.asarray(dU(U0, jnp.asarray(X))).reshape(M1 * M1, -1)

        state = attention_state(p.ntk, Es, CPP, CNP, CNN, run, L, weights, JS, JU, self.r)
        if p.branch is None:
            return state, None
        theta_v = (L @ (lV * Es.reshape(-1) + C_V * p.ntk.Theta.reshape(-1) * run.Ed.reshape(-1))).reshape(M1, M1)
        branch = p.branch.attention(p.ntk.Theta, JP, run, L, weights, JS, JU(C_O * C_V * Min),
                                    JU(lO * C_V * Min + C_O * theta_v))
        return state, branch


def _residual_vertex(a2: float, c2: float, V: np.ndarray, X: np.ndarray, Vb: np.ndarray) -> np.ndarray:
    """V' = xi^4 V + xi^2 gamma^2 (X + X^T) + gamma^4 V_b (module docstring), a2 = xi^2, c2 = gamma^2."""
    return a2 * a2 * V + a2 * c2 * (X + X.transpose(2, 3, 0, 1)) + c2 * c2 * Vb


@float64


def arch_finite_width_tensor(net: Serial, inputs, *, tol: float = 1e-11, ntk: bool = True) -> TensorFiniteWidth:
    """K, V and G1 over every site of ``inputs`` (N, *positions, d) through ``net`` (module docstring),
    and with ``ntk`` the NTK's fluctuations A, B, D, F where derived (:mod:`derive.finite.tensor_ntk`)."""
    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    check_derivable(net)
    x = check_arch_inputs(inputs)
    layers = sum(net.layer_counts().values())
    recorded = sum(item.times if isinstance(item, Repeat) else 1 for item in net.items)
    budget.check(budget.finite_width_tensor(math.prod(x.shape[:-1]), layers, recorded))
    theory = arch_kernels(net, x)  # infinite-width K and Theta of every output
    N = x.shape[0]
    top = []
    for i, item in enumerate(net.items, 1):
        if isinstance(item, Repeat):
            top.extend((f"layer {i}[{k + 1}]", item.body) for k in range(item.times))
        else:
            top.append((f"layer {i}", item))
    values = {"K": [], "V": [], "G1": [], "A": [], "B": [], "D": [], "F": []}
    reasons = []
    walker = _Walker(N, tol, ntk)
    p: _Point | None = None
    for where, item in top:
        for layer in (list(_flat(item)) if isinstance(item, Serial) else [item]):
            here = f"{where} ({layer.type})"
            if p is None:
                p = _first(layer, x, N, here)
                if not ntk:
                    p.ntk, p.ntk_reason = None, "not asked for (ntk=False)"
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                p, _ = walker.step(p, layer, here)
            _check_finite(p, here)
        for q, v in (("K", p.K), ("V", p.V), ("G1", p.G)):
            values[q].append(v if p.gaussian else None)
        held = p.gaussian and p.ntk is not None
        for q in "ABDF":
            values[q].append(getattr(p.ntk, q) if held else None)
        reasons.append("" if held else (p.ntk_reason or "not a Gaussian point"))
    values["Theta"] = [np.asarray(t).reshape(int(np.sqrt(np.size(t))), -1) for t in theory.ntk]
    return TensorFiniteWidth(net.name, [label for label, _ in net.top_level()], N, list(theory.spatial), values,
                             reasons)


def _check_finite(p: _Point, here: str) -> None:
    """A clear error where the walk met a divergent derivative (instead of NaN in the results)."""
    state = [p.K, p.V, p.G] + ([] if p.ntk is None else [p.ntk.Theta, p.ntk.A, p.ntk.B, p.ntk.D, p.ntk.F])
    if not all(v is None or np.all(np.isfinite(v)) for v in state):
        raise DeriveError(f"{here}: the finite-width maps are not finite here: two sites (inputs or positions) "
                          "with correlation +-1 that are not the same (antiparallel, or parallel with different "
                          "variances) meet a kink of the activation, where the K-derivatives of its Gaussian "
                          "expectations diverge; give inputs that are not parallel or antiparallel (identical "
                          "inputs or positions are derived)")


def _first(layer: Layer, x: np.ndarray, N: int, here: str) -> _Point:
    """The first weighted layer, on the raw inputs: its output is exactly Gaussian."""
    if layer.width is not None:
        raise DeriveError(f"{here}: the tensor form takes one width for every layer")
    kind, op, expr = _statement(layer)
    if kind != "variance" or op not in ("", "patch"):
        raise DeriveError(f"{here}: finite-width maps start from a dense or conv layer on the inputs")
    c0, c1 = _constants(expr)
    spatial = tuple(x.shape[1:-1])
    flat = x.reshape(N * math.prod(spatial), -1)
    two, spatial = _op(op, layer, jnp.asarray(flat @ flat.T / x.shape[-1]), N, spatial)
    K = c0 + c1 * np.asarray(two)
    try:
        t0, t1, _ = ntk_constants(layer, op)
        ntk, reason = first_state(t0 + t1 * np.asarray(two)), ""
    except DeriveError as e:
        ntk, reason = None, str(e)
    return _Point(K, np.zeros(K.shape * 2), np.zeros_like(K), spatial, ntk=ntk, ntk_reason=reason)


__all__ = ["TensorFiniteWidth", "arch_finite_width_tensor"]
