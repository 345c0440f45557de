"""``derive predict``: infinite-width predictions of networks trained on given data."""

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
    fail,
    load_arch_file,
    load_npy,
    save_npz,
    write_atomic,
)

#: Rows of each mode's table printed as text (all of them go to --out and --format json).
SHOWN = 20


def demo_data():
    """Training and test inputs for a first try: y = sin(x . w) + noise in d = 4, seed 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    x_train, x_test = rng.standard_normal((32, 4)), rng.standard_normal((8, 4))
    w = rng.standard_normal(4) / 2
    return x_train, np.sin(x_train @ w) + 0.05 * rng.standard_normal(32), x_test


def task(inputs: Optional[Path], targets: Optional[Path], test_inputs: Optional[Path], command: str):
    """(x_train, y_train, x_test, demo?): the three files, or the demo task when none is given."""
    given = [p is not None for p in (inputs, targets, test_inputs)]
    if any(given) and not all(given):
        fail(f"{command}: give --inputs, --targets and --test-inputs together (or none of them for the demo task)")
    if not any(given):
        return (*demo_data(), True)
    return (*(load_npy(p, o) for p, o in ((inputs, "--inputs"), (targets, "--targets"),
                                          (test_inputs, "--test-inputs"))), False)


def _times(values: Optional[List[str]], option: str):
    if not values:
        return None
    out = []
    for v in values:
        if v.strip().lower() in ("inf", "infinity"):
            out.append(float("inf"))
            continue
        try:
            out.append(float(v))
        except ValueError:
            fail(f"{option}: expected a number or 'inf', got {v!r}")
    return out


@app.command()
def predict(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Number of dense layers L."),
    cw: Optional[float] = typer.Option(None, "--cw", help="Weight variance C_W."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    lambda_w: Optional[float] = typer.Option(None, "--lambda-w", help="NTK weight learning-rate factor (default C_W)."),
    lambda_b: Optional[float] = typer.Option(None, "--lambda-b", help="NTK bias learning-rate factor (default C_b)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    arch: Optional[Path] = typer.Option(None, "--arch", help=ARCH_HELP + " Its output must have no positions."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Training inputs, .npy of shape (N, d) (with --targets and --test-inputs; default: a small generated regression task)."),
    targets: Optional[Path] = typer.Option(None, "--targets", help="Training targets, .npy of shape (N,) or (N, k)."),
    test_inputs: Optional[Path] = typer.Option(None, "--test-inputs", help="Test inputs, .npy of shape (M, d)."),
    time: Optional[List[str]] = typer.Option(None, "--time", "-t", help="Gradient-flow time t (repeatable; 'inf' or absent: trained to convergence). The learning rate multiplies it."),
    steps: Optional[List[int]] = typer.Option(None, "--steps", help="Instead of --time: discrete gradient-descent steps (repeatable)."),
    learning_rate: float = typer.Option(1.0, "--learning-rate", "--lr", help="Learning rate eta of the loss |f(X) - Y|^2 / (2 |Y|) (Neural Tangents' convention)."),
    noise: float = typer.Option(0.0, "--noise", help="Observation noise variance added to the train-train kernel's diagonal."),
    mode: Optional[List[str]] = typer.Option(None, "--mode", "-m", help="nngp (GP posterior / last layer trained), ntk (all layers trained by gradient descent) or ntkgp (GP posterior with the NTK); repeatable; default nngp and ntk."),
    full_covariance: bool = typer.Option(False, "--full-covariance", help="Also the full (M, M) test covariance (in --out and JSON); default the per-point variances."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write '<mode>_mean' and '<mode>_variance' (and '<mode>_covariance') arrays to this .npz file."),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
) -> None:
    """Predictions of infinitely wide networks trained on your data: the Gaussian-process posterior
    and the infinite ensemble trained by gradient descent on the mean squared error, at time t or
    at convergence (means and variances over initialisations; nt.predict's conventions).

    Examples:

      derive predict --activation relu --depth 3 --cw 2

      derive predict -a erf -L 5 --cw 1.5 --cb 0.05 --inputs x.npy --targets y.npy --test-inputs xt.npy --time 10 --time inf --out pred.npz

      derive predict --arch examples/architectures/residual_mlp.toml --steps 100 --lr 0.5
    """
    import numpy as np

    from derive import api

    activation_or_arch(activation, arch, "predict")
    x_train, y_train, x_test, demo = task(inputs, targets, test_inputs, "predict")
    t = _times(time, "--time")
    if t is not None and steps:
        fail("predict: give --time or --steps, not both")
    if t is not None and any(np.isposinf(t)):  # -inf goes on to be refused
        if len(t) > 1:
            fail("predict: ask --time inf on its own (converged predictions), finite times together")
        t = None
    if t is not None and len(t) == 1:
        t = t[0]
    steps = None if not steps else (steps[0] if len(steps) == 1 else list(steps))
    modes = tuple(mode) if mode else ("nngp", "ntk")
    covariance = "full" if full_covariance else "diagonal"
    if arch is not None:
        if depth is not None or cw is not None:
            fail("predict --arch: the architecture file sets the depth and variances (no --depth, --cw)")
        net = load_arch_file(arch)
        res = api.predict(net, x_train, y_train, x_test, t=t, steps=steps, learning_rate=learning_rate,
                          noise=noise, get=modes, covariance=covariance)
        network = {"architecture": net.name or str(arch)}
    else:
        if depth is None or cw is None:
            fail("predict: --depth and --cw are required with --activation")
        res = api.predict(activation, x_train, y_train, x_test, depth, cw, cb, lambda_w, lambda_b, t=t,
                          steps=steps, learning_rate=learning_rate, noise=noise, get=modes,
                          covariance=covariance, params=param)
        network = {"activation": activation, "depth": depth, "C_W": cw, "C_b": cb}
    if out is not None:
        arrays = {}
        for m, g in res.modes.items():
            arrays[f"{m}_mean"] = g.mean
            arrays[f"{m}_variance"] = g.variance
            if g.full:
                arrays[f"{m}_covariance"] = g.covariance
        write_atomic(out, lambda tmp: save_npz(tmp, **arrays))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({**network, "demo_data": demo, **res.to_dict()}))
        return
    typer.echo(_text(res, network, demo))
    if out is not None:
        typer.echo(f"wrote {out}")


def _text(res, network: dict, demo: bool) -> str:
    import textwrap

    import numpy as np

    what = ", ".join(f"{k} {v}" for k, v in network.items())
    header = [f"Infinite-width predictions: {what}",
              f"{res.time_label}; learning rate {res.learning_rate:g}, noise {res.noise:g}; {res.n_train} training "
              f"points, {res.n_test} test points"]
    if demo:
        header.append("Demo task: y = sin(x.w) + noise in d = 4 (give --inputs, --targets and --test-inputs for "
                      "your data).")
    lines = [textwrap.fill(h, 78, subsequent_indent="  ", break_on_hyphens=False) for h in header]
    names = {"nngp": "nngp: GP posterior" if res.times is None else "nngp: last layer trained",
             "ntk": "ntk: all layers trained (gradient descent on the MSE)",
             "ntkgp": "ntkgp: GP posterior with the NTK"}
    for m, g in res.modes.items():
        mean, var = np.asarray(g.mean), np.asarray(g.variance)
        label = "output"
        if res.times is not None and len(res.times) > 1:
            mean, var = mean[-1], var[-1]
            label += f" at the last time ({res.times[-1]:g})"
        if mean.ndim == 2:
            label = f"output 0 of {mean.shape[1]}" + label[len("output"):]
            mean = mean[:, 0]
        lines += ["", names[m], f"  {label}" + (f"; jitter {res.jitter[m]:g} added" if res.jitter.get(m) else ""),
                  f"{'test point':>10}  {'mean':>14}  {'std':>14}"]
        for i in range(min(len(mean), SHOWN)):
            lines.append(f"{i:>10}  {mean[i]:>14.8g}  {np.sqrt(max(var[i], 0.0)):>14.8g}")
        if len(mean) > SHOWN:
            lines.append(f"({SHOWN} of {len(mean)} test points shown; --out FILE.npz or --format json for all)")
    return "\n".join(lines)


def _widths(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        fail(f"--widths: expected comma-separated integers, got {text!r}")


@app.command("validate-trained")
def validate_trained(
    activation: str = typer.Option(..., "--activation", "-a", help=ACTIVATION_HELP),
    depth: int = typer.Option(..., "--depth", "-L", help="Number of dense layers L."),
    cw: float = typer.Option(..., "--cw", help="Weight variance C_W."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    lambda_w: Optional[float] = typer.Option(None, "--lambda-w", help="NTK weight learning-rate factor (default C_W)."),
    lambda_b: Optional[float] = typer.Option(None, "--lambda-b", help="NTK bias learning-rate factor (default C_b)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Training inputs (N, d) .npy (with --targets and --test-inputs; default: the demo task of 'derive predict', 8 training and 4 test points)."),
    targets: Optional[Path] = typer.Option(None, "--targets", help="Training targets (N,) or (N, k) .npy."),
    test_inputs: Optional[Path] = typer.Option(None, "--test-inputs", help="Test inputs (M, d) .npy."),
    widths: str = typer.Option("32,64,128", "--widths", help="Hidden widths n (three or more, comma-separated): the ensemble statistics are fitted as a + b/n."),
    networks: int = typer.Option(1000, "--networks", "-S", help="Networks trained per width."),
    steps: Optional[List[int]] = typer.Option(None, "--steps", help="Checkpoints: gradient-descent steps at which the test outputs are compared (repeatable; default 0, 50, 500)."),
    learning_rate: float = typer.Option(1.0, "--learning-rate", "--lr", help="Learning rate eta (loss |f(X) - Y|^2 / (2 |Y|))."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same numbers."),
    mode: str = typer.Option("ntk", "--mode", help="Prediction compared: ntk (every layer trained: what the networks do) or nngp (only the last layer; trained networks reject it when the run has power)."),
    z_max: float = typer.Option(5.0, "--z-max", help="A |z| at or above this fails the check (exit status 1)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Plot the ensemble statistics against 1/n (.png, .pdf or .svg)."),
    fmt: NumFormat = typer.Option(NumFormat.text, "--format", "-f", help="Output format."),
) -> None:
    """Infinite-width predictions against ensembles of finite-width networks trained by gradient
    descent: at each width, the mean and variance of every test output over the ensemble, fitted in
    1/n and compared with 'derive predict --steps' at n = infinity. Exit status 0 when every |z| <
    --z-max, 1 otherwise.

    Examples:

      derive validate-trained -a tanh -L 3 --cw 1.5 --cb 0.05 --widths 16,32,64 --networks 500

      derive validate-trained -a relu -L 3 --cw 2 --steps 0 --steps 200 --out trained.png
    """

    from derive import api
    from derive.cli.app import check_png

    x_train, y_train, x_test, demo = task(inputs, targets, test_inputs, "validate-trained")
    if demo:  # a smaller task: training runs per network
        x_train, y_train, x_test = x_train[:8], y_train[:8], x_test[:4]
    if out is not None:
        check_png(out)
    report = api.validate_trained(activation, x_train, y_train, x_test, depth, cw, cb, lambda_w, lambda_b,
                                  widths=_widths(widths), n_networks=networks, steps=tuple(steps or (0, 50, 500)),
                                  learning_rate=learning_rate, seed=seed, mode=mode, z_max=z_max, params=param,
                                  progress=True)  # on stderr, whatever the format
    if out is not None:
        write_atomic(out, lambda tmp: report.plot(tmp))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": activation, "depth": depth, "C_W": cw, "C_b": cb,
                               "demo_data": demo, **report.to_dict()}))
    else:
        verdict = "PASSED" if report.passed else "FAILED"
        lines = [f"Trained ensembles ({activation}, depth {depth}, C_W {cw:g}, C_b {cb:g}; widths {widths}, "
                 f"{networks} networks each, learning rate {learning_rate:g}) against the infinite-width "
                 f"{mode} prediction: {verdict} (worst |z| = {abs(report.worst.z):.2f}, limit {z_max:g})",
                 "fit n->inf: the intercept of a + b/n over the widths; '"
                 f"{z_max:g} se': the smallest deviation this run could detect.", ""]
        import textwrap

        typer.echo("\n".join(textwrap.fill(line, 78) if len(line) > 80 else line for line in lines))
        typer.echo("\n".join(report.table()))
        loss = ", ".join(f"n={w}: {v:.3g}" for w, v in report.final_loss.items())
        typer.echo(textwrap.fill(f"mean training loss at the last checkpoint: {loss}", 78))
        if out is not None:
            typer.echo(f"wrote {out}")
    raise typer.Exit(0 if report.passed else 1)
