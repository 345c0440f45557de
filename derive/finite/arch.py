"""Finite-width corrections at order 1/n of an architecture, single input, from its layer rules.

Each layer rule (``rules/layers/*.toml``) states in a ``[finite_width]`` table how its output is
built from its input ``h`` (one channel) and from means over the channels, ``mean(...)``:

    variance = "C_b + C_W*mean(h^2)"      dense: given its input, each output channel is an
                                          independent zero-mean Gaussian with this variance
    elementwise = "sigma(h)"              activation; layernorm:
                                          "(h - mean(h))/sqrt(mean(h^2) - mean(h)^2 + eps)"
    combine = "xi*h + gamma*b"            residual: the skip h and the branch output b

The engine derives the maps from these statements alone. A *Gaussian point* is the output z of a
dense layer (or of a residual block, see below) of width n, with E[z_i z_j] = delta_ij (K + G1/n)
and Cov(z_i^2, z_j^2) = V/n for i != j (PDLT ch. 4). The layers after it up to the next dense make
the next dense's conditional variance a function of channel means of functions of z (nested for
LayerNorm's statistics), and :mod:`derive.finite.collective` (the delta method on the channel means)
gives the next Gaussian point's K, V and G1 from it; for a dense layer after sigma these are PDLT's
eqs. (4.90) and (4.115).

A residual block z' = a z + c b (``combine``) whose branch ends in a dense layer: given z, b_i are
independent Gaussians of variance G_b, so with X = n Cov(z_i^2, G_b)

    K' = a^2 K + c^2 K_b,  V' = a^4 V + 2 a^2 c^2 X + c^4 V_b,  G1' = a^2 G1 + c^2 G1_b,

where (K_b, V_b, G1_b) is the branch output iterated from z, X = Cov_K(z^2, iota_1) + r V
d<iota_1>/dK at the branch's first dense (iota_1 its influence function over z) and X' = X dK'/dK
at each later one (the branch reads z only through its first layer). This closes in (K, V, G1) when
the branch reads the skip through a quadratic statistic: iota_1 in span{1, z^2}, as for a branch
that starts with a dense layer or LayerNorm. A branch that starts with an activation of the skip
(z + W sigma(z)) makes each channel's own increment variance depend on that channel through
sigma(z_i)^2 / n, an O(1/n) self-interaction (the stream becomes skewed: E z^3 = O(1/n)) that K, V,
G1 do not carry; it is refused with that reason.

Also carried: the NTK mean Theta at infinite width, from the rules' ``[maps]``; and, through a dense
layer whose input is a Gaussian point followed by activations only, the NTK fluctuations and the
dNTK (A, B, D, F, P, Q) from the dense rule's ``[finite_width.ntk]`` maps (PDLT ch. 8 and 11, with s
the run of activations). Through a residual block the NTK fluctuations A, B, D, F are combined from
the skip's, the branch output's and cross terms through the branch's Jacobian (:func:`_combine_ntk`;
the derivatives of the branch's infinite-width maps come from the dense rule's
``[finite_width.jacobian]``). After LayerNorm the same maps give A, B, D, F: the rule writes them
with channel statistics (``ncov``, ``dK``, ``dz`` of the next layer's conditional variance and NTK
diagonal), which carry LayerNorm's fluctuating mean and variance and its Jacobian's projection.
The dNTK (P, Q) is not carried after LayerNorm or through residual blocks (None from there on).
Layers without a ``[finite_width]`` table are refused with the reason; conv, pooling and flatten have the tensor form
(:mod:`derive.finite.tensor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

from derive.arch.description import Layer, Repeat, Serial, check_derivable
from derive.core import budget
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.finite.collective import G1, K, V, activation_table, ntk_maps, quadratic, r, segment_maps, z
from derive.rules.layers import (
    FW_INPUT,
    FW_JACOBIAN,
    FW_NTK_QUANTITIES,
    FW_SITES,
    StructuralOperator,
    act,
    combine_weights,
    mean,
)
from derive.symbolic.maps import BK, BTheta, layer_maps
from derive.symbolic.numeric import evaluate
from derive.symbolic.quadrature import DEFAULT_TOL

#: The per-layer quantities reported (JSON keys): the kernel, its 1/n corrections, the NTK mean and
#: (dense layers after activations) the NTK fluctuations and the dNTK.
QUANTITIES = ("K", "V", "G1", "Theta", *FW_NTK_QUANTITIES)


# ------------------------------------------------------------------------------------------------
# Walking an architecture


@dataclass(frozen=True)
class _Point:
    """A Gaussian point (numbers) and the elementwise run applied to it since."""

    K: float
    V: float
    G1: float
    Theta: float
    width: int
    norm: int  # the width V and G1 are normalised by
    run: sp.Expr = z  # one channel after the run, in z (mean(...) and act(...) nodes)
    activations: tuple = ()
    run_K: float | None = None  # infinite-width kernel and NTK after the run (for reports)
    run_Theta: float | None = None
    fluctuations: tuple | None = None  # (A, B, D, F, P, Q) at the point; None where not derived


@dataclass
class ArchFiniteWidth:
    """Per recorded output (top-level layers and repetitions, as :func:`derive.kernels.arch`):
    K, V, G1 at Gaussian points (None after an activation or LayerNorm, whose output is not one) and
    the infinite-width Theta. ``width`` is the uniform width used for the normalised columns."""

    name: str
    labels: list[str]
    values: dict
    width: int | None

    def normalised(self) -> dict:
        """V/(n K^2), G1/(n K) and, where A and B are derived, Var(H)/Theta^2 = (A + 2B)/(n Theta^2)."""
        K, V, G1, Th, A, B = (np.array([np.nan if v is None else v for v in self.values[q]], dtype=float)
                              for q in ("K", "V", "G1", "Theta", "A", "B"))
        n = np.inf if self.width is None else float(self.width)
        with np.errstate(all="ignore"):
            return {"V_over_nK2": V / (n * K**2), "G1_over_nK": G1 / (n * K),
                    "varH_over_Theta2": (A + 2 * B) / (n * Th**2)}

    def as_dict(self) -> dict:
        out = {"architecture": self.name, "labels": self.labels, **self.values, "width": self.width}
        if self.width is not None:
            out.update({k: [None if not np.isfinite(x) else float(x) for x in v]
                        for k, v in self.normalised().items()})
        return out

    def __repr__(self) -> str:
        name = f"{self.name}: " if self.name else ""
        width = f"width {self.width}" if self.width is not None else "V and G1 per 1/n"
        out = "" if not self.labels or self.values["K"][-1] is None else (
            f"; output K = {self.values['K'][-1]:.10g}, V = {self.values['V'][-1]:.10g}")
        return f"ArchFiniteWidth({name}{len(self.labels)} outputs, {width}{out})"

    def _repr_markdown_(self) -> str:
        from derive.core.display import MISSING, QUANTITY_LATEX, markdown_table, markdown_text

        quantities = [q for q in QUANTITIES if q in self.values]
        norm = {} if self.width is None else self.normalised()
        extra = [] if self.width is None else [
            ("$V/(nK^2)$", "V_over_nK2"), ("$G^{\\{1\\}}/(nK)$", "G1_over_nK"),
            ("$\\mathrm{Var}\\,\\hat\\Theta/\\Theta^2$", "varH_over_Theta2")]
        rows = [[markdown_text(label), *(self.values[q][i] for q in quantities),
                 *(norm[k][i] if np.isfinite(norm[k][i]) else MISSING for _, k in extra)]
                for i, label in enumerate(self.labels)]
        head = (f"**Finite-width corrections** of {markdown_text(self.name) or 'an architecture'}: one input, "
                + (f"width {self.width}" if self.width is not None else "$V$, $G^{\\{1\\}}$ and the NTK's "
                   "fluctuations as coefficients of 1/n") + "; $K$, $V$, $G^{\\{1\\}}$ at Gaussian points, "
                "$\\Theta$ at infinite width, $\\mathrm{Var}\\,\\hat\\Theta = (A + 2B)/n$, $P, Q$ the dNTK's")
        return "\n".join([head, "", markdown_table(
            ["output", *(f"${QUANTITY_LATEX.get(q, q)}$" for q in quantities), *(label for label, _ in extra)], rows),
            "", f"{MISSING}: the output of an activation or LayerNorm is not a Gaussian point (its statistics "
            "enter the next dense layer), or the quantity is not carried there."])


_NTK_SYMBOLS = tuple(S.BY_NAME[q] for q in FW_NTK_QUANTITIES)


@lru_cache(maxsize=None)
def _parameters(layer: Layer) -> tuple:
    """(symbol, float value) of every parameter of the layer."""
    return tuple((symbol, float(value)) for symbol, value in layer.values().items())


@lru_cache(maxsize=None)
def _variance(layer: Layer) -> sp.Expr | None:
    """The layer's conditional variance statement in one channel h, its parameters as symbols (None for
    a statement over positions). The maps derived from it stay symbolic in the parameters, which are
    given their values when evaluated: one derivation serves every layer of the type, and the
    expressions (hence the rounding) do not depend on the parameters' values."""
    F = layer.rule.finite_width["variance"]
    if F.atoms(StructuralOperator):
        return None
    return F.xreplace({s: FW_INPUT for s in FW_SITES})


