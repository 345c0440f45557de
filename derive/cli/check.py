"""``derive check``: a hand derivation against the engine, high-precision numerics and sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from derive.cli.app import ACTIVATION_HELP, PARAM_HELP, RULES_HELP, NumFormat, app, fail, json_number


@app.command()
def check(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP + " Optional with --claim-file if the file names one."),
    quantity: Optional[str] = typer.Option(None, "--quantity", "-q", help="What the claim is about: expectation, derivative_expectation, single_expectation, single_derivative_expectation, recursion, ntk_recursion, single_input, single_input_ntk, chi_par, chi_perp, or a finite-width map K, V, G1, Theta, A, B, D, F."),
    claim: Optional[str] = typer.Option(None, "--claim", help="The claimed expression in SymPy syntax, in K11, K12, K22, K, C_W, C_b, lambda_W, lambda_b, Theta12, Theta, V, G1, r, A, B, D, F, the activation's parameters, and rho = K12/sqrt(K11*K22), theta = acos(rho)."),
    claim_latex: Optional[str] = typer.Option(None, "--claim-latex", help="The claimed expression in LaTeX (K_{11}, C_W, \\lambda_W, \\Theta_{12}, \\rho, \\theta, \\frac, \\sqrt, \\arccos, ...)."),
    claim_file: Optional[Path] = typer.Option(None, "--claim-file", help="A TOML file of claims: activation = \"relu\", a table 'claims' (SymPy syntax) with a sub-table 'latex', and a table 'definitions' with a sub-table 'latex'; see derive.claims.check.load_claim_file."),
    define: Optional[List[str]] = typer.Option(None, "--define", "-D", help="Helper definition NAME=EXPR in the claim's syntax, repeatable, e.g. --define '\\theta=\\arccos(\\rho)'."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    empirical: bool = typer.Option(False, "--empirical", help="Also compare the claim with sampled Gaussians / two-layer networks (JAX; a few seconds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random points and samples."),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help=RULES_HELP),
) -> None:
    """Check a hand derivation: is the claimed formula right, and where is it not?

    Three verdicts:
    symbolic (the difference simplifies to 0 for |rho| <= 1, K > 0);
    numeric (30-digit values at random points and at rho -> +-1, K -> 0, large K);
    empirical, with --empirical (sampling, without the engine's derivation).
    A wrong claim is reported with the point of largest disagreement, both
    values and a hint (a factor, a sign, a missing term, where it fails).
    Exit status: 0 equal, 1 not equal, 3 undecided, 2 bad input.

    Examples:

      derive check -a relu -q single_input --claim "C_b + C_W*K/2"

      derive check -a relu -q expectation --claim-latex "\\frac{\\sqrt{K_{11}K_{22}}}{2\\pi}\\left(\\sin\\theta + (\\pi-\\theta)\\cos\\theta\\right)"

      derive check -a erf -q expectation --claim "2/pi*asin(2*K12/sqrt((1+2*K11)*(1+2*K22)))" --empirical --format json

      derive check --claim-file my_derivation.toml
    """
    from derive import api

    if claim_file is not None and define:
        fail("with --claim-file, put definitions in the file's [definitions] tables")
    given = sum(x is not None for x in (claim, claim_latex, claim_file))
    if given != 1:
        fail("give exactly one of --claim, --claim-latex and --claim-file")
    if claim_file is None and quantity is None:
        fail("give --quantity (what the claim is about), e.g. --quantity expectation")
    if claim_file is None and activation is None:
        fail("give --activation, e.g. --activation relu")
    rep = api.check(activation, quantity, claim, latex=claim_latex,
                    file=str(claim_file) if claim_file is not None else None, definitions=define or None,
                    params=param, empirical=empirical, seed=seed, rule_dirs=tuple(map(str, rules or ())))
    if fmt is NumFormat.json:
        typer.echo(json.dumps(rep.as_dict(), default=json_number))
    else:
        typer.echo(rep.to_text())
    code = {"equal": 0, "not-equal": 1, "undecided": 3}[rep.verdict]
    if code:
        raise typer.Exit(code)
