"""Layer types as rules: how one layer maps the infinite-width kernel and NTK of a batch.

A layer rule (``rules/layers/*.toml``, format in ``rules/README.md``) gives two formulas, the
kernel map and the NTK map of one entry of the Gram matrices, in the documented symbols

    K11, K12, K22   the layer input's kernel at (a, p), (a, p) / (a, p), (b, q) / (b, q), (b, q)
    Theta12         the layer input's NTK at (a, p), (b, q)
    BK12, BTheta12  a branch's output kernel and NTK (combinators: ``residual``)

for inputs a, b at spatial positions p, q (one position for unstructured inputs), the rule's
parameters (variances, learning-rate factors, ...), and three kinds of functions:

- ``E(f(z1, z2))``: the Gaussian expectation over (z1, z2) with covariance [[K11, K12], [K12, K22]],
  with ``sigma`` and ``dsigma`` standing for the layer's activation and its almost-everywhere
  derivative. It is derived by the expectation engine (:mod:`derive.symbolic.expectations`): closed forms
  where the identity rules close it, quadrature nodes otherwise. The dense-network recursions are
  the composition ``dense`` after ``activation`` (PDLT eqs. 4.118, 8.63).
- Structural operators on the whole Gram matrix, the algorithms a formula cannot express entry by
  entry: ``patch`` (convolution), ``pool`` (average pooling), ``spatial_mean`` (global pooling),
  ``diagonal_mean`` (flattening), ``attend`` (self-attention with deterministic weights), and
  ``mean_attend``, ``logit_response`` (self-attention with Gaussian logits; the latter takes two
  matrices). They are linear in each argument, defined in :mod:`derive.kernels.arch` and
  :mod:`derive.kernels.attention`. Maps whose operators keep the positions (the attention ones) may also
  multiply them entry by entry with ``K12`` and ``Theta12``.
- The elementary functions of the safe parser (``sqrt``, ``exp``, ...).

Every formula goes through the safe parser (:func:`derive.core.parse.parse_expression`); nothing in a
rule file is evaluated as Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import sympy as sp

from derive.core import symbols as S
from derive.core.errors import RuleError
from derive.core.parse import parse_expression
from derive.rules.files import _files, _normal, _read_toml

#: The branch's output kernel and NTK in a combinator's formulas.
BK12 = sp.Symbol("BK12", real=True)
BTheta12 = sp.Symbol("BTheta12", real=True)

#: The symbols a layer formula may use besides its parameters.
STATE_SYMBOLS = {s.name: s for s in (S.K11, S.K12, S.K22, S.Theta12, BK12, BTheta12, S.z1, S.z2)}

sigma = sp.Function("sigma")
dsigma = sp.Function("dsigma")


class E(sp.Function):
    """The Gaussian expectation E(f(z1, z2)) over (z1, z2) ~ N(0, [[K11, K12], [K12, K22]])."""

    nargs = 1


class StructuralOperator(sp.Function):
    """A linear map of a whole Gram matrix (see :mod:`derive.kernels.arch`)."""

    nargs = 1


class patch(StructuralOperator):
    """Convolution: mean over filter offsets d of X at (stride p + d, stride q + d)."""


class pool(StructuralOperator):
    """Average pooling: mean of X over all pairs of positions of the two windows."""


class spatial_mean(StructuralOperator):
    """Global average pooling: mean of X over all pairs of positions."""


class diagonal_mean(StructuralOperator):
    """Flatten: mean of X over equal positions."""


class attend(StructuralOperator):
    """Self-attention: A_a X_ab A_b^T with A_a the attention weights of input a."""


class mean_attend(StructuralOperator):
    """Self-attention with Gaussian logits: sum E[f_a(s, t) f_b(s', t')] X_ab(t, t')."""


class logit_response(StructuralOperator):
    """Mean product of attention Jacobians contracted with X over the values, Y over the logits."""

    nargs = 2


class mean(sp.Function):
    """The mean over the channels of a function of one channel (finite-width tables)."""

    nargs = 1


class ncov(sp.Function):
    """ncov(X, Y): n Cov of two channel statistics X, Y (expressions in mean(...) of the run) to order
    1/n, by the delta method at the last Gaussian point (:mod:`derive.finite.collective`)."""

    nargs = 2


class dK(sp.Function):
    """dK(X): the derivative of a channel statistic's infinite-width value with respect to the last
    Gaussian point's kernel K."""

    nargs = 1


class dz(sp.Function):
    """dz(X): the derivative of a channel statistic's influence function with respect to the channel z
    (n times the statistic's gradient in that channel); a function of z, used inside E(...)."""

    nargs = 1


class act(sp.Function):
    """act(k, d, u): the d-th almost-everywhere derivative of the k-th activation at u (finite-width
    tables write ``sigma(u)``; differentiation raises d)."""

    nargs = 3

    def fdiff(self, argindex=3):
        if argindex != 3:
            raise sp.ArgumentIndexError(self, argindex)
        k, d, u = self.args
        return act(k, d + 1, u)


#: One channel of the layer's input (at the two sites of a Gram entry: h1, h2) and the branch output
#: in ``[finite_width]`` formulas.
FW_INPUT = sp.Symbol("h", real=True)
FW_SITES = (sp.Symbol("h1", real=True), sp.Symbol("h2", real=True))
FW_BRANCH = sp.Symbol("b", real=True)
#: The run of elementwise layers since the last Gaussian point, s(z), and its derivative s'(z), in
#: the NTK maps of a ``[finite_width.ntk]`` table (one channel z ~ N(0, K), inside E(...) only).
FW_RUN = sp.Symbol("s", real=True)
FW_DRUN = sp.Symbol("ds", real=True)
#: What the NTK maps carry from layer to layer (PDLT ch. 8 and 11; see derive/finite/single.py).
FW_NTK_QUANTITIES = ("A", "B", "D", "F", "P", "Q")
#: The derivatives of a layer's infinite-width single-input maps K' = K'(K), Theta' = Theta'(K, Theta)
#: (``[finite_width.jacobian]``): what a residual block needs for the cross terms of its skip and
#: branch (derive/finite/arch.py).
FW_JACOBIAN = ("dK_dK", "dTheta_dK", "dTheta_dTheta")
#: The operators on channel statistics in ``[finite_width.define]``, ``.ntk`` and ``.jacobian``.
FW_STATISTIC_OPERATORS = (ncov, dK, dz)
#: The forms a ``[finite_width]`` table may take (module docstrings of :mod:`derive.finite.arch`
#: and :mod:`derive.finite.tensor`).
FW_KINDS = ("variance", "means", "elementwise", "combine")
_FW_FUNCTIONS = {"mean": (mean, 1, 1), "sigma": (lambda u: act(0, 0, u), 1, 1)}

OPERATORS = {cls.__name__: cls for cls in (patch, pool, spatial_mean, diagonal_mean, attend, mean_attend,
                                           logit_response)}

#: Operators whose output has the positions of their input (so K12 and Theta12 may multiply them).
SHAPE_PRESERVING = {"attend", "mean_attend", "logit_response"}

_FUNCTIONS = {
    "E": (E, 1, 1),
    "sigma": (sigma, 1, 1),
    "dsigma": (dsigma, 1, 1),
    **{name: (cls, 2 if cls is logit_response else 1, 2 if cls is logit_response else 1)
       for name, cls in OPERATORS.items()},
}


def _param_symbol(name: str) -> sp.Symbol:
    if name in S.BY_NAME:
        return S.BY_NAME[name]
    if name.startswith(("C_", "lambda_")) or name == "eps":
        return sp.Symbol(name, nonnegative=True)
    return sp.Symbol(name, real=True)


@dataclass(frozen=True)
class LayerRule:
    """A layer type as its rule file describes it (see module docstring)."""

    name: str
    kernel: sp.Expr
    ntk: sp.Expr
    params: tuple[tuple[sp.Symbol, sp.Expr, str], ...] = ()  # (symbol, default, description)
    options: tuple[tuple[str, object, str], ...] = ()  # (name, default, description)
    weights: tuple[tuple[str, sp.Expr], ...] = ()
    sampler: str = ""
    fresh_weights: bool = False
    combinator: str = ""
    requires: str = ""  # "gaussian": the maps assume zero-mean Gaussian features at the input
    output: str = "same"  # "gaussian", "non-gaussian" or "same" (as the input)
    aliases: tuple[str, ...] = ()
    description: str = ""
    source: str = ""
    path: str = ""
    finite_width_table: tuple[tuple[str, sp.Expr], ...] = ()
    finite_width_ntk: tuple[tuple[str, sp.Expr], ...] = ()  # [finite_width.ntk], definitions substituted
    finite_width_jacobian: tuple[tuple[str, sp.Expr], ...] = ()  # [finite_width.jacobian], likewise
    finite_width_not_derived: str = ""  # why the layer has no finite-width maps (finite_width.not_derived)
    # The NTK maps that also hold when the run since the last Gaussian point holds channel means
    # (finite_width.ntk_after_means): the others are not derived there.
    finite_width_ntk_after_means: tuple[str, ...] = ()

    def no_finite_width(self) -> str:
        """The message for a layer without finite-width maps: the rule's own reason where it gives one."""
        reason = self.finite_width_not_derived or "its 1/n maps are not derived yet"
        return f"the layer rule has no [finite_width] maps: {reason}"

    @property
    def finite_width(self) -> dict[str, sp.Expr]:
        """The ``[finite_width]`` statement (one of FW_KINDS), empty when the rule has none."""
        return dict(self.finite_width_table)

    @property
    def param_names(self) -> list[str]:
        return [s.name for s, _, _ in self.params]

    @property
    def option_names(self) -> list[str]:
        return [name for name, _, _ in self.options]

    def defaults(self, given: dict[str, float]) -> dict[sp.Symbol, sp.Expr]:
        """Parameter values: the given numbers, else the defaults (which may name other
        parameters, as lambda_W = C_W), resolved in order."""
        values: dict[sp.Symbol, sp.Expr] = {}
        for symbol, default, _ in self.params:
            if symbol.name in given:
                values[symbol] = sp.nsimplify(given[symbol.name]) if isinstance(given[symbol.name], int) \
                    else sp.Float(given[symbol.name])
            else:
                values[symbol] = default.xreplace(values)
        return values

    def operators(self) -> set[str]:
        return {type(op).__name__ for e in (self.kernel, self.ntk) for op in e.atoms(StructuralOperator)}

    @property
    def structural(self) -> bool:
        """Whether the maps use an operator on the whole matrix (else they act entry by entry)."""
        return bool(self.operators())


def _load_layer(path: Path) -> LayerRule:
    data = _read_toml(path)
    where = path.name
    try:
        name = data["name"]
        table = dict(STATE_SYMBOLS)
        params = []
        for pname, spec in data.get("params", {}).items():
            if not isinstance(spec, dict) or "default" not in spec:
                raise RuleError(f"{where}: parameter '{pname}' needs a default")
            symbol = _param_symbol(pname)
            default = parse_expression(str(spec["default"]), table, where=f"{where} default of {pname}")
            params.append((symbol, default, spec.get("description", "")))
            table[pname] = symbol
        options = tuple((oname, spec.get("default"), spec.get("description", ""))
                        for oname, spec in data.get("options", {}).items())
        weights = tuple((wname, parse_expression(text, table, where=f"{where} weights.{wname}"))
                        for wname, text in data.get("weights", {}).items())
        maps = data["maps"]
        kernel = parse_expression(maps["kernel"], table, functions=_FUNCTIONS, where=f"{where} maps.kernel")
        ntk = parse_expression(maps["ntk"], table, functions=_FUNCTIONS, where=f"{where} maps.ntk")
        fw_table = {**table, "h": FW_INPUT, "h1": FW_SITES[0], "h2": FW_SITES[1], "b": FW_BRANCH}
        fw_functions = {**_FW_FUNCTIONS, **{name: (cls, 1, 1) for name, cls in OPERATORS.items()
                                            if name != "logit_response"}}
        fw_data = dict(data.get("finite_width", {}))
        ntk_data, define_data = fw_data.pop("ntk", {}), fw_data.pop("define", {})
        jacobian_data = fw_data.pop("jacobian", {})
        after_means = fw_data.pop("ntk_after_means", [])
        if not isinstance(after_means, list) or not set(after_means) <= set(FW_NTK_QUANTITIES):
            raise RuleError(f"{where}: finite_width.ntk_after_means lists some of {', '.join(FW_NTK_QUANTITIES)}")
        not_derived = fw_data.pop("not_derived", "")
        if not isinstance(not_derived, str) or (not_derived and fw_data):
            raise RuleError(f"{where}: finite_width.not_derived is a reason (text), in a table without maps")
        finite_width = tuple((key, parse_expression(str(text), fw_table, functions=fw_functions,
                                                    where=f"{where} finite_width.{key}"))
                             for key, text in fw_data.items())
        finite_width_ntk, finite_width_jacobian = _parse_ntk_maps(ntk_data, define_data, table, where,
                                                                  jacobian_data)
    except KeyError as exc:
        raise RuleError(f"{where}: missing key {exc}") from None
    rule = LayerRule(name=name, kernel=kernel, ntk=ntk, params=tuple(params), options=options,
                     weights=weights, sampler=data.get("sampler", name),
                     fresh_weights=bool(data.get("fresh_weights", False)),
                     combinator=data.get("combinator", ""), requires=data.get("requires", ""),
                     output=data.get("output", "same"), aliases=tuple(data.get("aliases", [])),
                     description=data.get("description", ""), source=data.get("source", ""),
                     path=str(path), finite_width_table=finite_width, finite_width_ntk=finite_width_ntk,
                     finite_width_jacobian=finite_width_jacobian, finite_width_not_derived=not_derived,
                     finite_width_ntk_after_means=tuple(after_means))
    _check_rule(rule, where)
    return rule


def _parse_ntk_maps(maps: dict, definitions: dict, table: dict, where: str,
                    jacobian: dict | None = None) -> tuple[tuple[tuple[str, sp.Expr], ...], ...]:
    """The ``[finite_width.ntk]`` maps of A, B, D, F, P, Q and the ``[finite_width.jacobian]``
    derivatives (FW_JACOBIAN) with the ``[finite_width.define]`` helpers (each may use the earlier
    ones) substituted. Symbols: the state K, V, G1, Theta, A..Q and r, the rule's parameters, and
    inside E(...) and mean(...) the channel z, the run s and its derivative ds. A channel statistic
    (an expression in mean(...) of them) appears only as the argument of ncov, dK or dz."""
    jacobian = {} if jacobian is None else jacobian
    if not all(isinstance(t, dict) for t in (maps, definitions, jacobian)):
        raise RuleError(f"{where}: finite_width.ntk, finite_width.define and finite_width.jacobian must be tables")
    if (definitions or jacobian) and not maps:
        raise RuleError(f"{where}: finite_width.define and finite_width.jacobian go with finite_width.ntk")
    names = {**table, **{q: S.BY_NAME[q] for q in ("K", "V", "G1", "Theta", "r", "z", *FW_NTK_QUANTITIES)},
             "s": FW_RUN, "ds": FW_DRUN}
    functions = {"E": (E, 1, 1), "mean": (mean, 1, 1), "ncov": (ncov, 2, 2), "dK": (dK, 1, 1),
                 "dz": (dz, 1, 1)}
    channel = {S.z, FW_RUN, FW_DRUN}

    def check(expr: sp.Expr, label: str, statistic: bool = False, helper: bool = False) -> None:
        """s, ds, z only inside E(...) or mean(...) (a helper may be a function of the channel, used
        inside E); mean(...) only inside ncov, dK, dz (or a statistic)."""
        for op in expr.atoms(*FW_STATISTIC_OPERATORS):
            for arg in op.args:
                if not arg.has(mean):
                    raise RuleError(f"{where}: {label}: {type(op).__name__}(...) takes channel statistics "
                                    f"(expressions in mean(...)), got {sp.sstr(arg)}")
                check(arg, label, statistic=True)
        for node in expr.atoms(E):
            inner = node.args[0].xreplace({d: sp.Integer(1) for d in node.args[0].atoms(dz)})
            if inner.has(mean):
                raise RuleError(f"{where}: {label}: mean(...) inside E(...) (a statistic is used through ncov, dK, dz)")
        held = {e: sp.Integer(1) for e in expr.atoms(E, mean, *FW_STATISTIC_OPERATORS)}
        outside = expr.xreplace(held)
        stray = outside.free_symbols & channel
        if stray and not helper:
            raise RuleError(f"{where}: {label} uses {', '.join(sorted(s.name for s in stray))} outside E(...) and "
                            "mean(...)")
        if not statistic and expr.xreplace({e: sp.Integer(1) for e in expr.atoms(*FW_STATISTIC_OPERATORS)}).has(mean):
            raise RuleError(f"{where}: {label}: a channel statistic (mean(...)) is used through ncov, dK or dz")

    for key, text in definitions.items():
        if key in names or key in functions:
            raise RuleError(f"{where}: finite_width.define.{key} would hide a symbol of the maps")
        names[key] = parse_expression(str(text), names, functions=functions, where=f"{where} finite_width.define.{key}")
        check(names[key], f"finite_width.define.{key}", statistic=names[key].has(mean), helper=True)

    def parse(data: dict, keys: tuple, table_name: str) -> tuple:
        unknown = set(data) - set(keys)
        if unknown:
            raise RuleError(f"{where}: {table_name} maps {', '.join(keys)}, not {', '.join(sorted(unknown))}")
        out = []
        for key in keys:
            if key not in data:
                continue
            expr = parse_expression(str(data[key]), names, functions=functions, where=f"{where} {table_name}.{key}")
            check(expr, f"{table_name}.{key}")
            out.append((key, expr))
        if out and len(out) != len(keys):
            missing = sorted(set(keys) - {k for k, _ in out})
            raise RuleError(f"{where}: {table_name} maps every one of {', '.join(keys)} (missing "
                            f"{', '.join(missing)})")
        return tuple(out)

    return (parse(maps, FW_NTK_QUANTITIES, "finite_width.ntk"),
            parse(jacobian, FW_JACOBIAN, "finite_width.jacobian"))


def _check_finite_width(rule: LayerRule, where: str) -> None:
    fw = rule.finite_width
    if not fw:
        if rule.finite_width_ntk:
            raise RuleError(f"{where}: finite_width.ntk needs the layer's finite_width.variance")
        return
    if len(fw) != 1 or next(iter(fw)) not in FW_KINDS:
        raise RuleError(f"{where}: [finite_width] takes one of {', '.join(FW_KINDS)}, got {', '.join(fw)}")
    kind, expr = next(iter(fw.items()))
    params = {s for s, _, _ in rule.params}
    channel = {"variance": set(FW_SITES), "means": set(FW_SITES), "elementwise": {FW_INPUT},
               "combine": {FW_INPUT, FW_BRANCH}}[kind]
    stray = expr.free_symbols - channel - params
    if stray:
        raise RuleError(f"{where}: finite_width.{kind} may use {', '.join(sorted(s.name for s in channel))} and "
                        f"the parameters, not {', '.join(sorted(s.name for s in stray))}")
    if rule.finite_width_ntk and (kind != "variance" or expr.atoms(StructuralOperator)):
        raise RuleError(f"{where}: finite_width.ntk is for layers whose output is conditionally Gaussian "
                        "channel by channel (variance without structural operators)")
    operators = expr.atoms(StructuralOperator)
    if kind in ("variance", "means"):
        if expr.atoms(mean) != {mean(FW_SITES[0] * FW_SITES[1])} or len(operators) > 1 or any(
                op.args[0] != mean(FW_SITES[0] * FW_SITES[1]) for op in operators):
            raise RuleError(f"{where}: finite_width.{kind} is affine in mean(h1*h2), or in one structural "
                            "operator of it (patch(mean(h1*h2)))")
        if kind == "variance" and not rule.fresh_weights:
            raise RuleError(f"{where}: finite_width.variance states a conditionally Gaussian output, which "
                            "needs fresh_weights = true")
        if kind == "means" and (operators and expr != next(iter(operators)) or not operators):
            raise RuleError(f"{where}: finite_width.means is one structural operator of mean(h1*h2)")
    elif operators:
        raise RuleError(f"{where}: finite_width.{kind} acts per channel and position: no structural operators")
    if kind == "combine":
        if rule.combinator != "branch":
            raise RuleError(f"{where}: finite_width.combine is for combinators (combinator = \"branch\")")
        if expr.has(mean) or expr.has(act) or any(sp.diff(expr, s, 2) != 0 for s in (FW_INPUT, FW_BRANCH)) \
                or sp.diff(expr, FW_INPUT, FW_BRANCH) != 0 or expr.xreplace({FW_INPUT: 0, FW_BRANCH: 0}) != 0:
            raise RuleError(f"{where}: finite_width.combine must be linear in h and b (a*h + c*b)")
    if kind == "elementwise":
        for node in expr.atoms(mean):
            if node.args[0].free_symbols - {FW_INPUT} - params:
                raise RuleError(f"{where}: finite_width.elementwise: mean(...) takes a function of h")


def _check_rule(rule: LayerRule, where: str) -> None:
    _check_finite_width(rule, where)
    if rule.requires not in ("", "gaussian"):
        raise RuleError(f"{where}: requires must be \"gaussian\" or absent, got {rule.requires!r}")
    if rule.output not in ("gaussian", "non-gaussian", "same"):
        raise RuleError(f"{where}: output must be \"gaussian\", \"non-gaussian\" or \"same\", got {rule.output!r}")
    for label, expr in (("kernel", rule.kernel), ("ntk", rule.ntk)):
        uses_branch = expr.has(BK12) or expr.has(BTheta12)
        if uses_branch and rule.combinator != "branch":
            raise RuleError(f"{where}: maps.{label} uses BK12/BTheta12 but the rule is not a combinator "
                            "(combinator = \"branch\")")
        for node in expr.atoms(E):
            stray = node.args[0].free_symbols - {S.z1, S.z2} - {s for s, _, _ in rule.params}
            if stray:
                raise RuleError(f"{where}: maps.{label}: E(...) may use z1, z2 and parameters only, "
                                f"not {', '.join(sorted(s.name for s in stray))}")
        for node in expr.atoms(StructuralOperator):
            if any(arg not in (S.K12, S.Theta12) for arg in node.args):
                raise RuleError(f"{where}: maps.{label}: {type(node).__name__}(...) takes K12 or Theta12")
        operators = {type(op).__name__ for op in expr.atoms(StructuralOperator)}
        if operators:
            outside = expr.xreplace({op: sp.Integer(1) for op in expr.atoms(StructuralOperator)})
            entrywise = outside.free_symbols & {S.K11, S.K12, S.K22, S.Theta12, BK12, BTheta12}
            if entrywise and not (operators <= SHAPE_PRESERVING and entrywise <= {S.K12, S.Theta12}):
                raise RuleError(f"{where}: maps.{label}: outside its operators a structural map may use "
                                "parameters, and K12 or Theta12 only with operators that keep the positions "
                                f"({', '.join(sorted(SHAPE_PRESERVING))})")


@lru_cache(maxsize=None)
def combine_weights(combine: sp.Expr) -> tuple[float, float]:
    """(a^2, c^2) of a residual block's ``combine`` = a x + c f(x) (its [finite_width] table, parameters
    substituted): the factors its skip and its branch carry into K, V and G1 (PDLT ch. 11's xi^2 and
    gamma^2 when the block is xi x + gamma f(x))."""
    return float(sp.diff(combine, FW_INPUT)) ** 2, float(sp.diff(combine, FW_BRANCH)) ** 2


@lru_cache(maxsize=None)
def layer_rules(extra: tuple[str, ...] = ()) -> dict[str, LayerRule]:
    """All layer rules by normalised name and alias (first folder wins)."""
    rules: dict[str, LayerRule] = {}
    for path in _files("layers", extra):
        rule = _load_layer(path)
        for key in (rule.name, *rule.aliases):
            rules.setdefault(_normal(key), rule)
    return rules


def find_layer_rule(name: str, extra: tuple[str, ...] = ()) -> LayerRule:
    rules = layer_rules(extra)
    rule = rules.get(_normal(str(name)))
    if rule is None:
        known = ", ".join(sorted({r.name for r in rules.values()}))
        raise RuleError(f"unknown layer type '{name}' (known: {known})")
    return rule


def layer_names(extra: tuple[str, ...] = ()) -> list[str]:
    return sorted({r.name for r in layer_rules(extra).values()})


__all__ = ["BK12", "BTheta12", "E", "FW_BRANCH", "FW_DRUN", "FW_INPUT", "FW_KINDS", "FW_NTK_QUANTITIES", "FW_RUN", "FW_SITES",
           "FW_STATISTIC_OPERATORS", "act", "dK", "dsigma", "dz", "mean", "ncov", "LayerRule",
           "OPERATORS", "SHAPE_PRESERVING", "combine_weights", "StructuralOperator", "find_layer_rule", "layer_names", "layer_rules", "sigma"]
