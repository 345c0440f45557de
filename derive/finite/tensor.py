"""Finite-width corrections with positions and batches: the tensor form of V and G1, from the rules.

The sites s = (input a, position p) of every channel, flattened (M = N P of them), carry at a
Gaussian point (the output of a dense or conv layer, width n) the kernel K_st, the NLO kernel G1_st
(E[z_is z_it] = K_st + G1_st / n) and the four-point vertex V_(st)(uv) = n Cov(z_is z_it, z_ju z_jv)
(i != j; PDLT ch. 4 with inputs and positions alike). A weighted layer's rule states its output's
conditional covariance as an operator O on the channel means of its input, ``variance =
"C_b + C_W*patch(mean(h1*h2))"`` for conv (O the identity for dense), and pooling and flattening
state how they map those means, ``means = "pool(mean(h1*h2))"``. With h = L(sigma(z)) (sigma the
activation, the identity without one; L the ``means`` operators after it) and M_st = mean_i h_is h_it:

    n Cov(M_st, M_uv)      = <s_s s_t s_u s_v> - <s_s s_t><s_u s_v>
                             + (r/4) sum V_(c1c2)(c3c4) <d_c1 d_c2 (s_s s_t)> <d_c3 d_c4 (s_u s_v)>
    n (E M_st - <s_s s_t>) = r [1/2 sum G1_cd <d_c d_d (s_s s_t)> + 1/8 sum V_(c1c2)(c3c4) <d^4 (s_s s_t)>]

(the multi-input form of PDLT eqs. 4.90 and 4.115, the K^-1-raised indices contracted by Gaussian
integration by parts as in :func:`derive.finite.batch.iterate_batch`, whose four-point functions
and derivative tables this module uses), before L; then

    K' = C_b + C_W O(L <s s>),   V' = C_W^2 (O L x O L) n Cov(M, M),   G1' = C_W O(L n (E M - <s s>)).

A pooling layer on a Gaussian point (before an activation) is a linear map of each channel, so the
point stays one: K' = L K, V' = (L x L) V, G1' = L G1. All widths are one n (the sampler's), so
r = 1. One input without positions is the single-input form (:mod:`derive.finite.arch`), which
the tests check, as they check a batch of inputs through a dense network against ``iterate_batch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from derive.arch.description import Layer, Repeat, Serial, check_derivable
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.core.inputs import check_arch_inputs
from derive.finite.batch import _derivative_table, _four_point, _lookup, _pair_values, batch_terms
from derive.finite.moments import NumpyMoments, moment_rule
from derive.kernels.arch import _patch, _pool, _spatial_mean, arch_kernels
from derive.rules.layers import FW_INPUT, StructuralOperator, act, mean
from derive.symbolic.numeric import evaluate

H1, H2 = sp.Symbol("h1", real=True), sp.Symbol("h2", real=True)


def _statement(layer: Layer) -> tuple[str, str, sp.Expr]:
    """(kind, operator name or '', the statement) of the layer's [finite_width] table, for sites."""
    fw = layer.rule.finite_width
    if not fw:
        raise DeriveError(f"layer '{layer.type}': the layer rule has no [finite_width] table (its 1/n maps "
                          "are not derived yet)")
    kind, expr = next(iter(fw.items()))
    if kind not in ("variance", "means", "elementwise"):
        raise DeriveError(f"layer '{layer.type}': its finite-width maps are derived for one input without "
                          "positions only (the tensor form covers dense, conv, activation, pooling and flatten)")
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
# Structural operators on the site matrices (and on V, pair by pair)


def _apply(name: str, layer: Layer, X: np.ndarray, N: int, spatial: tuple) -> tuple[np.ndarray, tuple]:
    """The operator on X of shape (N, *spatial, N, *spatial, *rest) (``rest`` carried along)."""
    if name == "":
        return X, spatial
    if name == "patch":
        out, sp_ = _patch(X, N, spatial, layer)
    elif name == "pool":
        out, sp_ = _pool(X, N, spatial, layer)
    elif name == "spatial_mean":
        out, sp_ = _spatial_mean(X, N, spatial, layer)
    elif name == "diagonal_mean":
        P = math.prod(spatial)
        Y = np.asarray(X).reshape(N, P, N, P, -1)
        return np.einsum("apbpr->abr", Y).reshape((N, N) + X.shape[2 + 2 * len(spatial):]) / P, ()
    else:
        raise DeriveError(f"layer '{layer.type}': no tensor finite-width rule for the operator {name}")
    return np.asarray(out), tuple(sp_)


