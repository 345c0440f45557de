"""Checking a hand derivation: is a claimed formula for a derived quantity right, and where is it not?

A *claim* is an expression for one named quantity of an activation (see :data:`QUANTITIES`), typed in
SymPy syntax (through the safe parser :func:`derive.core.parse.parse_expression`) or in LaTeX (through
SymPy's ANTLR LaTeX parser, then a whitelist walk, see :func:`parse_latex_claim`). It is judged three
independent ways:

- **symbolic**: claim - derivation is brought to a canonical form on the domain K11, K22 > 0,
  K12 = rho sqrt(K11 K22) with |rho| <= 1 (arcsin x = pi/2 - arccos x, theta = arccos(rho) and
  sqrt(1 - rho^2) = sin(theta) become independent symbols modulo sin^2 + cos^2 = 1) and tested for
  zero, then handed to ``simplify`` within a time budget; ``undecided`` when neither decides;
- **numeric**: both sides are evaluated with mpmath at 30 digits (50-digit SymPy Floats substituted,
  then ``evalf``; no code is generated) at random points of the domain and at its edges
  (rho -> +-1, K -> 0, large K); quadrature nodes of the derivation are evaluated with
  :func:`derive.symbolic.numeric.evaluate`;
- **empirical** (optional, JAX): the claim alone is compared with sampled Gaussians or sampled
  two-layer networks, with standard errors and z-scores; the engine's derivation is not used, so a
  wrong claim is caught even if the derivation were wrong in the same way.

When the claim is wrong, the report gives the point of largest disagreement, both values, the
relative error and, where the numbers show one, a hint: a constant factor, a sign, a missing or
extra term, or a disagreement confined to rho -> +-1 or K -> 0.

The formulas the quantities stand for are those of :mod:`derive.symbolic.recursions` (PDLT eqs. 4.118,
8.63), :mod:`derive.symbolic.critical` (PDLT eqs. 5.9, 5.10) and :mod:`derive.finite.single` (PDLT ch. 4, 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from derive.claims.claim import parse_claim, split_definition
from derive.claims.quantities import QUANTITIES, quantity
from derive.claims.report import CheckReport, CheckSet, judge
from derive.core.errors import DeriveError
from derive.rules.activations import Activation

# ----------------------------------------------------------------------------------------------
# Entry points

#: Largest accepted claim file, in bytes.
MAX_FILE_BYTES = 200_000


def _definition_items(definitions, syntax: str) -> list[tuple[str, str, str]]:
    if not definitions:
        return []
    if isinstance(definitions, Mapping):
        return [(str(k), v, syntax) for k, v in definitions.items()]
    if isinstance(definitions, str):
        definitions = [definitions]
    items = []
    for d in definitions:
        if isinstance(d, tuple) and len(d) in (2, 3):
            items.append((d[0], d[1], d[2] if len(d) == 3 else syntax))
        else:
            name, text = split_definition(d)
            items.append((name, text, syntax))
    for name, text, _ in items:
        if not isinstance(text, str):
            raise DeriveError(f"definition '{name}': expected text, got {type(text).__name__}")
    return items


def check_claim(activation: Activation, quantity_name: str, claim: str | None = None, *,
                latex: str | None = None, definitions=None, empirical: bool = False, seed: int = 0,
                time_budget: float = 10.0) -> CheckReport:
    """Check one claim (SymPy syntax ``claim`` or LaTeX ``latex``) about ``quantity_name``.

    ``definitions``: ``["theta = \\arccos(\\rho)", ...]`` or ``{"theta": "..."}``, in the claim's syntax.
    """
    q = quantity(quantity_name)
    if (claim is None) == (latex is None):
        raise DeriveError("give exactly one of a claim (SymPy syntax) and a LaTeX claim")
    syntax = "latex" if latex is not None else "sympy"
    text = latex if latex is not None else claim
    where = "--claim-latex" if syntax == "latex" else "--claim"
    defs = _definition_items(definitions, syntax)
    parsed = parse_claim(text, q, activation, syntax=syntax, definitions=defs, where=where)
    return judge(parsed, activation, empirical=empirical, seed=seed, time_budget=time_budget)


@dataclass(frozen=True)
class ClaimFile:
    """A claim file's content: activation, parameters, claims and definitions."""

    activation: str | None
    params: dict
    claims: list  # (quantity, text, syntax)
    definitions: list  # (name, text, syntax)


