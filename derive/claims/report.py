"""Reports of a check: one claim (:class:`CheckReport`) or a claim file (:class:`CheckSet`), as text and JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mpmath
import numpy as np
import sympy as sp

from derive.claims.claim import Claim
from derive.claims.empirical import empirical_verdict
from derive.claims.hints import hint
from derive.claims.numeric import format_number, numeric_verdict
from derive.claims.quantities import derivation
from derive.claims.symbolic import symbolic_verdict
from derive.core.display import aligned, code, markdown_table, markdown_text, math_cell, number
from derive.core.errors import DeriveError
from derive.rules.activations import Activation

# ----------------------------------------------------------------------------------------------
# Reports

_SKIPPED = {"result": "skipped", "detail": "not requested (use --empirical / empirical=True)"}


@dataclass(repr=False)
class CheckReport:
    """The verdict on one claim, and how each method reached its own."""

    quantity: str
    activation: str
    params: dict
    claim: str
    claim_expr: sp.Expr
    derivation: sp.Expr
    verdict: str
    methods: dict
    max_rel_error: float | None
    counterexample: dict | None
    values: dict | None
    hint: str | None
    formula: str = ""

    @property
    def equal(self) -> bool:
        return self.verdict == "equal"

    def as_dict(self) -> dict:
        """JSON-ready: expressions as SymPy-syntax strings in the documented symbols."""
        methods = {}
        for k, m in self.methods.items():
            methods[k] = {kk: _jsonable(vv) for kk, vv in m.items() if kk not in ("records", "worst")}
        return {
            "quantity": self.quantity, "activation": self.activation, "params": self.params,
            "formula": self.formula, "claim": self.claim, "claim_parsed": str(self.claim_expr),
            "derivation": str(self.derivation), "verdict": self.verdict, "methods": methods,
            "max_rel_error": _jsonable(self.max_rel_error), "counterexample": _jsonable(self.counterexample),
            "values": _jsonable(self.values), "hint": self.hint,
        }

    def to_text(self) -> str:
        """A short report for people."""
        lines = [f"{self.quantity} of {self.activation}"
                 + (f" ({', '.join(f'{k}={v}' for k, v in self.params.items())})" if self.params else "")
                 + f":  {self.formula}",
                 f"  claim:      {self.claim_expr}", f"  derivation: {self.derivation}",
                 f"verdict: {self.verdict}"]
        for name in ("symbolic", "numeric", "empirical"):
            m = self.methods[name]
            lines.append(f"  {name:<9} {m['result']}: {m['detail']}")
        if self.counterexample:
            at = ", ".join(f"{k} = {_short(v)}" for k, v in self.counterexample.items())
            lines.append(f"  largest disagreement at {at}")
            if self.values:
                lines.append("    " + ", ".join(f"{k} = {_short(v)}" for k, v in self.values.items()))
        if self.max_rel_error is not None and self.verdict != "equal":
            lines.append(f"  max relative error: {self.max_rel_error:.3g}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def _params(self) -> str:
        return _params_text(self.params)

    def __repr__(self) -> str:
        short = f"CheckReport({self.quantity} of {self.activation}: {self.verdict}"
        with_claim = f"{short}; claim {self.claim})"
        return with_claim if len(with_claim) <= 120 and "\n" not in self.claim else short + ")"

    def _repr_markdown_(self) -> str:
        lines = [f"**Check of `{self.quantity}` for {markdown_text(self.activation)}**{markdown_text(self._params())}: "
                 f"verdict **{self.verdict}**", ""]
        if self.formula:
            lines += [code(self.formula), ""]
        methods = [[name, self.methods[name]["result"], markdown_text(self.methods[name]["detail"])]
                   for name in ("symbolic", "numeric", "empirical") if name in self.methods]
        lines += [aligned([rf"\text{{claim}} &= {sp.latex(self.claim_expr)}",
                           rf"\text{{derivation}} &= {sp.latex(self.derivation)}"]), "",
                  markdown_table(["method", "result", "detail"], methods)]
        if self.counterexample:
            at = ", ".join(f"{markdown_text(k)} = {_cell(v)}" for k, v in self.counterexample.items())
            values = "" if not self.values else ": " + ", ".join(
                f"{markdown_text(k)} = {_cell(v)}" for k, v in self.values.items())
            lines += ["", f"Largest disagreement at {at}{values}"]
        if self.max_rel_error is not None and self.verdict != "equal":
            lines += ["", f"Max relative error: {_cell(self.max_rel_error)}"]
        if self.hint:
            lines += ["", f"Hint: {markdown_text(self.hint)}"]
        return "\n".join(lines)


@dataclass(repr=False)
class CheckSet:
    """Several claims (from a claim file) about one activation."""

    activation: str
    params: dict
    reports: list[CheckReport] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        verdicts = {rep.verdict for rep in self.reports}
        for v in ("not-equal", "undecided"):
            if v in verdicts:
                return v
        return "equal"

    def as_dict(self) -> dict:
        return {"activation": self.activation, "params": self.params, "verdict": self.verdict,
                "claims": [rep.as_dict() for rep in self.reports]}

    def to_text(self) -> str:
        body = "\n\n".join(rep.to_text() for rep in self.reports)
        return f"{body}\n\noverall: {self.verdict} ({len(self.reports)} claims)"

    def _counts(self) -> str:
        counts: dict[str, int] = {}
        for rep in self.reports:
            counts[rep.verdict] = counts.get(rep.verdict, 0) + 1
        return ", ".join(f"{n} {v}" for v, n in counts.items())

    def __repr__(self) -> str:
        return f"CheckSet({self.activation}: {self.verdict}; {len(self.reports)} claims: {self._counts()})"

    def _repr_markdown_(self) -> str:
        params = _params_text(self.params)
        rows = [[code(rep.quantity), math_cell(sp.latex(rep.claim_expr)), math_cell(sp.latex(rep.derivation)),
                 f"**{rep.verdict}**" if rep.verdict != "equal" else rep.verdict,
                 markdown_text(rep.hint or "")] for rep in self.reports]
        return "\n".join([
            f"**{len(self.reports)} claims about {markdown_text(self.activation)}**{markdown_text(params)}: "
            f"overall **{self.verdict}** ({self._counts()})", "",
            markdown_table(["quantity", "claim", "derivation", "verdict", "hint"], rows)])


def _params_text(params: dict) -> str:
    """" (a = 1, b = 2)" for the activation's parameters, "" without any."""
    return f" ({', '.join(f'{k} = {v}' for k, v in params.items())})" if params else ""


