"""The ``derive`` command: a thin layer over :mod:`derive.api`.

Each command parses its options, calls one API function and prints the result as text (for
people), LaTeX (for papers) or JSON (one object on stdout, for tools). Bad input exits with
status 2 and a one-line message on stderr. Symbolic commands never import JAX.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="derive",
    help=(
        "Derive the statistics of deep networks at initialisation: kernels (NNGP), NTKs and their "
        "recursions, for any activation, with generated JAX code and Monte Carlo checks.\n\n"
        "Example: derive kernel --activation relu"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Format(str, Enum):
    text = "text"
    latex = "latex"
    json = "json"


class NumFormat(str, Enum):
    text = "text"
    json = "json"


class DType(str, Enum):
    float64 = "float64"
    float32 = "float32"


ACTIVATION_HELP = (
    "Activation: a rule name (relu, leaky_relu, tanh, gelu, ...; see 'derive activations') or an "
    "expression in z such as 'z*erf(z)' or 'relu(z) + 0.1*z'."
)
PARAM_HELP = "Activation parameter NAME=VALUE, repeatable, e.g. --param a=0.2 for leaky_relu."
RULES_HELP = "Extra folder of rule files (activations/*.toml, identities/*.toml), searched first."
ARCH_HELP = ("Architecture file (TOML: [[layers]] of dense, activation, layernorm, residual, conv, avg_pool, "
             "global_avg_pool, flatten, attention, repeat; see examples/architectures/) instead of --activation.")


def _activation_or_arch(activation, arch, command: str, arch_ok: bool = True) -> None:
    if activation is not None and arch is not None:
        fail(f"{command}: give --activation or --arch, not both")
    if activation is None and arch is None:
        fail(f"{command}: give --activation" + (" or --arch" if arch_ok else ""))


def _load_arch(path: Path):
    from derive.arch import load_arch

    return load_arch(path)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _jsonable(expr) -> str:
    return str(expr)


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, renamed into place when complete."""
    path = path.expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        fail(f"cannot write '{path}': folder '{folder}' does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".derive-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    _activation_or_arch(activation, arch, "kernel")
    if arch is not None:
        _arch_kernel(arch, fmt)
        return
    from derive import api
    from derive import symbols as S

    d = api.kernel(activation, param, rule_dirs=tuple(map(str, rules or ())))
    act = d.activation
    items = {
        "expectation": d.expectation,
        "derivative_expectation": d.derivative_expectation,
        "recursion": d.recursion,
        "ntk_recursion": d.ntk_recursion,
        "single_input": d.single_input,
        "single_input_ntk": d.single_input_ntk,
    }
    if fmt is Format.json:
        out = {
            "activation": act.name,
            "expression": str(act.expression),
            "params": act.describe_params(),
            "closed_form": d.closed_form,
            **{k: _jsonable(v) for k, v in items.items()},
        }
        if not d.closed_form:
            out["quadrature_order"] = d.quadrature_order
            out["quadrature_tolerance"] = d.tol
        typer.echo(json.dumps(out))
        return
    if fmt is Format.latex:
        import sympy as sp

        labels = {
            "expectation": r"\langle \sigma(z_1)\sigma(z_2)\rangle_K",
            "derivative_expectation": r"\langle \sigma'(z_1)\sigma'(z_2)\rangle_K",
            "recursion": r"K^{(\ell+1)}_{12}",
            "ntk_recursion": r"\Theta^{(\ell+1)}_{12}",
            "single_input": r"K^{(\ell+1)}",
            "single_input_ntk": r"\Theta^{(\ell+1)}",
        }
        typer.echo(rf"% {act.name}: \sigma(z) = {sp.latex(act.expression)}")
        for k, v in items.items():
            typer.echo(rf"{labels[k]} = {sp.latex(v)} \\")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{act.name}[/bold]: sigma(z) = {act.expression}"
                  + (f"   parameters: {act.describe_params()}" if act.params else ""))
    if d.closed_form:
        console.print("closed form: yes")
    else:
        console.print(f"closed form: no (quadrature nodes, order {d.quadrature_order}, tolerance {d.tol:g})")
    table = Table(show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("derived expression (symbols K11, K12, K22, K, C_W, C_b, lambda_W, lambda_b, Theta12)")
    for k, v in items.items():
        table.add_row(k, str(v))
    console.print(table)
    del S


@app.command()
def criticality(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    fmt: Format = typer.Option(Format.text, "--format", "-f", help="Output format."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help=RULES_HELP),
    arch: Optional[Path] = typer.Option(None, "--arch", help=ARCH_HELP),
    k0: float = typer.Option(1.0, "--k0", help="With --arch: the input's second moment x.x/d."),
) -> None:
    """Critical initialisations (C_W, C_b, K*), universality class and large-depth behaviour.

    Solves chi_par(K*) = chi_perp(K*) = 1 at a fixed point K* of K -> C_b + C_W <sigma^2>_K
    (exactly where the rules allow, else to >= 10 digits), and reports the class: scale-invariant,
    K*=0, half-stable or none (with the reason).

    Examples:

      derive criticality --activation tanh

      derive criticality --activation gelu --format json

      derive criticality --activation leaky_relu --param a=0.1 --format latex

      derive criticality --arch examples/architectures/residual_mlp.toml

    With --arch (no spatial layers): the single-input kernel and chi_par, chi_perp of every layer
    and repeated block along the trajectory from K = --k0, and the residual criticality condition
    xi^2 + gamma^2 chi_branch = 1.
    """
    _activation_or_arch(activation, arch, "criticality")
    if arch is not None:
        _arch_criticality(arch, k0, fmt)
        return
    from derive import api

    rep = api.criticality(activation, param, rule_dirs=tuple(map(str, rules or ())))
    d = rep.as_dict()
    if fmt is Format.json:
        typer.echo(json.dumps(d, default=_json_number))
        return
    if fmt is Format.latex:
        import sympy as sp

        typer.echo(rf"% {d['activation']}: universality class {d['class']}")
        typer.echo(rf"\chi_\parallel(K) = {sp.latex(rep.maps.chi_par)} \\")
        typer.echo(rf"\chi_\perp(K) = {sp.latex(rep.maps.chi_perp)} \\")
        for p in rep.critical_points:
            cw = sp.latex(p.exact.get("C_W", p.C_W))
            cb = sp.latex(p.exact.get("C_b", p.C_b))
            typer.echo(rf"C_W = {cw},\quad C_b = {cb},\quad K^* = {sp.latex(p.exact.get('K_star', p.K_star))} \\")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{d['activation']}[/bold]: universality class [bold]{d['class']}[/bold]")
    if d.get("reason"):
        console.print(f"  {d['reason']}")
    table = Table("C_W", "C_b", "K*", "stability")
    for p in d["critical_points"]:
        table.add_row(p.get("C_W_exact", f"{p['C_W']:.12g}"), p.get("C_b_exact", f"{p['C_b']:.12g}"),
                      p.get("K_star_exact", f"{p['K_star']:.12g}"), p.get("stability", ""))
    if d["critical_points"]:
        console.print(table)
    console.print(f"chi_par(K)  = {d['chi_par']}")
    console.print(f"chi_perp(K) = {d['chi_perp']}")
    console.print("Taylor data: " + ", ".join(f"{k} = {v}" for k, v in d["taylor"].items()))
    if "a1" in d:
        console.print(f"a1 = {d['a1_exact']}, b1 = {d['b1_exact']}, p_perp = {d['p_perp_exact']}")
    for k, v in d["asymptotics"].items():
        console.print(f"large depth: {k}^(l) ~ {v}")
    for k, v in d["learning_rates"].items():
        console.print(f"depth-scaled learning rate: {k}^(l) = {v}")


def _json_number(x):
    return None if x != x else float(x)


def _check_png(out: Path) -> None:
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        fail(f"--out '{out}': give a .png, .pdf or .svg file name")
    folder = out.expanduser().parent
    if not folder.is_dir():
        fail(f"cannot write '{out}': folder '{folder}' does not exist")


@app.command()
def phase(
    activation: str = typer.Option(..., "--activation", "-a", help=ACTIVATION_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Figure file (.png, .pdf or .svg)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    cw_max: float = typer.Option(4.0, "--cw-max", help="Largest C_W shown."),
    cb_max: float = typer.Option(1.0, "--cb-max", help="Largest C_b shown."),
    grid: int = typer.Option(60, "--grid", help="Grid points per axis."),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Also print the grid as JSON with --format json."),
) -> None:
    """Order/chaos phase diagram: chi_perp(K*) over (C_b, C_W), the chi_perp = 1 line, critical points.

    K* is the single-input fixed point reached from K = 1.

    Example: derive phase --activation tanh --out tanh-phase.png
    """
    from derive import api
    from derive.plots import phase_diagram

    _check_png(out)
    if cw_max <= 0.25 or cb_max < 0 or grid < 4:
        fail("need --cw-max > 0.25, --cb-max >= 0 and --grid >= 4")
    rep = api.criticality(activation, param)
    points = [p.as_dict() for p in rep.critical_points]
    tmp_holder = {}

    def write(tmp):
        tmp_holder["data"] = phase_diagram(rep.activation, tmp, (0.25, cw_max), (0.0, cb_max), grid,
                                           critical_points=points)

    _write_atomic(out, write)
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": rep.activation.name, "out": str(out), "critical_points": points,
                               **tmp_holder["data"]}, default=_json_number))
    else:
        typer.echo(f"wrote {out}")


