"""``derive criticality``, ``derive phase`` and ``derive profile``: criticality and signal propagation through depth."""

from __future__ import annotations

import json
import math
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
    check_png,
    fail,
    folded_table,
    json_number,
    load_arch_file,
    write_atomic,
)


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
    activation_or_arch(activation, arch, "criticality")
    if not 0 < k0 < math.inf:  # NaN fails too
        fail(f"need a finite --k0 > 0, got {k0}")
    if arch is not None:
        _arch_criticality(arch, k0, fmt)
        return
    from derive import api

    rep = api.criticality(activation, param, rule_dirs=tuple(map(str, rules or ())))
    d = rep.as_dict()
    if fmt is Format.json:
        typer.echo(json.dumps(d, default=json_number))
        return
    if fmt is Format.latex:
        import sympy as sp

        typer.echo(rf"% {d['activation']}: universality class {d['class']}")
        lines = [rf"\chi_\parallel(K) &= {sp.latex(rep.maps.chi_par)}",
                 rf"\chi_\perp(K) &= {sp.latex(rep.maps.chi_perp)}"]
        for p in rep.critical_points:
            cw = sp.latex(p.exact.get("C_W", p.C_W))
            cb = sp.latex(p.exact.get("C_b", p.C_b))
            k = p.exact.get("K_star", p.K_star)
            k = r"\text{any}" if str(k) == "any" else sp.latex(k)
            lines.append(rf"C_W &= {cw},\quad C_b = {cb},\quad K^* = {k}")
        typer.echo("\\begin{align}\n" + " \\\\\n".join(lines) + "\n\\end{align}")  # paste-ready (amsmath)
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{d['activation']}[/bold]: universality class [bold]{d['class']}[/bold]")
    if d.get("reason"):
        console.print(f"  {d['reason']}")
    table = folded_table("C_W", "C_b", "K*", "stability")
    for p in d["critical_points"]:
        table.add_row(p.get("C_W_exact", f"{p['C_W']:.12g}"), p.get("C_b_exact", f"{p['C_b']:.12g}"),
                      p.get("K_star_exact", f"{p['K_star']:.12g}"), p.get("stability", ""))
    if d["critical_points"]:
        console.print(table)
    from derive.symbolic.display import readable

    console.print(f"chi_par(K)  = {readable(rep.maps.chi_par)}", soft_wrap=True, markup=False, highlight=False)
    console.print(f"chi_perp(K) = {readable(rep.maps.chi_perp)}", soft_wrap=True, markup=False, highlight=False)
    console.print("Taylor data: " + ", ".join(f"{k} = {v}" for k, v in d["taylor"].items()))
    if "a1" in d:
        console.print(f"a1 = {d['a1_exact']}, b1 = {d['b1_exact']}, p_perp = {d['p_perp_exact']}")
    for k, v in d["asymptotics"].items():
        console.print(f"large depth: {k}^(l) ~ {v}")
    for k, v in d["learning_rates"].items():
        console.print(f"depth-scaled learning rate: {k}^(l) = {v}")


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

    check_png(out)
    if not (0.25 < cw_max < math.inf and 0 <= cb_max < math.inf and grid >= 4):  # NaN fails too
        fail("need a finite --cw-max > 0.25, a finite --cb-max >= 0 and --grid >= 4")
    rep = api.criticality(activation, param)
    points = [p.as_dict() for p in rep.critical_points]
    tmp_holder = {}

    def write(tmp):
        tmp_holder["data"] = phase_diagram(rep.activation, tmp, (0.25, cw_max), (0.0, cb_max), grid,
                                           critical_points=points)

    write_atomic(out, write)
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": rep.activation.name, "out": str(out), "critical_points": points,
                               **tmp_holder["data"]}, default=json_number))
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
    from derive.core.inputs import check_hyperparameters
    from derive.symbolic.signal import correlation_fixed_points, depth_profile

    check_hyperparameters(cw, cb, None, None, depth)
    if not (0 < k0 < math.inf and -1 <= rho0 <= 1):  # NaN fails too
        fail("need a finite --k0 > 0 and -1 <= --rho0 <= 1")
    if out is not None:
        check_png(out)
    act = api.activation(activation, param)
    prof = depth_profile(act, cw, cb, depth, k0, rho0)
    k_last = prof.K[-1]
    fps = correlation_fixed_points(act, cw, cb, float(k_last)) if np.isfinite(k_last) and k_last > 0 else []
    if out is not None:
        from derive.plots import depth_profile_plot

        write_atomic(out, lambda tmp: depth_profile_plot(act, prof, tmp, cw, cb))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": act.name, "C_W": cw, "C_b": cb, "depth": depth, "K0": k0,
                               "rho0": rho0, **prof.as_dict(), "correlation_fixed_points": fps},
                              default=json_number))
        return
    shown = sorted({0, depth - 1, *[min(depth - 1, 10**k - 1) for k in range(1, 6)]})
    for i in shown:
        typer.echo(f"layer {i + 1:>6}: K = {prof.K[i]:.6g}  rho = {prof.rho[i]:.6g}  "
                   f"chi_par = {prof.chi_par[i]:.6g}  chi_perp = {prof.chi_perp[i]:.6g}")
    for f in fps:
        kind = "marginal (tangent; a power-law approach)" if f["marginal"] else (
            "stable" if f["stable"] else "unstable")
        typer.echo(f"correlation fixed point rho* = {f['rho']:.10g}: chi_c = {f['chi_c']:.6g}, {kind}, "
                   f"depth scale {f['depth_scale']:.6g}")
    if out is not None:
        typer.echo(f"wrote {out}")


def _arch_criticality(path: Path, k0: float, fmt: Format) -> None:
    from derive.symbolic.arch_criticality import arch_criticality

    net = load_arch_file(path)
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

    console = Console()
    console.print(f"[bold]{net.name or path.name}[/bold]: single input, K^(0) = x.x/d = {k0:g}")
    table = folded_table("output", "K", "chi_par", "chi_perp")
    for r in d["layers"]:
        table.add_row(r["label"], f"{r['K']:.10g}", f"{r['chi_par']:.10g}", f"{r['chi_perp']:.10g}")
    console.print(table)
    for note in d["notes"]:
        console.print(note)