@lru_cache(maxsize=None)
def _activation_table(layer: Layer) -> tuple:
    return activation_table(layer.resolved_activation())


class _Walker:
    """Carries a Gaussian point through layers, each by its rule's [finite_width] statement."""

    def __init__(self, tol: float):
        self.tol = tol

    def layer_width(self, layer: Layer, default: int) -> int:
        return int(layer.width) if layer.width is not None else default

    # --- infinite-width single-input maps (kernel and NTK), from the rules' [maps]
    def infinite(self, layer: Layer, Kin, Thin, branch=None):
        maps = layer_maps(layer, self.tol)
        values = {S.K: Kin, S.Theta: Thin}
        if branch is not None:
            values.update({BK: branch[0], BTheta: branch[1]})
        return float(evaluate(maps.single_kernel, values)), float(evaluate(maps.single_ntk, values))

    def dense(self, p: _Point, layer: Layer, where: str, cross=None) -> tuple[_Point, object]:
        F = _variance(layer)
        if F is None:
            raise DeriveError(f"{where} ({layer.type}): a layer over positions; its finite-width maps are the "
                              "tensor form (derive.finite.tensor, or --inputs with positions)")
        maps = segment_maps(F.xreplace({FW_INPUT: p.run}), p.activations, self.tol, cross is not None)
        values = {K: p.K, V: p.V, G1: p.G1, r: p.width / p.norm, **dict(_parameters(layer))}
        Kn = float(evaluate(maps["K"], values))
        Vn = float(evaluate(maps["V"], values))
        G1n = float(evaluate(maps["G1"], values))
        base_K = p.K if p.run_K is None else p.run_K
        base_Th = p.Theta if p.run_Theta is None else p.run_Theta
        _, Th = self.infinite(layer, base_K, base_Th)
        out = _Point(Kn, Vn, G1n, Th, self.layer_width(layer, p.width), p.width,
                     fluctuations=self.fluctuations(p, layer, values))
        if cross is None:
            return out, None
        local = self.jacobian(p, layer, values)
        if cross == "start":  # first dense of a residual branch: X from the skip
            if not quadratic(maps["iota"]):
                raise DeriveError(
                    f"{where}: the residual branch reads its input z through {sp.sstr(maps['iota'])} per "
                    "channel, which is not quadratic in z: each channel's own increment then depends on that "
                    "channel at O(1/n) (a self-interaction that skews the stream), which K, V, G1 do not carry; "
                    "finite-width maps are derived for branches that start with a dense layer or layernorm")
            return out, _Cross(float(evaluate(maps["X"], values)), local)
        return out, _Cross(cross.X * float(evaluate(maps["J"], values)), _chain(local, cross.jacobian))

    def fluctuations(self, p: _Point, layer: Layer, values: dict) -> tuple | None:
        """(A, B, D, F, P, Q) after a dense layer, from its rule's [finite_width.ntk] maps; None when the
        input point has none. After a run with channel means (LayerNorm) only the maps the rule states
        hold there (``ntk_after_means``: A, B, D, F for dense); a quantity not derived, or whose map
        needs one that is not (P and Q after a residual block or LayerNorm), is None."""
        maps = layer.rule.finite_width_ntk
        if not maps or p.fluctuations is None:
            return None
        if p.run.has(mean):
            maps = tuple((q, e) for q, e in maps if q in layer.rule.finite_width_ntk_after_means)
        exprs = ntk_maps(maps, (), p.run, p.activations, self.tol)
        known = {s: v for s, v in zip(_NTK_SYMBOLS, p.fluctuations) if v is not None}
        state = {**values, S.Theta: p.Theta, **known}
        missing = set(_NTK_SYMBOLS) - set(known)
        return tuple(None if q not in exprs or exprs[q].free_symbols & missing else float(evaluate(exprs[q], state))
                     for q in FW_NTK_QUANTITIES)

    def jacobian(self, p: _Point, layer: Layer, values: dict) -> tuple | None:
        """(dK'/dK, dTheta'/dK, dTheta'/dTheta) of a dense layer's infinite-width maps at the point p,
        from its rule's [finite_width.jacobian] (through channel means too: the derivatives of the
        statistics' infinite-width values)."""
        maps = layer.rule.finite_width_jacobian
        if not maps:
            return None
        exprs = ntk_maps(maps, (), p.run, p.activations, self.tol)
        state = {**values, S.Theta: p.Theta}
        return tuple(float(evaluate(exprs[q], state)) for q in FW_JACOBIAN)

    def elementwise(self, p: _Point, layer: Layer) -> _Point:
        fw = layer.rule.finite_width["elementwise"].xreplace(layer.values())
        activations = p.activations
        if fw.has(act):
            activations = activations + (_activation_table(layer),)
            k = len(activations) - 1
            fw = fw.replace(lambda e: isinstance(e, act), lambda e: act(k, e.args[1], e.args[2]))
        base_K = p.K if p.run_K is None else p.run_K
        base_Th = p.Theta if p.run_Theta is None else p.run_Theta
        Kr, Thr = self.infinite(layer, base_K, base_Th)
        return _Point(p.K, p.V, p.G1, p.Theta, p.width, p.norm, _substitute_input(fw, p.run), activations,
                      Kr, Thr, p.fluctuations)

    def residual(self, p: _Point, layer: Layer, where: str) -> _Point:
        if p.run != z:
            raise DeriveError(f"{where}: the skip carries the output of an activation or layernorm; finite-width "
                              "maps are derived for a residual block whose input is a dense or residual output")
        if p.width != p.norm:
            raise DeriveError(f"{where}: finite-width maps of a residual block need one width throughout")
        b, cross = p, "start"
        for i, item in enumerate(_expand(layer.branch), 1):
            here = f"{where}, branch layer {i}"
            if item.rule.combinator:
                raise DeriveError(f"{here}: a residual block inside a residual branch has no finite-width maps yet")
            b, cross = self.step(b, item, here, cross)
        if b.run != z or cross in (None, "start"):
            raise DeriveError(f"{where}: the branch must end in a dense layer")
        if b.width != p.width:
            raise DeriveError(f"{where}: the branch output has width {b.width}, the skip {p.width}")
        a2, c2 = combine_weights(layer.rule.finite_width["combine"].xreplace(layer.values()))
        _, Th = self.infinite(layer, p.K, p.Theta, branch=(b.K, b.Theta))
        scale = p.width / b.norm  # the branch's V, G1, A.. are normalised by its last fan-in
        K1, V1, G11 = _combine(a2, c2, (p.K, p.V, p.G1), (b.K, scale * b.V, scale * b.G1), cross.X)
        fluctuations = None
        if p.fluctuations is not None and b.fluctuations is not None and cross.jacobian is not None:
            branch = tuple(None if v is None else scale * v for v in b.fluctuations)
            fluctuations = _combine_ntk(a2, c2, p, branch, cross.jacobian)
        return _Point(K1, V1, G11, Th, p.width, p.width, fluctuations=fluctuations)

    def step(self, p: _Point, layer: Layer, where: str, cross=None):
        fw = layer.rule.finite_width
        if not fw:
            raise DeriveError(f"{where} ({layer.type}): {layer.rule.no_finite_width()}")
        if "variance" in fw:
            return self.dense(p, layer, where, cross)
        if "means" in fw:
            raise DeriveError(f"{where} ({layer.type}): a layer over positions; its finite-width maps are the "
                              "tensor form (derive.finite.tensor, or --inputs with positions)")
        if "elementwise" in fw:
            return self.elementwise(p, layer), cross
        return self.residual(p, layer, where), cross