@app.command()
def profile(
    activation: str = typer.Option(..., "--activation", "-a", help=ACTIVATION_HELP),
    cw: float = typer.Option(..., "--cw", help="Weight variance C_W."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    depth: int = typer.Option(..., "--depth", "-L", help="Number of layers."),
    k0: float = typer.Option(1.0, "--k0", help="Input second moment x.x/d of both inputs."),
    rho0: float = typer.Option(0.5, "--rho0", help="Correlation of the two inputs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure file (.png, .pdf or .svg)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
) -> None:
    """K^(l), rho^(l), chi_par and chi_perp against depth, with correlation fixed points and depth scales.

    Examples:

      derive profile --activation tanh --cw 1 --cb 0 --depth 1000 --out tanh-profile.png

      derive profile --activation relu --cw 2 --cb 0 --depth 50 --format json
    """
    import numpy as np

    from derive import api
    from derive.signal import correlation_fixed_points, depth_profile

    api.check_hyperparameters(cw, cb, None, None, depth)
    if k0 <= 0 or not -1 <= rho0 <= 1:
        fail("need --k0 > 0 and -1 <= --rho0 <= 1")
    if out is not None:
        _check_png(out)
    act = api.activation(activation, param)
    prof = depth_profile(act, cw, cb, depth, k0, rho0)
    k_last = prof.K[-1]
    fps = correlation_fixed_points(act, cw, cb, float(k_last)) if np.isfinite(k_last) and k_last > 0 else []
    if out is not None:
        from derive.plots import depth_profile_plot

        _write_atomic(out, lambda tmp: depth_profile_plot(act, prof, tmp, cw, cb))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": act.name, "C_W": cw, "C_b": cb, "depth": depth, "K0": k0,
                               "rho0": rho0, **prof.as_dict(), "correlation_fixed_points": fps},
                              default=_json_number))
        return
    shown = sorted({0, depth - 1, *[min(depth - 1, 10**k - 1) for k in range(1, 6)]})
    for i in shown:
        typer.echo(f"layer {i + 1:>6}: K = {prof.K[i]:.6g}  rho = {prof.rho[i]:.6g}  "
                   f"chi_par = {prof.chi_par[i]:.6g}  chi_perp = {prof.chi_perp[i]:.6g}")
    for f in fps:
        typer.echo(f"correlation fixed point rho* = {f['rho']:.10g}: chi_c = {f['chi_c']:.6g}, "
                   f"{'stable' if f['stable'] else 'unstable'}, depth scale {f['depth_scale']:.6g}")
    if out is not None:
        typer.echo(f"wrote {out}")


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
    arch: Optional[Path] = typer.Option(None, "--arch", help="Architecture file instead of --activation, --cw, --cb, --depth. A dense network (dense, then activation and dense repeated; per-layer variances allowed) gets every quantity; other architectures of dense, activation, layernorm and residual layers get K, V, G1 and Theta per layer and block (the rules' [finite_width] tables). Conv, pooling and attention have no finite-width rules yet and are refused with the reason."),
) -> None:
    """Finite-width corrections at order 1/n: four-point vertex V, NLO kernel G1, NTK mean and
    fluctuations (A, B, D, F) and the dNTK-preactivation correlations (P, Q; PDLT ch. 11), layer by
    layer, with closed forms in depth where they exist.

    Examples:

      derive finite-width --activation relu --cw 2 --cb 0 --depth 10 --width 100

      derive finite-width --activation tanh --cw 1 --cb 0 --depth 1000 --width 256 --out tanh-fw.png

      derive finite-width --activation gelu --cw 1.98 --cb 0.17 --depth 20 --widths 64,128,128,256,... --format json
    """
    _activation_or_arch(activation, arch, "finite-width")
    if arch is not None:
        from derive.arch import as_dense_network

        net = _load_arch(arch)
        if cw is not None or depth is not None or lambda_w is not None or lambda_b is not None or param:
            fail("finite-width --arch: the architecture file sets the depth, variances and activation")
        dense = as_dense_network(net)
        if isinstance(dense, str):
            if widths is not None or k1 is not None:
                fail("finite-width --arch: --widths and --k1 apply to dense networks; layers set their own "
                     "width in the file, --width sets the rest")
            _arch_finite_width(net, arch, width, fmt, out)
            return
        activation, param = dense.activation, [f"{k}={v}" for k, v in dense.activation_params]
        depth = dense.depth
        cw, cb = dense.hyperparameter("C_W"), dense.hyperparameter("C_b")
        lambda_w, lambda_b = dense.hyperparameter("lambda_W"), dense.hyperparameter("lambda_b")
    if cw is None or depth is None:
        fail("finite-width: --cw and --depth are required")
    from derive import api
    from derive.finite_width import finite_width_report

    if width is not None and widths is not None:
        fail("give --width or --widths, not both")
    per_layer = any(isinstance(v, list) for v in (cw, cb, lambda_w, lambda_b))
    if per_layer:  # from an architecture file with layer-dependent variances
        for i in range(depth):
            api.check_hyperparameters(*(v[i] if isinstance(v, list) else v for v in (cw, cb, lambda_w, lambda_b)),
                                      depth)
    else:
        api.check_hyperparameters(cw, cb, lambda_w, lambda_b, depth)
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
        _check_png(out)
        if ws is None:
            fail("--out plots normalised fluctuations: give --width or --widths")
    act = api.activation(activation, param)
    rep = finite_width_report(act, depth, cw, cb, lambda_w, lambda_b, k1=k1, widths=ws)
    if out is not None:
        from derive.plots import finite_width_plot

        _write_atomic(out, lambda tmp: finite_width_plot(rep, tmp))
    if fmt is Format.json:
        typer.echo(json.dumps(rep, default=_json_number))
        return
    if fmt is Format.latex:
        import sympy as sp

        from derive.finite_width import finite_width_maps

        maps = finite_width_maps(act)
        for q, e in maps.recursions.items():
            typer.echo(rf"{q}^{{(\ell+1)}} = {sp.latex(e)} \\")
        for q, e in rep["closed_form"].items():
            typer.echo(rf"% closed form: {q}(l) = {e}")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    def shown_value(v):
        return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"

    console.print(f"[bold]{act.name}[/bold]: C_W = {shown_value(cw)}, C_b = {shown_value(cb)}, depth {depth}"
                  + (f", widths {widths or width}" if ws is not None else " (quantities are per 1/n_(l-1))"))
    table = Table("layer", "K", "V", "G1", "Theta", "A", "B", "D", "F", "P", "Q")
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

    from derive.arch_finite_width import arch_finite_width

    if width is not None and width < 1:
        fail("--width must be >= 1")
    if out is not None:
        _check_png(out)
        if width is None:
            fail("--out plots normalised fluctuations: give --width")
    result = arch_finite_width(net, width=width)
    if out is not None:
        from derive.plots import arch_finite_width_plot

        _write_atomic(out, lambda tmp: arch_finite_width_plot(result, tmp))
    if fmt is Format.json:
        typer.echo(json.dumps(result.as_dict(), default=_json_number))
        return
    if fmt is Format.latex:
        fail("finite-width --arch: --format latex is not available for architectures (use text or json)")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: one input with x.x/n_0 = 1"
                  + (f", width {width}" if width else " (V and G1 per 1/n)"))
    columns = ["output", "K", "V", "G1", "Theta"] + (["V/(n K^2)", "G1/(n K)"] if width else [])
    table = Table(*columns)
    norm = result.normalised()
    for i, label in enumerate(result.labels):
        row = [label] + ["-" if result.values[q][i] is None else f"{result.values[q][i]:.6g}"
                         for q in ("K", "V", "G1", "Theta")]
        if width:
            row += ["-" if not np.isfinite(norm[k][i]) else f"{norm[k][i]:.4g}" for k in ("V_over_nK2", "G1_over_nK")]
        table.add_row(*row)
    console.print(table)
    console.print("'-': the output of an activation or layernorm is not a Gaussian point; its statistics "
                  "enter the next dense layer")
    if out is not None:
        console.print(f"wrote {out}")


