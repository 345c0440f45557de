"""The ``derive`` command: a thin layer over the API, one module per command in :mod:`derive.cli`.

Each command parses its options, calls one API function and prints the result as text (for
people), LaTeX (for papers) or JSON (one object on stdout, for tools). Bad input exits with
status 2 and a one-line message on stderr. Symbolic commands never import JAX.
"""

from __future__ import annotations

import sys

import typer

# importing a command module registers its commands on the app, in this order in --help
# isort: off
from derive.cli import kernel, criticality, finite_width, gram, predict, validate, check, gate  # noqa: F401
# isort: on
from derive.cli.app import app


def main() -> None:
    """Entry point of the ``derive`` command: one-line errors, exit status 2 for bad input."""
    from derive.core.errors import DeriveError

    try:
        app()
    except DeriveError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
