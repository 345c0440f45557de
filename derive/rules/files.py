"""Loading the rule library (``rules/``): activation rules and closed-form expectation identities.

Rules are TOML files parsed with :mod:`tomllib`; every formula in them goes through the safe parser
(:func:`derive.core.parse.parse_expression`). The shipped library is found next to the source tree or,
once installed, as the package data ``derive._rules``; users add folders of their own with the
``DERIVE_RULES_PATH`` environment variable (``os.pathsep``-separated) or the ``rule_dirs`` argument.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import sympy as sp
import tomllib

from derive.core import symbols as S
from derive.core.errors import RuleError
from derive.core.parse import parse_expression


def builtin_rules_dir() -> Path:
    """The shipped ``rules/`` folder (source checkout or installed package data)."""
    here = Path(__file__).resolve().parents[2] / "rules"
    if (here / "activations").is_dir():
        return here
    return Path(str(resources.files("derive._rules")))


def rule_dirs(extra: tuple[str, ...] = ()) -> list[Path]:
    """Rule folders in priority order: the caller's, ``DERIVE_RULES_PATH``'s, then the shipped one."""
    env = tuple(p for p in os.environ.get("DERIVE_RULES_PATH", "").split(os.pathsep) if p)
    dirs = [Path(p) for p in (*extra, *env)]
    for d in dirs:
        if not d.is_dir():
            raise RuleError(f"rule folder '{d}' does not exist")
    return [*dirs, builtin_rules_dir()]


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RuleError(f"{path.name}: not valid TOML ({exc})") from None


def _files(sub: str, extra: tuple[str, ...]) -> list[Path]:
    out = []
    for d in rule_dirs(extra):
        folder = d / sub
        if folder.is_dir():
            out.extend(sorted(folder.glob("*.toml")))
    return out


# ---------------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class IdentityRule:
    """One ``[[identity]]`` entry, parsed: <integrand>_K = result over ``variables`` (z, or z1, z2),
    with ``wild`` symbols that match any constant. :mod:`derive.symbolic.expectations` builds its
    matching tables from these."""

    name: str
    variables: tuple
    wild: tuple
    integrand: sp.Expr
    result: sp.Expr
    source: str = ""


def load_identities(extra: tuple[str, ...] = ()) -> list[IdentityRule]:
    """Every ``[[identity]]`` of ``rules/identities/*.toml``, parsed by the safe parser."""
    out = []
    for path in _files("identities", extra):
        for k, entry in enumerate(_read_toml(path).get("identity", [])):
            where = f"{path.name}: identity {k + 1}"
            try:
                names = list(entry["variables"])
                wild = list(entry.get("wild", []))
                cov = ["K"] if len(names) == 1 else ["K11", "K12", "K22"]
                if names not in (["z"], ["z1", "z2"]):
                    raise RuleError(f"{where}: variables must be [\"z\"] or [\"z1\", \"z2\"]")
                table = {v: S.BY_NAME[v] for v in names}
                table.update({w: sp.Symbol(w, real=True) for w in wild})
                integrand = parse_expression(entry["integrand"], table, where=f"{where} integrand")
                result = parse_expression(entry["result"], {**table, **{c: S.BY_NAME[c] for c in cov}},
                                          where=f"{where} result")
                out.append(IdentityRule(entry.get("name", where), tuple(table[v] for v in names),
                                        tuple(table[w] for w in wild), integrand, result, entry.get("source", "")))
            except KeyError as exc:
                raise RuleError(f"{where}: missing key {exc}") from None
    return out


# --------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Param:
    """An activation parameter: its symbol, default value and meaning."""

    symbol: sp.Symbol
    default: sp.Expr
    description: str = ""


@dataclass(frozen=True)
class ActivationRule:
    """An activation as the rules describe it: sigma(z) with named parameters."""

    name: str
    expression: sp.Expr
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()
    family: str = "smooth"
    description: str = ""
    source: str = ""
    path: str = ""
    notes: dict = field(default_factory=dict)


def _normal(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _param_symbol(name: str, spec: dict) -> sp.Symbol:
    if spec.get("positive"):
        return sp.Symbol(name, positive=True)
    if spec.get("integer"):
        return sp.Symbol(name, integer=True, nonnegative=True)
    return sp.Symbol(name, real=True)


def _load_activation(path: Path) -> ActivationRule:
    data = _read_toml(path)
    where = path.name
    try:
        name = data["name"]
        pspecs = data.get("params", {})
        params = []
        table: dict[str, sp.Expr] = {"z": S.z}
        for pname, spec in pspecs.items():
            sym = _param_symbol(pname, spec)
            if "default" not in spec:
                raise RuleError(f"{where}: parameter '{pname}' needs a default")
            default = parse_expression(str(spec["default"]), {}, where=f"{where} default of {pname}")
            params.append(Param(sym, default, spec.get("description", "")))
            table[pname] = sym
        expr = parse_expression(data["expression"], table, where=f"{where} expression")
    except KeyError as exc:
        raise RuleError(f"{where}: missing key {exc}") from None
    return ActivationRule(name=name, expression=expr, params=tuple(params),
                          aliases=tuple(data.get("aliases", [])), family=data.get("family", "smooth"),
                          description=data.get("description", ""), source=data.get("source", ""),
                          path=str(path), notes=dict(data.get("notes", {})))


@lru_cache(maxsize=None)
def activation_rules(extra: tuple[str, ...] = ()) -> dict[str, ActivationRule]:
    """All activation rules by normalised name and alias (first folder wins)."""
    rules: dict[str, ActivationRule] = {}
    for path in _files("activations", extra):
        rule = _load_activation(path)
        for key in (rule.name, *rule.aliases):
            rules.setdefault(_normal(key), rule)
    return rules


def find_activation_rule(name: str, extra: tuple[str, ...] = ()) -> ActivationRule | None:
    return activation_rules(extra).get(_normal(name))


def activation_names(extra: tuple[str, ...] = ()) -> list[str]:
    """Names (not aliases) of every known activation, sorted."""
    return sorted({r.name for r in activation_rules(extra).values()})


__all__ = ["ActivationRule", "IdentityRule", "Param", "activation_names", "activation_rules",
           "find_activation_rule", "load_identities", "rule_dirs"]
