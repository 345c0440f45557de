"""``derive gate``: the multiplication gate of Lin, Tegmark & Rolnick (2017) for any activation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from derive.cli.app import ACTIVATION_HELP, PARAM_HELP, RULES_HELP, Format, app, fail, write_atomic


@app.command("gate")
def gate_command(
    activation: str = typer.Option(..., "--activation", "-a", help=ACTIVATION_HELP),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    lam: Optional[str] = typer.Option(None, "--lambda", "-l",
                                      help="The scale lambda > 0 (0.01 or 1/100); symbolic if omitted."),
    inputs: int = typer.Option(2, "--inputs", "-n",
                               help="n: neurons and layers for the product of n inputs (2..64)."),
    polynomial: Optional[str] = typer.Option(None, "--polynomial",
                                             help="A polynomial in x1..xk to count neurons and layers for."),
    fmt: Format = typer.Option(Format.text, "--format", "-f", help="Output format."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help=RULES_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Write the gate network as a standalone JAX module (.py)."),
) -> None:
    """The four-neuron multiplication gate of Lin, Tegmark & Rolnick (2017) for any activation.

    xy ~ mu (s(c+u+v) + s(c-u-v) - s(c+u-v) - s(c-u+v)), u = lam x, v = lam y:
    whether it exists (s''(c) != 0; the shift c when s''(0) = 0; or why not),
    its weights, its error series in lambda, and neuron and layer counts for
    products of n inputs (a tree of gates against one hidden layer) and polynomials.

    Examples:

      derive gate --activation softplus

      derive gate --activation tanh --inputs 8 --format json

      derive gate --activation gelu --polynomial "x1*x2 + x3^2"

      derive gate --activation swish --lambda 0.01 --out gate.py
    """
    from derive.core.errors import DeriveError
    from derive.gates.gate import gate

    try:
        res = gate(activation, param, lam=lam, inputs=inputs, polynomial=polynomial,
                   rule_dirs=tuple(map(str, rules or ())))
        src = None
        if out is not None:
            from derive.gates.networks import gate_source

            src = gate_source(res, lam)
    except DeriveError as exc:
        fail(str(exc))
    if out is not None:
        write_atomic(out, lambda tmp: Path(tmp).write_text(src))
    if fmt is Format.json:
        typer.echo(json.dumps({**res.as_dict(), **({"wrote": str(out)} if out is not None else {})}))
    elif fmt is Format.latex:
        typer.echo(res.to_latex())
    else:
        import shutil

        typer.echo(res.to_text(width=min(max(shutil.get_terminal_size((80, 24)).columns, 40), 120)))
        if out is not None:
            typer.echo(f"wrote {out}")
