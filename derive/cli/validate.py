"""``derive validate``: the theory against sampled finite-width networks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from derive.cli.app import (
    ACTIVATION_HELP,
    ARCH_HELP,
    PARAM_HELP,
    NumFormat,
    activation_or_arch,
    app,
    check_png,
    default_arch_inputs,
    fail,
    finite_width_inputs,
    folded_table,
    load_arch_file,
    load_npy,
    uses_positions,
    write_atomic,
)


@app.command()
def validate(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    cw: Optional[float] = typer.Option(None, "--cw", help="Weight variance C_W (W_ij ~ N(0, C_W / fan_in))."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Number of dense layers L."),
    width: Optional[int] = typer.Option(None, "--width", "-n", help="Width n of every layer (n_1 = ... = n_L = n)."),
    widths: Optional[str] = typer.Option(None, "--widths", help="Several uniform widths n1,n2,... (comma-separated): each is sampled and every estimate is extrapolated in 1/n to infinite width, where it is compared with the theory."),
    samples: int = typer.Option(1000, "--samples", "-S", help="Networks sampled per width."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same numbers."),
    quantities: str = typer.Option("K,Theta", "--quantities", "-q", help="Comma-separated: K (kernel, every layer and input pair), Theta (output NTK), V (four-point vertex), G1 (NLO kernel), Theta_var (the NTK's fluctuation, n Var(Theta) = A + 2B), dNTK_P and dNTK_Q (the dNTK's correlations with the preactivations, PDLT ch. 11; slower: second derivatives per network)."),
    lambda_w: Optional[float] = typer.Option(None, "--lambda-w", help="NTK weight learning-rate factor (default C_W)."),
    lambda_b: Optional[float] = typer.Option(None, "--lambda-b", help="NTK bias learning-rate factor (default C_b)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs as a .npy array of shape (N, d). Default: three fixed inputs in d = 8."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure (.png, .pdf or .svg): theory and Monte Carlo against depth, and against 1/n with --widths."),
    z_max: float = typer.Option(5.0, "--z-max", help="A checked |z| at or above this fails the check (exit status 1)."),
    sampler: str = typer.Option("weights", "--sampler", help="'weights' samples every weight; 'conditional' draws each layer's preactivations from their exact Gaussian law given the previous layer (same distribution, much faster; not for Theta, Theta_var)."),
    arch: Optional[Path] = typer.Option(None, "--arch", help=ARCH_HELP + " With --width: K of every layer and block and the output Theta of a batch (--samples 200 is plenty). With --widths n1,n2,n3: K, V and G1 of one input, fitted in 1/n (--samples 4000 or more for power on G1)."),
) -> None:
    """Check the derived kernel, NTK and finite-width statistics against sampled finite-width networks.

    Samples --samples networks per width, estimates every quantity with a standard error, and
    prints theory, estimate +- error and z = (estimate - theory) / error per layer and input pair.
    With --widths the estimates are also fitted by a + b/n and the intercept (width 1/n->0) is
    compared with the infinite-width theory. Exit status 0 when every checked |z| < --z-max, 1
    otherwise, 2 for bad input.

    Examples:

      derive validate --activation relu --cw 2 --cb 0.1 --depth 3 --width 256

      derive validate --activation tanh --cw 1.5 --cb 0.05 --depth 4 --widths 64,128,256 --quantities K,V,G1 --out tanh-mc.png

      derive validate --activation swish --cw 1.8 --cb 0.1 --depth 3 --width 128 --samples 500 --format json

      derive validate --activation gelu --cw 1.98 --cb 0.17 --depth 5 --widths 64,128,256 --samples 20000 --quantities K,V,G1 --sampler conditional

      derive validate --arch examples/architectures/pre_ln_transformer.toml --width 256 --samples 200

      derive validate --arch examples/architectures/residual_mlp.toml --widths 32,64,128 --samples 4000
    """
    activation_or_arch(activation, arch, "validate")
    if arch is not None:
        if widths is not None:
            if width is not None:
                fail("give --width or --widths, not both")
            _arch_validate_widths(arch, widths, samples, seed, z_max, fmt, quantities, inputs)
            return
        if width is None:
            fail("validate --arch: give --width N (kernels and NTK of a batch) or --widths n1,n2,n3 "
                 "(K, V, G1 of one input, fitted in 1/n)")
        _arch_validate(arch, width, samples, seed, inputs, z_max, fmt, out,
                       "Theta" in [q.strip() for q in quantities.split(",")])
        return
    if cw is None or depth is None:
        fail("validate: --cw and --depth are required with --activation")
    from derive.validation.validate import EXTRAPOLATED, weak_quantities
    from derive.validation.validate import validate as run_validation

    several = None
    if widths is not None:
        try:
            several = [int(w) for w in widths.split(",") if w.strip()]
        except ValueError:
            fail(f"--widths '{widths}': expected comma-separated integers")
    if width is None and not several:
        fail("give --width N or --widths n1,n2,...")
    if out is not None:
        check_png(out)
    x = None if inputs is None else load_npy(inputs, "--inputs")
    report = run_validation(activation, cw, cb, depth, width=width, widths=several, samples=samples, seed=seed,
                            quantities=quantities, inputs=x, lambda_W=lambda_w, lambda_b=lambda_b, params=param,
                            z_max=z_max, progress=True, method=sampler)  # on stderr, whatever the format
    if out is not None:
        write_atomic(out, report.plot)
    if fmt is NumFormat.json:
        typer.echo(json.dumps(report.as_dict()))
        raise typer.Exit(0 if report.passed else 1)
    from rich import box
    from rich.console import Console

    def number(v) -> str:
        return "-" if v is None else f"{v:.5g}"

    console = Console()
    console.print(f"[bold]{report.activation}[/bold]: C_W = {report.C_W:g}, C_b = {report.C_b:g}, "
                  f"lambda_W = {report.lambda_W:g}, lambda_b = {report.lambda_b:g}, depth {report.depth}, "
                  f"width{'s' if len(report.widths) > 1 else ''} {', '.join(map(str, report.widths))}, "
                  f"{report.samples} networks per width, seed {report.seed}"
                  + (", conditional sampler" if report.method == "conditional" else ""))
    table = folded_table("quantity", "layer", "inputs", "width", "theory", "estimate", "+- error", "z", "detects",
                  box=box.SIMPLE, pad_edge=False)
    for r in report.results:
        z = r["z"]
        bad = r["checked"] and z is not None and not abs(z) < report.z_max
        z_text = "-" if z is None else f"{z:.2f}"
        if bad:
            z_text = f"[bold red]{z_text}[/bold red]"
        elif not r["checked"] and z is not None:
            z_text = f"[dim]{z_text}[/dim]"
        detects = "-" if r["detectable"] is None or not r["checked"] else f"{r['detectable']:.2g}"
        if r["checked"] and r["weak"]:
            detects += " [yellow](weak)[/yellow]"
        table.add_row(r["quantity"], str(r["layer"]), ",".join(map(str, r["inputs"])), str(r["width"]),
                      number(r["theory"]), number(r["estimate"]), f"{r['stderr']:.2g}", z_text, detects)
    console.print(table)
    console.print(f"detects: the smallest deviation from the theory a checked row could detect ({report.z_max:g} "
                  "standard errors); (weak): not even a deviation as large as the value itself")
    for quantity, (weak, checked) in weak_quantities(report).items():
        console.print(f"[yellow]no power[/yellow]: {quantity} in {weak} of {checked} checked rows (more networks, "
                      "or for 1/n quantities smaller widths, give it power)")
    if len(report.widths) > 1:
        console.print(f"rows at width {EXTRAPOLATED}: intercept a of a + b/n fitted over the widths; they "
                      "decide the check (per-width z include the O(1/n) bias and are dimmed)")
    worst = report.worst
    if report.passed:
        console.print(f"[green]passed[/green]: every checked |z| < {report.z_max:g}"
                      + (f" (largest {abs(worst['z']):.3g})" if worst else ""))
    else:
        console.print(f"[bold red]failed[/bold red]: |z| = {abs(worst['z']):.3g} >= {report.z_max:g} for "
                      f"{worst['quantity']} at layer {worst['layer']}, inputs {worst['inputs']}, width {worst['width']}")
    if out is not None:
        console.print(f"wrote {out}")
    raise typer.Exit(0 if report.passed else 1)


def _arch_validate_widths(path: Path, widths: str, samples: int, seed: int, z_max: float, fmt: NumFormat,
                          quantities: str, inputs: Optional[Path] = None) -> None:
    """derive validate --arch --widths: the finite-width maps against sampled networks, fitted in 1/n."""
    from derive.validation.arch import CHECKED, check_finite_width

    try:
        ws = [int(w) for w in widths.split(",") if w.strip()]
    except ValueError:
        fail(f"--widths '{widths}': expected comma-separated integers")
    names = [q.strip() for q in quantities.split(",") if q.strip()]
    if names == ["K", "Theta"]:  # the default of --quantities
        names = ["K", "V", "G1"]
    unknown = [q for q in names if q not in CHECKED]
    if unknown:
        fail(f"validate --arch --widths checks {', '.join(CHECKED)}; not {', '.join(unknown)} "
             "(the dNTK is checked for dense networks: use --activation)")
    net = load_arch_file(path)
    x = finite_width_inputs(net, inputs) if inputs is not None or uses_positions(net) else None
    report = check_finite_width(net, ws, samples=samples, seed=seed, z_max=z_max, quantities=names, inputs=x,
                                progress=True)  # on stderr, whatever the format
    if fmt is NumFormat.json:
        typer.echo(json.dumps(report.as_dict()))
        raise typer.Exit(0 if report.passed else 1)
    from rich import box
    from rich.console import Console

    console = Console()
    if x is None:
        sites = "one input"
    else:
        sites = f"{x.shape[0]} input{'s' if x.shape[0] > 1 else ''}"
        if x.ndim > 2:
            sites += f" x {' x '.join(map(str, x.shape[1:-1]))} positions"
    console.print(f"[bold]{net.name or path.name}[/bold]: widths {', '.join(map(str, ws))}, {samples} networks "
                  f"each, seed {seed}; {sites}, fits a + b/n (K: a, G1: b; V: a of n Var(K_hat) - 2 E[K_hat]^2)")
    table = folded_table("quantity", "output", "entry", "theory", "fit", "+- error", "z", "detects", box=box.SIMPLE,
                         pad_edge=False, collapse_padding=True)
    table.columns[1].no_wrap = True  # a layer label stays on one line; the numbers' columns fold first
    for r in report.rows:
        z = r["z"]
        z_text = "-" if z is None else f"{z:.2f}"
        if z is not None and not abs(z) < z_max:
            z_text = f"[bold red]{z_text}[/bold red]"
        detects = f"{r['detectable']:.2g}" + (" [yellow](weak)[/yellow]" if r["weak"] else "")
        table.add_row(r["quantity"], r["layer"], "{},{}".format(*r["entry"]), f"{r['theory']:.5g}",
                      f"{r['estimate']:.5g}", f"{r['stderr']:.2g}", z_text, detects)
    console.print(table)
    console.print(f"detects: the smallest deviation this run would flag ({z_max:g} standard errors); weak: a "
                  "deviation as large as the value itself would pass (raise --samples)")
    worst = report.worst
    if report.passed:
        console.print(f"[green]passed[/green]: every |z| < {z_max:g}" + (f" (largest {abs(worst['z']):.3g})" if worst else ""))
    else:
        console.print(f"[bold red]failed[/bold red]: |z| = {abs(worst['z']):.3g} >= {z_max:g} for "
                      f"{worst['quantity']} at {worst['layer']}")
    raise typer.Exit(0 if report.passed else 1)


def _arch_validate(path: Path, width: int, samples: int, seed: int, inputs: Optional[Path], z_max: float,
                   fmt: NumFormat, out: Optional[Path], ntk: bool) -> None:
    from derive.sampling.arch import validate_arch

    net = load_arch_file(path)
    if out is not None:
        check_png(out)
    x = load_npy(inputs, "--inputs") if inputs is not None else default_arch_inputs(net)
    report = validate_arch(net, x, width, samples=samples, seed=seed, z_max=z_max, ntk=ntk,
                           progress=True)  # on stderr, whatever the format
    if out is not None:
        write_atomic(out, report.plot)
    if fmt is NumFormat.json:
        typer.echo(json.dumps(report.as_dict()))
        raise typer.Exit(0 if report.passed else 1)
    from rich import box
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: width {width}, {samples} networks, seed {seed}; "
                  "per output, the entry (a,p)-(b,q) (inputs a, b at positions p, q) with the largest |z|")
    table = folded_table("quantity", "output", "entries", "entry", "theory", "sampled", "stderr", "z",
                  box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    for column in table.columns[:4]:  # names, a layer label and an entry stay on one line
        column.no_wrap = True
    groups: dict = {}
    for r in report.results:
        groups.setdefault((r["quantity"], r["index"]), []).append(r)
    for (quantity, _), rows in groups.items():
        worst = max(rows, key=lambda r: -1 if r["z"] is None else abs(r["z"]))
        z = worst["z"]
        z_text = "-" if z is None else f"{z:.2f}"
        if z is not None and not abs(z) < z_max:
            z_text = f"[bold red]{z_text}[/bold red]"
        (a, p), (b, q) = worst["entry"]
        table.add_row(quantity, worst["layer"], str(len(rows)), f"({a},{p})-({b},{q})", f"{worst['theory']:.5g}",
                      f"{worst['estimate']:.5g}", f"{worst['stderr']:.2g}", z_text)
    console.print(table)
    worst = report.worst
    if report.passed:
        console.print(f"[green]passed[/green]: every |z| < {z_max:g}"
                      + (f" (largest {abs(worst['z']):.3g})" if worst else ""))
    else:
        console.print(f"[bold red]failed[/bold red]: |z| = {abs(worst['z']):.3g} >= {z_max:g} for "
                      f"{worst['quantity']} at {worst['layer']}, entry {worst['entry']}")
    if out is not None:
        console.print(f"wrote {out}")
    raise typer.Exit(0 if report.passed else 1)