def _combine(a2: float, c2: float, skip: tuple, branch: tuple, cross: float) -> tuple:
    """(K, V, G1) of a z + c b from the skip's and the branch's (K, V, G1) and X = n Cov(z_i^2, G_b)."""
    (K0, V0, G0), (Kb, Vb, Gb) = skip, branch
    return a2 * K0 + c2 * Kb, a2 * a2 * V0 + 2 * a2 * c2 * cross + c2 * c2 * Vb, a2 * G0 + c2 * Gb


@dataclass(frozen=True)
class _Cross:
    """What a residual branch carries of its input z: X = n Cov(z_i^2, G) of the current layer's
    conditional variance G, and the Jacobian (dK/dK_z, dTheta/dK_z, dTheta/dTheta_z) of its
    infinite-width maps (None where not derived)."""

    X: float
    jacobian: tuple | None


def _chain(local: tuple | None, inner: tuple | None) -> tuple | None:
    """The Jacobian of (K, Theta) -> (K', Theta') after ``inner``: K' depends on K only."""
    if local is None or inner is None:
        return None
    (kk, tk, tt), (ikk, itk, itt) = local, inner
    return kk * ikk, tk * ikk + tt * itk, tt * itt


def _combine_ntk(a2: float, c2: float, skip: _Point, branch: tuple, jacobian: tuple) -> tuple:
    """(A, B, D, F, P, Q) of z' = a z + c b, P and Q not derived (None).

    With H' = a^2 H + c^2 H_b + a c (H J^T + J H), J = db/dz and H_b the NTK of the branch output
    (every parameter, the skip's included: what the walker carries through the branch), the terms odd
    in the branch's last (fresh, zero-mean) weights drop out of every second moment, and to order 1/n

        A' = a^4 A + c^4 A_b + 2 a^2 c^2 (dTheta_b/dK D + dTheta_b/dTheta A)
        B' = a^4 B + c^4 B_b + 2 a^2 c^2 chi_b (Theta^2 + B)
        D' = a^4 D + c^4 D_b + a^2 c^2 [dK_b/dK D + dTheta_b/dK (2 K^2 + V) + dTheta_b/dTheta D]
        F' = a^4 F + c^4 F_b + 2 a^2 c^2 dK_b/dK (Theta K + F)

    where chi_b = dTheta_b/dTheta: n E[J_ij J_kl] = delta_ik delta_jl chi_b; the branch reads the skip
    through mean(z^2) and mean(H_kk), whose n-covariances with H_ii are D and A and with z_i^2 are
    2 K^2 + V and D; and n E[b_j J_ik] = delta_ij dK_b/dK z_k (Stein's lemma on the last weights:
    (1/2) d E[b_i b_j | z]/dz_k). The cross terms H_ik J_jk summed over k carry B and F at the same
    order as Theta J_ji. Derived here from the rule's ``combine``; checked against sampled residual
    networks (tests/test_arch_finite_width.py)."""
    A, B, D, F = skip.fluctuations[:4]
    Ab, Bb, Db, Fb = branch[:4]
    if None in (A, B, D, F, Ab, Bb, Db, Fb):
        return None
    kk, tk, tt = jacobian
    K, V, Th = skip.K, skip.V, skip.Theta
    m = a2 * c2
    return (a2 * a2 * A + c2 * c2 * Ab + 2 * m * (tk * D + tt * A),
            a2 * a2 * B + c2 * c2 * Bb + 2 * m * tt * (Th * Th + B),
            a2 * a2 * D + c2 * c2 * Db + m * (kk * D + tk * (2 * K * K + V) + tt * D),
            a2 * a2 * F + c2 * c2 * Fb + 2 * m * kk * (Th * K + F),
            None, None)


