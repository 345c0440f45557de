"""The ``derive`` command's application: output formats, shared option help, one-line errors, atomic writes."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

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


def flow_help() -> None:
    """Give every command its docstring as help with each paragraph on one line (the terminal wraps
    it): rich help keeps a docstring's line breaks, which cut sentences at the source's width. Indented
    lines (examples) stay as they are."""
    import inspect

    for command in app.registered_commands:
        if command.help is not None or command.callback is None or not command.callback.__doc__:
            continue
        paragraphs = []
        for paragraph in inspect.cleandoc(command.callback.__doc__).split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append(paragraph)
            else:
                paragraphs.append(" ".join(line.strip() for line in lines))
        command.help = "\n\n".join(paragraphs)


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


ARCH_HELP = ("Architecture file (TOML: \\[\\[layers]] of dense, activation, layernorm, residual, conv, avg_pool, "
             "global_avg_pool, flatten, attention, repeat; see examples/architectures/) instead of --activation.")


def activation_or_arch(activation, arch, command: str, arch_ok: bool = True) -> None:
    if activation is not None and arch is not None:
        fail(f"{command}: give --activation or --arch, not both")
    if activation is None and arch is None:
        fail(f"{command}: give --activation" + (" or --arch" if arch_ok else ""))


def load_arch_file(path: Path):
    from derive.arch.description import load_arch

    return load_arch(path)


def folded_table(*columns: str, **options):
    """A rich table whose every column folds what does not fit (formulas and numbers are never cut
    with an ellipsis, at any terminal width and when piped)."""
    from rich.table import Table

    table = Table(**options)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def jsonable(expr) -> str:
    return str(expr)


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, renamed into place when complete
    (:func:`derive.core.files.write_atomic`; Ctrl-C or an error leaves the previous file)."""
    from derive.core.errors import DeriveError
    from derive.core.files import write_atomic as write_file

    try:
        write_file(path, write)
    except DeriveError as exc:
        fail(str(exc))


def save_npz(path: str, **arrays) -> None:
    """``arrays`` into the .npz file ``path`` as given (np.savez would add .npz to another suffix)."""
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, **arrays)


def json_number(x):
    return None if x != x else float(x)


def check_png(out: Path) -> None:
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        fail(f"--out '{out}': give a .png, .pdf or .svg file name")
    folder = out.expanduser().parent
    if not folder.is_dir():
        fail(f"cannot write '{out}': folder '{folder}' does not exist")


def np_atleast(x):
    return x if isinstance(x, list) else [x]


def load_npy(path: Path, option: str):
    import numpy as np

    if not path.is_file():
        fail(f"{option}: no such file '{path}'")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for bad files
        fail(f"{option}: cannot read '{path}' as a .npy array ({type(exc).__name__})")


def default_arch_inputs(net):
    import numpy as np

    needs_positions = any(l.rule.structural for l in net.distinct_layers())
    shape = (3, 6, 4) if needs_positions else (4, 8)
    return np.random.default_rng(0).standard_normal(shape)


def uses_positions(net) -> bool:
    return any(l.rule.structural for l in net.distinct_layers())


def finite_width_inputs(net, inputs: Optional[Path]):
    import numpy as np

    if inputs is not None:
        return load_npy(inputs, "--inputs")
    return np.random.default_rng(0).standard_normal((1, 6, 4) if uses_positions(net) else (1, 8))
