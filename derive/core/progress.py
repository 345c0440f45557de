"""Progress of long runs (sampling, training), on stderr and never on stdout.

Every long-running public function takes ``progress``: ``False`` (silent), ``True`` (the default of
the :mod:`derive` facade) or a callable of its own documented signature. With ``True``, a terminal
or a notebook gets a live bar (rich); any other stderr (a pipe, a log file, CI) gets one line when a
stage starts and one when it ends, so that logs stay readable and JSON on stdout stays clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _in_notebook() -> bool:
    """Whether this process is a running Jupyter kernel (not merely one that imported IPython)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _interactive() -> bool:
    if _in_notebook():  # rich renders its bar in the cell's output
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(what: str, total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``(update(done), close())`` for a stage of ``total`` steps named ``what``."""
    start = time.perf_counter()
    if _interactive():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        live = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
        live.start()
        task = live.add_task(what, total=total)
        return (lambda done: live.update(task, completed=done)), live.stop
    print(f"derive: {what}...", file=sys.stderr, flush=True)

    def close():
        print(f"derive: {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    return (lambda done: None), close


def stage(progress, what: str, total: int, adapt: Callable | None = None):
    """``(callback, close)`` for a function's ``progress`` argument: None for False; for True a
    :func:`bar`; a callable is passed through ``adapt`` (to the callee's signature) or as it is."""
    if not progress:
        return None, lambda: None
    if progress is True:
        return bar(what, total)
    return (progress if adapt is None else adapt(progress)), lambda: None


__all__ = ["bar", "stage"]
