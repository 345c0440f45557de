"""The ``derive`` command: a thin layer over the API, one module per command in :mod:`derive.cli`.

Each command parses its options, calls one API function and prints the result as text (for
people), LaTeX (for papers) or JSON (one object on stdout, for tools). Bad input exits with
status 2 and a one-line message on stderr. Symbolic commands never import JAX.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import typer

# importing a command module registers its commands on the app, in this order in --help
# isort: off
from derive.cli import kernel, criticality, finite_width, gram, predict, validate, check, gate  # noqa: F401
# isort: on
from derive.cli.app import app, flow_help

flow_help()


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``derive`` command: one-line errors, exit status 2 for bad input.

    Bad input (a :class:`~derive.core.errors.DeriveError`, an unknown option, a value of the wrong type,
    input nested too deeply to parse) prints one line ``error: ...`` on stderr and exits with status 2;
    Ctrl-C exits with 130 (files being written are left as they were). ``DERIVE_DEBUG=1`` shows the
    traceback of an unexpected error instead of its one line (exit status 1).
    """
    from typer._click.exceptions import ClickException  # typer vendors click

    from derive.core.errors import DeriveError

    if "jax" not in sys.modules:  # a process of its own: JAX in float64 throughout (read at JAX's import)
        os.environ["JAX_ENABLE_X64"] = "1"
    previous = _stop_on_interrupt()
    try:
        status = app(args=args, standalone_mode=False)
    except DeriveError as exc:
        _error(str(exc), 2)
    except ClickException as exc:  # usage errors: one line, not a boxed usage message
        _error(exc.format_message(), exc.exit_code)
    except typer.Abort:
        _error("aborted", 1)
    except KeyboardInterrupt:
        _error("interrupted", 130)
    except RecursionError:
        _error("the input is nested too deeply to read", 2)
    except MemoryError:
        _error("out of memory (DERIVE_MAX_MEMORY sets the limit the work estimates are checked against)", 2)
    except Exception as exc:
        if os.environ.get("DERIVE_DEBUG"):
            raise
        _error(f"internal error ({type(exc).__name__}: {exc}); please report it (DERIVE_DEBUG=1 shows the "
               "traceback)", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(status if isinstance(status, int) else 0)


def _stop_on_interrupt():
    """Ctrl-C stops the command at once: the temporary files of writes in progress are removed (their
    targets keep their previous content), one line goes to stderr, exit status 130.

    A KeyboardInterrupt raised wherever Python happens to be would not do: raised inside a garbage
    collector callback (JAX installs one) it is reported as "ignored" and the run goes on, and raised
    inside a native library's initialisation it can crash the process. Returns the previous handler
    (restored when :func:`main` returns), or None off the main thread, where none can be set.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        from derive.core.files import discard_pending

        discard_pending()
        os.write(2, b"error: interrupted\n")
        os._exit(130)

    return signal.signal(signal.SIGINT, stop)


def _error(message: str, code: int) -> None:
    """``error: message`` on one line of stderr, then exit with ``code``."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if line:  # no arguments: the help was printed, with no error to add
        typer.echo(f"error: {line}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
