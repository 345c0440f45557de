"""``derive finite-width``: the order-1/n corrections of a dense network or an architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from derive.cli.app import (
    ACTIVATION_HELP,
    PARAM_HELP,
    Format,
    activation_or_arch,
    app,
    check_png,
    fail,
    finite_width_inputs,
    folded_table,
    json_number,
    load_arch_file,
    np_atleast,
    uses_positions,
    write_atomic,
)


@app.command("finite-width")
def finite_width(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    cw: Optional[float] = typer.Option(None, "--cw", help="Weight variance C_W (required)."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Number of layers (required)."),
    k1: Optional[float] = typer.Option(None, "--k1", help="First-layer kernel K^(1) (default C_b + C_W, i.e. x.x/n_0 = 1)."),
    lambda_w: Optional[float] = typer.Option(None, "--lambda-w", help="NTK weight learning-rate factor (default C_W)."),
    lambda_b: Optional[float] = typer.Option(None, "--lambda-b", help="NTK bias learning-rate factor (default C_b)."),
    width: Optional[int] = typer.Option(None, "--width", "-n", help="Uniform hidden width n (for normalised fluctuations)."),
    widths: Optional[str] = typer.Option(None, "--widths", help="Per-layer widths n_1,...,n_L (comma-separated)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    fmt: Format = typer.Option(Format.text, "--format", "-f", help="Output format."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Plot the normalised fluctuations against depth (.png)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs (N, d) as .npy (with --arch also (N, positions..., d)) for the tensor form of V, G1 and the NTK's fluctuations over every input and position. Default: one input (with --arch, of 6 positions in d = 4 when the architecture uses positions)."),
    arch: Optional[Path] = typer.Option(None, "--arch", help="Architecture file instead of --activation, --cw, --cb, --depth. A dense network (dense, then activation and dense repeated; per-layer variances allowed) gets every quantity and closed forms in depth; other architectures of dense, activation, layernorm and residual layers get K, V, G1, Theta per layer and block, the NTK fluctuations A, B, D, F through dense layers after activations or LayerNorm and through residual blocks, and the dNTK P, Q through dense layers after activations (the rules' [finite_width] tables); with conv, pooling, flatten or (tied) attention, the tensor form over positions. Dot-product attention is refused with the reason."),
) -> None:
    """Finite-width corrections at order 1/n: four-point vertex V, NLO kernel G1, NTK mean and
    fluctuations (A, B, D, F) and the dNTK-preactivation correlations (P, Q; PDLT ch. 11), layer by
    layer, with closed forms in depth where they exist.

    Examples:

      derive finite-width --activation relu --cw 2 --cb 0 --depth 10 --width 100

      derive finite-width --activation tanh --cw 1 --cb 0 --depth 1000 --width 256 --out tanh-fw.png

      derive finite-width --activation gelu --cw 1.98 --cb 0.17 --depth 20 --widths 64,128,128,256,... --format json
    """
    activation_or_arch(activation, arch, "finite-width")
    if arch is not None:
        from derive.arch.description import as_dense_network

        net = load_arch_file(arch)
        if cw is not None or depth is not None or lambda_w is not None or lambda_b is not None or param:
            fail("finite-width --arch: the architecture file sets the depth, variances and activation")
        dense = as_dense_network(net)
        if isinstance(dense, str) or inputs is not None:
            if widths is not None or k1 is not None:
                fail("finite-width --arch: --widths and --k1 apply to dense networks; layers set their own "
                     "width in the file, --width sets the rest")
            if inputs is not None or uses_positions(net):
                _arch_finite_width_tensor(net, net.name or arch.name, inputs, width, fmt)
            else:
                _arch_finite_width(net, arch, width, fmt, out)
            return
        activation, param = dense.activation, [f"{k}={v}" for k, v in dense.activation_params]
        depth = dense.depth
        cw, cb = dense.hyperparameter("C_W"), dense.hyperparameter("C_b")
        lambda_w, lambda_b = dense.hyperparameter("lambda_W"), dense.hyperparameter("lambda_b")
    if cw is None or depth is None:
        fail("finite-width: --cw and --depth are required")
    if inputs is not None:  # a batch: the dense network as an architecture, through the tensor form
        if widths is not None or k1 is not None:
            fail("finite-width --inputs: the kernel comes from the inputs (no --k1) and the maps are coefficients "
                 "of 1/n (no --widths; --width scales them)")
        from derive.api import activation as resolve_activation
        from derive.arch.description import dense_network

        net = dense_network(resolve_activation(activation, param), depth, cw, cb, lambda_w, lambda_b)
        _arch_finite_width_tensor(net, f"dense {activation} network, depth {depth}", inputs, width, fmt)
        return
    from derive import api
    from derive.core.inputs import check_hyperparameters
    from derive.finite.single import finite_width_report

    if width is not None and widths is not None:
        fail("give --width or --widths, not both")
    per_layer = any(isinstance(v, list) for v in (cw, cb, lambda_w, lambda_b))
    if per_layer:  # from an architecture file with layer-dependent variances
        for i in range(depth):
            check_hyperparameters(*(v[i] if isinstance(v, list) else v for v in (cw, cb, lambda_w, lambda_b)),
                                      depth)
    else:
        check_hyperparameters(cw, cb, lambda_w, lambda_b, depth)
    ws = None
    if widths is not None:
        try:
            ws = [int(w) for w in widths.split(",")]
        except ValueError:
            fail(f"--widths '{widths}': expected comma-separated integers")
        if len(ws) != depth:
            fail(f"--widths gives {len(ws)} widths for depth {depth}: give n_1,...,n_L")
    elif width is not None:
        ws = width
    if ws is not None and min(np_atleast(ws)) < 1:
        fail("widths must be >= 1")
    if out is not None:
        check_png(out)
        if ws is None:
            fail("--out plots normalised fluctuations: give --width or --widths")
    act = api.activation(activation, param)
    rep = finite_width_report(act, depth, cw, cb, lambda_w, lambda_b, k1=k1, widths=ws)
    if out is not None:
        from derive.plots import finite_width_plot

        write_atomic(out, lambda tmp: finite_width_plot(rep, tmp, C_W=cw, C_b=cb))
    if fmt is Format.json:
        typer.echo(json.dumps(rep, default=json_number))
        return
    if fmt is Format.latex:
        import sympy as sp

        from derive.finite.single import finite_width_maps

        maps = finite_width_maps(act)
        for q, e in maps.recursions.items():
            typer.echo(rf"{q}^{{(\ell+1)}} = {sp.latex(e)} \\")
        for q, e in rep["closed_form"].items():
            typer.echo(rf"% closed form: {q}(l) = {e}")
        return
    from rich.console import Console

    console = Console()
    def shown_value(v):
        return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"

    console.print(f"[bold]{act.name}[/bold]: C_W = {shown_value(cw)}, C_b = {shown_value(cb)}, depth {depth}"
                  + (f", widths {widths or width}" if ws is not None else " (quantities are per 1/n_(l-1))"))
    table = folded_table("layer", "K", "V", "G1", "Theta", "A", "B", "D", "F", "P", "Q")
    shown = sorted({0, depth - 1, *[min(depth - 1, 10**k - 1) for k in range(0, 6)], *range(min(depth, 5))})
    for i in shown:
        table.add_row(str(i + 1), *(f"{rep[q][i]:.6g}" if rep[q][i] is not None else "inf"
                                    for q in ("K", "V", "G1", "Theta", "A", "B", "D", "F", "P", "Q")))
    console.print(table)
    for q, e in rep["closed_form"].items():
        console.print(f"closed form in l: {q}(l) = {e}")
    if rep["depth_to_width"]:
        d2w = rep["depth_to_width"]
        console.print(f"slope of V/(n K^2) against l/n at depth: {d2w['V_over_nK2_slope']:.6g}; "
                      f"of Var(H)/Theta^2: {d2w['varH_over_Theta2_slope']:.6g}; "
                      f"of the dNTK's (P + 2Q)/(n Theta^2): {d2w['dH_over_nTheta2_slope']:.6g}")
        for key, label in (("V_over_nK2", "V/(n K^2)"), ("varH_over_Theta2", "Var(H)/Theta^2"),
                           ("dH_over_nTheta2", "|P + 2Q|/(n Theta^2)")):
            if d2w[f"{key}_untrusted_from_layer"]:
                console.print(f"[yellow]{label} exceeds 0.1 from layer {d2w[f'{key}_untrusted_from_layer']}: "
                              "the 1/n expansion is no longer trustworthy there[/yellow]")
    if out is not None:
        console.print(f"wrote {out}")


def _arch_finite_width(net, path: Path, width: Optional[int], fmt: Format, out: Optional[Path]) -> None:
    """derive finite-width --arch for architectures beyond the dense network."""
    import numpy as np

    from derive.finite.arch import arch_finite_width

    if width is not None and width < 1:
        fail("--width must be >= 1")
    if out is not None:
        check_png(out)
        if width is None:
            fail("--out plots normalised fluctuations: give --width")
    result = arch_finite_width(net, width=width)
    if out is not None:
        from derive.plots import arch_finite_width_plot

        write_atomic(out, lambda tmp: arch_finite_width_plot(result, tmp))
    if fmt is Format.json:
        typer.echo(json.dumps(result.as_dict(), default=json_number))
        return
    if fmt is Format.latex:
        fail("finite-width --arch: --format latex is not available for architectures (use text or json)")
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: one input with x.x/n_0 = 1"
                  + (f", width {width}" if width else " (V and G1 per 1/n)"))
    columns = ["output", "K", "V", "G1", "Theta"] + (["V/(n K^2)", "G1/(n K)", "Var H/Th^2"] if width else [])
    table = folded_table(*columns)  # folded, never cut: every digit stays
    norm = result.normalised()
    for i, label in enumerate(result.labels):
        row = [label] + ["-" if result.values[q][i] is None else f"{result.values[q][i]:.5g}"
                         for q in ("K", "V", "G1", "Theta")]
        if width:
            row += ["-" if not np.isfinite(norm[k][i]) else f"{norm[k][i]:.4g}"
                    for k in ("V_over_nK2", "G1_over_nK", "varH_over_Theta2")]
        table.add_row(*row)
    console.print(table)
    console.print("'-': the output of an activation or layernorm is not a Gaussian point (its statistics "
                  "enter the next dense layer); "
                  "--format json has A, B, D, F (and P, Q, not carried through LayerNorm or residual blocks)")
    if out is not None:
        console.print(f"wrote {out}")






def _arch_finite_width_tensor(net, title: str, inputs: Optional[Path], width: Optional[int], fmt: Format) -> None:
    """derive finite-width --arch over positions (and inputs), or --activation with --inputs: the tensor form."""
    import numpy as np

    from derive.finite.tensor import arch_finite_width_tensor

    if width is not None and width < 1:
        fail("--width must be >= 1")
    if fmt is Format.latex:
        fail("finite-width --arch: --format latex is not available for architectures (use text or json)")
    x = finite_width_inputs(net, inputs)
    result = arch_finite_width_tensor(net, x)
    if fmt is Format.json:
        out = result.as_dict()
        out["width"] = width
        typer.echo(json.dumps(out, default=json_number))
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{title}[/bold]: {x.shape[0]} input(s) of shape {tuple(x.shape[1:])}; "
                  "means over the sites (input, position) s of K_ss, V_(ss)(ss), G1_ss and the NTK's "
                  "fluctuation Theta_var = n Var(Theta_ss) = A + 2B"
                  + (f", width {width}" if width else " (V, G1 and Theta_var per 1/n)")
                  + "; --format json for every entry")
    columns = ["output", "sites", "K", "V", "G1", "Theta_var"] + (["max V/(n K^2)"] if width else [])
    table = folded_table(*columns)
    for label, K, V, G, var in zip(result.labels, result.values["K"], result.values["V"], result.values["G1"],
                                   result.theta_var()):
        if K is None:
            table.add_row(label, "-", "-", "-", "-", "-", *(["-"] if width else []))
            continue
        diag_v = np.einsum("ssss->s", V)
        digits = 4 if width else 6  # seven columns fit 80 characters with four digits
        row = [label, str(K.shape[0]), f"{np.mean(np.diag(K)):.{digits}g}", f"{np.mean(diag_v):.{digits}g}",
               f"{np.mean(np.diag(G)):.{digits}g}", "-" if var is None else f"{np.mean(np.diag(var)):.{digits}g}"]
        if width:
            row.append(f"{np.max(diag_v / np.diag(K) ** 2) / width:.4g}")
        table.add_row(*row)
    console.print(table)
    console.print("'-': the output of an activation or pooling of one is not a Gaussian point, or the NTK's "
                  "fluctuations are not derived there (--format json gives each output's reason)")