def np_atleast(x):
    return x if isinstance(x, list) else [x]


@app.command()
def gram(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Number of dense layers L (returns K^(L), Theta^(L))."),
    cw: Optional[float] = typer.Option(None, "--cw", help="Weight variance C_W (W_ij ~ N(0, C_W / fan_in))."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    lambda_w: Optional[float] = typer.Option(None, "--lambda-w", help="NTK weight learning-rate factor (default C_W)."),
    lambda_b: Optional[float] = typer.Option(None, "--lambda-b", help="NTK bias learning-rate factor (default C_b)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs as a .npy array of shape (N, d). Default: 4 inputs in d = 8 drawn with seed 0."),
    input_kernel: Optional[Path] = typer.Option(None, "--input-kernel", help="Instead of --inputs: the input covariance x.x'/d as an (N, N) .npy matrix (checked PSD)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write arrays 'nngp' and 'ntk' to this .npz file."),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
    dtype: DType = typer.Option(DType.float64, "--dtype", help="Floating-point type of the computation."),
    arch: Optional[Path] = typer.Option(None, "--arch", help=ARCH_HELP + " Inputs (N, d) or (N, positions..., d); default: 3 inputs of 6 positions in d = 4 if the architecture uses positions, else 4 inputs in d = 8."),
    method: str = typer.Option("auto", "--method", help="Dense networks: 'auto' (the fast tiled evaluation where the derivation allows it), 'tiled' or 'direct' (whole matrices layer by layer, the reference)."),
    devices: Optional[int] = typer.Option(None, "--devices", help="Dense networks, tiled method: shard the rows of the Gram matrices over this many local devices."),
) -> None:
    """NNGP and NTK Gram matrices of a batch of inputs at depth L (jit-compiled JAX).

    Examples:

      derive gram --activation relu --depth 3 --cw 2 --cb 0

      derive gram --activation tanh --depth 10 --cw 1.5 --cb 0.1 --inputs x.npy --out kernels.npz

      derive gram --arch examples/architectures/cnn.toml --out cnn.npz
    """
    import numpy as np

    _activation_or_arch(activation, arch, "gram")
    if arch is not None:
        if depth is not None or cw is not None or input_kernel is not None:
            fail("gram --arch: the architecture file sets the depth and variances (no --depth, --cw, --input-kernel)")
        _arch_gram(arch, inputs, out, fmt)
        return
    if depth is None or cw is None:
        fail("gram: --depth and --cw are required with --activation")
    from derive import api

    if inputs is not None and input_kernel is not None:
        fail("give --inputs or --input-kernel, not both")
    if inputs is not None:
        x = _load_npy(inputs, "--inputs")
    elif input_kernel is not None:
        x = api.inputs_from_kernel(_load_npy(input_kernel, "--input-kernel"))
    else:
        x = np.random.default_rng(0).standard_normal((4, 8))
    if method not in ("auto", "tiled", "direct"):
        fail(f"--method must be auto, tiled or direct, got {method!r}")
    if devices is not None and devices < 1:
        fail("--devices must be at least 1")
    res = api.gram(activation, x, depth, cw, cb, lambda_w, lambda_b, params=param, dtype=dtype.value,
                   method=method, devices=devices)
    if out is not None:
        _write_atomic(out, lambda tmp: np.savez(open(tmp, "wb"), nngp=res.nngp, ntk=res.ntk))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": activation, "depth": depth, "C_W": cw, "C_b": cb,
                               "lambda_W": cw if lambda_w is None else lambda_w,
                               "lambda_b": cb if lambda_b is None else lambda_b,
                               "dtype": dtype.value, "nngp": res.nngp.tolist(), "ntk": res.ntk.tolist()}))
        return
    with np.printoptions(precision=6, suppress=False, linewidth=120):
        typer.echo(f"NNGP K^({depth}):\n{res.nngp}\nNTK Theta^({depth}):\n{res.ntk}")
    if out is not None:
        typer.echo(f"wrote {out}")


