"""Activations: a shipped rule by name, or any expression in z the safe parser accepts.

:func:`resolve` turns what a user typed (``relu``, ``leaky_relu`` with ``a=0.2``, or
``"z*erf(z)"``) into an :class:`Activation`: sigma(z) as SymPy, its parameters (symbolic unless
given a value), and the almost-everywhere derivative sigma'(z) used by the NTK.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from derive.core import symbols as S
from derive.core.errors import DeriveError, UnknownActivation
from derive.core.forms import rewrite_specials
from derive.core.parse import parse_expression
from derive.rules.files import ActivationRule, Param, activation_names, activation_rules, find_activation_rule

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Activation:
    """sigma(z) with its parameters.

    Attributes:
        name: rule name, or the expression text for a user expression.
        expression: sigma(z), parameters symbolic.
        params: the rule's parameters.
        values: parameter values given by the user (symbol -> SymPy number).
        rule: the rule it came from (None for a user expression).
    """

    name: str
    expression: sp.Expr
    params: tuple[Param, ...] = ()
    values: Mapping[sp.Symbol, sp.Expr] = None  # type: ignore[assignment]
    rule: ActivationRule | None = None

    @property
    def sigma(self) -> sp.Expr:
        """sigma(z) with the given parameter values substituted.

        Integer parameters (a degree) always take their value or default: they decide the form.
        """
        subs = {p.symbol: p.default for p in self.params if p.symbol.is_integer}
        subs.update(self.values or {})
        return self.expression.xreplace(subs).doit() if subs else self.expression

    @property
    def defaults(self) -> dict[sp.Symbol, sp.Expr]:
        """Every parameter's value: the given one, else the rule's default."""
        out = {p.symbol: p.default for p in self.params}
        out.update(self.values or {})
        return out

    @property
    def sigma_numeric(self) -> sp.Expr:
        """sigma(z) with every parameter replaced by its value or default."""
        return self.expression.xreplace(self.defaults).doit()

    def derivative(self, numeric: bool = False) -> sp.Expr:
        """sigma'(z) almost everywhere: Dirac deltas from kinks and jumps are dropped.

        This is the derivative backpropagation uses (a finite network's preactivations sit on a
        kink with probability zero), so it is the one in the NTK recursion.
        """
        base = self.sigma_numeric if numeric else self.sigma
        d = sp.diff(rewrite_specials(base, (S.z,), exponentials=False), S.z)
        return d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))

    @property
    def family(self) -> str:
        return self.rule.family if self.rule else "user expression"

    def describe_params(self) -> dict[str, str]:
        """name -> value (given, or 'default' value) as strings, for reports."""
        vals = self.values or {}
        return {p.symbol.name: str(vals.get(p.symbol, p.default)) for p in self.params}


def _rule_functions(extra: tuple[str, ...]):
    """Every activation name, callable inside a user expression: ``relu(z) + 0.1*z``."""
    table = {}
    for key, rule in activation_rules(extra).items():
        def build(arg, _rule=rule):
            e = _rule.expression.xreplace({p.symbol: p.default for p in _rule.params})
            return e.xreplace({S.z: arg})
        table[key] = (build, 1, 1)
        table[rule.name] = (build, 1, 1)
    return table


def parse_params(items: Mapping[str, str] | list[str] | None, rule: ActivationRule | None) -> dict[sp.Symbol, sp.Expr]:
    """Parse ``name=value`` parameter settings (values are numeric expressions, e.g. ``1/3``)."""
    if not items:
        return {}
    if not isinstance(items, Mapping):
        pairs = {}
        for item in items:
            if "=" not in item:
                raise DeriveError(f"--param '{item}': expected NAME=VALUE, e.g. a=0.2")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        items = pairs
    known = {p.symbol.name: p for p in (rule.params if rule else ())}
    out = {}
    for k, v in items.items():
        if k not in known:
            names = ", ".join(known) or "none"
            what = f"activation '{rule.name}'" if rule else "a user expression"
            raise DeriveError(f"unknown parameter '{k}' for {what} (parameters: {names})")
        val = parse_expression(str(v), {}, where=f"parameter {k}") if not isinstance(v, (int, float)) else sp.nsimplify(v)
        if not val.is_real:
            raise DeriveError(f"parameter {k}: value must be a real number, got '{v}'")
        if known[k].symbol.is_positive and not val.is_positive:
            raise DeriveError(f"parameter {k}: value must be positive, got '{v}'")
        if known[k].symbol.is_integer and not (val.is_Integer and 0 <= val <= 64):
            raise DeriveError(f"parameter {k}: value must be an integer in [0, 64], got '{v}'")
        out[known[k].symbol] = val
    return out


def resolve(spec: str, params: Mapping[str, str] | list[str] | None = None,
            rule_dirs: tuple[str, ...] = ()) -> Activation:
    """The activation ``spec`` names: a rule name or alias, or an expression in ``z`` (or ``x``).

    Raises:
        UnknownActivation: a bare name that is no rule.
        ParseError: an expression the safe parser refuses.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownActivation("empty activation: give a name such as relu, or an expression in z")
    rule = find_activation_rule(spec, tuple(rule_dirs))
    if rule is not None:
        return Activation(rule.name, rule.expression, rule.params, parse_params(params, rule), rule)
    text = spec.strip()
    if _IDENT.match(text) and text not in ("z", "x"):
        names = activation_names(tuple(rule_dirs))
        close = difflib.get_close_matches(text.lower(), names, n=1, cutoff=0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UnknownActivation(f"unknown activation '{text}' ({hint}known: {', '.join(names)}; or an expression "
                                f"in z, e.g. 'z*erf(z)')")
    uses_x = bool(re.search(r"\bx\b", text))
    uses_z = bool(re.search(r"\bz\b", text))
    if uses_x and uses_z:
        raise DeriveError(f"activation '{text}': use one variable, z (or x), not both")
    expr = parse_expression(text, {"x" if uses_x else "z": S.z}, functions=_rule_functions(tuple(rule_dirs)),
                            where="activation")
    if params:
        parse_params(params, None)
    if not expr.has(S.z):
        raise DeriveError(f"activation '{text}' does not depend on z")
    return Activation(text, expr, (), {}, None)


def as_activation(spec, params=None, rule_dirs=()) -> Activation:
    """``spec`` itself when it is an :class:`Activation`, else :func:`resolve` of the name or expression."""
    if isinstance(spec, Activation):
        if params:
            raise DeriveError("give parameters with the activation's name, not with a resolved Activation")
        return spec
    return resolve(spec, params, tuple(rule_dirs))