def load_claim_file(path: str | Path) -> ClaimFile:
    """Read a claim file (TOML)::

        activation = "relu"
        params = { a = "0.2" }                 # optional
        [claims]                               # SymPy syntax
        single_input = "C_b + C_W*K/2"
        [claims.latex]                         # LaTeX
        expectation = '\\frac{\\sqrt{K_{11}K_{22}}}{2\\pi}(\\sin\\theta + (\\pi-\\theta)\\cos\\theta)'
        [definitions]                          # SymPy syntax helpers
        [definitions.latex]                    # LaTeX helpers
        theta = '\\arccos(\\rho)'
    """
    import tomllib

    p = Path(path).expanduser()
    if not p.is_file():
        raise DeriveError(f"claim file '{path}' does not exist")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise DeriveError(f"claim file '{path}' is too large (at most {MAX_FILE_BYTES} bytes)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeriveError(f"claim file '{path}': {str(exc).splitlines()[0]}") from None
    unknown = set(data) - {"activation", "params", "claims", "definitions"}
    if unknown:
        raise DeriveError(f"claim file '{path}': unknown keys {', '.join(sorted(unknown))} "
                          "(allowed: activation, params, claims, definitions)")
    act = data.get("activation")
    if act is not None and not isinstance(act, str):
        raise DeriveError(f"claim file '{path}': activation must be a string")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise DeriveError(f"claim file '{path}': params must be a table, e.g. params = {{ a = \"0.2\" }}")
    params = {str(k): str(v) for k, v in params.items()}

    def entries(table_name: str) -> list:
        table = data.get(table_name, {})
        if not isinstance(table, dict):
            raise DeriveError(f"claim file '{path}': [{table_name}] must be a table")
        out = []
        for k, v in table.items():
            if k == "latex":
                if not isinstance(v, dict):
                    raise DeriveError(f"claim file '{path}': [{table_name}.latex] must be a table")
                for kk, vv in v.items():
                    if not isinstance(vv, str):
                        raise DeriveError(f"claim file '{path}': {table_name}.latex.{kk} must be a string")
                    out.append((kk, vv, "latex"))
            elif isinstance(v, str):
                out.append((k, v, "sympy"))
            else:
                raise DeriveError(f"claim file '{path}': {table_name}.{k} must be a string")
        return out

    claims = entries("claims")
    if not claims:
        raise DeriveError(f"claim file '{path}' holds no claims (add a [claims] or [claims.latex] table)")
    for qname, _, _ in claims:
        quantity(qname)
    return ClaimFile(act, params, claims, entries("definitions"))


def check(spec=None, quantity_name: str | None = None, claim: str | None = None, *,
          latex: str | None = None, file: str | Path | None = None, definitions=None, params=None,
          empirical: bool = False, seed: int = 0, time_budget: float = 10.0,
          rule_dirs: Sequence[str] = ()) -> CheckReport | CheckSet:
    """Check a hand derivation: one claim (``claim`` or ``latex`` about ``quantity_name``), or every
    claim of a claim ``file`` (then a :class:`CheckSet`). See the module docstring for the verdicts."""
    from derive.rules.activations import as_activation as resolve_activation

    if file is not None:
        if claim is not None or latex is not None:
            raise DeriveError("give a claim file or a single claim, not both")
        if definitions:
            raise DeriveError("with a claim file, put definitions in its [definitions] tables")
        cf = load_claim_file(file)
        spec = spec if spec is not None else cf.activation
        if spec is None:
            raise DeriveError("no activation: give one, or set activation = \"...\" in the claim file")
        act = resolve_activation(spec, params if params is not None else (cf.params or None), rule_dirs)
        defs = cf.definitions
        out = CheckSet(act.name, act.describe_params())
        for qname, text, syntax in cf.claims:
            where = f"claim file [claims{'.latex' if syntax == 'latex' else ''}] {qname}"
            parsed = parse_claim(text, quantity(qname), act, syntax=syntax, definitions=defs, where=where)
            out.reports.append(judge(parsed, act, empirical=empirical, seed=seed, time_budget=time_budget))
        return out
    if spec is None:
        raise DeriveError("give an activation (a rule name such as relu, or an expression in z)")
    if quantity_name is None:
        raise DeriveError(f"give the quantity the claim is about ({', '.join(QUANTITIES)})")
    act = resolve_activation(spec, params, rule_dirs)
    return check_claim(act, quantity_name, claim, latex=latex, definitions=definitions, empirical=empirical,
                       seed=seed, time_budget=time_budget)
