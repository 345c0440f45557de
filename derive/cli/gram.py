"""``derive gram``: NNGP and NTK Gram matrices of a batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from derive.cli.app import (
    ACTIVATION_HELP,
    ARCH_HELP,
    PARAM_HELP,
    DType,
    NumFormat,
    activation_or_arch,
    app,
    default_arch_inputs,
    fail,
    load_arch_file,
    load_npy,
    save_npz,
    write_atomic,
)


@app.command()
def gram(
    activation: Optional[str] = typer.Option(None, "--activation", "-a", help=ACTIVATION_HELP),
    depth: Optional[int] = typer.Option(None, "--depth", "-L", help="Number of dense layers L (returns K^(L), Theta^(L))."),
    cw: Optional[float] = typer.Option(None, "--cw", help="Weight variance C_W (W_ij ~ N(0, C_W / fan_in))."),
    cb: float = typer.Option(0.0, "--cb", help="Bias variance C_b."),
    lambda_w: Optional[float] = typer.Option(None, "--lambda-w", help="NTK weight learning-rate factor (default C_W)."),
    lambda_b: Optional[float] = typer.Option(None, "--lambda-b", help="NTK bias learning-rate factor (default C_b)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs as a .npy array of shape (N, d). Default: 4 inputs in d = 8 drawn with seed 0."),
    test_inputs: Optional[Path] = typer.Option(None, "--test-inputs", help="Test inputs (M, d) as .npy: the (M, N) test-train blocks K(x_test, x_train) instead of the Gram matrices of --inputs (the training inputs)."),
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

      derive gram -a relu --depth 3 --cw 2 --inputs train.npy --test-inputs test.npy
    """
    import numpy as np

    activation_or_arch(activation, arch, "gram")
    if arch is not None:
        if depth is not None or cw is not None or input_kernel is not None:
            fail("gram --arch: the architecture file sets the depth and variances (no --depth, --cw, --input-kernel)")
        _arch_gram(arch, inputs, out, fmt, test_inputs)
        return
    if depth is None or cw is None:
        fail("gram: --depth and --cw are required with --activation")
    from derive import api
    from derive.core.inputs import inputs_from_kernel

    if inputs is not None and input_kernel is not None:
        fail("give --inputs or --input-kernel, not both")
    if test_inputs is not None and inputs is None:
        fail("--test-inputs needs --inputs (the training inputs)")
    if inputs is not None:
        x = load_npy(inputs, "--inputs")
    elif input_kernel is not None:
        x = inputs_from_kernel(load_npy(input_kernel, "--input-kernel"))
    else:
        x = np.random.default_rng(0).standard_normal((4, 8))
    if method not in ("auto", "tiled", "direct"):
        fail(f"--method must be auto, tiled or direct, got {method!r}")
    if devices is not None and devices < 1:
        fail("--devices must be at least 1")
    x_test = None if test_inputs is None else load_npy(test_inputs, "--test-inputs")
    res = api.gram(activation, x, depth, cw, cb, lambda_w, lambda_b, params=param, dtype=dtype.value,
                   method=method, devices=devices, x_test=x_test)
    if out is not None:
        write_atomic(out, lambda tmp: save_npz(tmp, nngp=res.nngp, ntk=res.ntk))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"activation": activation, "depth": depth, "C_W": cw, "C_b": cb,
                               "lambda_W": cw if lambda_w is None else lambda_w,
                               "lambda_b": cb if lambda_b is None else lambda_b,
                               "dtype": dtype.value, "nngp": res.nngp.tolist(), "ntk": res.ntk.tolist()}))
        return
    with np.printoptions(precision=6, suppress=False, linewidth=120):
        which = "" if x_test is None else " (test x train)"
        typer.echo(f"NNGP K^({depth}){which}:\n{res.nngp}\nNTK Theta^({depth}){which}:\n{res.ntk}")
    if out is not None:
        typer.echo(f"wrote {out}")




def _arch_gram(path: Path, inputs: Optional[Path], out: Optional[Path], fmt: NumFormat,
               test_inputs: Optional[Path] = None) -> None:
    import numpy as np

    from derive import api

    net = load_arch_file(path)
    if test_inputs is not None and inputs is None:
        fail("--test-inputs needs --inputs (the training inputs)")
    x = load_npy(inputs, "--inputs") if inputs is not None else default_arch_inputs(net)
    x_test = None if test_inputs is None else load_npy(test_inputs, "--test-inputs")
    res = api.arch_gram(net, x, x_test=x_test)
    nngp, ntk = res.nngp, res.ntk
    if out is not None:
        write_atomic(out, lambda tmp: save_npz(tmp, nngp=nngp, ntk=ntk))
    if fmt is NumFormat.json:
        typer.echo(json.dumps({"architecture": net.name, "inputs_shape": list(x.shape), "shape": list(nngp.shape),
                               "nngp": nngp.tolist(), "ntk": ntk.tolist()}))
        return
    with np.printoptions(precision=6, suppress=False, linewidth=120):
        typer.echo(f"NNGP (shape {nngp.shape}):\n{nngp}\nNTK:\n{ntk}")
    if out is not None:
        typer.echo(f"wrote {out}")