def _load_npy(path: Path, option: str):
    import numpy as np

    if not path.is_file():
        fail(f"{option}: no such file '{path}'")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for bad files
        fail(f"{option}: cannot read '{path}' as a .npy array ({type(exc).__name__})")


@app.command()
def activations(
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help=RULES_HELP),
) -> None:
    """List the activations the rules know, with their parameters.

    Example: derive activations
    """
    from derive.rules import activation_names, find_activation_rule

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
    from rich.table import Table

    table = Table("name", "sigma(z)", "parameters (default)", "family")
    for r in rows:
        table.add_row(r["name"], r["expression"], ", ".join(f"{k}={v}" for k, v in r["params"].items()), r["family"])
    Console().print(table)


@app.command()
def check(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP + " Optional with --claim-file if the file names one."),
    quantity: Optional[str] = typer.Option(None, "--quantity", "-q", help="What the claim is about: expectation, derivative_expectation, single_expectation, single_derivative_expectation, recursion, ntk_recursion, single_input, single_input_ntk, chi_par, chi_perp, or a finite-width map K, V, G1, Theta, A, B, D, F."),
    claim: Optional[str] = typer.Option(None, "--claim", help="The claimed expression in SymPy syntax, in K11, K12, K22, K, C_W, C_b, lambda_W, lambda_b, Theta12, Theta, V, G1, r, A, B, D, F, the activation's parameters, and rho = K12/sqrt(K11*K22), theta = acos(rho)."),
    claim_latex: Optional[str] = typer.Option(None, "--claim-latex", help="The claimed expression in LaTeX (K_{11}, C_W, \\lambda_W, \\Theta_{12}, \\rho, \\theta, \\frac, \\sqrt, \\arccos, ...)."),
    claim_file: Optional[Path] = typer.Option(None, "--claim-file", help="A TOML file of claims: activation = \"relu\", a table 'claims' (SymPy syntax) with a sub-table 'latex', and a table 'definitions' with a sub-table 'latex'; see derive.claims.load_claim_file."),
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
        typer.echo(json.dumps(rep.as_dict(), default=_json_number))
    else:
        typer.echo(rep.to_text())
    code = {"equal": 0, "not-equal": 1, "undecided": 3}[rep.verdict]
    if code:
        raise typer.Exit(code)


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
    from derive.errors import DeriveError
    from derive.gate import gate

    try:
        res = gate(activation, param, lam=lam, inputs=inputs, polynomial=polynomial,
                   rule_dirs=tuple(map(str, rules or ())))
        src = None
        if out is not None:
            from derive.gate_network import gate_source

            src = gate_source(res, lam)
    except DeriveError as exc:
        fail(str(exc))
    if out is not None:
        _write_atomic(out, lambda tmp: Path(tmp).write_text(src))
    if fmt is Format.json:
        typer.echo(json.dumps({**res.as_dict(), **({"wrote": str(out)} if out is not None else {})}))
    elif fmt is Format.latex:
        typer.echo(res.to_latex())
    else:
        import shutil

        typer.echo(res.to_text(width=min(max(shutil.get_terminal_size((80, 24)).columns, 40), 120)))
        if out is not None:
            typer.echo(f"wrote {out}")


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
        _write_atomic(out, lambda tmp: Path(tmp).write_text(src))
        typer.echo(f"wrote {out}")


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
    quantities: str = typer.Option("K,Theta", "--quantities", "-q", help="Comma-separated: K (kernel, every layer and input pair), Theta (output NTK), V (four-point vertex), G1 (NLO kernel), Theta_var (NTK fluctuation A + 2B/n), dNTK_P and dNTK_Q (the dNTK's correlations with the preactivations, PDLT ch. 11; slower: second derivatives per network)."),
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
    _activation_or_arch(activation, arch, "validate")
    if arch is not None:
        if widths is not None:
            if width is not None:
                fail("give --width or --widths, not both")
            _arch_validate_widths(arch, widths, samples, seed, z_max, fmt, quantities)
            return
        if width is None:
            fail("validate --arch: give --width N (kernels and NTK of a batch) or --widths n1,n2,n3 "
                 "(K, V, G1 of one input, fitted in 1/n)")
        _arch_validate(arch, width, samples, seed, inputs, z_max, fmt, out,
                       "Theta" in [q.strip() for q in quantities.split(",")])
        return
    if cw is None or depth is None:
        fail("validate: --cw and --depth are required with --activation")
    from derive.validate import EXTRAPOLATED, validate as run_validation

    several = None
    if widths is not None:
        try:
            several = [int(w) for w in widths.split(",") if w.strip()]
        except ValueError:
            fail(f"--widths '{widths}': expected comma-separated integers")
    if width is None and not several:
        fail("give --width N or --widths n1,n2,...")
    if out is not None:
        _check_png(out)
    x = None if inputs is None else _load_npy(inputs, "--inputs")
    report = run_validation(activation, cw, cb, depth, width=width, widths=several, samples=samples, seed=seed,
                            quantities=quantities, inputs=x, lambda_W=lambda_w, lambda_b=lambda_b, params=param,
                            z_max=z_max, progress=fmt is NumFormat.text, method=sampler)
    if out is not None:
        _write_atomic(out, report.plot)
    if fmt is NumFormat.json:
        typer.echo(json.dumps(report.as_dict()))
        raise typer.Exit(0 if report.passed else 1)
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def number(v) -> str:
        return "-" if v is None else f"{v:.5g}"

    console = Console()
    console.print(f"[bold]{report.activation}[/bold]: C_W = {report.C_W:g}, C_b = {report.C_b:g}, "
                  f"lambda_W = {report.lambda_W:g}, lambda_b = {report.lambda_b:g}, depth {report.depth}, "
                  f"width{'s' if len(report.widths) > 1 else ''} {', '.join(map(str, report.widths))}, "
                  f"{report.samples} networks per width, seed {report.seed}"
                  + (", conditional sampler" if report.method == "conditional" else ""))
    table = Table("quantity", "layer", "inputs", "width", "theory", "estimate", "+- error", "z", box=box.SIMPLE,
                  pad_edge=False)
    for r in report.results:
        z = r["z"]
        bad = r["checked"] and z is not None and not abs(z) < report.z_max
        z_text = "-" if z is None else f"{z:.2f}"
        if bad:
            z_text = f"[bold red]{z_text}[/bold red]"
        elif not r["checked"] and z is not None:
            z_text = f"[dim]{z_text}[/dim]"
        table.add_row(r["quantity"], str(r["layer"]), ",".join(map(str, r["inputs"])), str(r["width"]),
                      number(r["theory"]), number(r["estimate"]), f"{r['stderr']:.2g}", z_text)
    console.print(table)
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


