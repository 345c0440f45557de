"""``derive kernel``, ``derive activations`` and ``derive codegen``: the derived kernel and NTK maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from derive.cli.app import (
    ACTIVATION_HELP,
    ARCH_HELP,
    PARAM_HELP,
    RULES_HELP,
    Format,
    NumFormat,
    activation_or_arch,
    app,
    folded_table,
    jsonable,
    load_arch_file,
    write_atomic,
)


@app.command()
def kernel(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    fmt: Format = typer.Option(Format.text, "--format", "-f", help="Output format."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help=RULES_HELP),
    arch: Optional[Path] = typer.Option(None, "--arch", help=ARCH_HELP),
) -> None:
    """Derive <sigma sigma>_K, <sigma' sigma'>_K and the NNGP/NTK layer recursions.

    With --arch, the kernel and NTK maps of every layer of the architecture (two inputs, and one).

    Examples:

      derive kernel --activation relu

      derive kernel --activation leaky_relu --param a=0.2 --format json

      derive kernel --activation "z*erf(z)" --format latex

      derive kernel --arch examples/architectures/pre_ln_transformer.toml
    """
    activation_or_arch(activation, arch, "kernel")
    if arch is not None:
        _arch_kernel(arch, fmt)
        return
    from derive import api
    from derive.core import symbols as S

    d = api.kernel(activation, param, rule_dirs=tuple(map(str, rules or ())))
    act = d.activation
    items = d.items()
    if fmt is Format.json:
        out = {
            "activation": act.name,
            "expression": str(act.expression),
            "params": act.describe_params(),
            "closed_form": d.closed_form,
            **{k: jsonable(v) for k, v in items.items()},
        }
        if not d.closed_form:
            out["quadrature_order"] = d.quadrature_order
            out["quadrature_tolerance"] = d.tol
        typer.echo(json.dumps(out))
        return
    if fmt is Format.latex:
        typer.echo(d.to_latex())  # a paste-ready align block (amsmath), one line per quantity
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{act.name}[/bold]: sigma(z) = {act.expression}"
                  + (f"   parameters: {act.describe_params()}" if act.params else ""))
    if d.closed_form:
        console.print("closed form: yes")
    else:
        orders = sorted({n.order for n in d.nodes()})
        which = f"order {orders[0]}" if len(orders) == 1 else f"orders {', '.join(map(str, orders))}"
        console.print(f"closed form: no (quadrature nodes, {which} points per dimension, tolerance {d.tol:g})")
    from derive.symbolic.display import readable

    # one line per formula, never cut: a terminal wraps it, a pipe keeps it whole
    console.print("derived (symbols K11, K12, K22, K, C_W, C_b, lambda_W, lambda_b, Theta12, Theta):",
                  soft_wrap=True)
    width = max(map(len, items))
    for k, v in items.items():
        console.print(f"  {k:<{width}} = {readable(v)}", soft_wrap=True, markup=False, highlight=False)
    del S


@app.command()
def activations(
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help=RULES_HELP),
) -> None:
    """List the activations the rules know, with their parameters.

    Example: derive activations
    """
    from derive.rules.files import activation_names, find_activation_rule

    dirs = tuple(map(str, rules or ()))
    rows = []
    for name in activation_names(dirs):
        r = find_activation_rule(name, dirs)
        rows.append({"name": r.name, "expression": str(r.expression), "family": r.family,
                     "params": {p.symbol.name: str(p.default) for p in r.params},
                     "aliases": list(r.aliases), "description": r.description})
    if fmt is NumFormat.json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console

    table = folded_table("name", "sigma(z)", "parameters (default)", "family")
    for r in rows:
        table.add_row(r["name"], r["expression"], ", ".join(f"{k}={v}" for k, v in r["params"].items()), r["family"])
    Console().print(table)


@app.command()
def codegen(
    activation: str = typer.Option(..., "--activation", "-a", help=ACTIVATION_HELP),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the module to this .py file instead of stdout."),
) -> None:
    """Emit the generated JAX layer maps as a readable, standalone Python module.

    Example: derive codegen --activation gelu --out gelu_kernel.py
    """
    from derive import api

    src = api.emit_code(activation, param)
    if out is None:
        typer.echo(src)
    else:
        write_atomic(out, lambda tmp: Path(tmp).write_text(src))
        typer.echo(f"wrote {out}")


def _arch_kernel(path: Path, fmt: Format) -> None:
    """Per-layer derived maps of an architecture (SymPy only: no JAX)."""
    from derive.symbolic.maps import layer_maps

    net = load_arch_file(path)
    rows = []
    for i, layer in enumerate(net.distinct_layers(), start=1):
        maps = layer_maps(layer)
        rows.append({"layer": i, "type": layer.type, "description": layer.describe(),
                     "kernel": maps.kernel, "ntk": maps.ntk, "single_kernel": maps.single_kernel,
                     "single_ntk": maps.single_ntk})
    if fmt is Format.json:
        typer.echo(json.dumps({"architecture": net.name, "description": net.describe(),
                               "layers": [{k: (jsonable(v) if k in ("kernel", "ntk", "single_kernel", "single_ntk")
                                               else v) for k, v in r.items()} for r in rows]}))
        return
    if fmt is Format.latex:
        import sympy as sp

        from derive.symbolic.display import rationalise

        typer.echo(f"% {net.name or path.name}")
        for r in rows:  # one paste-ready align block (amsmath) per layer
            typer.echo(rf"% layer {r['layer']}: {r['description']}")
            typer.echo("\\begin{align}\n" + rf"K'_{{12}} &= {sp.latex(rationalise(r['kernel']))} \\" + "\n"
                       + rf"\Theta'_{{12}} &= {sp.latex(rationalise(r['ntk']))}" + "\n\\end{align}")
        return
    from rich.console import Console

    console = Console()
    from derive.symbolic.display import readable

    console.print(f"[bold]{net.name or path.name}[/bold]: {len(rows)} distinct layers; recorded outputs: "
                  + ", ".join(label for label, _ in net.top_level()), soft_wrap=True)
    for r in rows:  # one line per formula, never cut: a terminal wraps it, a pipe keeps it whole
        console.print(f"layer {r['layer']}: {r['description']}", soft_wrap=True, markup=False, highlight=False)
        for name, key in (("K'12", "kernel"), ("Theta'12", "ntk"), ("K' (one input)", "single_kernel")):
            console.print(f"  {name:<14} = {readable(r[key])}", soft_wrap=True, markup=False, highlight=False)
    console.print("symbols: K11, K12, K22 and Theta12 are the layer input's kernel and NTK; BK12, BTheta12 "
                  "the branch output's; patch, pool, spatial_mean, diagonal_mean, attend act on whole "
                  "Gram matrices (rules/layers/*.toml)")
