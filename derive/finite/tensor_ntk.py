"""The NTK's fluctuations over sites (inputs and positions): A, B, D, F in tensor form, from the rules.

A Gaussian point over M sites (:mod:`derive.finite.tensor`) carries, besides K, V and G1, the
infinite-width NTK Theta_st and the order-1/n statistics of the NTK H_ij(s, t) of its channels
(PDLT §8.2, eqs. 8.63 and 8.65, with sites for samples):

    n E[dH_i1i2(s,t) dH_i3i4(u,v)] = d_i1i2 d_i3i4 A_(st)(uv) + d_i1i3 d_i2i4 B_(su)(tv)
                                     + d_i1i4 d_i2i3 B_(sv)(tu)
    n E[dH_i1i2(s,t) z_i3(u) z_i4(v)] = d_i1i2 d_i3i4 D_(st)(uv) + d_i1i3 d_i2i4 F_(su)(tv)
                                        + d_i1i4 d_i2i3 F_(sv)(tu)

(the first pair of B's and F's indices belongs to one channel). A weighted layer whose rule states
``variance = "c0 + C_W*op(mean(h1*h2))"`` and ``ntk = "t0 + t1*op(K12) + C_W*op(Theta12)"`` (dense:
no operator; conv: ``patch``) reads the run s = sigma(z) since the point (the identity without an
activation), pooled by the run's ``means`` operators: with L the linear map of a matrix of
products (the pooling, then op), its output channels have, given the layer below,

    G = c0 + C_W L(P),   E_W H = T = t0 + t1 L(P) + C_W L(N),
    P_st = mean_j s_j(s) s_j(t),   N_st = mean_j s'_j(s) s'_j(t) H_jj(s, t),

and the weights' own Wick pairings. With Q_st = mean_j s'_j(s) s'_j(t), <.> over z ~ N(0, K),
J_f the K-derivatives of <f> (J[(st), (cd)] = d<f_st>/dK_cd, each ordered pair half of a symmetric
change) and r = 1 (one width):

    n Cov(P, P) = <ssss> - <ss><ss> + r J_P V J_P^T           (as for G1, :mod:`derive.finite.batch`)
    n Cov(Q, P) = <s's'ss> - <s's'><ss> + r J_Q V J_P^T
    n Cov(N, P) = Theta (x) 1 . n Cov(Q, P) + r <s's'> (x) 1 . (D J_P^T)
    n Cov(N, N) = Theta (x) Theta . n Cov(Q, Q) + r <s's'> (x) <s's'> . A
                  + r Theta (x) <s's'> . (J_Q D^T) + r <s's'> (x) Theta . (D J_Q^T)

(X (x) Y . Z the entrywise product with X_st Y_uv). Then

    A' = L [t1^2 C_PP + t1 C_W (C_PN + C_NP) + C_W^2 C_NN] L^T,   D' = L [C_W t1 C_PP + C_W^2 C_NP] L^T,
    B' = C_W^2 L [<s'_x1 s'_x2 s'_y1 s'_y2> Theta_x1y1 Theta_x2y2 + r <s'_x1 s'_x2> <s'_y1 s'_y2> B_(x1x2)(y1y2)] L^T,
    F' = C_W^2 L [<s'_x1 s_x2 s'_y1 s_y2> Theta_x1y1
                  + r sum_pq <d_p (s'_x1 s_x2)> <d_q (s'_y1 s_y2)> F_(x1p)(y1q)] L^T,
    Theta' = t0 + t1 L <ss> + C_W L (Theta . <s's'>),

L acting on each index pair (in B and F the pairs of one channel, which share the weight and, for
a convolution, its filter offset). For one input without positions these are PDLT's eqs. 8.89
term by term, the rule ``rules/layers/dense.toml`` states (the tests check the diagonal against
:func:`derive.finite.arch.arch_finite_width`). A pooling of a Gaussian point maps every index by
its linear map. <d_p f> and J are K-derivatives of two-input expectations (Price's theorem:
<s'_1 s'_2> = d<s_1 s_2>/dK12, <s''_1 s_2> = 2 d<s_1 s_2>/dK11); the four-point expectations of
s and s' come from :func:`derive.finite.moments.product_moment`. A residual block combines the
skip's statistics with its branch's through the branch's Jacobian (:func:`residual_state`); a
weighted layer after LayerNorm reads the normalised products and LayerNorm's Jacobian
(:func:`layernorm_state`). Tied self-attention is, given its logits, a weighted layer of the values,
a linear map of the positions and a weighted layer of the output weights, and its logits' own
fluctuations add to A and D (:func:`attention_state`); in a residual branch its Jacobians also read
the attention weights (:meth:`BranchJacobians.attention`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.finite.batch import _pair_values, batch_terms
from derive.finite.moments import moment_rule, product_moment
from derive.finite.moments_jax import trapezoid_product_moments, worth_compiling
from derive.finite.single import single_expectations
from derive.rules.layers import StructuralOperator
from derive.symbolic.numeric import evaluate


@dataclass
class NTKState:
    """Theta (M, M) and A, B, D, F (M, M, M, M) at a Gaussian point (module docstring)."""

    Theta: np.ndarray
    A: np.ndarray
    B: np.ndarray
    D: np.ndarray
    F: np.ndarray | None  # None where not derived: after attention (attention_state)

    def mapped(self, L: np.ndarray) -> NTKState:
        """Every index pair through the linear map L (M'^2, M^2) of a pooling."""
        M2 = int(round(np.sqrt(L.shape[0])))

        def four(X):
            M = X.shape[0]
            return (L @ X.reshape(M * M, M * M) @ L.T).reshape((M2,) * 4)

        return NTKState((L @ self.Theta.reshape(-1)).reshape(M2, M2), four(self.A), four(self.B), four(self.D),
                        None if self.F is None else four(self.F))


def ntk_variance(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """n Var(H_ii(s, t)) = A_(st)(st) + B_(ss)(tt) + B_(st)(ts), shape (M, M)."""
    return np.einsum("stst->st", A) + np.einsum("sstt->st", B) + np.einsum("stts->st", B)


def ntk_constants(layer, op: str) -> tuple[float, float, float]:
    """(t0, t1, t2) of the rule's NTK map t0 + t1 op(K12) + t2 op(Theta12)."""
    expr = layer.rule.ntk.xreplace(layer.values())
    x, y = sp.Dummy("x"), sp.Dummy("y")
    rep = {}
    for node in expr.atoms(StructuralOperator):
        if type(node).__name__ != op or node.args[0] not in (S.K12, S.Theta12):
            raise DeriveError(f"layer '{layer.type}': its NTK map {layer.rule.ntk} is not affine in {op}(K12) and "
                              f"{op}(Theta12); the NTK's fluctuations over sites are not derived for it")
        rep[node] = x if node.args[0] == S.K12 else y
    linear = expr.xreplace(rep).xreplace({S.K12: x, S.Theta12: y})
    if linear.free_symbols - {x, y} or any(sp.diff(linear, a, b) != 0 for a in (x, y) for b in (x, y)):
        raise DeriveError(f"layer '{layer.type}': its NTK map {layer.rule.ntk} is not affine in K12 and Theta12")
    zero = {x: 0, y: 0}
    return float(linear.xreplace(zero)), float(sp.diff(linear, x)), float(sp.diff(linear, y))


def first_state(theta: np.ndarray) -> NTKState:
    """The first weighted layer on the inputs: its NTK is deterministic."""
    M = theta.shape[0]
    zero = np.zeros((M,) * 4)
    return NTKState(theta, zero, zero.copy(), zero.copy(), zero.copy())


# ------------------------------------------------------------------------------------------------
# The run's expectations over sites


@dataclass(frozen=True)
class Sites:
    """Sites of a Gaussian point grouped into classes of identical ones (z(s) = z(t): equal rows of K, V
    and G1, as duplicate inputs or positions whose receptive fields are all padding give): ``rep[s]``
    the class of site s, ``keep`` one site of each class. A kinked activation's K-derivatives diverge
    at such a pair (correlation 1), while the mathematics has a value: the same expectations over the
    distinct sites (the point's law lives on them), expanded back. Quantities indexed by sites are
    copied to every member of a class (:meth:`values`); derivatives in K (or z) are split evenly over
    the members (:meth:`derivatives`), so that contracting them with quantities that are copies gives
    the derivative over the distinct sites."""

    rep: np.ndarray
    keep: np.ndarray

    @classmethod
    def of(cls, K: np.ndarray, V: np.ndarray | None = None, G: np.ndarray | None = None, rtol: float = 1e-12
           ) -> Sites:
        """The classes of identical sites of the point (K, V, G1); every site its own class unless the
        rows of K, V and G1 agree to ``rtol`` of their scale."""
        M = K.shape[0]
        scale = max(float(np.max(np.abs(K))), 1e-300)
        d = np.diag(K)
        rep, keep = np.empty(M, dtype=int), []
        for t in range(M):
            for c, s in enumerate(keep):
                if abs(d[s] - d[t]) <= rtol * scale and d[s] + d[t] - 2 * K[s, t] <= rtol * scale:
                    rep[t] = c
                    break
            else:
                rep[t] = len(keep)
                keep.append(t)
        sites = cls(rep, np.asarray(keep, dtype=int))
        if sites.distinct:
            return sites
        for X in (K, G, V):
            if X is not None and not np.allclose(sites.values(sites.reduce(X)), X, rtol=1e-9,
                                                 atol=1e-12 * max(float(np.max(np.abs(X))), 1e-300)):
                return cls(np.arange(M), np.arange(M))
        return sites

    @property
    def distinct(self) -> bool:
        return len(self.keep) == len(self.rep)

    def reduce(self, X: np.ndarray) -> np.ndarray:
        """X (every axis a site) on the distinct sites."""
        return X[np.ix_(*[self.keep] * X.ndim)]

    def values(self, X: np.ndarray) -> np.ndarray:
        """X over the distinct sites (every axis) copied to every site."""
        return X[np.ix_(*[self.rep] * X.ndim)]

    def derivatives(self, X: np.ndarray, axes: int) -> np.ndarray:
        """X over the distinct sites with its last ``axes`` axes derivatives (split evenly over each
        class), the others values."""
        size = np.bincount(self.rep)[self.rep].astype(float)
        out = self.values(X)
        for k in range(X.ndim - axes, X.ndim):
            out = out / size.reshape((-1,) + (1,) * (X.ndim - 1 - k))
        return out

    def pairs(self, X: np.ndarray, derivative_pairs: int = 0) -> np.ndarray:
        """:meth:`values` / :meth:`derivatives` of X over flattened pairs of distinct sites ((M'^2,) or
        (M'^2, M'^2), the last ``derivative_pairs`` pairs derivatives), over flattened pairs of sites."""
        m = len(self.keep)
        pairs = X.ndim
        Y = X.reshape((m,) * (2 * pairs))
        Y = self.derivatives(Y, 2 * derivative_pairs) if derivative_pairs else self.values(Y)
        M = len(self.rep)
        return Y.reshape((M * M,) * pairs)


@dataclass
class RunTables:
    """Expectations of the run s (and s') at a Gaussian point over M sites (module docstring):
    ``Ed`` <s's'>, ``JQ`` d<s's'>/dK (M^2, M^2), ``g`` [x1, x2, p] = <d_p (s'_x1 s_x2)>,
    ``D4`` <s's's's'>, ``X4`` [a, b, c, d] = <s'_a s'_b s_c s_d>; ``sites`` the point's identical
    sites (None: all distinct), where the tables are expanded from the distinct ones."""

    Ed: np.ndarray
    JQ: np.ndarray
    g: np.ndarray
    D4: np.ndarray
    X4: np.ndarray
    sites: Sites | None = None


def identity_tables(K: np.ndarray) -> RunTables:
    """s = z: s' = 1."""
    M = K.shape[0]
    g = np.zeros((M, M, M))
    for x1, x2 in np.ndindex(M, M):
        g[x1, x2, x2] = 1.0
    ones = np.ones((M, M))
    return RunTables(ones, np.zeros((M * M, M * M)), g, np.ones((M,) * 4), np.einsum("ab,cd->abcd", ones, K))


def activation_tables(activation, K: np.ndarray, tol: float, sites: Sites | None = None) -> RunTables:
    """:class:`RunTables` of s = sigma(z) (module docstring); with ``sites``, computed over the distinct
    sites and expanded (:class:`Sites`)."""
    if sites is not None and not sites.distinct:
        t = activation_tables(activation, sites.reduce(K), tol)
        return RunTables(sites.values(t.Ed), sites.pairs(t.JQ, 1), sites.derivatives(t.g, 1), sites.values(t.D4),
                         sites.values(t.X4), sites)
    M = K.shape[0]
    sigma, ds = activation.sigma_numeric, activation.derivative(numeric=True)
    terms = batch_terms(activation, tol)
    dE, d2E = terms.pairs.dE, terms.pairs.d2E
    e = single_expectations(sigma, ds, tol)
    d2, dd2 = e["d2"], sp.diff(e["d2"], S.K)

    def one(expr, k):
        with np.errstate(all="ignore"):
            return float(evaluate(expr, {S.K: k}))

    Ed = np.empty((M, M))
    JQ = np.zeros((M * M, M * M))
    g = np.zeros((M, M, M))
    for a, b in np.ndindex(M, M):
        row = a * M + b
        if a == b:
            k = K[a, a]
            Ed[a, a] = one(d2, k)
            JQ[row, a * M + a] = one(dd2, k)
            g[a, a, a] = one(terms.g1, k)
            continue
        v = (K[a, a], K[a, b], K[b, b])
        Ed[a, b] = _pair_values(dE["12"], *v)
        JQ[row, a * M + a] = _pair_values(d2E["11,12"], *v)
        JQ[row, b * M + b] = _pair_values(d2E["12,22"], *v)
        JQ[row, a * M + b] = JQ[row, b * M + a] = _pair_values(d2E["12,12"], *v) / 2
        g[a, b, a] = 2 * _pair_values(dE["11"], *v)
        g[a, b, b] = Ed[a, b]
    rule = moment_rule(activation, "auto", float(np.max(np.diag(K))), tol)

    def key(sites: tuple, derivs: tuple) -> tuple:
        """((site, (i, j)), ...): <prod_k f_k(z_sites[k])>, f = s' where derivs[k] else s, as powers
        sigma^i sigma'^j per distinct site."""
        powers: dict = {}
        for site, d in zip(sites, derivs):
            i, j = powers.get(site, (0, 0))
            powers[site] = (i, j + 1) if d else (i + 1, j)
        return tuple(sorted(powers.items()))

    quads = list(itertools.product(range(M), repeat=4))
    keys = {q: (key(q, (True,) * 4), key(q, (True, True, False, False))) for q in quads}
    memo = _moments({k for pair in keys.values() for k in pair}, rule, sigma, ds, K)
    D4 = np.empty((M,) * 4)
    X4 = np.empty((M,) * 4)
    for q in quads:
        D4[q], X4[q] = memo[keys[q][0]], memo[keys[q][1]]
    return RunTables(Ed, JQ, g, D4, X4)


def _moments(keys: set, rule, sigma: sp.Expr, ds: sp.Expr, K: np.ndarray) -> dict:
    """{key: E[prod sigma(z_site)^i sigma'(z_site)^j]} for keys ((site, (i, j)), ...): under the
    trapezoid rule, the sets of d sites all at once (:func:`trapezoid_product_moments`) where there
    are enough of them to pay for compiling (:func:`worth_compiling`; the sets of four, from about
    eight sites on), the others one by one (:func:`product_moment`)."""
    keys = sorted(keys)
    count = np.bincount([len(k) for k in keys], minlength=5)
    batched = [k for k in keys if rule.kind == "trapezoid" and worth_compiling(len(k), rule.order, count[len(k)])]
    covs = [K[np.ix_(idx, idx)] for idx in ([site for site, _ in k] for k in batched)]
    values = trapezoid_product_moments(sigma, ds, rule.order, covs, [[p for _, p in k] for k in batched])
    memo = dict(zip(batched, values))
    for k in keys:
        if k not in memo:
            idx = [site for site, _ in k]
            memo[k] = product_moment(rule, tuple(sigma**i * ds**j for _, (i, j) in k), K[np.ix_(idx, idx)])
    return memo


# ------------------------------------------------------------------------------------------------
# A weighted layer


def weighted_state(state: NTKState, K: np.ndarray, V: np.ndarray, Es: np.ndarray, JP: np.ndarray, CPP: np.ndarray,
                   run: RunTables, L: np.ndarray, constants: tuple, C_W: float, r: float = 1.0) -> NTKState:
    """The next point's NTK statistics (module docstring): ``Es`` <ss>, ``JP`` d<ss>/dK and ``CPP``
    n Cov(P, P) of the layer's channel means, L (M'^2, M^2) the linear map of its products."""
    CNP, CNN = run_covariances(state, K, V, Es, JP, run, r)
    return _assemble(state, Es, CPP, CNP, CNN, run, L, constants, C_W, r)


def run_covariances(state: NTKState, K: np.ndarray, V: np.ndarray, Es: np.ndarray, JP: np.ndarray, run: RunTables,
                    r: float = 1.0) -> tuple:
    """n Cov(N, P) and n Cov(N, N) of the run's channel means (module docstring), flattened pairs."""
    M = K.shape[0]
    M2 = M * M
    Th, Ed = state.Theta.reshape(-1), run.Ed.reshape(-1)
    Vm, Am, Dm = (X.reshape(M2, M2) for X in (V, state.A, state.D))
    CQQ = run.D4.reshape(M2, M2) - np.outer(Ed, Ed) + r * run.JQ @ Vm @ run.JQ.T
    CQP = run.X4.reshape(M2, M2) - np.outer(Ed, Es.reshape(-1)) + r * run.JQ @ Vm @ JP.T
    return _ntk_means_covariances(Th, Ed, Am, Dm, CQP, CQQ, JP, run.JQ, r)


def _ntk_means_covariances(Th, Ed, Am, Dm, CQP, CQQ, JP, JQ, r):
    """n Cov(N, P) and n Cov(N, N) of N = mean_j s'_j s'_j H_jj (module docstring), flattened pairs;
    JP and JQ the Jacobians of the means P and Q in K, r the width ratio of every 1/n term."""
    DJP, DJQ = Dm @ JP.T, Dm @ JQ.T  # [(st), (uv)] = sum_cd D_(st)(cd) J[(uv), (cd)]
    CNP = Th[:, None] * CQP + r * Ed[:, None] * DJP
    CNN = (np.outer(Th, Th) * CQQ + r * np.outer(Ed, Ed) * Am
           + r * np.outer(Th, Ed) * DJQ.T + r * np.outer(Ed, Th) * DJQ)
    return CNP, CNN


def _assemble(state: NTKState, Es, CPP, CNP, CNN, run: RunTables, L: np.ndarray, constants: tuple, C_W: float,
              r: float) -> NTKState:
    """A', B', D', F' and Theta' from the channel means' covariances and the run's tables (module
    docstring), every index pair through L."""
    M = state.Theta.shape[0]
    M2 = M * M
    t0, t1, t2 = constants
    Th, Ed = state.Theta.reshape(-1), run.Ed.reshape(-1)
    inner_A = t1 * t1 * CPP + t1 * t2 * (CNP + CNP.T) + t2 * t2 * CNN
    inner_D = C_W * (t1 * CPP + t2 * CNP)
    YB = (np.einsum("abcd,ac,bd->abcd", run.D4, state.Theta, state.Theta)
          + r * np.einsum("ab,cd,abcd->abcd", run.Ed, run.Ed, state.B))
    YF = None if state.F is None else (np.einsum("acbd,ac->abcd", run.X4, state.Theta)
                                       + r * np.einsum("abp,cdq,apcq->abcd", run.g, run.g, state.F))
    M1 = int(round(np.sqrt(L.shape[0])))

    def four(X):
        return (L @ X.reshape(M2, M2) @ L.T).reshape((M1,) * 4)

    theta = t0 + t1 * (L @ Es.reshape(-1)) + t2 * (L @ (Th * Ed))
    return NTKState(theta.reshape(M1, M1), four(inner_A), four(C_W * C_W * YB), four(inner_D),
                    None if YF is None else four(C_W * C_W * YF))


# ------------------------------------------------------------------------------------------------
# A weighted layer after LayerNorm


@dataclass
class LayerNormTables:
    """LayerNorm phi_j(s) = (z_j(s) - mu_s) / sigma_s at a Gaussian point, to the order the NTK's
    statistics need (:func:`layernorm_state`): ``X`` <phi phi> = K_st / (sigma_s sigma_t) with
    sigma_s^2 = K_ss + eps, ``JX`` dX/dK (entry by entry), and the run's tables with s' -> q (``run``;
    ``run.JQ`` dq/dK of q_st = 1 / (sigma_s sigma_t))."""

    X: np.ndarray
    JX: np.ndarray
    run: RunTables


def layernorm_tables(K: np.ndarray, eps: float) -> LayerNormTables:
    """:class:`LayerNormTables`: ``run.Ed`` = q, ``run.JQ`` = dq/dK, ``run.D4`` = q_ab q_cd,
    ``run.X4[s, t, u, v]`` = q_st (R_uv - R_su R_sv - R_tv R_tu + R_su R_tv R_st) with R = X, and
    ``run.g[s, u, p]`` = (d_pu / sigma_u - d_ps R_su / sigma_s) / sigma_s (:func:`layernorm_state`)."""
    M = K.shape[0]
    sig = np.sqrt(np.diag(K) + eps)
    q = 1 / np.outer(sig, sig)
    R = K * q
    JX = np.zeros((M * M, M * M))
    Jq = np.zeros((M * M, M * M))
    for s, t in np.ndindex(M, M):
        row = s * M + t
        JX[row, row] += q[s, t]
        for d in (s, t):  # through sigma_s and sigma_t: d sigma_d^{-1} / dK_dd = -1 / (2 sigma_d^3)
            JX[row, d * M + d] -= R[s, t] / (2 * sig[d] ** 2)
            Jq[row, d * M + d] -= q[s, t] / (2 * sig[d] ** 2)
    X4 = q[:, :, None, None] * (R[None, None, :, :] - R[:, None, :, None] * R[:, None, None, :]
                                - R[None, :, None, :] * R[None, :, :, None] + np.einsum("su,tv,st->stuv", R, R, R))
    g = np.zeros((M, M, M))
    for s, u in np.ndindex(M, M):
        g[s, u, u] += 1 / (sig[u] * sig[s])
        g[s, u, s] -= R[s, u] / sig[s] ** 2
    run = RunTables(q, Jq, g, np.einsum("ab,cd->abcd", q, q), X4)
    return LayerNormTables(R, JX, run)


def layernorm_state(state: NTKState, K: np.ndarray, V: np.ndarray, tables: LayerNormTables, L: np.ndarray,
                    constants: tuple, C_W: float, r: float = 1.0) -> NTKState:
    """The NTK statistics after LayerNorm (pooled by the run) and a weighted layer with the linear map
    L of its products. The layer reads X_st = mean_j phi_j(s) phi_j(t) = a_st q_st (a = mean z z, the
    mean over channels mu enters at second order only) and N_st = mean_j (J_s H J_t^T)_jj with
    LayerNorm's Jacobian J_s = P_s / sigma_s, P_s = 1 - 1 1^T / n - phi(s) phi(s)^T / n. To the order
    of A, B and D the projection P drops out (its terms are 1/n in the mean and n^-3/2 in the
    fluctuations), so N = h q with h_st = mean_j H_jj(s, t), and the delta method on (a, h), with
    n Cov(a, a) = K (x) K + K (x) K + r V, n Cov(h, a) = D, n Cov(h, h) = A, gives A' and D'; B' is
    the identity run's with s' -> 1 / sigma. F' keeps the projection: the channel pair (s, u) of F
    reads (1/n) psi(u)^T H(s, t) psi(v) / (sigma_s sigma_t), psi(u) = P_s phi(u) = phi(u) - R_su phi(s),
    whose mean is Theta_st q_st (R_uv - R_su R_sv - R_tv R_tu + R_su R_tv R_st) plus the input's F
    through psi's coefficients (``g``). For one input without positions F's terms cancel up to eps
    (the single-input form's `dz(G)/2`, the projected vector)."""
    return _assemble(state, tables.X, *layernorm_covariances(state, K, V, tables, r), tables.run, L, constants, C_W, r)


def layernorm_covariances(state: NTKState, K: np.ndarray, V: np.ndarray, tables: LayerNormTables, r: float = 1.0
                          ) -> tuple:
    """n Cov(X, X), n Cov(N, X) and n Cov(N, N) of the means a layer after LayerNorm reads
    (:func:`layernorm_state`), flattened pairs."""
    M2 = K.size
    Th = state.Theta.reshape(-1)
    q = tables.run.Ed.reshape(-1)
    Am, Dm = state.A.reshape(M2, M2), state.D.reshape(M2, M2)
    W = _wick(K) + r * V.reshape(M2, M2)
    CPP = tables.JX @ W @ tables.JX.T
    Jq = tables.run.JQ
    CQP = Jq @ W @ tables.JX.T
    CQQ = Jq @ W @ Jq.T
    return (CPP, *_ntk_means_covariances(Th, q, Am, Dm, CQP, CQQ, tables.JX, tables.run.JQ, r))


def _wick(K: np.ndarray) -> np.ndarray:
    """K_su K_tv + K_sv K_tu, flattened pairs: n Cov(mean_i z_is z_it, mean_i z_iu z_iv) of independent
    Gaussian channels with covariance K."""
    M = K.shape[0]
    return (np.einsum("su,tv->stuv", K, K) + np.einsum("sv,tu->stuv", K, K)).reshape(M * M, M * M)


# ------------------------------------------------------------------------------------------------
# Attention


def attention_state(state: NTKState, Es: np.ndarray, CPP: np.ndarray, CNP: np.ndarray, CNN: np.ndarray,
                    run: RunTables, L: np.ndarray, weights: dict, JS: np.ndarray, JU, r: float = 1.0) -> NTKState:
    """The NTK statistics after self-attention with tied query/key weights (``rules/layers/attention.toml``)
    that reads the run's means P (``Es`` = <P>, n Cov(P, P) = ``CPP``; N, its NTK means, with
    ``CNP``, ``CNN``), pooled by L. With the logits' means U = P + eps (pooled; eps the query weights'
    own Wishart fluctuation, n Cov = W = M (x) M + M (x) M, M = L<P>, the same for any number of heads)
    and f(U, S) = A(U) S A(U)^T, the layer is, given U, a weighted layer of the values v = W_V h (no
    bias; C_V, lambda_V), the linear map JS = df/dS of every head's channels y = A v, and a weighted
    layer of the output weights on y (C_O, C_b; lambda_O, lambda_b): its B' and the y-point's share of
    A', D' are those steps' (:func:`weighted_state` on the identity run). The query and key weights'
    own gradients enter the NTK's mean at order 1/n, and leave no term in A, B, D. What U adds: with T the output's NTK and G its covariance, dT/dU = JU(X_T), dG/dU =
    JU(X_G) (JU(X) = df/dU at (U, X), X_T = lambda_O K_v + C_O Theta_v, X_G = C_O K_v, K_v = C_V M, Theta_v
    the values' NTK), and n Cov(U, S) = C_V C_PP, n Cov(U, N_v) = lambda_V C_PP + C_V C_NP^T (S and N_v
    the values' channel means, pooled C's), to order 1/n

        A' += JU_T (C_PP + W) JU_T^T + JU_T C_UT JS^T + JS C_UT^T JU_T^T,
        D' += JU_T (C_PP + W) JU_G^T + C_O C_V JU_T C_PP JS^T + JS C_UT^T JU_G^T,

    C_UT = lambda_O n Cov(U, S) + C_O n Cov(U, N_v): the delta method on G and T as functions of (U, S,
    N_v), the first block being the y-point's. F is not derived (None, and None after it): the
    attention weights, which every channel shares, carry n E[H_ij z_i z_j] (i != j) at leading order
    through the logits' path in the layer's Jacobian, which the two weighted steps do not hold (the
    query weights' own gradients do not enter it: without them, the fit of F to the networks the tests
    write out moves by under one standard error). ``weights`` holds lambda_b, lambda_O, lambda_V, C_O, C_V; ``JU(X)``
    returns df/dU at X, flattened."""
    lb, lO, lV, C_O, C_V = (weights[k] for k in ("lambda_b", "lambda_O", "lambda_V", "C_O", "C_V"))
    M1 = int(round(np.sqrt(L.shape[0])))
    values = _assemble(state, Es, CPP, CNP, CNN, run, L, (0.0, lV, C_V), C_V, r)
    Min = (L @ Es.reshape(-1)).reshape(M1, M1)
    CPPp, CNPp = L @ CPP @ L.T, L @ CNP @ L.T
    My = int(round(np.sqrt(JS.shape[0])))
    Ky = (JS @ (C_V * Min.reshape(-1))).reshape(My, My)
    Vy = JS @ (C_V * C_V * r * CPPp) @ JS.T
    y = values.mapped(JS)
    out = weighted_state(y, Ky, Vy.reshape((My,) * 4), Ky, np.eye(My * My), _wick(Ky) + Vy, identity_tables(Ky),
                         np.eye(My * My), (lb, lO, C_O), C_O, r)
    JT, JG = JU(lO * C_V * Min + C_O * values.Theta), JU(C_O * C_V * Min)
    CU = r * CPPp + _wick(Min)
    CUT = r * (lO * C_V * CPPp + C_O * (lV * CPPp + C_V * CNPp.T))
    A = out.A.reshape(My * My, -1) + JT @ CU @ JT.T + JT @ CUT @ JS.T + JS @ CUT.T @ JT.T
    D = out.D.reshape(My * My, -1) + JT @ CU @ JG.T + r * C_O * C_V * JT @ CPPp @ JS.T + JS @ CUT.T @ JG.T
    return NTKState(out.Theta, A.reshape((My,) * 4), out.B, D.reshape((My,) * 4), None)


# ------------------------------------------------------------------------------------------------
# A residual block


@dataclass
class BranchJacobians:
    """What a residual branch's output carries of the skip z it reads (flattened pairs of sites):
    ``kk`` dK_b/dK, ``tk`` dTheta_b/dK, ``tt`` dTheta_b/dTheta of its infinite-width maps (K-derivatives
    each ordered pair half of a symmetric change, Theta-derivatives entry by entry), and ``R12``,
    ``R22`` the one-sided derivatives of :func:`residual_state`: with z~ a copy of z that only the
    second argument of K_b(v, s) reads, R12 = dK_b(v, s)/dK(z, z~)_ax and R22 = dK_b(v, s)/dK(z~, z~)_ax
    (entry by entry; the block K_b(z~, z~) follows kk). After LayerNorm the same chain holds with
    <s s> -> X, <s's'> -> q (:class:`LayerNormTables`)."""

    kk: np.ndarray
    tk: np.ndarray
    tt: np.ndarray
    R12: np.ndarray
    R22: np.ndarray

    @classmethod
    def start(cls, M: int) -> BranchJacobians:
        eye, zero = np.eye(M * M), np.zeros((M * M, M * M))
        return cls(eye, zero, eye.copy(), eye.copy(), zero.copy())

    def mapped(self, L: np.ndarray) -> BranchJacobians:
        """After the linear map L of a pooling of the point."""
        return BranchJacobians(*(L @ X for X in (self.kk, self.tk, self.tt, self.R12, self.R22)))

    def weighted(self, Theta: np.ndarray, JP: np.ndarray, run: RunTables, L: np.ndarray, constants: tuple,
                 C_W: float) -> BranchJacobians:
        """After a weighted layer K' = c0 + C_W L<ss>, Theta' = t0 + t1 L<ss> + t2 L(Theta . <s's'>) that
        reads the run s at a point with NTK ``Theta`` (``JP`` = d<ss>/dK). On the copy z~, the pair
        (z(c), z~(d)) has <s s>' = <s's'> dK(z, z~)_cd + w_cd dK(z~, z~)_dd with w_cd = d<s_c s_d>/dK_dd
        (c != d) and <s s''>/2 = (d<s^2>/dK - <s'^2>)/2 (c = d; also where c and d are identical sites,
        :class:`Sites`)."""
        _, t1, t2 = constants
        return self._through(Theta, JP, run, C_W * L, t1 * L, t2 * L, C_W * L)

    def attention(self, Theta: np.ndarray, JP: np.ndarray, run: RunTables, L: np.ndarray, weights: dict,
                  JS: np.ndarray, JG: np.ndarray, JT: np.ndarray) -> BranchJacobians:
        """After tied attention (:func:`attention_state`) that reads the run s pooled by L: its kernel
        C_b + C_O f(P, C_V P) and NTK lambda_b + lambda_O f(P, C_V P) + C_O f(P, lambda_V P + C_V N) (P, N
        pooled), so dK = (JG + C_O C_V JS) dP and dTheta = (JT + t1 JS) dP + C_O C_V JS dN with JG = JU(C_O
        C_V M), JT = JU(X_T), t1 = lambda_O C_V + C_O lambda_V. R12 and R22 keep the cross products'
        share only: they serve F, which is not derived after attention (:func:`attention_state`)."""
        lO, lV, C_O, C_V = (weights[k] for k in ("lambda_O", "lambda_V", "C_O", "C_V"))
        t2 = C_O * C_V
        return self._through(Theta, JP, run, (JG + t2 * JS) @ L, (JT + (lO * C_V + C_O * lV) * JS) @ L,
                             t2 * JS @ L, t2 * JS @ L)

    def _through(self, Theta, JP, run: RunTables, LK, LTP, LTN, LC) -> BranchJacobians:
        """The chain through a layer whose kernel moves by LK dP and NTK by LTP dP + LTN dN in the run's
        means P and N, and whose one-sided kernel K_b(v, s) moves by LC through the cross products."""
        M = Theta.shape[0]
        Ed = run.Ed.reshape(-1)
        rep = np.arange(M) if run.sites is None else run.sites.rep
        w = np.zeros((M * M, M * M))
        for c, d in np.ndindex(M, M):
            # d's class block: its pairs together are d<.>/dK_dd over the distinct sites (Sites)
            block = [a * M + b for a, b in np.ndindex(M, M) if rep[a] == rep[d] == rep[b]]
            total = JP[c * M + d, block].sum()
            w[c * M + d, d * M + d] = total if rep[c] != rep[d] else (total - Ed[c * M + d]) / 2
        LE = LTN * Ed[None, :]
        kk = LK @ JP @ self.kk
        tk = (LTP @ JP + (LTN * Theta.reshape(-1)[None, :]) @ run.JQ) @ self.kk + LE @ self.tk
        R12 = LC @ (Ed[:, None] * self.R12)
        R22 = LC @ (Ed[:, None] * self.R22 + w @ self.kk)
        return BranchJacobians(kk, tk, LE @ self.tt, R12, R22)


def residual_state(a2: float, c2: float, skip: NTKState, K: np.ndarray, V: np.ndarray, branch: NTKState,
                   jac: BranchJacobians) -> NTKState:
    """The NTK statistics of z' = a z + c b (a2 = a^2, c2 = c^2) from the skip z's (``skip``, its K and
    V), the branch output's (``branch``: every parameter, the skip's through the branch's Jacobian) and
    ``jac``. With H' = a^2 H + c^2 H_b + a c (J H + H J^T), J_ik(s, x) = d b_i(s)/d z_k(x), the terms odd
    in the branch's last (fresh, zero-mean) weights drop out of every second moment, and to order 1/n
    (flattened pairs; m = a^2 c^2; the tensor form of :func:`derive.finite.arch._combine_ntk`)

        A' = a^4 A + c^4 A_b + m (D tk^T + A tt^T + tk D^T + tt A^T)
        D' = a^4 D + c^4 D_b + m (D kk^T + tk W + tt D),   W = n Cov(z z, z z) = V + K (x) K + K (x) K
        B'_(su)(tv) = a^4 B + c^4 B_b + m sum_xy [tt_(su)(xy) Y_(xy)(tv) + tt_(tv)(xy) Y_(su)(xy)]
        F'_(su)(tv) = a^4 F + c^4 F_b + m sum_xa [rho_(us)(ax) Z_(xa)(tv) + rho_(vt)(ax) Z'_(su)(xa)]
        Theta' = a^2 Theta + c^2 Theta_b

    with Y_(xy)(tv) = Theta_xt Theta_yv + B_(xy)(tv), Z_(xa)(tv) = Theta_xt K_av + F_(xa)(tv),
    Z'_(su)(xa) = Theta_sx K_au + F_(su)(xa). Why: the branch reads the skip through the channel means
    mean_k z_k z_k and mean_k H_kk, whose n-covariances with H_ii(s, t) are D and A and with z_i z_i are
    W and D; n E[J_ik(s, x) J_jl(u, y)] = delta_ij delta_kl tt_(su)(xy); and Stein's lemma on the last
    weights gives n E[b_j(v) J_ik(s, x)] = delta_ij sum_a rho_(vs)(ax) z_k(a), the derivative of
    E[b_j(v) b_i(s)] in the second argument's z only: rho_(vs)(ax) = R12 + R22_(vs)(ax) + R22_(vs)(xa)."""
    M = K.shape[0]
    M2 = M * M
    m = a2 * c2
    A, D = skip.A.reshape(M2, M2), skip.D.reshape(M2, M2)
    W = V.reshape(M2, M2) + (np.einsum("au,bv->abuv", K, K) + np.einsum("av,bu->abuv", K, K)).reshape(M2, M2)
    cross_A = D @ jac.tk.T + A @ jac.tt.T
    A1 = a2 * a2 * A + c2 * c2 * branch.A.reshape(M2, M2) + m * (cross_A + cross_A.T)
    D1 = a2 * a2 * D + c2 * c2 * branch.D.reshape(M2, M2) + m * (D @ jac.kk.T + jac.tk @ W + jac.tt @ D)
    Y = (np.einsum("xt,yv->xytv", skip.Theta, skip.Theta) + skip.B).reshape(M2, M2)
    B1 = a2 * a2 * skip.B + c2 * c2 * branch.B + m * (jac.tt @ Y + Y @ jac.tt.T).reshape((M,) * 4)
    rho = (jac.R12 + jac.R22 + jac.R22.reshape(M2, M, M).transpose(0, 2, 1).reshape(M2, M2)).reshape((M,) * 4)
    F1 = None
    if skip.F is not None and branch.F is not None:  # F is not derived after attention (attention_state)
        Z = np.einsum("xt,av->xatv", skip.Theta, K) + skip.F
        Z2 = np.einsum("sx,au->suxa", skip.Theta, K) + skip.F
        F1 = (a2 * a2 * skip.F + c2 * c2 * branch.F
              + m * (np.einsum("usax,xatv->sutv", rho, Z) + np.einsum("vtax,suxa->sutv", rho, Z2)))
    return NTKState(a2 * skip.Theta + c2 * branch.Theta, A1.reshape((M,) * 4), B1, D1.reshape((M,) * 4), F1)


__all__ = ["BranchJacobians", "LayerNormTables", "NTKState", "RunTables", "Sites", "activation_tables",
           "attention_state", "first_state", "identity_tables", "layernorm_covariances", "layernorm_state",
           "layernorm_tables", "ntk_constants", "ntk_variance", "residual_state", "run_covariances", "weighted_state"]