# ----------------------------------------------------------------------------------------------
# --arch


def _arch_kernel(path: Path, fmt: Format) -> None:
    """Per-layer derived maps of an architecture (SymPy only: no JAX)."""
    from derive.arch import layer_maps

    net = _load_arch(path)
    rows = []
    for i, layer in enumerate(net.distinct_layers(), start=1):
        maps = layer_maps(layer)
        rows.append({"layer": i, "type": layer.type, "description": layer.describe(),
                     "kernel": maps.kernel, "ntk": maps.ntk, "single_kernel": maps.single_kernel,
                     "single_ntk": maps.single_ntk})
    if fmt is Format.json:
        typer.echo(json.dumps({"architecture": net.name, "description": net.describe(),
                               "layers": [{k: (_jsonable(v) if k in ("kernel", "ntk", "single_kernel", "single_ntk")
                                               else v) for k, v in r.items()} for r in rows]}))
        return
    if fmt is Format.latex:
        import sympy as sp

        typer.echo(f"% {net.name or path.name}")
        for r in rows:
            typer.echo(rf"% layer {r['layer']}: {r['description']}")
            typer.echo(rf"K'_{{12}} = {sp.latex(r['kernel'])} \\")
            typer.echo(rf"\Theta'_{{12}} = {sp.latex(r['ntk'])} \\")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: {len(rows)} distinct layers; recorded outputs: "
                  + ", ".join(label for label, _ in net.top_level()[:12])
                  + (" ..." if len(net.top_level()) > 12 else ""))
    table = Table("layer", "kernel map K'12", "NTK map Theta'12", "one input K'", show_lines=True)
    for r in rows:
        table.add_row(r["description"], str(r["kernel"]), str(r["ntk"]), str(r["single_kernel"]))
    console.print(table)
    console.print("symbols: K11, K12, K22 and Theta12 are the layer input's kernel and NTK; BK12, BTheta12 "
                  "the branch output's; patch, pool, spatial_mean, diagonal_mean, attend act on whole "
                  "Gram matrices (rules/layers/*.toml)")