def _expand(net: Serial):
    for item in net.items:
        if isinstance(item, Repeat):
            for _ in range(item.times):
                yield from _expand(item.body)
        else:
            yield item


def _substitute_input(expr: sp.Expr, run: sp.Expr) -> sp.Expr:
    return expr.xreplace({FW_INPUT: run})


def arch_finite_width(net: Serial, *, width: int | None = None, input_norm: float = 1.0,
                      tol: float = DEFAULT_TOL) -> ArchFiniteWidth:
    """Iterate K, V, G1 (and the infinite-width NTK Theta) through ``net`` for one input.

    Args:
        net: an architecture of layer types with ``[finite_width]`` tables (module docstring).
        width: the uniform width n for the normalised columns V/(n K^2), G1/(n K); weighted layers'
            own ``width`` set the ratios r of per-layer widths.
        input_norm: x.x / n_0 of the input (K^(1) = C_b + C_W x.x/n_0).
    Returns: values per recorded output; V = G1 = 0 after the first dense (its output is Gaussian).
    """
    if not isinstance(net, Serial):
        raise DeriveError(f"expected an architecture (derive.arch.Serial), got {type(net).__name__}")
    check_derivable(net)
    if not np.isfinite(input_norm) or input_norm <= 0:
        raise DeriveError(f"input_norm must be finite and > 0, got {input_norm}")
    layers = sum(net.layer_counts().values())
    budget.check(budget.finite_width(layers, what=f"finite-width maps through {layers} layers"))
    for layer in net.distinct_layers():
        if any(e.atoms(StructuralOperator) for e in layer.rule.finite_width.values()):
            raise DeriveError(f"layer '{layer.type}' acts over positions; its finite-width maps are the tensor "
                              "form (derive.finite.tensor, or --inputs with positions)")
    walker = _Walker(tol)
    labels = [label for label, _ in net.top_level()]
    values = {q: [] for q in QUANTITIES}
    p: _Point | None = None
    top = []
    for i, item in enumerate(net.items, 1):
        if isinstance(item, Repeat):
            top.extend((f"{i}[{k + 1}]", item.body) for k in range(item.times))
        else:
            top.append((str(i), item))
    for where, item in top:
        layers = list(_expand(item)) if isinstance(item, Serial) else [item]
        for j, layer in enumerate(layers, 1):
            here = f"layer {where}" + (f".{j}" if isinstance(item, Serial) else "")
            if p is None:
                if not layer.rule.finite_width:
                    raise DeriveError(f"{here} ({layer.type}): {layer.rule.no_finite_width()}")
                if layer.type != "dense" or "variance" not in layer.rule.finite_width:
                    raise DeriveError(f"{here} ({layer.type}): finite-width maps start from a dense layer on the inputs")
                vals = {s.name: float(v) for s, v in layer.values().items()}
                Kin = vals["C_b"] + vals["C_W"] * input_norm
                Th = vals["lambda_b"] + vals["lambda_W"] * input_norm
                n1 = walker.layer_width(layer, width or 1)
                p = _Point(Kin, 0.0, 0.0, Th, n1, n1, fluctuations=(0.0,) * len(FW_NTK_QUANTITIES))
                continue
            p, _ = walker.step(p, layer, here)
        gaussian = p.run == z
        values["K"].append(p.K if gaussian else p.run_K)
        values["V"].append(p.V if gaussian else None)
        values["G1"].append(p.G1 if gaussian else None)
        values["Theta"].append(p.Theta if gaussian else p.run_Theta)
        for q, v in zip(FW_NTK_QUANTITIES, p.fluctuations or (None,) * len(FW_NTK_QUANTITIES)):
            values[q].append(v if gaussian else None)
    return ArchFiniteWidth(net.name, labels, values, width)


__all__ = ["ArchFiniteWidth", "QUANTITIES", "arch_finite_width"]