def _on_matrix(name, layer, A, N, spatial):
    M = A.shape[0]
    out, sp2 = _apply(name, layer, A.reshape((N, *spatial, N, *spatial)), N, spatial)
    M2 = N * math.prod(sp2)
    return out.reshape(M2, M2), sp2


def _on_vertex(name, layer, V, N, spatial):
    M = V.shape[0]
    first, sp2 = _apply(name, layer, V.reshape((N, *spatial, N, *spatial, M, M)), N, spatial)
    M2 = N * math.prod(sp2)
    first = np.moveaxis(first.reshape(M2, M2, M, M), (2, 3), (0, 1))  # (M, M, M2, M2)
    second, _ = _apply(name, layer, first.reshape((N, *spatial, N, *spatial, M2, M2)), N, spatial)
    return np.moveaxis(second.reshape(M2, M2, M2, M2), (2, 3), (0, 1)), sp2


# ------------------------------------------------------------------------------------------------
# Channel-mean statistics of sigma at a Gaussian point


def _mean_statistics(activation, K: np.ndarray, V: np.ndarray, G: np.ndarray, r: float, tol: float):
    """(<s_s s_t>, n Cov(M, M), n (E M - <s s>)) for M_st = mean_i sigma(z_is) sigma(z_it)."""
    terms = batch_terms(activation, tol)
    bx, E2, s2, s4 = terms.pairs, terms.E2, terms.s2, terms.s4
    single = {"g1": terms.g1, "g2": terms.g2}
    rule = moment_rule(activation, "auto", float(np.max(np.diag(K))), tol)
    numeric = NumpyMoments(activation.sigma_numeric, rule.smoothed)
    M = K.shape[0]
    pairs = [(a, b) for a in range(M) for b in range(M)]
    deriv = {(a, b): _derivative_table(bx, single, K, a, b) for a, b in pairs}
    two = np.empty((M, M))
    for a, b in pairs:
        two[a, b] = (float(evaluate(s2, {S.K: K[a, a]})) if a == b else _pair_values(E2, K[a, a], K[a, b], K[b, b]))
    cov = np.empty((M,) * 4)
    quartic: dict = {}
    for a1, a2, a3, a4 in np.ndindex(*cov.shape):
        key = tuple(sorted((a1, a2, a3, a4)))
        if key not in quartic:
            quartic[key] = _four_point(bx, s4, K, (a1, a2, a3, a4), rule, numeric)
        m12, m34 = deriv[(a1, a2)][2], deriv[(a3, a4)][2]
        acc = 0.0
        for c1 in {a1, a2}:
            for c2 in {a1, a2}:
                for c3 in {a3, a4}:
                    for c4 in {a3, a4}:
                        acc += V[c1, c2, c3, c4] * _lookup(m12, (c1, c2)) * _lookup(m34, (c3, c4))
        cov[a1, a2, a3, a4] = quartic[key] - two[a1, a2] * two[a3, a4] + r / 4 * acc
    bias = np.empty((M, M))
    for a, b in pairs:
        m2, m4 = deriv[(a, b)][2], deriv[(a, b)][4]
        ids = {a, b}
        acc2 = sum(G[c, d] * _lookup(m2, (c, d)) for c in ids for d in ids)
        acc4 = sum(V[c1, c2, c3, c4] * _lookup(m4, (c1, c2, c3, c4))
                   for c1 in ids for c2 in ids for c3 in ids for c4 in ids)
        bias[a, b] = r * (acc2 / 2 + acc4 / 8)
    return two, cov, bias


# ------------------------------------------------------------------------------------------------
# Walking an architecture


@dataclass
class TensorFiniteWidth:
    """Per recorded output (as :func:`derive.kernels.arch.arch_kernels`): K and G1 of shape (M, M) and
    V of shape (M, M, M, M) over the M sites (input, position) flattened, at Gaussian points (None
    elsewhere); ``spatial`` the positions of each output; Theta the infinite-width NTK (M, M)."""

    name: str
    labels: list[str]
    N: int
    spatial: list[tuple]
    values: dict

    def as_dict(self) -> dict:
        def listed(x):
            return None if x is None else np.asarray(x).tolist()

        return {"architecture": self.name, "labels": self.labels, "inputs": self.N,
                "spatial": [list(s) for s in self.spatial],
                **{q: [listed(x) for x in v] for q, v in self.values.items()}}