def _arch_criticality(path: Path, k0: float, fmt: Format) -> None:
    from derive.arch_criticality import arch_criticality

    net = _load_arch(path)
    rep = arch_criticality(net, k0)
    d = rep.as_dict()
    if fmt is Format.json:
        typer.echo(json.dumps({"architecture": net.name, **d}))
        return
    if fmt is Format.latex:
        for r in d["layers"]:
            typer.echo(rf"% {r['label']}: K = {r['K']:.12g},\ \chi_\parallel = {r['chi_par']:.10g},"
                       rf"\ \chi_\perp = {r['chi_perp']:.10g}")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: single input, K^(0) = x.x/d = {k0:g}")
    table = Table("output", "K", "chi_par", "chi_perp")
    for r in d["layers"]:
        table.add_row(r["label"], f"{r['K']:.10g}", f"{r['chi_par']:.10g}", f"{r['chi_perp']:.10g}")
    console.print(table)
    for note in d["notes"]:
        console.print(note)


def _default_arch_inputs(net):
    import numpy as np

    needs_positions = any(l.rule.structural for l in net.distinct_layers())
    shape = (3, 6, 4) if needs_positions else (4, 8)
    return np.random.default_rng(0).standard_normal(shape)


def _arch_gram(path: Path, inputs: Optional[Path], out: Optional[Path], fmt: NumFormat) -> None:
    import numpy as np

    from derive.arch_kernels import arch_kernels

    net = _load_arch(path)
    x = _load_npy(inputs, "--inputs") if inputs is not None else _default_arch_inputs(net)
    res = arch_kernels(net, x)
    nngp, ntk = res.output
    if out is not None:
        _write_atomic(out, lambda tmp: np.savez(open(tmp, "wb"), nngp=nngp, ntk=ntk))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"architecture": net.name, "inputs_shape": list(x.shape), "shape": list(nngp.shape),
                               "nngp": nngp.tolist(), "ntk": ntk.tolist()}))
        return
    with np.printoptions(precision=6, suppress=False, linewidth=120):
        typer.echo(f"NNGP (shape {nngp.shape}):\n{nngp}\nNTK:\n{ntk}")
    if out is not None:
        typer.echo(f"wrote {out}")