def _cell(v) -> str:
    """A counterexample's coordinate or value: floats in full, mpmath numbers at their precision."""
    if isinstance(v, (mpmath.mpf, mpmath.mpc)):
        return format_number(v)
    return number(v) if isinstance(v, (int, float, np.number)) else markdown_text(v)


def _short(v) -> str:
    return f"{v:.10g}" if isinstance(v, float) else str(v)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else str(float(v))
    if isinstance(v, (mpmath.mpf, mpmath.mpc)):
        return format_number(v)
    if isinstance(v, sp.Basic):
        return str(v)
    return v


def _decide(symbolic: dict, numeric: dict, empirical: dict) -> str:
    """not-equal if any method shows a difference; equal if symbolic or numeric shows equality; else
    undecided."""
    results = (symbolic["result"], numeric["result"], empirical["result"])
    if "not-equal" in results:
        return "not-equal"
    if symbolic["result"] == "equal" or numeric["result"] == "equal":
        return "equal"
    return "undecided"


def judge(claim: Claim, activation: Activation, *, empirical: bool = False, seed: int = 0,
          time_budget: float = 10.0) -> CheckReport:
    """Run the three verdicts on a parsed claim and assemble the report."""
    q = claim.quantity
    engine = derivation(activation, q.name)
    sym = symbolic_verdict(claim.expr, engine, q, time_budget)
    num = numeric_verdict(claim.expr, engine, q, seed)
    emp = dict(_SKIPPED)
    if empirical:
        try:
            emp = empirical_verdict(claim.expr, q, activation, seed)
        except (DeriveError, NotImplementedError, ValueError, TypeError) as exc:
            emp = {"result": "undecided", "detail": f"sampling was not possible ({str(exc).splitlines()[0]})"}
    verdict = _decide(sym, num, emp)
    counterexample = values = None
    max_rel = num.get("max_rel_error")
    if num["result"] == "not-equal" or (sym["result"] == "not-equal" and "worst" in num):
        w = num["worst"]
        counterexample, values = w["at"], {"claim": w["claim"], "derivation": w["derivation"]}
    elif emp["result"] == "not-equal":
        w = emp["worst"]
        counterexample = dict(w["at"])
        values = {"claim": w["claim"], "sampled": w["sampled"], "stderr": w["stderr"], "z": w["z"]}
        max_rel = emp.get("rel_error")
    the_hint = None
    if verdict == "not-equal":
        the_hint = hint(num, engine, q, sym)
        if emp["result"] == "not-equal" and num["result"] != "not-equal":
            w = emp["worst"]
            sampled = (f"sampling gives {w['sampled']:.6g} +- {w['stderr']:.2g} where the claim gives "
                       f"{w['claim']:.6g}")
            if num["result"] == "equal":
                sampled = "the engine's derivation agrees with the claim but sampling does not: " + sampled
            the_hint = sampled if the_hint is None else f"{sampled}; {the_hint}"
    return CheckReport(
        quantity=q.name, activation=activation.name, params=activation.describe_params(), claim=claim.text,
        claim_expr=claim.expr, derivation=engine, verdict=verdict,
        methods={"symbolic": sym, "numeric": num, "empirical": emp}, max_rel_error=max_rel,
        counterexample=counterexample, values=values, hint=the_hint, formula=q.formula)