def _flat(net: Serial):
    for item in net.items:
        if isinstance(item, Repeat):
            for _ in range(item.times):
                yield from _flat(item.body)
        else:
            yield item


def arch_finite_width_tensor(net: Serial, inputs, *, tol: float = 1e-11) -> TensorFiniteWidth:
    """K, V and G1 over every site of ``inputs`` (N, *positions, d) through ``net`` (module docstring)."""
    from derive.rules.activations import resolve

    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    check_derivable(net)
    x = check_arch_inputs(inputs)
    theory = arch_kernels(net, x)  # infinite-width K and Theta of every output
    N = x.shape[0]
    top = []
    for i, item in enumerate(net.items, 1):
        if isinstance(item, Repeat):
            top.extend((f"layer {i}[{k + 1}]", item.body) for k in range(item.times))
        else:
            top.append((f"layer {i}", item))
    values = {"K": [], "V": [], "G1": []}
    spatial = tuple(x.shape[1:-1])  # positions of the current Gaussian point
    K = V = G = None
    activation = None
    after: list[tuple[str, Layer]] = []  # means operators applied after the activation, in order
    for where, item in top:
        for layer in (list(_flat(item)) if isinstance(item, Serial) else [item]):
            here = f"{where} ({layer.type})"
            if layer.rule.combinator or layer.branch is not None:
                raise DeriveError(f"{here}: residual blocks with positions or several inputs have no "
                                  "finite-width maps yet (one input without positions is derived)")
            if layer.width is not None:
                raise DeriveError(f"{here}: the tensor form takes one width for every layer")
            kind, op, expr = _statement(layer)
            if K is None and kind != "variance":
                raise DeriveError(f"{here}: finite-width maps start from a weighted layer on the inputs")
            if kind == "elementwise":
                if expr != act(0, 0, FW_INPUT):
                    raise DeriveError(f"{here}: LayerNorm with positions or several inputs has no finite-width "
                                      "maps yet (one input without positions is derived)")
                activation = layer.resolved_activation()
                continue
            if kind == "means":
                if activation is None and not after:
                    if op == "diagonal_mean":
                        after.append((op, layer))  # flatten relabels channels: it acts at the next layer
                        continue
                    # pooling a Gaussian point: a linear map of each channel
                    K, _ = _on_matrix(op, layer, K, N, spatial)
                    G, _ = _on_matrix(op, layer, G, N, spatial)
                    V, spatial = _on_vertex(op, layer, V, N, spatial)
                else:
                    after.append((op, layer))
                continue
            c0, c1 = _constants(expr)
            if K is None:  # the first weighted layer, on the raw inputs: exactly Gaussian
                flat = x.reshape(N * math.prod(spatial), -1)
                two, spatial = _on_matrix(op, layer, flat @ flat.T / x.shape[-1], N, spatial)
                K, V, G = c0 + c1 * two, np.zeros(two.shape * 2), np.zeros_like(two)
                continue
            two, cov, bias = _mean_statistics(activation or resolve("linear"), K, V, G, 1.0, tol)
            for name, lay in [*after, (op, layer)]:
                two, s_next = _on_matrix(name, lay, two, N, spatial)
                bias, _ = _on_matrix(name, lay, bias, N, spatial)
                cov, _ = _on_vertex(name, lay, cov, N, spatial)
                spatial = s_next
            K, V, G = c0 + c1 * two, c1**2 * cov, c1 * bias
            activation, after = None, []
        gaussian = activation is None and not after
        for q, v in (("K", K), ("V", V), ("G1", G)):
            values[q].append(v if gaussian else None)
    values["Theta"] = [np.asarray(t).reshape(int(np.sqrt(np.size(t))), -1) for t in theory.ntk]
    return TensorFiniteWidth(net.name, [label for label, _ in net.top_level()], N, list(theory.spatial), values)


__all__ = ["TensorFiniteWidth", "arch_finite_width_tensor"]