def _arch_validate_widths(path: Path, widths: str, samples: int, seed: int, z_max: float, fmt: NumFormat,
                          quantities: str) -> None:
    """derive validate --arch --widths: the finite-width maps against sampled networks, fitted in 1/n."""
    from derive.arch_finite_width_check import CHECKED, check_finite_width

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
             "(the NTK fluctuations are derived for dense networks: use --activation)")
    net = _load_arch(path)
    if fmt is NumFormat.text:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("sampling networks", total=samples * len(ws))
            report = check_finite_width(net, ws, samples=samples, seed=seed, z_max=z_max, quantities=names,
                                        progress=lambda done, total: bar.update(task, completed=done))
    else:
        report = check_finite_width(net, ws, samples=samples, seed=seed, z_max=z_max, quantities=names)
    if fmt is NumFormat.json:
        typer.echo(json.dumps(report.as_dict()))
        raise typer.Exit(0 if report.passed else 1)
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: widths {', '.join(map(str, ws))}, {samples} networks "
                  f"each, seed {seed}; one input, fits a + b/n (K: a, G1: b; V: a of n Var(K_hat) - 2 E[K_hat]^2)")
    table = Table("quantity", "output", "theory", "fit", "+- error", "z", "detects", box=box.SIMPLE, pad_edge=False)
    for r in report.rows:
        z = r["z"]
        z_text = "-" if z is None else f"{z:.2f}"
        if z is not None and not abs(z) < z_max:
            z_text = f"[bold red]{z_text}[/bold red]"
        detects = f"{r['detectable']:.2g}" + (" [yellow](weak)[/yellow]" if r["weak"] else "")
        table.add_row(r["quantity"], r["layer"], f"{r['theory']:.5g}", f"{r['estimate']:.5g}", f"{r['stderr']:.2g}",
                      z_text, detects)
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
    from derive.arch_sampler import validate_arch

    net = _load_arch(path)
    if out is not None:
        _check_png(out)
    x = _load_npy(inputs, "--inputs") if inputs is not None else _default_arch_inputs(net)
    if fmt is NumFormat.text:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("sampling networks", total=samples)
            report = validate_arch(net, x, width, samples=samples, seed=seed, z_max=z_max, ntk=ntk,
                                   progress=lambda done: bar.update(task, completed=done))
    else:
        report = validate_arch(net, x, width, samples=samples, seed=seed, z_max=z_max, ntk=ntk)
    if out is not None:
        _write_atomic(out, report.plot)
    if fmt is NumFormat.json:
        typer.echo(json.dumps(report.as_dict()))
        raise typer.Exit(0 if report.passed else 1)
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: width {width}, {samples} networks, seed {seed}; "
                  "per output, the entry with the largest |z|")
    table = Table("quantity", "output", "entries", "entry (a,p)-(b,q)", "theory", "estimate", "+- error", "z",
                  box=box.SIMPLE, pad_edge=False)
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


def main() -> None:
    """Entry point of the ``derive`` command: one-line errors, exit status 2 for bad input."""
    from derive.errors import DeriveError

    try:
        app()
    except DeriveError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
